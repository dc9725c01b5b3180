"""The API contract, checked on every public model (its tiny preset): keys, inference mode,
transforms, initialisation, and clear errors for bad input."""

import inspect
import re
import subprocess
import sys
import textwrap
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from eqx_vision.layers import BatchNorm, ChannelLayerNorm, LayerNorm
from eqx_vision.training import is_stateful
from tiny import NAMES, NUM_CLASSES, batched, build, call, config, input_shape


BAD_INPUT = (ValueError, jaxtyping.TypeCheckError)

# The dropout-like rates of the models under test: every architecture but SimpleViT has an
# active stochastic layer in training mode.
DROPOUT: dict[str, dict[str, float]] = {
    "ViT": dict(dropout=0.1, emb_dropout=0.1),
    "CaiT": dict(dropout=0.1, emb_dropout=0.1, layer_dropout=0.1),
    "CrossFormer": dict(attn_dropout=0.1, ff_dropout=0.1),
    "CrossViT": dict(dropout=0.1, emb_dropout=0.1),
    "CvT": dict(dropout=0.1),
    "DeepViT": dict(dropout=0.1, emb_dropout=0.1),
    "LeViT": dict(dropout=0.1),
    "NesT": dict(dropout=0.1),
    "ParallelViT": dict(dropout=0.1, emb_dropout=0.1),
    "ViTWithPatchMerger": dict(dropout=0.1, emb_dropout=0.1),
    "PiT": dict(dropout=0.1, emb_dropout=0.1),
    "RegionViT": dict(attn_dropout=0.1, ff_dropout=0.1),
    "ScalableViT": dict(dropout=0.1),
    "T2TViT": dict(dropout=0.1, emb_dropout=0.1),
    "TwinsSVT": dict(dropout=0.1),
    "SmallDatasetViT": dict(dropout=0.1, emb_dropout=0.1),
}

# The input sizes each architecture must refuse, as (overrides of the tiny preset, input
# shape, message), for the architectures without an `image_size` argument; those with one
# refuse every size but the built one (`size_errors`).
SIZE_ERRORS: dict[str, list[tuple[dict[str, Any], tuple[int, ...], str]]] = {
    "CrossFormer": [
        ({}, (3, 36, 32), r"\(3, 36, 32\).*height.*stage-2.*multiple of global_window_size 2"),
        ({}, (3, 32, 34), r"\(3, 32, 34\).*width.*stage-1.*multiple of global_window_size 2"),
        ({}, (3, 8, 8), r"stage-4 embedding cannot take a side of 1.*multiples of 16 fit"),
        ({"local_window_size": 2}, (3, 32, 24),
         r"\(3, 32, 24\).*width.*stage-3.*multiple of local_window_size 2"),
    ],
    "CvT": [({}, (3, 0, 5), r"at least 1x1.*\(3, 0, 5\)")],
    "RegionViT": [
        ({}, (3, 30, 32), r"any multiple of 4 pixels.*\(3, 30, 32\)"),
        ({}, (3, 32, 31), r"any multiple of 4 pixels.*\(3, 32, 31\)"),
        ({"local_patch_size": 4}, (3, 24, 16),
         r"8, 16, 32 or any multiple of 64.*\(3, 24, 16\)"),
    ],
    "ScalableViT": [
        ({}, (3, 32, 24), r"\(3, 32, 24\).*width.*multiple of window_size 2"),
        ({}, (3, 4, 32), r"height.*smaller than reduction_factor 2"),
        ({}, (3, 40, 32), r"\(3, 40, 32\).*multiples of 16 fit"),
        ({}, (3, 32, 34), r"\(3, 32, 34\).*width.*multiples of 16 fit"),
    ],
    "TwinsSVT": [
        ({}, (3, 24, 32), r"multiples of 16 and at least 16.*\(3, 24, 32\)"),
        ({}, (3, 32, 40), r"multiples of 16 and at least 16.*\(3, 32, 40\)"),
        ({}, (3, 8, 8), r"at least 16.*\(3, 8, 8\)"),
    ],
}  # fmt: skip


def stochastic(name: str, **overrides: Any) -> tuple[Any, Any]:
    """The tiny preset with its dropout rates on, as `build` does."""
    return build(name, jax.random.key(0), **{**DROPOUT.get(name, {}), **overrides})


def exact_size(name: str) -> bool:
    """Whether the architecture accepts only the input size it was built for."""
    return "image_size" in config(name).kwargs


def size_errors(name: str) -> list[tuple[dict[str, Any], tuple[int, ...], str]]:
    """Input sizes the architecture's tiny preset must refuse, with the message."""
    if not exact_size(name):
        return SIZE_ERRORS.get(name, [])
    c, h, w = input_shape(name)
    built = rf"\({h}, {w}\), shape \({c}, {h}, {w}\)"
    sizes = [(h + 8, w), (h, w + 16), (h // 2, w // 2), (h + 8, w + 8)]
    return [({}, (c, bh, bw), rf"{built}.*\({c}, {bh}, {bw}\)") for bh, bw in sizes]


def rejected_shapes(name: str) -> list[tuple[dict[str, Any], tuple[int, ...], str]]:
    """Inputs the model must reject, with the message: a batch, wrong channels, sizes."""
    c, h, w = input_shape(name)
    # The expected shape as the message shows it: sides by name for models of any size.
    shape = rf"\({c}, {h}, {w}\)" if exact_size(name) else rf"\({c}, height, width\)"
    return [
        ({}, (1, c, h, w), r"a batch\? map the model over it with jax.vmap"),
        ({}, (2, c, h, w), rf"\(2, {c}, {h}, {w}\).*jax.vmap"),
        ({}, (c + 1, h, w), rf"{c} input channels, shape {shape}.*\({c + 1}, {h}, {w}\)\.$"),
        ({}, (1, h, w), rf"{c} input channels, shape {shape}.*\(1, {h}, {w}\)\.$"),
        ({}, (h, w, c), rf"{c} input channels, shape {shape}.*\({h}, {w}, {c}\) \(channels last"),
        *size_errors(name),
    ]


def image(name, seed=0, batch=None):
    shape = input_shape(name) if batch is None else (batch, *input_shape(name))
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", NAMES)
def test_inference_mode_is_deterministic_and_needs_no_key(name):
    model, state = stochastic(name)
    infer = eqx.nn.inference_mode(model)
    x = image(name)
    a = call(infer, state, x)
    b = call(infer, state, x, key=jax.random.key(1))
    c = call(infer, state, x, key=jax.random.key(2))
    assert a.shape == (NUM_CLASSES,)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(DROPOUT))
def test_training_mode_needs_a_key_and_uses_it(name):
    model, state = stochastic(name)
    stateful = is_stateful(model)
    x = image(name, batch=2) if stateful else image(name)

    @eqx.filter_jit
    def run(model, state, key):  # each run starts from the initial state
        if not stateful:
            return call(model, state, x, key=key)
        keys = None if key is None else jax.random.split(key, x.shape[0])
        out, _ = jax.vmap(
            lambda x, k: model(x, state, key=k),
            axis_name="batch",
            in_axes=(0, None if keys is None else 0),
            out_axes=(0, None),
        )(x, keys)
        return out[0] if isinstance(out, tuple) else out

    with pytest.raises(ValueError, match="key"):
        run(model, state, None)
    a, b = run(model, state, jax.random.key(1)), run(model, state, jax.random.key(2))
    assert a.shape == ((2, NUM_CLASSES) if stateful else (NUM_CLASSES,))
    assert not np.allclose(a, b), "different dropout keys gave the same output"
    np.testing.assert_array_equal(a, run(model, state, jax.random.key(1)))


def test_every_architecture_but_simple_vit_is_stochastic():
    assert sorted(DROPOUT) == sorted(set(NAMES) - {"SimpleViT"})


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad(name):
    model, state = stochastic(name)
    infer = eqx.nn.inference_mode(model)
    x = image(name, batch=2)

    def loss(model, x):
        return jnp.sum(batched(model, state, x) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(infer, x)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    logits = np.asarray(jax.jit(lambda x: batched(infer, state, x))(x))
    # The two images give different logits, so that this comparison and those of other
    # tests (bfloat16 against float32) compare something (the tiny LeViT's output depends
    # on its input only as `tiny.build` builds it: see `tiny._without_zero_scales`).
    assert np.max(np.abs(logits[0] - logits[1])) > 1e-3 * np.max(np.abs(logits[1])), logits
    np.testing.assert_allclose(logits[1], call(infer, state, x[1]), rtol=1e-5, atol=1e-5)


NORMS = (LayerNorm, ChannelLayerNorm, BatchNorm)


@pytest.mark.parametrize("name", NAMES)
def test_norms_add_the_reference_eps(name):
    """Every LayerNorm, channel LayerNorm and BatchNorm adds eps 1e-5 to the variance, as
    every norm of vit-pytorch does (torch's default and its channel LayerNorms'): on
    activations of unit variance a wrong eps is within the parity tests' noise."""
    model, _ = build(name, jax.random.key(0))
    norms = [n for n in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, NORMS))
             if isinstance(n, NORMS)]  # fmt: skip
    assert norms and {n.eps for n in norms} == {1e-5}, [(type(n).__name__, n.eps) for n in norms]


@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_parameters(name):
    a, _ = build(name, jax.random.key(3))
    b, _ = build(name, jax.random.key(3))
    c, _ = build(name, jax.random.key(4))
    assert eqx.tree_equal(a, b)
    assert not eqx.tree_equal(a, c)


def _inference_model(name: str, overrides: dict[str, Any]) -> tuple[Any, Any]:
    model, state = build(name, jax.random.key(0), **overrides)
    return eqx.nn.inference_mode(model), state


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_clear_error(name):
    """With the type checks on: jaxtyping's error or ours, naming the shape."""
    c, h, w = input_shape(name)
    for overrides, shape, _ in rejected_shapes(name):
        model, state = _inference_model(name, overrides)
        with pytest.raises(BAD_INPUT) as info:
            call(model, state, jnp.zeros(shape))
        message = str(info.value)
        assert str(shape).replace(" ", "") in message.replace(" ", "") or "f32[" in message
        if isinstance(info.value, ValueError) and exact_size(name):
            assert str((c, h, w)) in message, message
    model, state = _inference_model(name, {})
    with pytest.raises(BAD_INPUT):
        call(model, state, jnp.zeros((c, h, w), jnp.int32))


@pytest.mark.parametrize("name", NAMES)
def test_input_errors(name, no_typecheck):
    """Without the type checks, the model's own ValueError says what was expected and what
    was given: a batch, wrong channels, a size the model cannot take, integers."""
    c, h, w = input_shape(name)
    for overrides, shape, match in rejected_shapes(name):
        model, state = _inference_model(name, overrides)
        with pytest.raises(ValueError, match=match):
            call(model, state, jnp.zeros(shape))
    model, state = _inference_model(name, {})
    with pytest.raises(ValueError, match=rf"{name} expects a floating-point image.*int32"):
        call(model, state, jnp.zeros((c, h, w), jnp.int32))


@pytest.mark.parametrize("name", NAMES)
def test_empty_image_is_a_clear_error(name, no_typecheck):
    """An image with no pixels along a side is refused with a ValueError naming its shape."""
    model, state = _inference_model(name, {})
    c, h, w = input_shape(name)
    for shape in ((c, 0, w), (c, h, 0)):
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            call(model, state, jnp.zeros(shape))


@pytest.mark.parametrize("name", NAMES)
def test_input_errors_under_typecheck(name):
    """With the type checks on, a batch is refused, and wrong channels are our ValueError."""
    model, state = _inference_model(name, {})
    c, h, w = input_shape(name)
    with pytest.raises(BAD_INPUT):
        call(model, state, jnp.zeros((2, c, h, w)))
    with pytest.raises(ValueError, match="channels"):
        call(model, state, jnp.zeros((1, h, w)))


def test_bad_input_without_the_type_checking_hook():
    """Models check their input themselves: without the jaxtyping hook, the errors are the
    same ValueErrors with the expected and the actual shapes."""
    script = textwrap.dedent(
        """
        import re, sys, jax, jax.numpy as jnp, equinox as eqx
        sys.path.insert(0, "tests")
        from tiny import NAMES, build, call
        from test_behaviour import rejected_shapes
        for name in NAMES:
            for overrides, shape, match in rejected_shapes(name):
                model, state = build(name, jax.random.key(0), **overrides)
                model = eqx.nn.inference_mode(model)
                try:
                    call(model, state, jnp.zeros(shape))
                except ValueError as e:
                    assert str(shape) in str(e), (name, str(e))
                    assert re.search(match, str(e)), (name, match, str(e))
                else:
                    raise AssertionError(f"{name} accepted shape {shape}")
        print("ok", len(NAMES))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(NAMES)}"


def bad_arguments(name: str) -> list[tuple[str, Any]]:
    """Arguments the constructor must reject, each with the others of the tiny preset (with
    its dropout rates): a float and a bool for every int, a float inside every tuple of
    ints, rates outside [0, 1) for every dropout rate, and an unknown pooling."""
    model_config = config(name, **DROPOUT.get(name, {}))
    bad: list[tuple[str, Any]] = []
    for argument, value in model_config.kwargs.items():
        if "dropout" in argument:
            bad += [(argument, 1.0), (argument, -0.1)]
        elif isinstance(value, int) and not isinstance(value, bool):
            bad += [(argument, value + 0.5), (argument, True)]
        elif isinstance(value, tuple) and value and all(type(v) is int for v in value):
            bad += [(argument, (*value[:-1], value[-1] + 0.5))]
    if "pool" in inspect.signature(model_config.cls).parameters:
        bad += [("pool", "max")]
    return bad


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_clear_errors(name):
    cases = bad_arguments(name)
    assert len(cases) >= 4
    for argument, value in cases:
        with pytest.raises(BAD_INPUT) as info:
            stochastic(name, **{argument: value})
        assert argument in str(info.value), (argument, value, str(info.value))


def test_bad_arguments_without_the_type_checking_hook():
    """Without the jaxtyping hook, the constructors check their arguments themselves: a
    ValueError naming the model, the argument and the value."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from tiny import NAMES
        from test_behaviour import bad_arguments, stochastic
        count = 0
        for name in NAMES:
            for argument, value in bad_arguments(name):
                try:
                    stochastic(name, **{argument: value})
                except ValueError as e:
                    expected = f"{name}: {argument} must be "
                    assert str(e).startswith(expected), (name, argument, str(e))
                    assert repr(value) in str(e), (name, argument, str(e))
                    count += 1
                else:
                    raise AssertionError(f"{name} accepted {argument}={value!r}")
        print("ok", count)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
