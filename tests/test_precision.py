"""Mixed precision: every model in bfloat16 against itself in float32, the training step and
the command line with `--precision bfloat16`.

`python tests/test_precision.py` prints the measured bfloat16-vs-float32 errors of every
architecture as a Markdown table (the one in docs/precision.md).
"""

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_vision as ev
from eqx_vision import data, training
from eqx_vision.cli import main
from eqx_vision.layers._linear import dense
from eqx_vision.precision import COMPUTE_DTYPES, Precision, cast_input, cast_output
from eqx_vision.precision._bfloat16 import _linear_impl, _linear_p
from tiny import NAMES, NUM_CLASSES, batched, build, input_shape


BATCH = 2
# Bounds on the bfloat16 run against the float32 run of the same model and input (the
# measured values are in docs/precision.md): the largest logit error relative to the
# largest float32 logit, and the cosine similarity of the flattened parameter gradients.
MAX_LOGIT_ERROR = 0.05
MIN_GRAD_COSINE = 0.99


def _run(model: Any, state: Any, images: jax.Array, labels: jax.Array, policy):
    """Raw logits, their float32 loss and its parameter gradients, under `policy`."""

    def loss(model):
        raw = batched(model, state, policy.cast_input(images))
        logits = policy.cast_output(raw)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), raw

    (value, raw), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    return value, raw, grads


def _jaxprs(jaxpr: jex.core.Jaxpr) -> Iterator[jex.core.Jaxpr]:
    """`jaxpr` and every jaxpr inside it."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    yield from _jaxprs(sub.jaxpr)
                elif isinstance(sub, jex.core.Jaxpr):
                    yield from _jaxprs(sub)


def _equations(jaxpr: jex.core.Jaxpr) -> Iterator[jex.core.JaxprEqn]:
    """Every equation of `jaxpr`, inner jaxprs (scan, checkpoint, jit) included."""
    for sub in _jaxprs(jaxpr):
        yield from sub.eqns


def _dtype(var: Any) -> str:
    return str(getattr(var.aval, "dtype", None))


def _matmul_dtypes(model: Any, state: Any, images: jax.Array) -> set[str]:
    """The operand dtypes of every matrix multiply and convolution of a forward pass. A
    float32 product whose result is only rounded to bfloat16 (a short product evaluated
    wide on purpose, as the head mixing of CaiT and DeepViT) counts as bfloat16."""
    closed = eqx.filter_make_jaxpr(lambda m, x: batched(m, state, x))(model, images)[0]
    found = set()
    for jaxpr in _jaxprs(closed.jaxpr):
        rounded = {
            eqn.invars[0]
            for eqn in jaxpr.eqns
            if eqn.primitive.name == "convert_element_type"
            and eqn.params["new_dtype"] == jnp.bfloat16
        }
        uses: dict[Any, int] = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if not isinstance(v, jex.core.Literal):
                    uses[v] = uses.get(v, 0) + 1
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                (out,) = eqn.outvars
                if out in rounded and uses[out] == 1:
                    found.add("bfloat16")
                else:
                    found.update(_dtype(v) for v in eqn.invars)
            elif eqn.primitive is _linear_p:  # the weight is cast inside
                found.add(_dtype(eqn.invars[0]))
    return found


def measure(name: str) -> dict[str, Any]:
    """Run the tiny preset of `name` in float32 and in bfloat16 (inference mode, a batch of
    2 images) and compare logits and gradients."""
    model, state = build(name, jr.key(0))
    model = eqx.nn.inference_mode(model)
    images = jr.normal(jr.key(1), (BATCH, *input_shape(name)))
    labels = jnp.arange(BATCH) % NUM_CLASSES

    def both(model, state, images, labels):
        return [_run(model, state, images, labels, Precision(p)) for p in COMPUTE_DTYPES]

    # One program for both runs.
    runs = eqx.filter_jit(both)(model, state, images, labels)
    (loss32, logits32, grads32), (loss16, logits16, grads16) = runs
    g32 = jax.tree.leaves(eqx.filter(grads32, eqx.is_inexact_array))
    g16 = jax.tree.leaves(eqx.filter(grads16, eqx.is_inexact_array))
    flat32 = jnp.concatenate([g.ravel() for g in g32])
    flat16 = jnp.concatenate([g.astype(jnp.float32).ravel() for g in g16])
    l32, l16 = np.asarray(logits32, np.float32), np.asarray(logits16, np.float32)
    return {
        "logits_dtype": logits16.dtype,
        "matmul_dtypes": _matmul_dtypes(model, state, cast_input(images, jnp.bfloat16)),
        "logits_finite": bool(np.all(np.isfinite(l16))),
        "grad_dtypes": {g.dtype for g in g16},
        "grads_finite": bool(jnp.all(jnp.isfinite(flat16))),
        "logit_error": float(np.max(np.abs(l16 - l32)) / np.max(np.abs(l32))),
        "loss_error": abs(float(loss16) - float(loss32)),
        "grad_cosine": float(
            jnp.dot(flat16, flat32) / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))
        ),
        "grad_error": float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32)),
    }


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_against_float32(name):
    m = measure(name)
    assert m["logits_dtype"] == jnp.bfloat16, "the model promoted its activations to float32"
    assert m["matmul_dtypes"] == {"bfloat16"}, "a matmul or convolution ran in float32"
    assert m["logits_finite"] and m["grads_finite"]
    assert m["grad_dtypes"] == {jnp.dtype(jnp.float32)}, "parameter gradients must be float32"
    assert m["logit_error"] < MAX_LOGIT_ERROR, m
    assert m["grad_cosine"] > MIN_GRAD_COSINE, m


class _Normalise(eqx.Module):
    """A model that is a LayerNorm over the width of each row of each channel, and a channel
    LayerNorm over the channels of each pixel."""

    norm: ev.layers.LayerNorm
    channel_norm: ev.layers.ChannelLayerNorm

    def __call__(self, x, *, key=None):
        return jnp.concatenate([self.norm(x).ravel(), self.channel_norm(x).ravel()])


def test_layer_norm_statistics_are_float32_under_bfloat16():
    """Images of values 1000 + 4k (k a random integer in [-3, 3]): exact in bfloat16 (whose
    spacing there is 4), with means that are not, and a standard deviation of ~8. The
    bfloat16 policy must normalise them as float32 does and round the result once: its
    error is then bfloat16's rounding of the output, measured 7.8e-3 at most (outputs of
    magnitude <= 2.1). Statistics taken in bfloat16 (a mean rounded to a multiple of 4,
    `x - mean` and the variance rounded) are off by ~0.3; the tolerance is 3e-2."""
    k = jr.randint(jr.key(0), (3, 8, 2, 64), -3, 4)
    images = (1000.0 + 4.0 * k).astype(jnp.float32)
    assert bool(jnp.all(images.astype(jnp.bfloat16).astype(jnp.float32) == images))
    for axis in (1, 3):  # the means the two norms take
        mean = images.mean(axis=axis)
        assert bool(jnp.mean(mean.astype(jnp.bfloat16).astype(jnp.float32) != mean) > 0.5)
    model = _Normalise(ev.layers.LayerNorm(64), ev.layers.ChannelLayerNorm(8))
    state = eqx.nn.State(model)
    run = eqx.filter_jit(training.apply_model)
    wide, _ = run(model, state, images, precision="float32")
    low, _ = run(model, state, images, precision="bfloat16")
    assert low.dtype == jnp.float32  # apply_model casts the output back
    assert float(jnp.max(jnp.abs(wide))) > 1.5
    half = wide.shape[1] // 2
    for name, part in (("LayerNorm", slice(0, half)), ("ChannelLayerNorm", slice(half, None))):
        error = float(jnp.max(jnp.abs(low[:, part] - wide[:, part])))
        assert error <= 3e-2, (name, error)


def _dot_dtypes(fn: Callable[..., Any], *args: Any) -> set[tuple[str, ...]]:
    """The operand dtypes of every `dot_general` in the program of `fn(*args)`."""
    eqns = _equations(jax.make_jaxpr(fn)(*args).jaxpr)
    return {tuple(map(_dtype, e.invars)) for e in eqns if e.primitive.name == "dot_general"}


def test_bfloat16_linear_matches_its_plain_form():
    """A bfloat16 `Linear` is one primitive whose backward products also take bfloat16
    operands with float32 accumulation; its values and gradients are those of the plain
    `dot_general(..., preferred_element_type=float32)` form, under `vmap`, `jvp`, `scan`,
    `checkpoint`, second derivatives and per-example weights."""
    linear = ev.layers.Linear(12, 20, key=jr.key(0))
    x = jr.normal(jr.key(1), (4, 7, 12))
    scale = jnp.arange(20.0)

    def loss(layer, x, plain=False):
        def one(xi):
            xi = xi.astype(jnp.bfloat16)
            return _linear_impl(xi, layer.weight, layer.bias) if plain else layer(xi)

        y = jax.vmap(one)(x).astype(jnp.float32)
        return jnp.sum(y**2 * scale)

    grads = [eqx.filter_grad(loss)(linear, x, plain) for plain in (False, True)]
    for new, plain in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        assert new.dtype == jnp.float32
        np.testing.assert_allclose(new, plain, rtol=2e-2, atol=2e-2 * float(jnp.abs(plain).max()))
    dx = [jax.grad(lambda x, p=p: loss(linear, x, p))(x) for p in (False, True)]
    np.testing.assert_allclose(dx[0], dx[1], rtol=1e-6)

    # The backward products: bfloat16 x bfloat16 (the plain form gets a float32 cotangent).
    assert _dot_dtypes(lambda m: eqx.filter_grad(loss)(m, x), linear) == {("bfloat16", "bfloat16")}
    plain = _dot_dtypes(lambda m: eqx.filter_grad(lambda m: loss(m, x, True))(m), linear)
    assert any("float32" in operands for operands in plain)

    # Forward mode, under jit, scan and checkpoint, and second derivatives.
    tangent = jax.tree.map(jnp.ones_like, linear)
    outs = [jax.jvp(lambda m, p=p: loss(m, x, p), (linear,), (tangent,))[1] for p in (False, True)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-2)

    def scanned(x):
        def body(h, _):
            return jax.checkpoint(lambda h: linear(h)[..., :12])(h), None

        h = jax.lax.scan(body, x.astype(jnp.bfloat16), None, length=3)[0]
        return jnp.sum(h.astype(jnp.float32))

    assert jax.jit(jax.grad(scanned))(x).dtype == x.dtype
    hessian = jax.jacfwd(jax.grad(lambda v: loss(linear, v)))(x[:1, :1])
    assert hessian.shape == (1, 1, 12, 1, 1, 12) and bool(jnp.all(jnp.isfinite(hessian)))

    # Per-example weights (a batched weight) take the plain form.
    weights = jnp.stack([linear.weight] * 4)
    batched_out = jax.vmap(lambda w, v: dense(v.astype(jnp.bfloat16), w))(weights, x)
    expected = jax.vmap(lambda v: dense(v.astype(jnp.bfloat16), linear.weight))(x)
    np.testing.assert_array_equal(batched_out, expected)


def test_bfloat16_stack_keeps_bit_patterns():
    """XLA's CPU backend slices bfloat16 buffers through float32 copies of the whole buffer;
    what a bfloat16 stack keeps per layer for its backward pass is the uint16 bit pattern
    of its linear outputs, the block inputs aside."""
    model, state = build("ViT", jr.key(0), depth=2)  # a stack of two blocks
    model = eqx.nn.inference_mode(model)
    images = jr.normal(jr.key(1), (2, *input_shape("ViT"))).astype(jnp.bfloat16)

    def loss(model):
        return jnp.sum(batched(model, state, images).astype(jnp.float32))

    closed = eqx.filter_make_jaxpr(eqx.filter_grad(loss))(model)[0]
    scans = [e for e in _equations(closed.jaxpr) if e.primitive.name == "scan"]
    forward = [e for e in scans if not e.params["reverse"] and e.params["length"] > 1]
    assert len(forward) == 1
    (scan,) = forward
    carry: Any = scan.outvars[0].aval
    kept: list[Any] = [v.aval for v in scan.outvars[scan.params["num_carry"] :]]
    bits = [a for a in kept if a.dtype == jnp.uint16]
    assert len(bits) == 4  # qkv, the attention output, GELU's value and its slope
    for aval in kept:
        if aval.dtype == jnp.bfloat16:
            assert aval.shape == (scan.params["length"], *carry.shape), aval
        else:
            assert aval.dtype in (jnp.uint16, jnp.float32) or aval.ndim <= 2, aval

    # A second derivative cannot go through a bit pattern: it fails loudly (a silent zero
    # otherwise); under another policy it is the plain one.
    def loss_of_images(model, images):
        return jnp.sum(batched(model, state, images).astype(jnp.float32) ** 2)

    def hvp(model):
        grad = jax.grad(lambda v: loss_of_images(model, v))
        return jax.jvp(grad, (images,), (jnp.ones_like(images),))[1]

    with pytest.raises(NotImplementedError, match="second derivatives of a bfloat16 block"):
        hvp(model)
    plain = ev.remat(model, "all")
    assert bool(jnp.all(jnp.isfinite(hvp(plain).astype(jnp.float32))))

    # First derivatives are those of the plain bfloat16 computation, up to GELU's slope
    # being rounded to bfloat16 (measured: 1.3e-3 relative).
    def flat(grads):
        leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
        return np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in leaves])

    got, want = flat(eqx.filter_grad(loss)(model)), flat(eqx.filter_grad(loss)(plain))
    assert np.linalg.norm(got - want) < 5e-3 * np.linalg.norm(want)


def test_precision_policy():
    assert Precision().compute_dtype == "float32"
    assert Precision(jnp.bfloat16) == Precision("bfloat16") == Precision.of("bfloat16")
    assert Precision(np.dtype(np.float32)).dtype == jnp.float32
    assert hash(Precision("bfloat16")) == hash(Precision(jnp.bfloat16))  # a static jit arg
    for bad in ("float16", "float64", "int8", "fp8", None):
        with pytest.raises(ValueError, match="compute_dtype must be 'float32' or 'bfloat16'"):
            Precision(bad)
    batch = {"x": np.ones((2, 3), np.float32), "y": np.arange(2), "k": jr.key(0), "n": 3}
    cast = cast_input(batch, jnp.bfloat16)
    assert cast["x"].dtype == jnp.bfloat16 and cast["y"].dtype == batch["y"].dtype
    assert cast["k"] is batch["k"] and cast["n"] == 3
    assert cast_output(cast)["x"].dtype == jnp.float32
    assert ev.Precision is Precision


def test_train_step_in_bfloat16():
    # BatchNorm: statistics of a bfloat16 batch, float32 running ones
    model, state = build("CvT", jr.key(0), dropout=0.1)
    optimizer = training.make_optimizer(1e-3, total_steps=10)
    opt_state = training.init_optimizer(optimizer, model)
    images = jr.normal(jr.key(1), (4, *input_shape("CvT")))
    labels = jnp.arange(4) % NUM_CLASSES
    new_model, new_state, new_opt, loss = training.train_step(
        model, state, opt_state, images, labels, jr.key(2),
        optimizer=optimizer, precision="bfloat16",
    )  # fmt: skip
    for tree in (new_model, new_state, new_opt):
        leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    assert not eqx.tree_equal(new_model, model)
    assert not eqx.tree_equal(new_state, state)  # the running statistics moved
    assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> str:
    """32 training and 16 test digits (8x8)."""
    raw = data.load_digits()
    train, test = np.asarray(raw.train_images), np.asarray(raw.test_images)
    path = tmp_path_factory.mktemp("data") / "digits-tiny.npz"
    np.savez(
        path,
        images=(train[:32, 0] * 255).astype(np.uint8),
        labels=raw.train_labels[:32],
        test_images=(test[:16, 0] * 255).astype(np.uint8),
        test_labels=raw.test_labels[:16],
    )
    return str(path)


def test_cli_precision(tmp_path, tiny_npz, capsys):
    out = str(tmp_path / "bf16")
    argv = ["train", "--model", "vit-tiny", "--image-size", "8", "--batch-size", "16",
            "--data", tiny_npz, "--epochs", "1", "--no-progress", "--out", out]  # fmt: skip
    assert main([*argv, "--precision", "bfloat16"]) == 0
    stdout = capsys.readouterr().out
    assert "bfloat16" in stdout and stdout.strip().splitlines()[-1].startswith("test accuracy")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["settings"]["precision"] == "bfloat16"
    import safetensors.numpy as st

    tensors = st.load_file(os.path.join(out, "last.safetensors"))
    assert {t.dtype for t in tensors.values() if t.dtype.kind == "f"} == {np.dtype(np.float32)}

    assert main(["evaluate", "--checkpoint", out]) == 0  # in the run's precision
    assert "classes, bfloat16" in capsys.readouterr().out

    # --resume keeps the saved precision and refuses another one.
    assert main(["train", "--out", out, "--resume", "--precision", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with --precision bfloat16, not float32" in err[0]

    # A run whose settings predate --precision was trained in float32.
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    del config["settings"]["precision"]
    del config["train_config"]  # written since the training loop moved into the library
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 0
    assert ", float32, out" in capsys.readouterr().out

    # A bad value: one line on stderr, exit code 2, nothing written.
    fresh = str(tmp_path / "fresh")
    assert main([*argv[:-1], fresh, "--precision", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["eqx-vision: error: --precision must be float32 or bfloat16; got 'float16'"]
    assert not os.path.exists(fresh)


def _table() -> str:
    rows = [
        "| Architecture | logit error | loss error | gradient cosine | gradient error |",
        "|---|---|---|---|---|",
    ]
    for name in NAMES:
        m = measure(name)
        rows.append(
            f"| {name} | {m['logit_error']:.1e} | {m['loss_error']:.1e} | "
            f"{m['grad_cosine']:.5f} | {m['grad_error']:.1e} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())
