"""Cutting images into patch tokens, and checking what a model is given."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import Positive, checked_arguments
from ._linear import LayerNorm, Linear


def pair(value: Any, name: str) -> tuple[int, int]:
    """`(h, w)` from an int or a pair of ints (a tuple or a list), validated as positive:
    the one reading of a size that may be given either way. Anything else is a
    `ValueError` naming `name` (the type is checked here, not by an annotation)."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}.")
    if min(out) <= 0:
        raise ValueError(f"{name} must be positive; got {value!r}.")
    return out


def check_divisible(
    image_size: tuple[int, int], patch_size: tuple[int, int], name: str = "patch_size"
) -> tuple[int, int]:
    """The patch grid `(h, w)`; a ValueError if `image_size` is not a multiple of `name`."""
    (ih, iw), (ph, pw) = image_size, patch_size
    if ih % ph or iw % pw:
        raise ValueError(
            f"image_size must be divisible by {name}; got image_size={image_size} and "
            f"{name}={patch_size}."
        )
    return ih // ph, iw // pw


AXES = ("channels", "height", "width")


def check_image(x: Array, expected: tuple[int, int | None, int | None], model: str) -> None:
    """Raise a ValueError unless `x` is one float image of shape `expected`.

    `expected` is `(channels, height, width)`; a side given as `None` is not checked here
    (models that take several sizes check the sides themselves), and the messages then
    show it by name. Runs on static shapes only, so it is free under `jax.jit`.
    """
    c, h, w = expected
    named = [a if v is None else str(v) for a, v in zip(AXES, expected, strict=True)]
    shown = "(" + ", ".join(named) + ")"
    if x.ndim != 3:
        hint = " (a batch? map the model over it with jax.vmap)" if x.ndim == 4 else ""
        raise ValueError(
            f"{model} takes one image of shape (channels, height, width) = {shown}; "
            f"got an array of shape {tuple(x.shape)}{hint}."
        )
    if x.shape[0] != c:
        hint = " (channels last? the channel axis comes first)" if x.shape[-1] == c else ""
        raise ValueError(
            f"{model} expects {c} input channels, shape {shown}; got shape {tuple(x.shape)}{hint}."
        )
    if (h is not None and x.shape[1] != h) or (w is not None and x.shape[2] != w):
        raise ValueError(
            f"{model} was built for images of size {(h, w)}, shape {shown}; got shape "
            f"{tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{model} expects a floating-point image; got dtype {x.dtype}.")


def patchify(
    x: Float[Array, "channels height width"],
    patch_size: tuple[int, int],
    *,
    channels_first: bool = False,
) -> Float[Array, "num_patches patch_dim"]:
    """`'c (h p1) (w p2) -> (h w) (p1 p2 c)'`: row-major patches, channels innermost.

    With `channels_first=True` each patch is flattened `(c p1 p2)` instead, channels
    outermost (the patch order of Twins-SVT and RegionViT).
    """
    c, height, width = x.shape
    ph, pw = patch_size
    h, w = height // ph, width // pw
    order = (1, 3, 0, 2, 4) if channels_first else (1, 3, 2, 4, 0)
    x = x.reshape(c, h, ph, w, pw).transpose(order)
    return x.reshape(h * w, ph * pw * c)


class PatchEmbedding(eqx.Module):
    """Non-overlapping patches, flattened `(p1 p2 c)`, then `[LayerNorm] → Linear → [LayerNorm]`.

    The patch embedding of ViT (with both norms), Parallel ViT (with neither) and SPT (with
    the first only); with `channels_first=True` the patches are flattened `(c p1 p2)`.
    """

    pre_norm: LayerNorm | None
    linear: Linear
    post_norm: LayerNorm | None
    patch_size: tuple[int, int] = eqx.field(static=True)
    channels_first: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        channels: Positive,
        patch_size: tuple[Positive, Positive],
        dim: Positive,
        *,
        pre_norm: bool = True,
        post_norm: bool = True,
        channels_first: bool = False,
        bias: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: input channels.
        - `patch_size`: `(height, width)` of a patch.
        - `dim`: the token dimension.
        - `pre_norm`, `post_norm`: whether to layer-normalise the flattened patch before
          the projection, and the token after it.
        - `channels_first`: flatten each patch `(c p1 p2)` rather than `(p1 p2 c)`.
        - `bias`: whether the projection has a bias.
        - `key`: a `jax.random.key` for the initialisation.
        """
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.pre_norm = LayerNorm(patch_dim) if pre_norm else None
        self.linear = Linear(patch_dim, dim, use_bias=bias, key=key)
        self.post_norm = LayerNorm(dim) if post_norm else None
        self.patch_size = patch_size
        self.channels_first = channels_first

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "num_patches dim"]:
        x = patchify(x, self.patch_size, channels_first=self.channels_first)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.linear(x)
        if self.post_norm is not None:
            x = self.post_norm(x)
        return x


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings, `(height * width, dim)`, row-major.

    Feature blocks `[sin(x ω), cos(x ω), sin(y ω), cos(y ω)]` with x the column, y the row,
    and `ω_i = temperature^(-i / (dim/4 - 1))`, as in "Better plain ViT baselines"
    (arXiv:2205.01580). Returned as a NumPy constant: it is not a parameter.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for sine-cosine embeddings; got dim={dim}.")
    quarter = dim // 4
    if quarter < 2:
        raise ValueError(f"dim must be at least 8 for sine-cosine embeddings; got dim={dim}.")
    f32 = np.float32
    y, x = np.meshgrid(np.arange(height, dtype=f32), np.arange(width, dtype=f32), indexing="ij")
    omega = f32(1.0) / f32(temperature) ** (np.arange(quarter, dtype=f32) / f32(quarter - 1))
    y = y.reshape(-1, 1) * omega[None]
    x = x.reshape(-1, 1) * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe.astype(np.float32)
