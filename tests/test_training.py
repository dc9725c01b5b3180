"""The reusable training library: loss, steps, optimizer, data parallelism, data, presets."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqx_vision as ev
from eqx_vision import data, presets, training


def _batch(config: presets.ModelConfig, n: int = 8, seed: int = 1):
    x = jr.normal(jr.key(seed), (n, config.channels, *config.image_size))
    y = jnp.arange(n) % config.num_classes
    return x, y


def _config(preset: str, size: int = 16, num_classes: int = 4) -> presets.ModelConfig:
    return presets.resolve_model(preset, num_classes=num_classes, data_channels=1, image_size=size)


def test_is_stateful():
    vit, vit_state = _config("vit-tiny").build_like()
    cvt, cvt_state = _config("cvt-tiny").build_like()
    assert not training.is_stateful(vit) and jax.tree.leaves(vit_state) == []
    assert training.is_stateful(cvt) and jax.tree.leaves(cvt_state)


def test_apply_model_stateless_and_stateful():
    for preset in ("vit-tiny", "cvt-tiny"):
        config = _config(preset)
        model, state = config.build_like()
        x = jax.ShapeDtypeStruct((8, config.channels, *config.image_size), jnp.float32)
        logits, new_state = eqx.filter_eval_shape(
            lambda m, s, x: training.apply_model(m, s, x, key=jr.key(2)), model, state, x
        )
        assert logits.shape == (8, 4)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for leaf in jax.tree.leaves(new_state):  # unbatched: out_axes=None for the state
            assert leaf.ndim <= 2


def test_levit_distillation_head_uses_the_class_logits():
    model, state = eqx.nn.make_with_state(ev.LeViT)(
        image_size=32, num_classes=3, dim=(16, 32), depth=1, heads=(1, 2), mlp_mult=2,
        stages=2, dim_key=8, dim_value=16, num_distill_classes=3, key=jr.key(0),
    )  # fmt: skip
    x = jr.normal(jr.key(1), (4, 3, 32, 32))
    model = eqx.nn.inference_mode(model)

    @eqx.filter_jit
    def both(model, state, x):
        logits, _ = training.apply_model(model, state, x)
        expected, _ = jax.vmap(model, in_axes=(0, None))(x, state)
        loss, _ = training.loss_fn(model, state, x, jnp.arange(4) % 3)
        return logits, expected, loss

    logits, expected, loss = both(model, state, x)
    assert isinstance(expected, tuple)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected[0]))
    assert loss.shape == () and jnp.isfinite(loss)


@pytest.mark.parametrize("preset", ["vit-tiny", "cvt-tiny"])
def test_train_step_learns_and_updates_state(preset):
    config = _config(preset)
    model, state = config.build(jr.key(0))
    optimizer = training.make_optimizer(3e-3, weight_decay=0.0, warmup_steps=0, total_steps=30)
    opt_state = training.init_optimizer(optimizer, model)
    x, y = _batch(config)
    losses = []
    for i in range(12):
        model, new_state, opt_state, loss = training.train_step(
            model, state, opt_state, x, y, jr.key(i), optimizer=optimizer
        )
        if training.is_stateful(model):  # BatchNorm running statistics move
            before, after = jax.tree.leaves(state)[0], jax.tree.leaves(new_state)[0]
            assert not np.array_equal(np.asarray(before), np.asarray(after))
        state = new_state
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("preset", ["vit-tiny", "cvt-tiny"])
def test_train_step_with_donated_buffers(preset):
    """`eqx.filter_jit(train_step, donate="all")`, as the training guide suggests for loops
    that rebind everything: the same steps, and the donated inputs are consumed."""
    config = _config(preset)
    optimizer = training.make_optimizer(3e-3, weight_decay=0.0, warmup_steps=0, total_steps=30)
    donating = eqx.filter_jit(training.train_step, donate="all")
    runs = {}
    for name, step in (("plain", training.train_step), ("donated", donating)):
        model, state = config.build(jr.key(0))
        opt_state = training.init_optimizer(optimizer, model)
        losses = []
        for i in range(3):
            x, y = _batch(config, seed=i)  # a fresh batch every step
            old_weight = jax.tree.leaves(eqx.filter(model, eqx.is_array))[0]
            model, state, opt_state, loss = step(
                model, state, opt_state, x, y, jr.key(i), optimizer=optimizer
            )
            losses.append(float(loss))
            assert old_weight.is_deleted() == (name == "donated")
        runs[name] = losses
    np.testing.assert_allclose(runs["donated"], runs["plain"], rtol=1e-6)


def test_eval_step_mask():
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    x, y = _batch(config)
    loss, acc, logits = training.eval_step(model, state, x, y)
    mask = jnp.arange(8) < 5
    mloss, macc, mlogits = training.eval_step(model, state, x, y, mask)
    sub_loss, sub_acc, _ = training.eval_step(model, state, x[:5], y[:5])
    np.testing.assert_allclose(float(mloss), float(sub_loss), rtol=1e-6)
    np.testing.assert_allclose(float(macc), float(sub_acc))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(mlogits))
    assert logits.shape == (8, 4) and 0 <= float(acc) <= 1


def test_schedule_warmup_then_cosine():
    schedule = training.learning_rate_schedule(1.0, warmup_steps=10, total_steps=110)
    values = [float(np.asarray(schedule(i))) for i in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.make_optimizer(1e-3, warmup_steps=20, total_steps=10)


def test_batches_depend_on_seed_and_epoch_only():
    a = training.batches(100, 16, seed=3, epoch=2)
    b = training.batches(100, 16, seed=3, epoch=2)
    c = training.batches(100, 16, seed=3, epoch=3)
    assert len(a) == 6 and all(len(i) == 16 for i in a)
    assert all(np.array_equal(i, j) for i, j in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert len(np.unique(np.concatenate(a))) == 96


# (The CvT case runs through the command line in test_cli.py.)
@pytest.mark.parametrize("preset", ["vit-tiny"])
def test_data_parallel_equals_single_device(preset):
    assert jax.local_device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    config = _config(preset)
    x, y = _batch(config, n=16)
    optimizer = training.make_optimizer(1e-3, warmup_steps=1, total_steps=10)

    def run(parallel):
        model, state = config.build(jr.key(0))
        opt_state = training.init_optimizer(optimizer, model)
        images, labels = x, y
        if parallel is not None:
            model, state, opt_state = parallel.replicate((model, state, opt_state))
            images, labels = parallel.shard_batch((x, y))
            assert len(images.sharding.device_set) == parallel.num_devices
        losses = []
        for i in range(4):
            model, state, opt_state, loss = training.train_step(
                model, state, opt_state, images, labels, jr.key(i), optimizer=optimizer,
                parallel=parallel,
            )  # fmt: skip
            losses.append(float(loss))
        return np.array(losses), model, state

    single, model1, state1 = run(None)
    multi, model4, state4 = run(training.DataParallel.create(4))
    np.testing.assert_allclose(multi, single, rtol=1e-5)
    # Parameters agree to the size of one update (1e-3): Adam turns the rounding noise of
    # a gradient that is exactly zero in exact arithmetic (a conv bias before BatchNorm)
    # into steps of +-lr, whose signs depend on the order of the batch reduction.
    leaves4 = jax.tree.leaves(eqx.filter(model4, eqx.is_array))
    leaves1 = jax.tree.leaves(eqx.filter(model1, eqx.is_array))
    for a, b in zip(leaves4, leaves1, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=4e-3)
    for a, b in zip(jax.tree.leaves(state4), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)


def test_data_parallel_errors():
    with pytest.raises(ValueError, match="num_devices"):
        training.DataParallel.create(jax.local_device_count() + 1)
    parallel = training.DataParallel.create(4)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        parallel.shard_batch(np.zeros((6, 2)))


def test_digits_split_is_fixed_and_stratified():
    raw = data.load_digits()
    assert len(raw.train_labels) + len(raw.test_labels) == 1797
    assert raw.channels == 1 and raw.num_classes == 10
    counts = np.bincount(raw.test_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    again = data.load_digits()
    np.testing.assert_array_equal(raw.test_images, again.test_images)
    ds = data.prepare(raw, channels=3, image_size=(16, 16))
    assert ds.train_images.shape == (len(raw.train_labels), 3, 16, 16)
    assert ds.train_images.dtype == np.float32
    assert -1.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    np.testing.assert_array_equal(ds.train_images[:, 0], ds.train_images[:, 2])


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 5)
    for shape in [(15, 6, 7), (15, 3, 6, 7), (15, 6, 7, 3)]:
        path = tmp_path / f"d{len(shape)}{shape[1]}.npz"
        np.savez(path, images=rng.integers(0, 256, shape, dtype=np.uint8), labels=labels)
        raw = data.load_dataset(str(path))
        channels = 1 if len(shape) == 3 else 3
        assert raw.channels == channels and raw.num_classes == 3
        assert np.asarray(raw.train_images).shape[1:] == (channels, 6, 7)
        assert len(raw.test_labels) == 3  # one of each class
    with pytest.raises(data.DataError, match="no array 'labels'"):
        np.savez(tmp_path / "bad.npz", images=np.zeros((4, 5, 5)))
        data.load_dataset(str(tmp_path / "bad.npz"))


def test_presets_cover_every_architecture():
    assert len(presets.ARCHITECTURES) == 17
    for arch, slug in presets.ARCHITECTURES.items():
        for size in ("tiny", "small", "reference"):
            assert presets.PRESETS[f"{slug}-{size}"].model == arch


@pytest.mark.parametrize(
    "name", [p.name for p in presets.PRESETS.values() if not p.name.endswith("reference")]
)
def test_preset_builds_and_takes_its_input(name):
    preset = presets.PRESETS[name]
    assert preset.model in presets.available_architectures()
    config = presets.resolve_model(name, num_classes=10, data_channels=1)
    presets.check_input_size(config)  # abstract forward pass: no compilation
    model, state = config.build_like()
    x = jax.ShapeDtypeStruct((2, config.channels, *config.image_size), jnp.float32)
    out = eqx.filter_eval_shape(
        lambda m, s, x: training.apply_model(m, s, x, key=jr.key(0))[0], model, state, x
    )
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    "name", [p.name for p in presets.PRESETS.values() if p.name.endswith("reference")]
)
def test_reference_presets_construct(name):
    preset = presets.PRESETS[name]
    assert preset.model in presets.available_architectures()
    config = presets.resolve_model(name, num_classes=1000, data_channels=3)
    assert config.image_size == (preset.image_size, preset.image_size)
    presets.check_input_size(config)


def test_config_files(tmp_path):
    cfg = {"model": "vit", "image_size": 8, "patch_size": 4, "dim": 16, "depth": 1,
           "heads": 2, "mlp_dim": 16, "dim_head": 8, "num_classes": 1000}  # fmt: skip
    path = tmp_path / "m.json"
    path.write_text(__import__("json").dumps(cfg))
    config = presets.resolve_model(str(path), num_classes=3, data_channels=1)
    assert config.model == "ViT" and config.image_size == (8, 8)
    assert config.kwargs["num_classes"] == 3 and config.kwargs["channels"] == 1
    yaml_path = tmp_path / "m.yaml"
    yaml_path.write_text("model: PiT\nimage_size: 16\npatch_size: 4\ndim: 16\ndepth: [1, 1]\n"
                         "heads: 2\nmlp_dim: 32\ndim_head: 8\n")  # fmt: skip
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(presets.ConfigError, match="pip install pyyaml"):
            presets.resolve_model(str(yaml_path), num_classes=3, data_channels=1)
    else:
        config = presets.resolve_model(str(yaml_path), num_classes=3, data_channels=1)
        assert config.kwargs["depth"] == (1, 1)
        presets.check_input_size(config)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "ViT", "image_size": 8, "patch_size": 4, "dimm": 3}')
    with pytest.raises(presets.ConfigError, match="takes no argument"):
        presets.resolve_model(str(bad), num_classes=3, data_channels=1)
    with pytest.raises(presets.ConfigError, match="unknown model"):
        presets.resolve_model("nope", num_classes=3, data_channels=1)
