"""The API contract, checked on every public model: keys, inference mode, transforms,
initialisation, and clear errors for bad input."""

import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from zoo import ZOO, bad_arguments, batched, call


NAMES = sorted(ZOO)
BAD_INPUT = (ValueError, jaxtyping.TypeCheckError)


def image(entry, seed=0, batch=None):
    shape = entry.input_shape if batch is None else (batch, *entry.input_shape)
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", NAMES)
def test_inference_mode_is_deterministic_and_needs_no_key(name):
    entry = ZOO[name]
    model, state = entry.build(jax.random.key(0))
    infer = eqx.nn.inference_mode(model)
    x = image(entry)
    a = call(entry, infer, state, x)
    b = call(entry, infer, state, x, key=jax.random.key(1))
    c = call(entry, infer, state, x, key=jax.random.key(2))
    assert a.shape == (entry.config.get("num_classes", 1000),)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", [n for n in NAMES if ZOO[n].stochastic])
def test_training_mode_needs_a_key_and_uses_it(name):
    entry = ZOO[name]
    model, state = entry.build(jax.random.key(0))
    x = image(entry, batch=2) if entry.stateful else image(entry)

    @eqx.filter_jit
    def run(model, state, key):  # each run starts from the initial state
        if not entry.stateful:
            return call(entry, model, state, x, key=key)
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
    assert not np.allclose(a, b), "different dropout keys gave the same output"
    np.testing.assert_array_equal(a, run(model, state, jax.random.key(1)))


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad(name):
    entry = ZOO[name]
    model, state = entry.build(jax.random.key(0))
    infer = eqx.nn.inference_mode(model)
    x = image(entry, batch=2)

    def loss(model, x):
        return jnp.sum(batched(entry, model, state, x) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(infer, x)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    np.testing.assert_allclose(
        jax.jit(lambda x: batched(entry, infer, state, x))(x)[1],
        call(entry, infer, state, x[1]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_parameters(name):
    entry = ZOO[name]
    a, _ = entry.build(jax.random.key(3))
    b, _ = entry.build(jax.random.key(3))
    c, _ = entry.build(jax.random.key(4))
    assert eqx.tree_equal(a, b)
    assert not eqx.tree_equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_clear_error(name):
    entry = ZOO[name]
    model, state = (
        eqx.nn.inference_mode(entry.build(jax.random.key(0))[0]),
        entry.build(jax.random.key(0))[1],
    )
    c, h, w = entry.input_shape
    for shape in entry.rejected_shapes():
        with pytest.raises(BAD_INPUT) as info:
            call(entry, model, state, jnp.zeros(shape))
        message = str(info.value)
        assert str(shape).replace(" ", "") in message.replace(" ", "") or "f32[" in message
        if isinstance(info.value, ValueError) and entry.exact_size:
            assert str((c, h, w)) in message, message
    with pytest.raises(BAD_INPUT):
        call(entry, model, state, jnp.zeros((c, h, w), jnp.int32))


def test_bad_input_without_the_type_checking_hook():
    """Models check their input themselves: without the jaxtyping hook, the errors are the
    same ValueErrors with the expected and the actual shapes."""
    script = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp, equinox as eqx
        sys.path.insert(0, "tests")
        from zoo import ZOO, call
        for name, entry in sorted(ZOO.items()):
            model, state = entry.build(jax.random.key(0))
            model = eqx.nn.inference_mode(model)
            for shape in entry.rejected_shapes():
                try:
                    call(entry, model, state, jnp.zeros(shape))
                except ValueError as e:
                    assert str(shape) in str(e), (name, str(e))
                    if entry.exact_size:
                        assert str(entry.input_shape) in str(e), (name, str(e))
                else:
                    raise AssertionError(f"{name} accepted shape {shape}")
        print("ok", len(ZOO))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(ZOO)}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_clear_errors(name):
    entry = ZOO[name]
    cases = bad_arguments(entry)
    assert len(cases) >= 4
    for argument, value in cases:
        with pytest.raises(BAD_INPUT) as info:
            entry.build(jax.random.key(0), **{argument: value})
        assert argument in str(info.value), (argument, value, str(info.value))


def test_bad_arguments_without_the_type_checking_hook():
    """Without the jaxtyping hook, the constructors check their arguments themselves: a
    ValueError naming the model, the argument and the value."""
    script = textwrap.dedent(
        """
        import sys, jax
        sys.path.insert(0, "tests")
        from zoo import ZOO, bad_arguments
        count = 0
        for name, entry in sorted(ZOO.items()):
            for argument, value in bad_arguments(entry):
                try:
                    entry.build(jax.random.key(0), **{argument: value})
                except ValueError as e:
                    expected = f"{entry.cls.__name__}: {argument} must be "
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
