"""The `-tiny` presets of `eqx_vision.presets.CATALOGUE`, built and called the way the tests
that run across every architecture need them.

The tests build each architecture from its tiny preset with 5 classes and 3 channels; what
a test needs beyond the constructor arguments comes from the preset (its input size) or the
model (`training.is_stateful`), or is a small table in the one test module that needs it
(dropout rates, rejected input sizes).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from eqx_vision.layers import BatchNorm
from eqx_vision.presets import CATALOGUE, ModelConfig, resolve_model
from eqx_vision.training import is_stateful


NUM_CLASSES = 5
# Public class name -> preset slug, in alphabetical order (the ids of parametrized tests).
SLUGS: dict[str, str] = {a.model: a.slug for a in sorted(CATALOGUE, key=lambda a: a.model)}
NAMES: list[str] = list(SLUGS)


def config(name: str, **overrides: Any) -> ModelConfig:
    """The tiny preset of the architecture `name` (a class name) with `NUM_CLASSES` classes,
    3 channels, and `overrides` of its constructor arguments."""
    base = resolve_model(f"{SLUGS[name]}-tiny", num_classes=NUM_CLASSES, data_channels=3)
    return dataclasses.replace(base, kwargs={**base.kwargs, **overrides})


def build(name: str, key: jax.Array, **overrides: Any) -> tuple[Any, Any]:
    """`(model, state)` of the tiny preset (`state` is empty for stateless models), with
    every output depending on the input (see `_without_zero_scales`)."""
    model, state = config(name, **overrides).build(key)
    return _without_zero_scales(model), state


def _without_zero_scales(model: Any) -> Any:
    """`model` with the BatchNorm scales initialised to zero set to one.

    LeViT zero-initialises the scale of the BatchNorm after every attention, as its
    reference does: its downsampling block, which has no residual, then outputs a constant,
    and so does the whole model, whatever the image. A test comparing outputs (batched
    against single, bfloat16 against float32) would compare constants. With the scales at
    one, as after some training, every part of the model reaches the output. Other models
    are unchanged (their BatchNorm scales start at one).
    """

    def unzero(node: Any) -> Any:
        if isinstance(node, BatchNorm):
            return eqx.tree_at(
                lambda bn: bn.weight, node, jnp.where(node.weight == 0, 1.0, node.weight)
            )
        return node

    return jax.tree.map(unzero, model, is_leaf=lambda node: isinstance(node, BatchNorm))


def input_shape(name: str) -> tuple[int, int, int]:
    """`(channels, height, width)` of one image for the tiny preset."""
    c = config(name)
    return (c.channels, *c.image_size)


def call(model: Any, state: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Logits of one image, whatever the model's calling convention."""
    if is_stateful(model):
        out, _ = model(x, state, key=key)
    else:
        out = model(x, key=key)
    return out[0] if isinstance(out, tuple) else out


def batched(model: Any, state: Any, x: jax.Array) -> jax.Array:
    """Logits of a batch of images (BatchNorm statistics over the batch)."""
    if is_stateful(model):
        out, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    else:
        out = jax.vmap(model)(x)
    return out[0] if isinstance(out, tuple) else out
