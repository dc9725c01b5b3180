"""Fully sharded data parallelism (`DataParallel(fsdp=True)`): the placement rule, training
equal to the replicated run on 4 host devices, checkpoints and resume, and `train --fsdp`."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from eqx_vision import cli, data, presets, training
from eqx_vision.layers import Stack
from eqx_vision.training._parallel import fsdp_axis


P = jax.sharding.PartitionSpec


def _fsdp(n: int = 4, min_shard_bytes: int = 0) -> training.DataParallel:
    assert jax.local_device_count() >= n, "tests/conftest.py forces 4 CPU devices"
    return training.DataParallel.create(n, fsdp=True, min_shard_bytes=min_shard_bytes)


def _spec(parallel: training.DataParallel, shape, dtype=jnp.float32, stacked: int = 0):
    return parallel.param_sharding(jax.ShapeDtypeStruct(shape, dtype), stacked).spec


# ---- the rule ------------------------------------------------------------------------


def test_the_largest_divisible_axis_is_sharded():
    parallel = _fsdp(4)
    assert _spec(parallel, (8, 12)) == P(None, "data")
    assert _spec(parallel, (12, 8)) == P("data")
    assert _spec(parallel, (7, 12, 5)) == P(None, "data")
    assert _spec(parallel, (16, 6, 10)) == P("data")  # the larger axes do not divide
    assert _spec(parallel, (8, 8)) == P(None, "data")  # a tie: the later axis
    assert _spec(parallel, (1000, 768)) == P("data")  # a classifier of 1000 classes
    # Nothing divides, or nothing to split: replicated.
    for shape in [(6, 10), (3,), ()]:
        assert _spec(parallel, shape) == P(), shape
    # The leading axes of a stack are left out, even when they are the largest.
    assert _spec(parallel, (16, 8, 4), stacked=1) == P(None, "data")
    assert _spec(parallel, (16, 8, 4), stacked=2) == P(None, None, "data")
    assert _spec(parallel, (16, 6), stacked=1) == P()


def test_small_arrays_and_replicated_runs_stay_replicated():
    parallel = _fsdp(4, min_shard_bytes=1024)
    assert _spec(parallel, (16, 16)) == P(None, "data")  # 1024 bytes
    assert _spec(parallel, (16, 15)) == P()  # 960 bytes
    assert _spec(parallel, (16, 16), jnp.bfloat16) == P()  # 512 bytes
    assert _spec(training.DataParallel.create(4), (1024, 1024)) == P()  # fsdp off
    # Over one device there is nothing to shard.
    assert _spec(_fsdp(1), (1024, 1024)) == P()
    assert training.DataParallel.create(4, fsdp=True).min_shard_bytes == 2**20
    with pytest.raises(ValueError, match="min_shard_bytes"):
        training.DataParallel.create(4, fsdp=True, min_shard_bytes=-1)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=0, max_size=4),
    num_devices=st.sampled_from([2, 3, 4, 8]),
)
def test_the_rule_picks_the_largest_divisible_axis(shape, num_devices):
    axis = fsdp_axis(shape, num_devices)
    divisible = [i for i, n in enumerate(shape) if n % num_devices == 0]
    if not divisible:
        assert axis is None
        return
    assert axis in divisible
    largest = max(shape[i] for i in divisible)
    assert shape[axis] == largest
    assert axis == max(i for i in divisible if shape[i] == largest)  # ties: the later


def test_stacks_are_never_sharded_along_their_depth():
    """A ViT of 8 blocks of width 4: the depth (8) is the largest divisible axis of every
    stacked leaf, and the rule shards another, in the model as in the optimizer state."""
    config = presets.resolve_model("vit-tiny", num_classes=4, data_channels=1, image_size=8)
    config = presets.ModelConfig(
        config.model,
        {
            **config.kwargs,
            "depth": 8,
            "dim": 4,
            "heads": 1,
            "dim_head": 4,
            "mlp_dim": 4,
        },  # fmt: skip
        config.image_size,
        config.channels,
    )
    model, _ = config.build_like()
    optimizer = training.make_optimizer(1e-3, total_steps=2)
    opt_state = training.init_optimizer(optimizer, model)
    parallel = _fsdp(4)
    shardings = parallel.param_shardings((model, opt_state))
    stacks = [
        node
        for node in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, Stack))
        if isinstance(node, Stack)
    ]
    assert len(stacks) == 3  # the model's and AdamW's two moments
    specs = [s.spec for stack in stacks for s in jax.tree.leaves(stack.blocks)]
    assert specs and all(spec[0] is None for spec in specs), specs
    assert all("data" in spec for spec in specs)  # (8, 4) and the like: the 4
    # The same leaves outside a stack would be split along their first axis.
    blocks = model.transformer.layers.blocks  # pyright: ignore[reportAttributeAccessIssue]
    assert parallel.param_sharding(blocks.attn.norm.weight).spec == P("data")
    # Every array leaf gets a sharding, every other leaf None: the structure of the tree.
    arrays = eqx.filter((model, opt_state), lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert jax.tree.structure(shardings) == jax.tree.structure(arrays)


# ---- training -----------------------------------------------------------------------

# FSDP against the replicated run, both over 4 devices, 4 steps of plain SGD (learning rate
# 0.1; not Adam, which moves an element of zero exact gradient by +-lr on the sign of its
# rounding noise: see test_training.PARALLEL_TOLERANCES). Every array that has an axis
# divisible by 4 is sharded (`min_shard_bytes=0`). The largest differences, measured:
# losses 8.6e-8 / 0 (relative), parameters 3.0e-8 / 6.0e-8, BatchNorm state - / 6.0e-8
# (absolute), for ViT / LeViT; the tolerances are about 10x over them, and the parameters
# move by 3e-2.
TOLERANCES = {"loss": 1e-6, "params": 5e-7, "state": 5e-7}


def _config(preset: str) -> presets.ModelConfig:
    return presets.resolve_model(preset, num_classes=4, data_channels=3, image_size=16)


def _train(config: presets.ModelConfig, parallel: training.DataParallel, steps: int = 4):
    x = jr.normal(jr.key(1), (16, config.channels, *config.image_size))
    y = jnp.arange(16) % config.num_classes
    optimizer = optax.sgd(0.1)
    model, state = config.build(jr.key(0))
    opt_state = training.init_optimizer(optimizer, model)
    model, opt_state = parallel.shard_params((model, opt_state))
    state = parallel.replicate(state)
    images, labels = parallel.shard_batch((x, y))
    losses = []
    for i in range(steps):
        model, state, opt_state, loss = training.train_step(
            model, state, opt_state, images, labels, jr.key(i), optimizer=optimizer,
            parallel=parallel,
        )  # fmt: skip
        losses.append(float(loss))
    return np.array(losses), model, state, opt_state


def _arrays(tree) -> list:
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _assert_placed(parallel: training.DataParallel, tree) -> int:
    """Every array of `tree` has its `param_sharding`; returns how many are split."""
    expected = jax.tree.leaves(parallel.param_shardings(eqx.filter(tree, eqx.is_array)))
    leaves = _arrays(tree)
    assert len(leaves) == len(expected)
    for x, sharding in zip(leaves, expected, strict=True):
        assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.shape, x.sharding, sharding)
    return sum("data" in tuple(x.sharding.spec) for x in leaves)


@pytest.mark.parametrize("preset", ["vit-tiny", "levit-tiny"])
def test_fsdp_equals_the_replicated_run(preset):
    config = _config(preset)
    tol = TOLERANCES
    initial = _arrays(config.build(jr.key(0))[0])
    replicated, model1, state1, _ = _train(config, training.DataParallel.create(4))
    parallel = _fsdp(4)
    sharded, model4, state4, opt_state4 = _train(config, parallel)
    # The parameters and optimizer state stay sharded by the rule, the state replicated.
    split = _assert_placed(parallel, (model4, opt_state4))
    assert split > 0.8 * len(_arrays(model4)), split
    for x in jax.tree.leaves(state4):
        assert x.sharding.is_fully_replicated
    np.testing.assert_allclose(sharded, replicated, rtol=tol["loss"])
    moved = 0.0
    for a, b, before in zip(_arrays(model4), _arrays(model1), initial, strict=True):
        moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(before)))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol["params"])
    assert moved > 1e4 * tol["params"], moved
    state_pairs = list(zip(jax.tree.leaves(state4), jax.tree.leaves(state1), strict=True))
    assert bool(state_pairs) == (preset == "levit-tiny")
    for a, b in state_pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol["state"])


@pytest.fixture(scope="module")
def digits_small() -> data.Dataset:
    ds = data.prepare(data.load_digits(), channels=1, image_size=(8, 8))
    return data.Dataset(
        ds.train_images[:64], ds.train_labels[:64], ds.test_images[:16], ds.test_labels[:16],
        ds.class_names, "digits[:64]",
    )  # fmt: skip


FIT_VIT = presets.resolve_model("vit-tiny", num_classes=10, data_channels=1, image_size=8)
FIT = training.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, warmup_epochs=0.5,
                           seed=1)  # fmt: skip


def _fit(out, ds, **kwargs) -> training.FitResult:
    model, state = kwargs.pop("like", None) or FIT_VIT.build(jr.key(0))
    return training.fit(model, state, ds, FIT, out=out, parallel=_fsdp(4),
                        model_config=FIT_VIT.to_json(), **kwargs)  # fmt: skip


def test_fit_with_fsdp_saves_and_resumes(tmp_path, digits_small):
    """A run stopped after its first epoch and resumed ends as the uninterrupted one; the
    checkpoint gathers the sharded arrays, and the restored ones are sharded again."""
    parallel = _fsdp(4)
    reference = _fit(None, digits_small)  # the same run, not written
    split = _assert_placed(parallel, (reference.model, reference.opt_state))
    assert split > 0
    out = str(tmp_path / "resumed")
    stopped = _fit(out, digits_small, callback=lambda metrics: True)
    assert stopped.stopped and stopped.epoch == 1
    resumed = _fit(out, digits_small, like=FIT_VIT.build_like(), resume=True)
    assert [r["train_loss"] for r in resumed.metrics] == [
        r["train_loss"] for r in reference.metrics
    ]
    got = _arrays((resumed.model, resumed.opt_state))
    want = _arrays((reference.model, reference.opt_state))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A finished run resumed: the arrays as `fit` restores and places them, no step after.
    again = _fit(out, digits_small, like=FIT_VIT.build_like(), resume=True)
    assert again.step == reference.step
    assert _assert_placed(parallel, (again.model, again.opt_state)) == split
    for a, b in zip(_arrays((again.model, again.opt_state)), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_command_trains_with_fsdp(small_npz, tmp_path, capsys, monkeypatch):
    given = []
    fit = training.fit

    def recording_fit(*args, **kwargs):
        given.append(kwargs["parallel"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", recording_fit)
    out = str(tmp_path / "run")
    code = cli.main(["train", "--model", "vit-tiny", "--image-size", "8", "--batch-size", "16",
                     "--epochs", "1", "--data", small_npz, "--devices", "4", "--fsdp",
                     "--out", out, "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "test accuracy" in printed
    assert os.path.isfile(os.path.join(out, "last.safetensors"))
    [parallel] = given
    assert parallel.fsdp and parallel.num_devices == 4
