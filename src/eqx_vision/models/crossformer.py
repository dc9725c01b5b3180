"""CrossFormer: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention".

Wang et al., 2021, https://arxiv.org/abs/2108.00154.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Conv2d,
    LayerNorm,
    Linear,
    MapAttention,
    MapFeedForward,
    Stack,
    check_key,
    check_windowed_image,
    size_multiple as find_size_multiple,
    split_key,
    window_merge,
    window_partition,
)
from ..layers._attention import split_heads
from ..layers._checks import Minimum, NonNegative, PerStage, Positive, Rate, checked_arguments
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


NUM_STAGES = 4
DIM_HEAD = 32


# One int for all four stages or one per stage (the reference's `cast_tuple(value, 4)`),
# passed to `__init__` as a tuple of four.
StageInts = Annotated[int | Sequence[int], PerStage(NUM_STAGES)]


def _check_kernel_sets(
    kernel_sets: tuple[tuple[int, ...], ...], strides: tuple[int, ...], dims: tuple[int, ...]
) -> None:
    """The cross-embedding kernels of each stage agree with its stride and its `dim`."""
    for kernels, stride, dim in zip(kernel_sets, strides, dims, strict=True):
        if not kernels or min(kernels) < stride or len({(k - stride) % 2 for k in kernels}) > 1:
            raise ValueError(
                "cross_embed_kernel_sizes must give at least one kernel size per stage, all "
                ">= the stride of their stage and all differing from it by an even or all by "
                "an odd amount (else the convolutions disagree on the map size); got "
                f"{kernels} with stride {stride}."
            )
        if int(dim / 2 ** (len(kernels) - 1)) <= 0:
            raise ValueError(
                f"dim {dim} is too small to split over {len(kernels)} cross-embedding "
                f"kernels; got dim={dims!r}."
            )


class CrossEmbedLayer(eqx.Module):
    """The cross-scale embedding: convolutions of several kernel sizes, one stride, concatenated.

    Kernels are sorted ascending; the `i`-th of `n` gets `dim_out // 2**(i+1)` output
    channels and the last gets the remainder (`dim_out = 64` with four kernels: 32, 16, 8,
    8). Each has padding `(k - stride) // 2` and a bias.
    """

    convs: tuple[Conv2d, ...]
    stride: int = eqx.field(static=True)
    kernel_sizes: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        kernel_sizes: Sequence[int],
        stride: int,
        *,
        key: PRNGKeyArray,
    ):
        kernels = sorted(kernel_sizes)
        scales = [int(dim_out / 2**i) for i in range(1, len(kernels))]
        scales.append(dim_out - sum(scales))
        keys = jr.split(key, len(kernels))
        self.convs = tuple(
            Conv2d(dim_in, d, k, stride=stride, padding=(k - stride) // 2, key=kk)
            for k, d, kk in zip(kernels, scales, keys, strict=True)
        )
        self.stride = stride
        self.kernel_sizes = tuple(kernels)

    def __call__(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "dim out_height out_width"]:
        return jnp.concatenate([conv(x) for conv in self.convs], axis=0)

    def out_size(self, n: int) -> int | None:
        """The output side for an input side `n`, or `None` if the convolutions disagree."""
        sides = {
            (n + 2 * ((k - self.stride) // 2) - k) // self.stride + 1 for k in self.kernel_sizes
        }
        side = sides.pop()
        return side if not sides and side > 0 else None


class DynamicPositionBias(eqx.Module):
    """The dynamic position bias: an MLP from a 2-D offset to one bias shared by all heads.

    `Linear(2, d) → [LayerNorm → ReLU → Linear(d, d)] x 2 → LayerNorm → ReLU → Linear(d, 1)`.
    """

    linears: tuple[Linear, ...]
    norms: tuple[LayerNorm, ...]

    def __init__(self, dim: int, *, key: PRNGKeyArray):
        keys = jr.split(key, 4)
        sizes = [(2, dim), (dim, dim), (dim, dim), (dim, 1)]
        self.linears = tuple(Linear(i, o, key=k) for (i, o), k in zip(sizes, keys, strict=True))
        self.norms = tuple(LayerNorm(dim) for _ in range(3))

    def __call__(self, offsets: Float[Array, "num_offsets 2"]) -> Float[Array, " num_offsets"]:
        x = self.linears[0](offsets)
        for norm, linear in zip(self.norms, self.linears[1:], strict=True):
            x = linear(jnp.maximum(norm(x), 0.0))
        return x[:, 0]


def dpb_gather_indices(window: int) -> np.ndarray:
    """The reference's indices into the bias table for each (query, key) pair of a window.

    For positions `p_i, p_j` of a `window x window` window (row-major), with
    `(dy, dx) = p_i - p_j`, the index is `(dy + w - 1) * (2w - 1) + (dx + w - 1)`: the
    layout of a `(2w - 1)^2` table, although the table evaluated by the bias MLP has
    `(2w + 1)^2` rows, offsets `-w..w` with row stride `2w + 1`. Reproduced as is.
    """
    pos = np.arange(window)
    grid = np.stack(np.meshgrid(pos, pos, indexing="ij")).reshape(2, -1).T
    rel = grid[:, None] - grid[None, :] + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def dpb_offsets(window: int) -> np.ndarray:
    """The `(2w + 1)^2` offsets `(dy, dx)`, each in `-w..w`, row-major, as float32."""
    pos = np.arange(-window, window + 1)
    grid = np.stack(np.meshgrid(pos, pos, indexing="ij")).reshape(2, -1).T
    return grid.astype(np.float32)


class DistanceAttention(eqx.Module):
    """Short- or long-distance attention (LSDA) with its dynamic position bias.

    Short: attention within contiguous `w x w` windows. Long: attention within groups of
    `w x w` pixels spaced `H/w` rows and `W/w` columns apart. Heads are `dim // 32` of
    dimension 32; the projections are 1x1 convolutions (`to_qkv` without bias); the
    attention probabilities take dropout, the output does not.
    """

    attn: MapAttention
    dpb: DynamicPositionBias
    window: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        kind: Literal["short", "long"],
        window: int,
        *,
        dropout: float,
        key: PRNGKeyArray,
    ):
        attn_key, dpb_key = jr.split(key)
        self.attn = MapAttention(
            dim,
            heads=dim // DIM_HEAD,
            dim_head=DIM_HEAD,
            dropout=dropout,
            window=window,
            dilated=kind == "long",
            out_dropout=False,
            key=attn_key,
        )
        self.dpb = DynamicPositionBias(dim // 4, key=dpb_key)
        self.window = window

    def bias(self, dtype: Any) -> Float[Array, "seq seq"]:
        """The dynamic position bias of every (query, key) pair of a window."""
        table = self.dpb(jnp.asarray(dpb_offsets(self.window), dtype=dtype))
        return table[dpb_gather_indices(self.window)]

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        return self.attn(x, bias=self.bias(x.dtype), key=key)

    def probabilities(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "windows heads seq seq"]:
        """The attention probabilities of each window (without dropout), windows numbered
        as `window_partition` numbers them (contiguous for short-distance attention,
        interleaved for long-distance attention), each of `window ** 2` pixels row by row:
        the softmax of the scaled scores plus the position bias."""
        attn = self.attn
        assert attn.window is not None
        y = x.transpose(1, 2, 0)
        if attn.norm is not None:
            y = attn.norm(y)
        q, k, _ = attn._linear_qkv(y)
        q, k = (window_partition(t, attn.window, dilated=attn.dilated) for t in (q, k))
        q, k = (jax.vmap(split_heads, in_axes=(0, None))(t, attn.heads) for t in (q, k))
        dots = jnp.einsum("whid,whjd->whij", q, k) * attn.scale + self.bias(x.dtype)
        probs = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
        return probs.astype(x.dtype)

    def key_map(
        self, probs: Float[Array, "windows heads seq seq"], size: tuple[int, int]
    ) -> Float[Array, "heads height width"]:
        """The attention each pixel of a `size` map receives, averaged over the queries of
        its window, each window's keys put back at their place in the map."""
        attn = self.attn
        assert attn.window is not None
        received = probs.mean(axis=2).transpose(0, 2, 1)  # (windows, seq, heads)
        merged = window_merge(received, size, attn.window, dilated=attn.dilated)
        return merged.transpose(2, 0, 1)


class CrossFormerBlock(eqx.Module):
    """Short-distance attention, feed-forward, long-distance attention, feed-forward; each
    a residual branch."""

    short_attn: DistanceAttention
    short_ff: MapFeedForward
    long_attn: DistanceAttention
    long_ff: MapFeedForward

    def __init__(
        self,
        dim: int,
        local_window: int,
        global_window: int,
        *,
        attn_dropout: float,
        ff_dropout: float,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.short_attn = DistanceAttention(
            dim, "short", local_window, dropout=attn_dropout, key=k1
        )
        self.short_ff = MapFeedForward(dim, 4 * dim, dropout=ff_dropout, out_dropout=False, key=k2)
        self.long_attn = DistanceAttention(dim, "long", global_window, dropout=attn_dropout, key=k3)
        self.long_ff = MapFeedForward(dim, 4 * dim, dropout=ff_dropout, out_dropout=False, key=k4)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        k1, k2, k3, k4 = split_key(key, 4)
        x = x + self.short_attn(x, key=k1)
        x = x + self.short_ff(x, key=k2)
        x = x + self.long_attn(x, key=k3)
        return x + self.long_ff(x, key=k4)

    def attention_maps(
        self, x: Float[Array, "channels height width"]
    ) -> tuple[
        Float[Array, "channels height width"],
        tuple[Float[Array, "heads height width"], Float[Array, "heads height width"]],
    ]:
        """The block's output (in inference mode) and what each pixel receives from the
        short- and long-distance attention, `(heads, height, width)` each (see
        `DistanceAttention.key_map`)."""
        size = (x.shape[1], x.shape[2])
        short = self.short_attn.key_map(self.short_attn.probabilities(x), size)
        x = x + self.short_attn(x)
        x = x + self.short_ff(x)
        long = self.long_attn.key_map(self.long_attn.probabilities(x), size)
        x = x + self.long_attn(x)
        return x + self.long_ff(x), (short, long)


class CrossFormer(eqx.Module):
    """CrossFormer, a four-stage hierarchical vision transformer with cross-scale attention.

    Each stage starts with a cross-scale embedding layer (convolutions of several kernel
    sizes with one stride, concatenated over channels) and runs `depth` blocks of
    short-distance attention (within `local_window_size` windows), feed-forward,
    long-distance attention (within interleaved `global_window_size` groups spread over
    the whole map) and feed-forward, all pre-norm residual branches on the feature map.
    Attention scores get a dynamic position bias, an MLP of the relative offset. The last
    map is averaged and classified by a Linear layer.

    Equal to `vit_pytorch.crossformer.CrossFormer`; load its weights with
    `eqx_vision.from_vit_pytorch`. Reproduced from the reference:

    - **Position-bias indices.** The bias MLP is evaluated on the `(2w + 1)^2` offsets
      `-w..w`, but each (query, key) pair reads row `(dy + w - 1)(2w - 1) + (dx + w - 1)`,
      the index of a `(2w - 1)^2` table. So the bias of offset `(0, 0)` is the MLP at
      `(-2, 2)` for `w = 7`: the bias is still a function of the relative offset, but not
      the one the MLP is fed (see `dpb_gather_indices`).
    - Heads are `dim // 32` per stage, of dimension 32 (`dim` below 32 is rejected).
    - The cross-embedding convolutions are padded by `(k - stride) // 2`.
    - No dropout on the attention output or after the feed-forward; no final norm.

    The image sides accepted are those for which every stage's convolutions agree on the
    map size and both windows tile the map, as in the reference; `size_multiple` is the
    smallest side whose multiples all work (224 for the default configuration).
    """

    embeds: tuple[CrossEmbedLayer, ...]
    stages: tuple[Stack[CrossFormerBlock] | None, ...]
    to_logits: Linear | None
    channels: int = eqx.field(static=True)
    local_window_size: tuple[int, ...] = eqx.field(static=True)
    global_window_size: tuple[int, ...] = eqx.field(static=True)
    size_multiple: int | None = eqx.field(static=True)
    smallest_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        dim: Annotated[StageInts, Minimum(DIM_HEAD)] = (64, 128, 256, 512),
        depth: Annotated[StageInts, Minimum(0)] = (2, 2, 8, 2),
        global_window_size: Annotated[StageInts, Minimum(1)] = (8, 4, 2, 1),
        local_window_size: Annotated[StageInts, Minimum(1)] = 7,
        cross_embed_kernel_sizes: Annotated[
            Sequence[Sequence[int]], PerStage(NUM_STAGES), Minimum(1)
        ] = ((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides: Annotated[StageInts, Minimum(1)] = (4, 2, 2, 2),
        num_classes: NonNegative = 1000,
        attn_dropout: Rate = 0.0,
        ff_dropout: Rate = 0.0,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of each stage's map; an int for all four or four ints. Each must
          be at least 32 (heads are `dim // 32`).
        - `depth`: blocks per stage (an int or four).
        - `global_window_size`: the long-distance window side per stage (an int or four):
          the number of pixels per side of each interleaved group.
        - `local_window_size`: the short-distance window side per stage (an int or four).
        - `cross_embed_kernel_sizes`: per stage, the kernel sizes of the cross-scale
          embedding convolutions. Within a stage, `k - stride` must have one parity, so
          that the convolutions agree on the output size.
        - `cross_embed_strides`: the embedding stride per stage (an int or four).
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features).
        - `attn_dropout`: dropout rate on the attention probabilities.
        - `ff_dropout`: dropout rate after the feed-forward activation.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes every per-stage argument as a tuple of four
        dims, depths = cast(tuple[int, ...], dim), cast(tuple[int, ...], depth)
        global_windows = cast(tuple[int, ...], global_window_size)
        local_windows = cast(tuple[int, ...], local_window_size)
        strides = cast(tuple[int, ...], cross_embed_strides)
        kernel_sets = cast(tuple[tuple[int, ...], ...], cross_embed_kernel_sizes)
        _check_kernel_sets(kernel_sets, strides, dims)

        keys = jr.split(key, 2 * NUM_STAGES + 1)
        dims_in = (channels, *dims[:-1])
        embeds, stages = [], []
        for i in range(NUM_STAGES):
            embeds.append(
                CrossEmbedLayer(dims_in[i], dims[i], kernel_sets[i], strides[i], key=keys[2 * i])
            )

            def make_block(index: int, *, key: PRNGKeyArray, i: int = i) -> CrossFormerBlock:
                return CrossFormerBlock(
                    dims[i],
                    local_windows[i],
                    global_windows[i],
                    attn_dropout=attn_dropout,
                    ff_dropout=ff_dropout,
                    key=key,
                )

            stages.append(Stack(make_block, depths[i], key=keys[2 * i + 1]) if depths[i] else None)
        self.embeds = tuple(embeds)
        self.stages = tuple(stages)
        self.to_logits = Linear(dims[-1], num_classes, key=keys[-1]) if num_classes > 0 else None
        self.channels = channels
        self.local_window_size = local_windows
        self.global_window_size = global_windows
        period, stride = 1, 1
        for i in range(NUM_STAGES):
            stride *= strides[i]
            period = math.lcm(period, stride * local_windows[i], stride * global_windows[i])
        self.size_multiple = find_size_multiple(lambda n: self._fit(n) is None, period=period)
        fitting = next((n for n in range(1, 1 << 14) if self._fit(n) is None), None)
        if fitting is None:
            raise ValueError(
                "no image size fits the windows: local_window_size "
                f"{local_windows} and global_window_size {global_windows} never tile the "
                f"stage maps made by cross_embed_strides {strides}."
            )
        self.smallest_size = fitting

    def _fit(self, side: int) -> str | None:
        """Why an image side of `side` pixels does not fit, or `None` if it does."""
        n = side
        for i, embed in enumerate(self.embeds):
            out = embed.out_size(n)
            if out is None:
                return f"the stage-{i + 1} embedding cannot take a side of {n}"
            n = out
            if self.stages[i] is None:  # no attention, so nothing to tile
                continue
            for name, window in (
                ("local_window_size", self.local_window_size[i]),
                ("global_window_size", self.global_window_size[i]),
            ):
                if n % window:
                    return f"the stage-{i + 1} map side {n} is not a multiple of {name} {window}"
        return None

    def _check(self, x: Float[Array, "channels height width"]) -> None:
        check_windowed_image(
            x,
            self.channels,
            self._fit,
            self.size_multiple,
            self.smallest_size,
            type(self).__name__,
        )

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's output map, of the stage's
        channels, its stride the product of the embedding strides so far. (With kernels
        that differ from the stride by an odd amount, a stage's map is one cell smaller
        than the image side over the stride when the stride divides that side.)"""
        infos, reduction = [], 1
        for i, embed in enumerate(self.embeds):
            reduction *= embed.stride
            channels = sum(conv.weight.shape[0] for conv in embed.convs)
            infos.append(FeatureInfo(i, f"stages[{i}]", channels, (reduction, reduction)))
        return tuple(infos)

    def _stages(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None
    ) -> list[Float[Array, "dim h w"]]:
        """Every stage's output map, in order."""
        outputs = []
        for embed, stage, stage_key in zip(
            self.embeds, self.stages, split_key(key, NUM_STAGES), strict=True
        ):
            x = embed(x)
            if stage is not None:
                x = stage(x, key=stage_key)
            outputs.append(x)
        return outputs

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dim h w"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with sides the windows fit.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's map `(dim, height / 32, width / 32)` (for the default
        strides), before pooling.
        """
        self._check(x)
        check_key(self, key)
        return self._stages(x, key)[-1]

    def forward_head(
        self, x: Float[Array, "dim h w"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the mean over the
        map, `(dim,)`.
        """
        pooled = x.mean(axis=(1, 2))
        if pre_logits or self.to_logits is None:
            return pooled
        return self.to_logits(pooled)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the output map of chosen stages.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which stages (see `feature_info`): `None` for all four, an int `n` for
          the last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; CrossFormer has no final norm, so it
          changes nothing.
        - `output_fmt`: `"map"` for `(channels, h, w)` maps, `"tokens"` for
          `(h * w, channels)` tokens, row by row.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks of
        each stage run in their scanned stack.
        """
        del norm
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, NUM_STAGES, name)
        self._check(x)
        check_key(self, key)
        maps = self._stages(x, key)
        outputs = []
        for i in chosen:
            y = maps[i]
            if output_fmt == "tokens":
                y = y.reshape(y.shape[0], -1).T
            outputs.append(y)
        return outputs if intermediates_only else (maps[-1], outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "CrossFormer":
        """This model for `(height, width)` images: the model has no parameter that depends
        on the image size, so it is returned as it is if its windows tile both sides, and a
        `ValueError` says why otherwise (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        for side, axis in zip(image_size, ("height", "width"), strict=True):
            reason = self._fit(int(side))
            if reason is not None:
                raise ValueError(
                    f"CrossFormer cannot take images of size {tuple(image_size)}: for the "
                    f"{axis}, {reason}."
                )
        return self

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "CrossFormer":
        """This model with a new classifier of `num_classes` outputs, or none for `0` (see
        [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.feature_info[-1].channels, num_classes, key=key)
        return eqx.tree_at(lambda m: m.to_logits, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with sides the windows fit (see the
          class docstring).
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the pooled
        features `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))
