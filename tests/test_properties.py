"""Property tests: random valid configurations build and run with the right output shape;
random invalid ones raise a ValueError naming the argument at construction."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_vision as ev


# With the jaxtyping hook on (as in this test suite), a value of the wrong *type* (a string
# where an int is annotated, a 3-tuple for a pair) is a TypeCheckError naming the parameter
# before the constructor runs; without the hook the constructor raises a ValueError.
INVALID = (ValueError, jaxtyping.TypeCheckError)

SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip


def image(shape: tuple[int, ...]) -> jax.Array:
    """A random image: an image of ones is flat over every patch and token, which a
    LayerNorm maps to zeros, so that little of the model is exercised."""
    return jax.random.normal(jax.random.key(1), shape)


def run(model: Any, shape: tuple[int, ...]) -> jax.Array:
    out = eqx.nn.inference_mode(model)(image(shape))
    assert bool(jnp.all(jnp.isfinite(out))), out
    return out


@st.composite
def vit_configs(draw, *, rectangular: bool = True, pool: bool = True) -> dict[str, Any]:
    ph, gh = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    pw, gw = (draw(st.integers(1, 4)), draw(st.integers(1, 3))) if rectangular else (ph, gh)
    config = dict(
        image_size=(ph * gh, pw * gw) if rectangular else ph * gh,
        patch_size=(ph, pw) if rectangular else ph,
        num_classes=draw(st.integers(1, 4)),
        dim=draw(st.sampled_from([8, 12, 16])),
        depth=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        mlp_dim=draw(st.integers(1, 16)),
        dim_head=draw(st.integers(1, 8)),
    )
    if pool:
        config["pool"] = draw(st.sampled_from(["cls", "mean"]))
    return config


def image_shape(config: dict[str, Any], channels: int = 3) -> tuple[int, int, int]:
    size = config["image_size"]
    h, w = size if isinstance(size, tuple) else (size, size)
    return (config.get("channels", channels), h, w)


@SETTINGS
@given(vit_configs(), st.integers(1, 4))
def test_vit_valid(config, channels):
    model = ev.ViT(**config, channels=channels, key=jax.random.key(0))
    out = run(model, image_shape(config, channels))
    assert out.shape == (config["num_classes"],)


INVALID_VIT = [
    (dict(image_size=30, patch_size=8), "image_size"),
    (dict(image_size=(32, 30), patch_size=(8, 8)), "image_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=(8, 8, 8)), "patch_size"),
    (dict(pool="max"), "pool"),
    (dict(depth=0), "depth"),
    (dict(heads=0), "heads"),
    (dict(num_classes=-1), "num_classes"),
    (dict(channels=0), "channels"),
]

BASE_VIT = dict(image_size=32, patch_size=8, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=8)


@pytest.mark.parametrize("bad,name", INVALID_VIT)
def test_vit_invalid(bad, name):
    with pytest.raises(INVALID, match=name):
        ev.ViT(**{**BASE_VIT, **bad}, key=jax.random.key(0))  # pyright: ignore[reportArgumentType]


@SETTINGS
@given(
    size=st.integers(1, 40),
    patch=st.integers(1, 12),
)
def test_vit_divisibility_is_checked_at_construction(size, patch):
    config = {**BASE_VIT, "image_size": size, "patch_size": patch}
    if size % patch:
        with pytest.raises(ValueError, match="divisible"):
            ev.ViT(**config, key=jax.random.key(0))  # pyright: ignore[reportArgumentType]
    else:
        model = ev.ViT(**config, key=jax.random.key(0))  # pyright: ignore[reportArgumentType]
        assert run(model, (3, size, size)).shape == (3,)


# Every architecture: random valid variations of its tiny preset run with the right
# output shape; a negative value for any integer hyper-parameter is refused at construction.


def _int_params(config: dict[str, Any]) -> list[str]:
    return sorted(
        k for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0
    )


@SETTINGS
@given(data=st.data())
def test_every_architecture_runs_with_random_num_classes(data):
    from tiny import NAMES, build, call, input_shape

    name = data.draw(st.sampled_from(NAMES))
    num_classes = data.draw(st.integers(1, 6))
    model, state = build(
        name, jax.random.key(data.draw(st.integers(0, 3))), num_classes=num_classes
    )
    out = call(eqx.nn.inference_mode(model), state, image(input_shape(name)))
    assert out.shape == (num_classes,)
    assert bool(jnp.all(jnp.isfinite(out)))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_architecture_refuses_negative_sizes(data):
    from tiny import NAMES, build, config

    name = data.draw(st.sampled_from(NAMES))
    arg = data.draw(st.sampled_from(_int_params(dict(config(name).kwargs))))
    value = data.draw(st.integers(-64, -1))
    with pytest.raises(INVALID) as info:
        build(name, jax.random.key(0), **{arg: value})
    assert str(value) in str(info.value) or arg in str(info.value)
