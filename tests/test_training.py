"""The reusable training library: loss, steps, optimizer, data parallelism, the training
loop (`fit`), data, presets."""

import dataclasses
import json
import math
import os
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_vision as ev
from eqx_vision import checkpoint, data, presets, training


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


class _DropoutOnly(eqx.Module):
    """A model that is one dropout layer: its output shows the mask it drew."""

    dropout: eqx.nn.Dropout

    def __call__(self, x, *, key=None):
        return self.dropout(x.reshape(-1), key=key)


class _StatefulDropoutOnly(eqx.Module):
    """The same, called as a model with BatchNorm state is (`model(x, state, key=k)`)."""

    dropout: eqx.nn.Dropout
    index: eqx.nn.StateIndex

    def __init__(self):
        self.dropout = eqx.nn.Dropout(0.5)
        self.index = eqx.nn.StateIndex(jnp.zeros(()))

    def __call__(self, x, state, *, key=None):
        return self.dropout(x.reshape(-1), key=key), state


@pytest.mark.parametrize("stateful", [False, True], ids=["stateless", "stateful"])
def test_apply_model_draws_a_dropout_mask_per_example(stateful):
    """Four identical images in one batch: each example gets its own dropout key, so the
    four outputs differ (16 values each: equal masks by chance with probability 2**-16)."""
    model = _StatefulDropoutOnly() if stateful else _DropoutOnly(eqx.nn.Dropout(0.5))
    state = eqx.nn.State(model)
    assert training.is_stateful(model) == stateful
    images = jnp.ones((4, 1, 4, 4))
    run = eqx.filter_jit(training.apply_model)
    logits, _ = run(model, state, images, key=jr.key(0))
    rows = np.asarray(logits)
    assert rows.shape == (4, 16) and set(np.unique(rows)) == {0.0, 2.0}
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(rows[i], rows[j]), f"examples {j} and {i}: the same mask"
    again, _ = run(model, state, images, key=jr.key(0))
    np.testing.assert_array_equal(np.asarray(again), rows)  # the same key, the same masks
    other, _ = run(model, state, images, key=jr.key(1))
    assert not np.array_equal(np.asarray(other), rows)
    plain, _ = run(eqx.nn.inference_mode(model), state, images)
    np.testing.assert_array_equal(np.asarray(plain), np.ones((4, 16)))


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


def _warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then a half cosine to 0 at
    `total`, written out."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def test_make_optimizer_is_clipped_adamw_with_warmup_cosine():
    """`make_optimizer` against the chain it stands for, built here from optax's parts:
    gradients clipped to global norm 1, Adam's moments, weight decay decoupled from them
    (added to the update, not the gradient), then the warm-up + cosine learning rate.
    Every other step's gradient has a global norm of ~40, so clipping acts; in between,
    a norm of ~0.04, below the clip."""
    peak, decay, warmup, total = 0.1, 0.1, 3, 10
    optimizer = training.make_optimizer(peak, weight_decay=decay, warmup_steps=warmup,
                                        total_steps=total)  # fmt: skip
    schedule = lambda count: _warmup_cosine(int(count), peak, warmup, total)
    adamw = (
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(decay),
        optax.scale_by_learning_rate(lambda count: jnp.asarray(schedule(count))),
    )
    chains = {"clipped": optax.chain(optax.clip_by_global_norm(1.0), *adamw),
              "unclipped": optax.chain(*adamw)}  # fmt: skip
    params = {"w": jr.normal(jr.key(0), (4, 3)), "b": jnp.full((5,), 0.5)}
    ours: Any = params
    ours_state = optimizer.init(params)
    refs: dict[str, Any] = {name: (params, chain.init(params)) for name, chain in chains.items()}
    for step in range(total):
        scale = 10.0 if step % 2 == 0 else 0.01
        keys = dict(zip(params, jr.split(jr.key(100 + step), len(params)), strict=True))
        grads = {k: scale * jr.normal(keys[k], p.shape) for k, p in params.items()}
        norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
        assert norm > 10 if scale > 1 else norm < 1
        updates, ours_state = optimizer.update(grads, ours_state, ours)
        ours = optax.apply_updates(ours, updates)
        for name, chain in chains.items():
            ref, ref_state = refs[name]
            ref_updates, ref_state = chain.update(grads, ref_state, ref)
            refs[name] = (optax.apply_updates(ref, ref_updates), ref_state)
        for leaf in params:
            got, want = ours[leaf], refs["clipped"][0][leaf]
            message = f"{leaf} after step {step + 1}"
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=message)
    # Clipping matters here: the chain without it ends far from ours.
    far = max(float(jnp.max(jnp.abs(ours[k] - refs["unclipped"][0][k]))) for k in params)
    assert far > 1e-3, far


def test_batches_depend_on_seed_and_epoch_only():
    a = training.batches(100, 16, seed=3, epoch=2)
    b = training.batches(100, 16, seed=3, epoch=2)
    c = training.batches(100, 16, seed=3, epoch=3)
    assert len(a) == 6 and all(len(i) == 16 for i in a)
    assert all(np.array_equal(i, j) for i, j in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert len(np.unique(np.concatenate(a))) == 96


# The data-parallel step against the single-device one, 4 steps of plain SGD (learning rate
# 0.1). Not Adam: Adam scales every element's update to about the learning rate whatever the
# size of its gradient, so an element whose exact gradient is zero (CvT's attention
# LayerNorm bias feeds a depthwise convolution and a train-mode BatchNorm, which removes
# any shift) or tiny moves by +-lr on the sign of its rounding noise, and a comparison
# would compare noise (make_optimizer's chain is tested above). The largest differences,
# measured: losses 1.7e-7 / 3.6e-7 (relative), parameters 1.2e-7 / 1.2e-7, BatchNorm
# state - / 6.0e-8 (absolute), for ViT / CvT; the tolerances are 5-10x over them. The
# parameters move by up to 3e-2 / 1.2e-1, so a step that went wrong on the devices (the
# gradient of one shard, the BatchNorm statistics of one shard) shows far above them.
PARALLEL_TOLERANCES = {"loss": 2e-6, "params": 1e-6, "state": 5e-7}


@pytest.mark.parametrize("preset", ["vit-tiny", "cvt-tiny"])
def test_data_parallel_equals_single_device(preset):
    assert jax.local_device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    config = _config(preset)
    x, y = _batch(config, n=16)
    optimizer = optax.sgd(0.1)
    tol = PARALLEL_TOLERANCES

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

    initial = config.build(jr.key(0))[0]
    single, model1, state1 = run(None)
    multi, model4, state4 = run(training.DataParallel.create(4))
    np.testing.assert_allclose(multi, single, rtol=tol["loss"])
    paths = jax.tree_util.tree_flatten_with_path(eqx.filter(model4, eqx.is_array))[0]
    leaves1 = jax.tree.leaves(eqx.filter(model1, eqx.is_array))
    leaves0 = jax.tree.leaves(eqx.filter(initial, eqx.is_array))
    moved = 0.0
    for (path, a), b, before in zip(paths, leaves1, leaves0, strict=True):
        moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(before)))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol["params"],
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip
    assert moved > 1e4 * tol["params"], moved  # the comparison can tell a step from none
    state_leaves = list(zip(jax.tree.leaves(state4), jax.tree.leaves(state1), strict=True))
    assert len(state_leaves) == (18 if preset == "cvt-tiny" else 0)  # 6 BatchNorms x 3
    for a, b in state_leaves:
        if np.issubdtype(np.asarray(b).dtype, np.integer):  # the batch counts
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol["state"])


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


def test_config_files(tmp_path, monkeypatch):
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
    import yaml  # noqa: F401  (the test extra installs PyYAML: this branch always runs)

    config = presets.resolve_model(str(yaml_path), num_classes=3, data_channels=1)
    assert config.model == "PiT" and config.image_size == (16, 16) and config.preset is None
    assert config.kwargs["depth"] == (1, 1) and config.kwargs["dim_head"] == 8
    assert config.kwargs["num_classes"] == 3 and config.kwargs["channels"] == 1
    presets.check_input_size(config)
    model, _ = config.build(jr.key(0))
    assert isinstance(model, ev.PiT)
    broken = tmp_path / "broken.yml"
    broken.write_text("model: PiT\ndepth: [1, 1\n")
    with pytest.raises(presets.ConfigError, match="broken.yml is not valid YAML"):
        presets.resolve_model(str(broken), num_classes=3, data_channels=1)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "yaml", None)  # PyYAML not installed: `import yaml` fails
        with pytest.raises(presets.ConfigError, match="needs PyYAML: pip install pyyaml"):
            presets.resolve_model(str(yaml_path), num_classes=3, data_channels=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "ViT", "image_size": 8, "patch_size": 4, "dimm": 3}')
    with pytest.raises(presets.ConfigError, match="takes no argument"):
        presets.resolve_model(str(bad), num_classes=3, data_channels=1)
    with pytest.raises(presets.ConfigError, match="unknown model"):
        presets.resolve_model("nope", num_classes=3, data_channels=1)


# ---- the training loop: fit and evaluate -------------------------------------------------


@pytest.fixture(scope="module")
def digits_small() -> data.Dataset:
    """96 training and 40 test digits at 8x8: a tiny model trains on them in seconds."""
    ds = data.prepare(data.load_digits(), channels=1, image_size=(8, 8))
    return data.Dataset(
        ds.train_images[:96], ds.train_labels[:96], ds.test_images[:40], ds.test_labels[:40],
        ds.class_names, "digits[:96]",
    )  # fmt: skip


# With dropout: a resumed run must draw the keys of the run it continues.
TINY_VIT = presets.resolve_model("vit-tiny", num_classes=10, data_channels=1, image_size=8)
TINY_VIT = dataclasses.replace(TINY_VIT, kwargs={**TINY_VIT.kwargs, "dropout": 0.1,
                                                 "emb_dropout": 0.1})  # fmt: skip
# A learning rate at which the fixture run learns in its 18 steps: test accuracy 0.1 -> 0.45
# (10 classes), so that a loop that does not train shows.
FIT = training.TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, warmup_epochs=0.5,
                           seed=1, remat="linear")  # fmt: skip
DETERMINISTIC = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "learning_rate")


def _fit(out, **kwargs) -> training.FitResult:
    model, state = TINY_VIT.build(jr.key(0))
    ds = kwargs.pop("data")
    return training.fit(model, state, ds, FIT, out=out, model_config=TINY_VIT.to_json(), **kwargs)


def _deterministic(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in DETERMINISTIC} for r in records]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits_small) -> tuple[str, training.FitResult, list[dict]]:
    """An uninterrupted run of `fit`, with the metrics its callback received."""
    out = str(tmp_path_factory.mktemp("fit") / "run")
    received = []
    result = _fit(out, data=digits_small, callback=received.append)
    return out, result, received


def test_fit_writes_its_outputs_and_calls_back(fitted, digits_small):
    out, result, received = fitted
    assert {"config.json", "last.safetensors", "metrics.jsonl", "curves.png"} <= set(
        os.listdir(out)
    )
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines == received == result.metrics
    assert [r["epoch"] for r in received] == [1, 2, 3]
    assert [r["step"] for r in received] == [6, 12, 18]  # 96 images, batch 16
    assert received[-1]["train_loss"] < 0.85 * received[0]["train_loss"]  # measured 0.76
    assert received[-1]["test_accuracy"] >= 0.3  # measured 0.45; chance is 0.1
    assert (result.epoch, result.step, result.stopped) == (3, 18, False)
    assert result.test_accuracy == received[-1]["test_accuracy"]
    assert result.best_accuracy == max(r["test_accuracy"] for r in received)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["train_config"] == FIT.to_json()
    assert config["model_config"] == TINY_VIT.to_json()
    header = checkpoint.read_header(os.path.join(out, "last.safetensors"))
    assert header["training"]["epoch"] == 3 and header["training"]["step"] == 18
    evaluated = training.evaluate(
        result.model, result.state, digits_small.test_images, digits_small.test_labels
    )
    assert evaluated == pytest.approx((result.test_loss, result.test_accuracy), rel=1e-6)


class _StopAt(training.Callback):
    """Stops after `steps` steps, as a killed process would; records what it sees."""

    def __init__(self, steps: int | None = None):
        self.steps = steps
        self.info: training.FitInfo | None = None
        self.epochs: list[int] = []

    def on_fit_start(self, info: training.FitInfo) -> None:
        self.info = info

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def on_step(self, info: training.StepInfo) -> bool:
        return self.steps is not None and info.step >= self.steps


def test_fit_resume_equals_uninterrupted(fitted, tmp_path, digits_small):
    """Stopped in epoch 2 and resumed from the checkpoint of epoch 1: the same metrics and,
    bit for bit, the same weights and optimizer state as the run that was not stopped. The
    model has dropout, so every step after the resume must draw the key the uninterrupted
    run drew at that step."""
    assert TINY_VIT.kwargs["dropout"] > 0 and TINY_VIT.kwargs["emb_dropout"] > 0
    out = str(tmp_path / "resumed")
    # Stop in the middle of epoch 2: the checkpoint holds epoch 1.
    stopper = _StopAt(steps=9)
    stopped = _fit(out, data=digits_small, callback=stopper)
    assert stopped.stopped and (stopped.epoch, stopped.step) == (1, 9)
    assert [r["epoch"] for r in stopped.metrics] == [1]
    assert checkpoint.read_header(os.path.join(out, "last.safetensors"))["training"]["step"] == 6
    # Resume into the structure of the model only (no memory for the weights).
    like_model, like_state = TINY_VIT.build_like()
    watcher = _StopAt()
    resumed = training.fit(
        like_model, like_state, digits_small, FIT, out=out, resume=True, callback=watcher,
        model_config=TINY_VIT.to_json(),
    )  # fmt: skip
    assert watcher.info is not None and watcher.info.resumed
    assert (watcher.info.start_epoch, watcher.info.step, watcher.epochs) == (1, 6, [2, 3])
    reference = fitted[1]
    assert _deterministic(resumed.metrics) == _deterministic(reference.metrics)
    leaves = jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array))
    expected = jax.tree.leaves(eqx.filter((reference.model, reference.opt_state), eqx.is_array))
    for a, b in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_refuses_to_overwrite_a_run(fitted, digits_small):
    out = fitted[0]
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(FileExistsError, match="already holds a run"):
        _fit(out, data=digits_small)
    changed = dataclasses.replace(FIT, learning_rate=0.5)
    with pytest.raises(ValueError, match="learning_rate"):
        training.fit(*TINY_VIT.build_like(), digits_small, changed, out=out, resume=True)
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_fit_stops_on_a_nan_loss(tmp_path, digits_small):
    images = digits_small.train_images.copy()
    images[:, :, 0, 0] = np.nan
    poisoned = dataclasses.replace(digits_small, train_images=images)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1"):
        _fit(out, data=poisoned)
    assert not os.path.exists(os.path.join(out, "last.safetensors"))  # nothing NaN saved
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == ""


def test_fit_config_errors(digits_small):
    with pytest.raises(ValueError, match="remat must be linear or inputs or all"):
        training.TrainConfig(remat="dots")
    with pytest.raises(ValueError, match="precision"):
        training.TrainConfig(precision="float16")
    with pytest.raises(ValueError, match="batch_size 128"):
        training.fit(*TINY_VIT.build_like(), digits_small, training.TrainConfig(batch_size=128))
    with pytest.raises(ValueError, match="resume needs"):
        training.fit(*TINY_VIT.build_like(), digits_small, FIT, resume=True)


def test_evaluate_pads_the_last_batch():
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    x, y = _batch(config, n=10)
    loss, accuracy, _ = training.eval_step(model, state, x, y)
    for batch_size in (4, 10, 16):
        got = training.evaluate(model, state, np.asarray(x), np.asarray(y), batch_size=batch_size)
        np.testing.assert_allclose(got, (float(loss), float(accuracy)), rtol=1e-5)
    parallel = training.DataParallel.create(4)
    got = training.evaluate(model, state, x, y, batch_size=6, parallel=parallel)  # 6 -> 4
    np.testing.assert_allclose(got, (float(loss), float(accuracy)), rtol=1e-5)
