"""RegionViT: "RegionViT: Regional-to-Local Attention for Vision Transformers".

Chen, Panda and Fan, 2021, https://arxiv.org/abs/2106.02689.
"""

from collections.abc import Sequence
from typing import Annotated, Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    PEG,
    Attention,
    ChannelLayerNorm,
    Conv2d,
    FeedForward,
    LayerNorm,
    Linear,
    Stack,
    check_image,
    check_key,
    gelu,
    split_key,
    window_merge,
    window_partition,
)
from ..layers._checks import NonNegative, PerStage, Positive, Rate, checked_arguments
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


HEADS = 4
DIM_HEAD = 32
FF_MULT = 4
NUM_STAGES = 4


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _local_grid(side: int, tokenize_local_3_conv: bool) -> int:
    """The local-token grid along one image side: the tokenizer reduces by 4 either way."""
    if tokenize_local_3_conv:
        side = _conv_out(_conv_out(side, 3, 2, 1), 3, 2, 1)
        return _conv_out(side, 3, 1, 1)
    return _conv_out(side, 8, 4, 3)


def _stage_windows(
    side: int, window_size: int, local_patch_size: int, tokenize_local_3_conv: bool
) -> tuple[int, ...] | None:
    """The window (local tokens per region token) of each stage along one image side, or
    `None` if an image side of `side` pixels cannot be processed."""
    region_patch = local_patch_size * window_size
    if side < 1 or side % region_patch or side % local_patch_size:
        return None
    local, region = _local_grid(side, tokenize_local_3_conv), side // region_patch
    windows = []
    for stage in range(NUM_STAGES):
        if stage:
            local, region = _conv_out(local, 3, 2, 1), _conv_out(region, 3, 2, 1)
        # The local map must split into one window per region token, and the relative
        # position table only covers windows of up to `window_size`.
        if local % region or not 1 <= local // region <= window_size:
            return None
        windows.append(local // region)
    return tuple(windows)


def _supported_sides(
    window_size: int, local_patch_size: int, tokenize_local_3_conv: bool
) -> tuple[int | None, tuple[int, ...]]:
    """`(multiple, extra)`: an image side is supported iff it is a multiple of `multiple`
    (if not `None`) or one of the `extra` sides.

    With `P = local_patch_size * window_size` and `4 | P`, the local map is `P / 4` times
    the region map; if that ratio `k` is at most `window_size`, every multiple of `8 P`
    keeps the ratio through the three stride-2 downsamplings (every multiple of `P` when
    `k = 1`). Other sides work only when every odd region map met on the way is at most
    `window_size` wide, so they all lie below `4 * window_size * P`, a range searched here.
    """
    region_patch = local_patch_size * window_size
    ratio, rest = divmod(region_patch, 4)
    multiple = None
    if rest == 0 and ratio <= window_size:
        multiple = region_patch if ratio == 1 else 8 * region_patch
    bound = 16 * (window_size + 1) * region_patch
    extra = tuple(
        side
        for side in range(region_patch, bound + 1, region_patch)
        if (multiple is None or side % multiple)
        and _stage_windows(side, window_size, local_patch_size, tokenize_local_3_conv)
    )
    return multiple, extra


# A positive int for all four stages or one per stage, passed to `__init__` as a tuple of four.
StageInts = Annotated[Positive | Sequence[Positive], PerStage(NUM_STAGES)]


class ConvTokenizer(eqx.Module):
    """Three 3x3 convolutions that turn the image into the local-token map (4x smaller).

    `Conv(s2) → ChannelLayerNorm → GELU → Conv(s2) → ChannelLayerNorm → GELU → Conv(s1)`,
    every convolution with padding 1 and bias: the tokenizer of the smaller RegionViTs.
    """

    conv1: Conv2d
    norm1: ChannelLayerNorm
    conv2: Conv2d
    norm2: ChannelLayerNorm
    conv3: Conv2d

    def __init__(self, channels: int, dim: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `channels`: input channels.
        - `dim`: channels of the token map.
        - `key`: a `jax.random.key` for the initialisation.
        """
        key1, key2, key3 = jr.split(key, 3)
        self.conv1 = Conv2d(channels, dim, 3, stride=2, padding=1, key=key1)
        self.norm1 = ChannelLayerNorm(dim)
        self.conv2 = Conv2d(dim, dim, 3, stride=2, padding=1, key=key2)
        self.norm2 = ChannelLayerNorm(dim)
        self.conv3 = Conv2d(dim, dim, 3, stride=1, padding=1, key=key3)

    def __call__(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "dim out_height out_width"]:
        x = gelu(self.norm1(self.conv1(x)))
        x = gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class R2LBlock(eqx.Module):
    """One regional-to-local layer: regional self-attention, then local attention in each
    window together with its region token, then a feed-forward block on both.

    The same `attn` (its LayerNorm and weights) serves both attentions.
    """

    attn: Attention
    ff: FeedForward

    def __init__(self, dim: int, attn_dropout: float, ff_dropout: float, *, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: token dimension.
        - `attn_dropout`: dropout on the attention probabilities and output.
        - `ff_dropout`: dropout after the feed-forward activation.
        - `key`: a `jax.random.key` for the initialisation.
        """
        attn_key, ff_key = jr.split(key)
        self.attn = Attention(
            dim, heads=HEADS, dim_head=DIM_HEAD, dropout=attn_dropout, key=attn_key
        )
        self.ff = FeedForward(dim, dim * FF_MULT, dropout=ff_dropout, out_dropout=False, key=ff_key)

    def __call__(
        self,
        tokens: tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]],
        bias: Float[Array, "heads seq seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]]:
        """**Arguments:**

        - `tokens`: `(region, local)`: one region token per window, `(windows, dim)`, and
          each window's local tokens, `(windows, window_seq, dim)`.
        - `bias`: the local attention's position bias, `(heads, 1 + window_seq, 1 +
          window_seq)`, the region token first.
        - `key`: needed only for dropout in training mode.

        **Returns:** the updated `(region, local)`.
        """
        region, local = tokens
        region_key, local_key, ff_key = split_key(key, 3)
        region = region + self.attn(region, key=region_key)
        joined = jnp.concatenate([region[:, None], local], axis=1)
        keys = None if local_key is None else jr.split(local_key, joined.shape[0])
        attended = jax.vmap(lambda t, k: self.attn(t, bias=bias, key=k))(joined, keys)
        joined = joined + attended
        joined = joined + self.ff(joined, key=ff_key)
        return joined[:, 0], joined[:, 1:]

    def attention_maps(
        self,
        tokens: tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]],
        bias: Float[Array, "heads seq seq"],
    ) -> tuple[
        tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]],
        tuple[Float[Array, "heads windows windows"], Float[Array, "windows heads seq seq"]],
    ]:
        """The block's output (in inference mode) and its attention probabilities: the
        regional attention `(heads, windows, windows)` and each window's local attention
        `(windows, heads, 1 + window_seq, 1 + window_seq)`, the region token first."""
        region, local = tokens
        regional = self.attn.probabilities(region)
        region = region + self.attn(region)
        joined = jnp.concatenate([region[:, None], local], axis=1)
        local_probs = jax.vmap(lambda t: self.attn.probabilities(t, bias=bias))(joined)
        return self((tokens[0], local), bias), (regional, local_probs)


class R2LStage(eqx.Module):
    """A stage: `[Downsample] → [PEG] →` a stack of `R2LBlock`s on local and region maps.

    The downsampling convolution (3x3, stride 2, padding 1) is one module applied to both
    maps. The relative position table is shared by all the stage's blocks.
    """

    downsample: Conv2d | None
    peg: PEG | None
    rel_pos_bias: Float[Array, "positions heads"]
    layers: Stack[R2LBlock]
    window_size: int = eqx.field(static=True)

    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        *,
        window_size: int,
        downsample: bool,
        use_peg: bool,
        attn_dropout: float,
        ff_dropout: float,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim_in`, `dim`: token dimension of the previous stage and of this one.
        - `depth`: number of `R2LBlock`s.
        - `window_size`: the largest window the relative position table covers.
        - `downsample`: whether to start with the stride-2 convolution.
        - `use_peg`: whether to apply a PEG to the local map after it.
        - `attn_dropout`, `ff_dropout`: dropout rates of the blocks.
        - `key`: a `jax.random.key` for the initialisation.
        """
        down_key, peg_key, bias_key, layers_key = jr.split(key, 4)
        self.downsample = (
            Conv2d(dim_in, dim, 3, stride=2, padding=1, key=down_key) if downsample else None
        )
        self.peg = PEG(dim, key=peg_key) if use_peg else None
        self.rel_pos_bias = normal(bias_key, ((2 * window_size - 1) ** 2, HEADS))
        self.layers = Stack(
            lambda _, key: R2LBlock(dim, attn_dropout, ff_dropout, key=key),
            depth,
            key=layers_key,
        )
        self.window_size = window_size

    def position_bias(self, window: tuple[int, int]) -> Float[Array, "heads seq seq"]:
        """The local attention bias for `window = (wh, ww)` local tokens per region token.

        Token `(i, j)` of the window attends to `(i', j')` with the table row
        `(i - i' + w - 1) + (j - j' + w - 1) * (2w - 1)`, `w = window_size`: the row offset
        is the minor index, as in the reference. The region token's row and column are 0.
        """
        wh, ww = window
        w = self.window_size
        rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        d_rows = rows[:, None] - rows[None, :] + w - 1
        d_cols = cols[:, None] - cols[None, :] + w - 1
        bias = self.rel_pos_bias[d_rows + d_cols * (2 * w - 1)]
        return jnp.pad(jnp.moveaxis(bias, -1, 0), ((0, 0), (1, 0), (1, 0)))

    def enter(
        self,
        local: Float[Array, "dim_in local_h local_w"],
        region: Float[Array, "dim_in region_h region_w"],
    ) -> tuple[
        tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]],
        Float[Array, "heads seq seq"],
        tuple[int, int],
        tuple[int, int],
    ]:
        """The blocks' input: `((region tokens, windows of local tokens), bias, local map
        size, window)`, after the downsampling and the PEG."""
        if self.downsample is not None:
            local, region = self.downsample(local), self.downsample(region)
        if self.peg is not None:
            local = self.peg(local)
        dim, lh, lw = local.shape
        _, rh, rw = region.shape
        window = (lh // rh, lw // rw)
        bias = self.position_bias(window).astype(local.dtype)
        windows = window_partition(local.transpose(1, 2, 0), window)
        regions = region.reshape(dim, rh * rw).T
        return (regions, windows), bias, (lh, lw), window

    @staticmethod
    def leave(
        tokens: tuple[Float[Array, "windows dim"], Float[Array, "windows window_seq dim"]],
        size: tuple[int, int],
        window: tuple[int, int],
    ) -> tuple[Float[Array, "dim lh lw"], Float[Array, "dim rh rw"]]:
        """The blocks' output tokens back on the `(local, region)` maps."""
        regions, windows = tokens
        (lh, lw), (wh, ww) = size, window
        local = window_merge(windows, size, window).transpose(2, 0, 1)
        return local, regions.T.reshape(regions.shape[1], lh // wh, lw // ww)

    def __call__(
        self,
        local: Float[Array, "dim_in local_h local_w"],
        region: Float[Array, "dim_in region_h region_w"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "dim lh lw"], Float[Array, "dim rh rw"]]:
        """**Arguments:**

        - `local`: the local-token map.
        - `region`: the region-token map; the local map must be a whole number of windows
          per region token along each axis.
        - `key`: needed only for dropout in training mode.

        **Returns:** the updated `(local, region)` maps.
        """
        tokens, bias, size, window = self.enter(local, region)
        return self.leave(self.layers(tokens, bias, key=key), size, window)


class RegionViT(eqx.Module):
    """The regional-to-local vision transformer.

    Two token maps are built from the image: local tokens by a convolutional tokenizer that
    reduces the image 4x (one 8x8 stride-4 convolution, or with `tokenize_local_3_conv`
    three 3x3 convolutions), and region tokens from non-overlapping
    `(local_patch_size * window_size)`-pixel patches, each flattened in `(c p1 p2)` order
    and embedded by a 1x1 convolution. Four stages follow, each halving both maps with one
    stride-2 convolution (except the first) and running regional-to-local blocks: the region
    tokens attend to each other, then every window of local tokens attends within itself
    together with its region token, under a learned relative-position bias, and a
    feed-forward block updates both. The mean region token goes through
    `LayerNorm → Linear`.

    Equal to `vit_pytorch.regionvit.RegionViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. The reference details reproduced:

    - attention has 4 heads of 32 dimensions in every stage, whatever `dim`;
    - one attention module (the same LayerNorm and weights) serves both the regional and
      the local attention of a layer; the feed-forward block (hidden width `4 * dim`, no
      dropout after its output layer) runs on the joined region and local tokens only;
    - one downsampling convolution per stage is shared by the local and the region map;
    - the PEG (`use_peg`, from the second stage on) acts on the local map only;
    - the relative-position table has `(2 * window_size - 1)^2` rows and is indexed with
      the row offset as the minor index, `(Δi + w - 1) + (Δj + w - 1)(2w - 1)`; the window
      actually used is measured at run time as the ratio of the two maps, and may be
      smaller than `window_size` (its offsets still index the same table); the region
      token's bias row and column are zero;
    - the local tokenizer always reduces the image 4x: `local_patch_size` only sets the
      region patch size;
    - there is no LayerNorm at the end of the stages, only the head's.

    Unlike the reference, whose local tokenizer expects 3 input channels whatever
    `channels` says (so that only `channels=3` runs), the local tokenizer here reads
    `channels` channels.

    Images of several sizes are accepted, height and width independently, but only those
    whose maps split into whole windows at every stage, with windows of at most
    `window_size`: for the defaults, sides of 28, 56, 112, 560 or any multiple of 224
    pixels. Other sizes are rejected with the list of valid ones (the reference fails
    inside a reshape, or indexes past its position table).
    """

    local_encoder: Conv2d | ConvTokenizer
    region_encoder: Conv2d
    stages: tuple[R2LStage, ...]
    head_norm: LayerNorm
    mlp_head: Linear | None
    channels: int = eqx.field(static=True)
    window_size: int = eqx.field(static=True)
    local_patch_size: int = eqx.field(static=True)
    tokenize_local_3_conv: bool = eqx.field(static=True)
    side_multiple: int | None = eqx.field(static=True)
    extra_sides: tuple[int, ...] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        dim: StageInts = (64, 128, 256, 512),
        depth: StageInts = (2, 2, 8, 2),
        window_size: Positive = 7,
        num_classes: NonNegative = 1000,
        tokenize_local_3_conv: bool = False,
        local_patch_size: Positive = 4,
        use_peg: bool = False,
        attn_dropout: Rate = 0.0,
        ff_dropout: Rate = 0.0,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension of each of the 4 stages, an int or a tuple of 4.
        - `depth`: number of regional-to-local blocks of each stage, an int or a tuple of 4.
        - `window_size`: local tokens per region token along each axis (7 or 14 in the
          paper); the region patch is `local_patch_size * window_size` pixels.
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features).
        - `tokenize_local_3_conv`: embed the local tokens with three 3x3 convolutions and
          channel LayerNorms (as the paper's smaller models) rather than one 8x8 one.
        - `local_patch_size`: the local patch size that, times `window_size`, gives the
          region patch size.
        - `use_peg`: whether to add a position-generating depthwise convolution to the
          local map at the start of stages 2 to 4.
        - `attn_dropout`: dropout rate on the attention probabilities and outputs.
        - `ff_dropout`: dropout rate after the feed-forward activation.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both per-stage arguments as tuples of four
        dims, depths = cast(tuple[int, ...], dim), cast(tuple[int, ...], depth)
        multiple, extra = _supported_sides(window_size, local_patch_size, tokenize_local_3_conv)
        if multiple is None and not extra:
            raise ValueError(
                f"RegionViT with window_size={window_size} and "
                f"local_patch_size={local_patch_size} accepts no image size: the local "
                "tokenizer reduces the image 4x, so every window would hold "
                f"{local_patch_size * window_size / 4:g} local tokens per side where at most "
                f"window_size={window_size} fit."
            )
        local_key, region_key, head_key, *stage_keys = jr.split(key, 3 + NUM_STAGES)
        region_patch = local_patch_size * window_size
        if tokenize_local_3_conv:
            self.local_encoder = ConvTokenizer(channels, dims[0], key=local_key)
        else:
            self.local_encoder = Conv2d(channels, dims[0], 8, stride=4, padding=3, key=local_key)
        self.region_encoder = Conv2d(channels * region_patch**2, dims[0], 1, key=region_key)
        self.stages = tuple(
            R2LStage(
                dims[max(i - 1, 0)],
                dims[i],
                depths[i],
                window_size=window_size,
                downsample=i > 0,
                use_peg=use_peg and i > 0,
                attn_dropout=attn_dropout,
                ff_dropout=ff_dropout,
                key=stage_keys[i],
            )
            for i in range(NUM_STAGES)
        )
        self.head_norm = LayerNorm(dims[-1])
        self.mlp_head = Linear(dims[-1], num_classes, key=head_key) if num_classes > 0 else None
        self.channels = channels
        self.window_size = window_size
        self.local_patch_size = local_patch_size
        self.tokenize_local_3_conv = tokenize_local_3_conv
        self.side_multiple = multiple
        self.extra_sides = extra

    def supports(self, height: int, width: int) -> bool:
        """Whether an image of `height x width` pixels can be processed."""
        return all(
            _stage_windows(
                side, self.window_size, self.local_patch_size, self.tokenize_local_3_conv
            )
            is not None
            for side in (height, width)
        )

    def _sizes_text(self) -> str:
        parts = [", ".join(map(str, self.extra_sides))] if self.extra_sides else []
        if self.side_multiple is not None:
            parts.append(f"any multiple of {self.side_multiple}")
        elif len(self.extra_sides) > 1:
            parts[0] = "one of " + parts[0]
        return " or ".join(parts)

    def _check(self, x: Float[Array, "channels height width"]) -> None:
        name = type(self).__name__
        check_image(x, (self.channels, None, None), name)
        if not self.supports(int(x.shape[1]), int(x.shape[2])):
            raise ValueError(
                f"{name}(window_size={self.window_size}, "
                f"local_patch_size={self.local_patch_size}, "
                f"tokenize_local_3_conv={self.tokenize_local_3_conv}) takes images whose "
                f"height and width are each {self._sizes_text()} pixels; got shape "
                f"{tuple(x.shape)}."
            )

    @property
    def region_patch_size(self) -> int:
        """The side in pixels of the patch of each first-stage region token."""
        return self.local_patch_size * self.window_size

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's local-token map, of the
        stage's `dim`, its stride 4 in the first stage and twice the previous one in each
        next (on sides that are not a multiple of the stride, the stride-2 convolutions
        round the map up). The region-token map of stage `i` has the stride
        `local_patch_size * window_size * 2 ** i`."""
        return tuple(
            FeatureInfo(
                i,
                f"stages[{i}]",
                int(stage.layers.blocks.attn.norm.weight.shape[-1]),  # pyright: ignore[reportOptionalMemberAccess]
                (4 * 2**i, 4 * 2**i),
            )
            for i, stage in enumerate(self.stages)
        )

    def _stages(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None
    ) -> list[tuple[Float[Array, "dim lh lw"], Float[Array, "dim rh rw"]]]:
        """Every stage's output `(local map, region map)`, in order."""
        local = self.local_encoder(x)
        c, p = self.channels, self.region_patch_size
        h, w = x.shape[1] // p, x.shape[2] // p
        patches = x.reshape(c, h, p, w, p).transpose(0, 2, 4, 1, 3).reshape(c * p * p, h, w)
        region = self.region_encoder(patches)
        outputs = []
        for stage, stage_key in zip(self.stages, split_key(key, NUM_STAGES), strict=True):
            local, region = stage(local, region, key=stage_key)
            outputs.append((local, region))
        return outputs

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dim region_h region_w"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, of a size the model supports.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's region-token map `(dim, region_h, region_w)`, what
        the head pools. (The local-token maps come from `forward_intermediates`.)
        """
        self._check(x)
        check_key(self, key)
        return self._stages(x, key)[-1][1]

    def forward_head(
        self, x: Float[Array, "dim region_h region_w"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the region-token map from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the mean region
        token after the head's LayerNorm, `(dim,)`.
        """
        pooled = self.head_norm(x.mean(axis=(1, 2)))
        if pre_logits or self.mlp_head is None:
            return pooled
        return self.mlp_head(pooled)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        region_tokens: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the local-token map of chosen stages.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which stages (see `feature_info`): `None` for all four, an int `n` for
          the last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; the stages end without a norm (the
          head's LayerNorm acts on the pooled region token), so it changes nothing.
        - `output_fmt`: `"map"` for `(dim, h, w)` maps, `"tokens"` for `(h * w, dim)`
          tokens, row by row.
        - `region_tokens`: return each output as `(local output, region output)`, the
          stage's region tokens in the same format.
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
        stages = self._stages(x, key)

        def fmt(y: Array) -> Array:
            return y.reshape(y.shape[0], -1).T if output_fmt == "tokens" else y

        outputs = []
        for i in chosen:
            local, region = stages[i]
            outputs.append((fmt(local), fmt(region)) if region_tokens else fmt(local))
        return outputs if intermediates_only else (stages[-1][1], outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "RegionViT":
        """This model for `(height, width)` images: the model has no parameter that depends
        on the image size, so it is returned as it is if it supports the size, and a
        `ValueError` lists the sizes it supports otherwise (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        height, width = (int(n) for n in image_size)
        if not self.supports(height, width):
            raise ValueError(
                f"RegionViT(window_size={self.window_size}, "
                f"local_patch_size={self.local_patch_size}) cannot take images of size "
                f"{(height, width)}: height and width must each be {self._sizes_text()} "
                "pixels."
            )
        return self

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "RegionViT":
        """This model with a new classifier of `num_classes` outputs, or none for `0` (the
        head's LayerNorm stays; see [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.head_norm.weight.shape[0], num_classes, key=key)  # pyright: ignore[reportOptionalMemberAccess]
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with a height and width the model
          supports (see the class docstring and `supports`).
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the pooled
        features `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))
