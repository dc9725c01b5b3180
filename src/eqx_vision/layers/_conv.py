"""Convolutional pieces for feature maps `(channels, height, width)`, one example at a time.

Padding is always explicit and symmetric (`padding=p` as in torch), never `'SAME'`, which
pads differently for even inputs and strided convolutions.
"""

import math
from typing import Annotated, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import Minimum, NonNegative, Pair, Positive, PositivePair, checked_arguments
from ._init import full, uniform
from ._linear import layer_norm


class Conv2d(eqx.Module):
    """A 2-D convolution with symmetric zero padding, `torch.nn.Conv2d` semantics.

    The weight is `(out_channels, in_channels, kernel, kernel)` and the bias
    `(out_channels,)`, as in torch, initialised uniformly in $\\pm 1/\\sqrt{\\text{fan\\_in}}$.
    For depthwise convolutions use `DepthwiseConv2d`, which is much faster on CPU.
    """

    weight: Float[Array, "out_channels in_channels kh kw"]
    bias: Float[Array, " out_channels"] | None
    stride: tuple[int, int] = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        in_channels: Positive,
        out_channels: Positive,
        kernel_size: PositivePair,
        *,
        stride: PositivePair = 1,
        padding: Annotated[int | tuple[int, int], Pair(), Minimum(0)] = 0,
        use_bias: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channel counts.
        - `kernel_size`, `stride`, `padding`: ints or `(height, width)` pairs; the padding
          is added on both sides.
        - `use_bias`: whether to add a learned bias.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes the sizes as (height, width) pairs
        kh, kw = cast(tuple[int, int], kernel_size)
        wkey, bkey = jr.split(key)
        bound = 1.0 / math.sqrt(in_channels * kh * kw)
        self.weight = uniform(wkey, (out_channels, in_channels, kh, kw), -bound, bound)
        self.bias = uniform(bkey, (out_channels,), -bound, bound) if use_bias else None
        self.stride = cast(tuple[int, int], stride)
        self.padding = cast(tuple[int, int], padding)

    def __call__(
        self, x: Float[Array, "in_channels height width"]
    ) -> Float[Array, "out_channels out_height out_width"]:
        out_channels, in_channels, kh, kw = self.weight.shape
        weight = self.weight.astype(x.dtype)
        if kh * kw <= _MAX_WINDOWS_KERNEL or _is_patchify(
            x.shape, (kh, kw), self.stride, self.padding
        ):
            windows = _windows(x, (kh, kw), self.stride, self.padding)  # (c, kh*kw, h, w)
            weight = weight.reshape(out_channels, in_channels, kh * kw)
            y = jnp.einsum("ckhw,ock->ohw", windows, weight)
        else:
            (ph, pw) = self.padding
            y = jax.lax.conv_general_dilated(
                x[None],
                weight,
                window_strides=self.stride,
                padding=((ph, ph), (pw, pw)),
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
            )[0]
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)[:, None, None]
        return y


class DepthwiseConv2d(eqx.Module):
    """A depthwise 2-D convolution (`groups = in_channels`), written as shifted multiply-adds.

    Equal to `torch.nn.Conv2d(c, c * multiplier, k, stride, padding, groups=c)`: output
    channel `o` reads input channel `o // multiplier`. XLA's grouped convolution is tens of
    times slower than this formulation on CPU, so every depthwise convolution of the library
    (CvT projections, PiT pooling, position generators) goes through this layer.
    """

    weight: Float[Array, "out_channels 1 kh kw"]
    bias: Float[Array, " out_channels"] | None
    multiplier: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        channels: Positive,
        kernel_size: Positive,
        *,
        stride: Positive = 1,
        padding: NonNegative = 0,
        multiplier: Positive = 1,
        use_bias: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: input channels.
        - `kernel_size`: the square kernel's size.
        - `stride`, `padding`: as in torch, padding on both sides.
        - `multiplier`: output channels per input channel.
        - `use_bias`: whether to add a learned bias.
        - `key`: a `jax.random.key` for the initialisation.
        """
        wkey, bkey = jr.split(key)
        bound = 1.0 / kernel_size
        out = channels * multiplier
        self.weight = uniform(wkey, (out, 1, kernel_size, kernel_size), -bound, bound)
        self.bias = uniform(bkey, (out,), -bound, bound) if use_bias else None
        self.multiplier = multiplier
        self.stride = stride
        self.padding = padding

    def __call__(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "out_channels out_height out_width"]:
        k = self.weight.shape[-1]
        s, p = self.stride, self.padding
        if self.multiplier > 1:
            x = jnp.repeat(x, self.multiplier, axis=0)
        x = jnp.pad(x, ((0, 0), (p, p), (p, p)))
        _, height, width = x.shape
        out_h = (height - k) // s + 1
        out_w = (width - k) // s + 1
        if out_h <= 0 or out_w <= 0:
            raise ValueError(
                f"DepthwiseConv2d: a {k}x{k} kernel does not fit a padded input of "
                f"{height}x{width}."
            )
        weight = self.weight[:, 0].astype(x.dtype)
        y = jnp.zeros((x.shape[0], out_h, out_w), x.dtype)
        for i in range(k):
            for j in range(k):
                window = x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]
                y = y + window * weight[:, i, j, None, None]
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)[:, None, None]
        return y


class ChannelLayerNorm(eqx.Module):
    """LayerNorm over the channel axis of a `(channels, height, width)` map, at every pixel.

    `(x - mean_c) / sqrt(var_c + eps) * g + b` with the biased variance: the channel
    LayerNorm of CvT, NesT, Twins, CrossFormer, ScalableViT and RegionViT. The reference
    stores the affine parameters as `g` and `b` of shape `(1, C, 1, 1)`.
    """

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    eps: float = eqx.field(static=True)

    @checked_arguments
    def __init__(self, channels: Positive, *, eps: float = 1e-5):
        """**Arguments:**

        - `channels`: number of channels.
        - `eps`: added to the variance.
        """
        self.weight = full((channels,), 1.0)
        self.bias = full((channels,), 0.0)
        self.eps = eps

    def __call__(self, x: Float[Array, " channels *spatial"]) -> Float[Array, " channels *spatial"]:
        return layer_norm(x, self.weight, self.bias, self.eps, axis=0)


def max_pool2d(
    x: Float[Array, "channels height width"], kernel_size: int, stride: int, padding: int
) -> Float[Array, "channels out_height out_width"]:
    """Max pooling with symmetric padding that never wins (as `torch.nn.MaxPool2d`)."""
    p = padding
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, kernel_size, kernel_size),
        (1, stride, stride),
        ((0, 0), (p, p), (p, p)),
    )


def unfold(
    x: Float[Array, "channels height width"], kernel_size: int, stride: int, padding: int = 0
) -> Float[Array, "num_windows patch_dim"]:
    """Sliding `k x k` windows as tokens, each flattened in `(c kh kw)` order.

    `torch.nn.Unfold(k, stride=s, padding=p)` followed by `'b d n -> b n d'`: windows in
    row-major order, each vector channel-major.
    """
    c = x.shape[0]
    k, s, p = kernel_size, stride, padding
    patches = _windows(x, (k, k), (s, s), (p, p), name="unfold")
    return patches.reshape(c * kernel_size**2, -1).T


# Up to this kernel area (and for non-overlapping "patchify" kernels) a convolution is one
# matrix product over the input's windows; larger kernels (only in patch embeddings, never
# inside a stack of blocks) use XLA's convolution, which there is faster than gathering
# kh * kw copies of the input.
_MAX_WINDOWS_KERNEL = 9


def _is_patchify(
    shape: tuple[int, ...], kernel_size: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int],
) -> bool:  # fmt: skip
    """Whether the kernel tiles the input exactly: stride = kernel, no padding."""
    return (
        tuple(kernel_size) == tuple(stride)
        and tuple(padding) == (0, 0)
        and shape[1] % kernel_size[0] == 0
        and shape[2] % kernel_size[1] == 0
    )


def _windows(
    x: Float[Array, "channels height width"],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    name: str = "Conv2d",
) -> Float[Array, "channels kernel_positions out_height out_width"]:
    """The input under each kernel position: `(c, kh * kw, out_h, out_w)`, kernel offsets
    row-major, one strided slice of the padded input per offset.

    A convolution is then one matrix product with the weight (on CPU, XLA runs a
    `lax.conv` whose weight is sliced from a stacked parameter inside `lax.scan` 10-100x
    slower than the same matrix products). Non-overlapping windows are a reshape.
    """
    _, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{name}: a {kh}x{kw} window does not fit a padded input of "
            f"{height + 2 * ph}x{width + 2 * pw}."
        )
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        return x[:, None, ::sh, ::sw][..., :out_h, :out_w]
    if _is_patchify(x.shape, (kh, kw), (sh, sw), (ph, pw)):
        c = x.shape[0]
        tiles = x.reshape(c, out_h, kh, out_w, kw).transpose(0, 2, 4, 1, 3)
        return tiles.reshape(c, kh * kw, out_h, out_w)
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    pieces = [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(pieces, axis=1)
