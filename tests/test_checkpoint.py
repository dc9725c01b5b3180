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


# ---- non-finite tensors: never written, refused at load ---------------------------------


def _with_nan(tree, get, index=0, value=float("nan")):
    leaf = get(tree)
    return eqx.tree_at(get, tree, leaf.reshape(-1).at[index].set(value).reshape(leaf.shape))


def test_save_refuses_non_finite_tensors(tmp_path):
    config = _config("vit-tiny")
    model, state, opt_state, _ = _trained(config, steps=1)
    opt_state: Any
    path = tmp_path / "last.safetensors"
    checkpoint.save(path, model, state, opt_state=opt_state, model_config=config.to_json())
    before = _files(tmp_path)

    bad_model = _with_nan(model, lambda m: m.mlp_head.weight, 3)
    bad_model = _with_nan(bad_model, lambda m: m.mlp_head.weight, 5, float("inf"))
    with pytest.raises(FloatingPointError) as info:
        checkpoint.save(path, bad_model, state, opt_state=opt_state)
    message = str(info.value)
    assert "'model.mlp_head.weight' has 2 non-finite value(s)" in message, message
    assert "\n" not in message
    # The optimizer state is checked too, and the first bad tensor is the one named.
    mu = opt_state[1][0].mu  # clip_by_global_norm, then adamw: (scale_by_adam, ...)
    bad_mu = _with_nan(mu, lambda m: m.mlp_head.bias, 0, float("-inf"))
    bad_opt = (opt_state[0], (opt_state[1][0]._replace(mu=bad_mu), *opt_state[1][1:]))
    with pytest.raises(FloatingPointError, match=r"'opt_state\.1\.0\.mu\.mlp_head\.bias' has 1 "):
        checkpoint.save(path, model, state, opt_state=bad_opt)
    with pytest.raises(FloatingPointError, match="'model.mlp_head.weight'"):
        checkpoint.save(path, bad_model, state, opt_state=bad_opt)
    assert _files(tmp_path) == before  # untouched, and no temporary file left

    # On request, it is written; then loading refuses it unless asked the same.
    checkpoint.save(path, bad_model, state, opt_state=bad_opt, allow_non_finite=True)
    like, like_state = config.build_like()
    like_opt = training.init_optimizer(OPTIMIZER, like)
    with pytest.raises(
        checkpoint.CheckpointFormatError, match=r"'model.mlp_head.weight' has 2 non-finite"
    ):
        checkpoint.load(path, like, like_state)
    ckpt = checkpoint.load(path, like, like_state, like_opt_state=like_opt, allow_non_finite=True)
    assert int(np.isnan(np.asarray(ckpt.model.mlp_head.weight)).sum()) == 1


def test_load_refuses_non_finite_state_and_optimizer_state(tmp_path):
    import safetensors.numpy as st

    config = _config("cvt-tiny")
    model, state = config.build(jr.key(0))
    path = tmp_path / "ckpt.safetensors"
    opt_state = training.init_optimizer(OPTIMIZER, model)
    checkpoint.save(path, model, state, opt_state=opt_state, model_config=config.to_json())
    tensors = st.load_file(str(path))
    like, like_state = config.build_like()
    like_opt = training.init_optimizer(OPTIMIZER, like)
    for prefix in ("state.", "opt_state."):
        # A file written by an older release, or by hand, without the check of `save`.
        floats = [n for n in tensors if n.startswith(prefix) and tensors[n].dtype.kind == "f"]
        name = sorted(floats)[0]
        bad = dict(tensors)
        bad[name] = np.full_like(tensors[name], np.nan)
        st.save_file(bad, str(path), metadata={"format": checkpoint.FORMAT})
        with pytest.raises(checkpoint.CheckpointFormatError, match=f"'{name}' has"):
            checkpoint.load(path, like, like_state, like_opt_state=like_opt)


def test_non_finite_check_covers_bfloat16_and_skips_integers(tmp_path):
    path = tmp_path / "tree.safetensors"
    ok = {"w": jnp.ones(3, jnp.bfloat16), "n": jnp.array([1, 2], jnp.int32)}
    checkpoint.save(path, ok)
    bad = {**ok, "w": jnp.array([1.0, jnp.inf, jnp.nan], jnp.bfloat16)}
    with pytest.raises(FloatingPointError, match="'model.w' has 2 non-finite value"):
        checkpoint.save(path, bad)


# ---- malformed headers and tensors: CheckpointFormatError, one line ---------------------


def _raw_file(header: Any, data: bytes = b"", size: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if size is None else size).to_bytes(8, "little") + text + data


def _meta(**meta: Any) -> dict[str, Any]:
    return {"__metadata__": {"format": checkpoint.FORMAT, **meta}}


OBJECT = "must be a JSON object; got "
INTEGER = "must be a non-negative integer; got "
MALFORMED_HEADERS: dict[str, tuple[bytes, str]] = {
    "a JSON list": (_raw_file([1, 2]), "a JSON list, expected an object"),
    "a JSON string": (_raw_file("header"), "a JSON str, expected an object"),
    "a JSON number": (_raw_file(7), "a JSON int, expected an object"),
    "metadata a list": (_raw_file({"__metadata__": ["format"]}), "not an eqx_vision checkpoint"),
    "metadata a string": (_raw_file({"__metadata__": "x"}), "not an eqx_vision checkpoint"),
    "no metadata": (_raw_file({}), "got no format"),
    "format a list": (_raw_file({"__metadata__": {"format": [1]}}), "got format [1]"),
    "format a number": (_raw_file({"__metadata__": {"format": 1}}), "got format 1"),
    "another format": (_raw_file({"__metadata__": {"format": "x/2"}}), "got format 'x/2'"),
    "model_config a list": (_raw_file(_meta(model_config="[1]")), "config " + OBJECT + "list"),
    "model_config a string": (_raw_file(_meta(model_config='"ViT"')), OBJECT + "str"),
    "model_config a number": (_raw_file(_meta(model_config="3.5")), OBJECT + "float"),
    "model_config null": (_raw_file(_meta(model_config="null")), OBJECT + "NoneType"),
    "model_config not JSON": (_raw_file(_meta(model_config="{")), "model_config is not JSON"),
    "model_config not a string": (_raw_file(_meta(model_config={"model": "ViT"})),
                                  "model_config must be a JSON string; got dict"),
    "training a list": (_raw_file(_meta(training="[]")), "training " + OBJECT + "list"),
    "training a number": (_raw_file(_meta(training="1")), "training " + OBJECT + "int"),
    "training deeply nested": (_raw_file(_meta(training="[" * 100_000)), "training is not JSON"),
    "training a huge number": (_raw_file(_meta(training="9" * 5000)), "training is not JSON"),
    "epoch a string": (_raw_file(_meta(training='{"epoch": "2"}')), "epoch " + INTEGER + "'2'"),
    "step negative": (_raw_file(_meta(training='{"step": -1}')), "step " + INTEGER + "-1"),
    "step a boolean": (_raw_file(_meta(training='{"step": true}')), INTEGER + "True"),
    "step a float": (_raw_file(_meta(training='{"step": 1.5}')), INTEGER + "1.5"),
    "size beyond the file": (_raw_file(_meta(), size=10_000),
                             "header size is 10000 bytes; expected at most"),
    "size absurd": (_raw_file(_meta(), size=2**64 - 1), "expected at most"),
    "too short": (b"\x01\x00\x00", "too short"),
    "not UTF-8": (_raw_file(b'{"\xff\xfe": 1}'), "not UTF-8 JSON"),
    "UTF-16": (_raw_file(json.dumps(_meta()).encode("utf-16")), "not UTF-8 JSON"),
    "deeply nested header": (_raw_file(b"[" * 100_000), "not UTF-8 JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_header_is_a_format_error(tmp_path, case):
    raw, fragment = MALFORMED_HEADERS[case]
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(raw)
    like = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    for read in (lambda: checkpoint.read_header(path), lambda: checkpoint.load(path, like)):
        with pytest.raises(checkpoint.CheckpointFormatError) as info:
            read()
        message = str(info.value)
        assert fragment in message and "\n" not in message and len(message) < 300, message


def _rewrite(path, change) -> None:
    """Rewrite the checkpoint at `path` with `change(tensors)`, the header kept."""
    import safetensors.numpy as st

    raw = path.read_bytes()
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = st.load_file(str(path))
    change(tensors)
    st.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "rng",
    [
        np.arange(5, dtype=np.uint32),  # 5 values
        np.zeros((1, 2), np.uint32),  # 2 values, another shape
        np.zeros(2, np.float32),  # the right shape, another dtype
        np.zeros(2, np.int32),
        np.zeros((), np.uint32),
    ],
    ids=["5", "1x2", "float32", "int32", "scalar"],
)
def test_malformed_rng_is_a_format_error(tmp_path, rng):
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, model, state, rng=jr.key(3), model_config=config.to_json())
    _rewrite(path, lambda t: t.update(rng=rng))
    like, like_state = config.build_like()
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"tensor 'rng' has shape") as info:
        checkpoint.load(path, like, like_state)
    assert "expected the key data of a jax.random.key: shape (2,), dtype uint32" in str(info.value)
    # and `save` refuses to write such key data in the first place
    with pytest.raises(ValueError, match="rng has shape"):
        checkpoint.save(tmp_path / "other.safetensors", model, state, rng=jnp.asarray(rng))
    assert not (tmp_path / "other.safetensors").exists()


def test_integer_tensor_for_a_float_leaf_and_back_are_format_errors(tmp_path):
    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    opt_state = training.init_optimizer(OPTIMIZER, model)
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, model, state, opt_state=opt_state, model_config=config.to_json())
    like, like_state = config.build_like()
    like_opt = training.init_optimizer(OPTIMIZER, like)

    def to_int(t):
        t["model.mlp_head.bias"] = t["model.mlp_head.bias"].astype(np.int32)

    _rewrite(path, to_int)
    with pytest.raises(checkpoint.CheckpointFormatError, match="bias' has dtype int32"):
        checkpoint.load(path, like, like_state)
    checkpoint.save(path, model, state, opt_state=opt_state, model_config=config.to_json())
    names = checkpoint._flatten(model, None, opt_state, None)
    count = next(n for n in names if n.endswith("count"))

    def to_float(t):
        t[count] = t[count].astype(np.float32)

    _rewrite(path, to_float)
    with pytest.raises(checkpoint.CheckpointFormatError, match=f"'{count}' has dtype float32"):
        checkpoint.load(path, like, like_state, like_opt_state=like_opt)


# ---- the files written: permissions and temporary names ---------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_of_a_plain_open(tmp_path, umask, expected):
    import stat

    config = _config("vit-tiny")
    model, state = config.build(jr.key(0))
    previous = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "last.safetensors", model, state)
        with checkpoint.atomic_write(tmp_path / "config.json", "w") as f:
            f.write("{}\n")
        with open(tmp_path / "plain", "w") as f:
            f.write("")
    finally:
        os.umask(previous)
    modes = {n: stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in os.listdir(tmp_path)}
    assert modes == {"last.safetensors": expected, "config.json": expected, "plain": expected}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_replaced_file_keeps_its_mode(tmp_path):
    import stat

    path = tmp_path / "config.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    previous = os.umask(0o077)
    try:
        with checkpoint.atomic_write(path, "w") as f:
            f.write('{"a": 1}')
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert json.loads(path.read_text()) == {"a": 1}


def test_temporary_file_is_hidden_beside_the_target(tmp_path, monkeypatch):
    import re

    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((src, dst, sorted(os.listdir(tmp_path))))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    for _ in range(2):
        checkpoint.save(tmp_path / "last.safetensors", {"w": jnp.ones(2)})
    with checkpoint.atomic_write(tmp_path / "metrics.jsonl", "w") as f:
        f.write("{}\n")
    monkeypatch.undo()
    names = []
    for src, dst, listing in seen:
        folder, name = os.path.split(src)
        assert folder == str(tmp_path) and name in listing
        target = re.escape(os.path.basename(dst))
        assert re.fullmatch(rf"\.{target}\.[0-9a-z]+\.tmp", name), name
        names.append(name)
    assert len(set(names)) == 3  # a fresh random name each time
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors", "metrics.jsonl"]
