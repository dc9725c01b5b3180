"""Checkpoints: exact round trips, atomic writes, clear errors."""

import json
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_vision import checkpoint, training
from eqx_vision.presets import ModelConfig, resolve_model


OPTIMIZER = training.make_optimizer(1e-3, warmup_steps=1, total_steps=10)


def _config(preset: str, size: int = 16) -> ModelConfig:
    return resolve_model(preset, num_classes=4, data_channels=1, image_size=size)


def _trained(config: ModelConfig, steps: int = 2):
    """A model, state and optimizer state after a few steps (so that Adam's moments and
    the BatchNorm statistics are not at their initial values)."""
    model, state = config.build(jr.key(0))
    optimizer = OPTIMIZER  # one object, so that the compiled step is reused across tests
    opt_state = training.init_optimizer(optimizer, model)
    x = jr.normal(jr.key(1), (4, config.channels, *config.image_size))
    y = jnp.arange(4) % 4
    for step in range(steps):
        model, state, opt_state, _ = training.train_step(
            model, state, opt_state, x, y, jr.key(step), optimizer=optimizer
        )
    return model, state, opt_state, optimizer


def _assert_same(a, b) -> None:
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("preset", ["vit-tiny", "cvt-tiny"])
def test_round_trip_is_exact(tmp_path, preset):
    config = _config(preset)
    model, state, opt_state, optimizer = _trained(config)
    key = jr.key(42)
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(
        path,
        model,
        state,
        opt_state=opt_state,
        rng=key,
        model_config=config.to_json(),
        training={"step": 2, "epoch": 1},
    )
    like_model, like_state = config.build_like()  # abstract: no arrays computed
    like_opt = training.init_optimizer(optimizer, like_model)
    ckpt = checkpoint.load(
        path, like_model, like_state, like_opt_state=like_opt, model_name=config.model
    )
    _assert_same(ckpt.model, model)
    _assert_same(ckpt.opt_state, opt_state)
    assert jax.tree.structure(ckpt.state) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(ckpt.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(ckpt.rng), np.asarray(jr.key_data(key)))
    assert ckpt.training == {"step": 2, "epoch": 1}
    assert ckpt.model_config == config.to_json()
    # The loaded model computes the same thing.
    x = jr.normal(jr.key(3), (2, config.channels, *config.image_size))
    a = training.eval_step(model, state, x, jnp.zeros(2, jnp.int32))[2]
    assert ckpt.state is not None
    b = training.eval_step(ckpt.model, ckpt.state, x, jnp.zeros(2, jnp.int32))[2]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tensor_names_are_key_paths(tmp_path):
    import safetensors.numpy as st

    config = _config("cvt-tiny")
    model, state, opt_state, _ = _trained(config, steps=1)
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, model, state, opt_state=opt_state, model_config=config.to_json())
    names = set(st.load_file(str(path)))
    model_names = {
        "model." + jax.tree_util.keystr(p, simple=True, separator=".")
        for p, _ in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    }
    assert model_names <= names
    state_names = sorted(n for n in names if n.startswith("state."))
    # State leaves are named by the path of the BatchNorm's StateIndex, not positionally.
    assert len(state_names) == len(jax.tree.leaves(state))
    assert all(".bn.state_index." in n for n in state_names), state_names[:3]
    assert any(n.startswith("opt_state.") and ".mu." in n for n in names)
    # A safetensors file: an 8-byte header length, then a JSON header (no pickle).
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["model_config"])["model"] == "CvT"


def test_wrong_architecture_and_shapes_are_clear_errors(tmp_path):
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    path = tmp_path / "vit.safetensors"
    checkpoint.save(path, model, state, model_config=config.to_json())

    other = _config("cvt-tiny")
    like, like_state = other.build_like()
    with pytest.raises(checkpoint.CheckpointFormatError, match="holds a ViT checkpoint"):
        checkpoint.load(path, like, like_state, model_name="CvT")
    with pytest.raises(checkpoint.CheckpointFormatError, match="has no tensor 'model.stages"):
        checkpoint.load(path, like, like_state)

    wider = resolve_model("vit-tiny", num_classes=5, data_channels=1, image_size=16)
    like, like_state = wider.build_like()
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"mlp_head.weight' has shape"):
        checkpoint.load(path, like, like_state, model_name="ViT")

    shallower = ModelConfig("ViT", {**config.kwargs, "depth": 2}, (16, 16), 1)
    like, like_state = shallower.build_like()
    with pytest.raises(checkpoint.CheckpointFormatError, match="shape"):
        checkpoint.load(path, like, like_state)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(checkpoint.CheckpointFormatError, match="not a safetensors file"):
        checkpoint.read_header(bad)


def test_extra_tensors_are_an_error(tmp_path):
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, model, state, model_config=config.to_json())
    no_head = eqx.tree_at(lambda m: m.mlp_head, model, None, is_leaf=lambda x: x is None)
    with pytest.raises(checkpoint.CheckpointFormatError, match="does not have: model.mlp_head"):
        checkpoint.load(path, no_head, state)


def _files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch, fail_at):
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    model: Any
    path = tmp_path / "last.safetensors"
    checkpoint.save(path, model, state, model_config=config.to_json(), training={"epoch": 1})
    before = _files(tmp_path)

    class Boom(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Boom

    if fail_at == "write":
        # Fail half-way through writing the new file's bytes.
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            real_write = f.write

            class Half:
                def __getattr__(self, name):
                    return getattr(f, name)

                def __enter__(self):
                    f.__enter__()
                    return self

                def __exit__(self, *exc):
                    return f.__exit__(*exc)

                def write(self, data):
                    real_write(data[: len(data) // 2])
                    raise Boom

            return Half()

        monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(checkpoint.os, fail_at, boom)

    changed = eqx.tree_at(lambda m: m.mlp_head.bias, model, model.mlp_head.bias + 1)
    with pytest.raises(Boom):
        checkpoint.save(path, changed, state, model_config=config.to_json(), training={"epoch": 2})
    monkeypatch.undo()
    assert _files(tmp_path) == before  # same file, same bytes, no temporary file left
    like, like_state = config.build_like()
    ckpt = checkpoint.load(path, like, like_state)
    assert ckpt.training == {"epoch": 1}
    _assert_same(ckpt.model, model)
