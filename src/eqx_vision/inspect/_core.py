"""Attention maps in image coordinates, for every model, and gradient saliency."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class AttentionMap(eqx.Module):
    """What one group of attention layers looks at, on the image's grid.

    `maps[layer, head, i, j]` is the attention that the image cell `(i, j)` receives: from
    the class token where the layers have one (its row of probabilities over the patch
    tokens), otherwise averaged over every query that attends to it. Windowed and regional
    attention are stitched back into image coordinates (each window's keys at their place
    in the image), keys on a reduced grid (spatial-reduction attention, pooled stages) have
    that grid's stride. Cell `(i, j)` covers the image pixels
    `[i * stride[0], (i + 1) * stride[0]) x [j * stride[1], (j + 1) * stride[1])`.

    - `maps`: `(layers, heads, grid_h, grid_w)`.
    - `name`: the group of layers, as a path in the model (`"transformer"`, `"stages[1]"`).
    - `stride`: image pixels per cell, `(height, width)`.
    """

    maps: Float[Array, "layers heads grid_h grid_w"]
    name: str = eqx.field(static=True)
    stride: tuple[int, int] = eqx.field(static=True)

    def on_image(self, image_size: tuple[int, int]) -> Float[Array, "layers heads height width"]:
        """The maps at the image's resolution: each cell repeated over the pixels it covers,
        pixels beyond the last cell (a border that no patch covers) zero."""
        up = jnp.repeat(jnp.repeat(self.maps, self.stride[0], axis=2), self.stride[1], axis=3)
        up = up[:, :, : image_size[0], : image_size[1]]
        pad_h, pad_w = image_size[0] - up.shape[2], image_size[1] - up.shape[3]
        return jnp.pad(up, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))


_ATTENTION: dict[type, Callable[..., list[AttentionMap]]] = {}


def register(*types: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the function that computes a model type's `image_attention`: called as
    `fn(model, image)` (or `fn(model, image, state)` for a model with state), the model in
    inference mode and the image checked."""

    def decorate(fn: Callable[..., list[AttentionMap]]) -> Callable[..., list[AttentionMap]]:
        for t in types:
            _ATTENTION[t] = fn
        return fn

    return decorate


def image_attention(
    model: Any, image: Float[Array, "channels height width"], state: Any = None
) -> list[AttentionMap]:
    """The attention maps of every attention layer of `model` on one image, in image
    coordinates, for all the architectures of `eqx_vision` (and their timm variants).

    The model runs in inference mode (no dropout; BatchNorm with its running statistics),
    so no key is needed. Works under `jit` (`eqx.filter_jit`).

    **Arguments:**

    - `model`: any model of `eqx_vision`.
    - `image`: one image, as the model takes it.
    - `state`: the state of a model with BatchNorm (CvT, LeViT).

    **Returns:** a list of [`AttentionMap`][eqx_vision.inspect.AttentionMap]s in the order
    the layers run, one per group of layers (a stage, a branch, an encoder); see each
    system's page for its groups.
    """
    for cls in type(model).__mro__:
        if cls in _ATTENTION:
            fn = _ATTENTION[cls]
            break
    else:
        raise TypeError(
            f"image_attention: no attention maps are defined for {type(model).__name__}."
        )
    model = eqx.nn.inference_mode(model)
    return fn(model, image) if state is None else fn(model, image, state)


def saliency(
    model: Any,
    images: Float[Array, "batch channels height width"],
    labels: Int[Array, " batch"] | None = None,
    state: Any = None,
) -> Float[Array, "batch height width"]:
    """Gradient saliency (Simonyan et al., 2013, https://arxiv.org/abs/1312.6034): for each
    image, the gradient of the logit of its label with respect to the pixels, its largest
    absolute value over the channels. One `vmap` of `grad`, in inference mode.

    **Arguments:**

    - `model`: any model with a head.
    - `images`: a batch of images.
    - `labels`: the class of each image; by default the predicted one.
    - `state`: the state of a model with BatchNorm.

    **Returns:** `(batch, height, width)`, non-negative.
    """
    model = eqx.nn.inference_mode(model)

    def logits(x: Array) -> Array:
        return model(x) if state is None else model(x, state)[0]

    if labels is None:
        labels = jnp.argmax(jax.vmap(logits)(images), axis=-1)

    def one(x: Array, label: Array) -> Array:
        grad = jax.grad(lambda x: logits(x)[label])(x)
        return jnp.abs(grad).max(axis=0)

    return jax.vmap(one)(images, labels)
