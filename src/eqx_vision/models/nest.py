"""NesT: "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable
Visual Understanding".

Zhang et al., 2021, https://arxiv.org/abs/2105.12723.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    ChannelLayerNorm,
    Conv2d,
    Linear,
    MapAttention,
    MapFeedForward,
    PatchEmbedding,
    Stack,
    check_image,
    check_key,
    grid_to_tokens,
    max_pool2d,
    replace,
    resize_bicubic,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import (
    Interval,
    NonNegative,
    PerStage,
    Positive,
    Rate,
    checked_arguments,
)
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


PatchEmbed = Literal["norm", "conv"]
PosEmbed = Literal["scalar", "full"]
PoolPadding = Literal["symmetric", "same"]


class NesTBlock(eqx.Module):
    """`x + attn(x)` then `x + ff(x)` on a feature map, attention within each block."""

    attn: MapAttention
    ff: MapFeedForward

    def __init__(
        self,
        dim: int,
        heads: int,
        block: int,
        mlp_mult: int,
        dropout: float,
        *,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        attn_key, ff_key = jr.split(key)
        self.attn = MapAttention(
            dim,
            heads=heads,
            dim_head=dim // heads,
            dropout=dropout,
            projections="qkv",
            window=block,
            qkv_bias=qkv_bias,
            norm_eps=norm_eps,
            key=attn_key,
        )
        self.ff = MapFeedForward(
            dim, dim * mlp_mult, dropout=dropout, norm_eps=norm_eps, key=ff_key
        )

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        attn_key, ff_key = split_key(key, 2)
        x = x + self.attn(x, key=attn_key)
        return x + self.ff(x, key=ff_key)


class NesTLevel(eqx.Module):
    """One level of the hierarchy: position embedding, blocks, then the aggregation.

    The map is cut into `block x block` blocks, which attend within themselves, and a
    learned position embedding is added first: with `pos_embedding="scalar"` one scalar per
    position of a block, shared by all blocks and channels (vit-pytorch); with `"full"` one
    vector per position of every block, `(blocks, seq, channels)` with blocks and positions
    row-major (timm). Except at the last level, a 3x3 convolution, a channel LayerNorm and a
    3x3 stride-2 max pooling then halve the map and change its channels; the pooling pads
    one pixel on every side (`pool_padding="symmetric"`, torch) or, as TensorFlow's
    `'SAME'`, only after the last row and column of an even map (`"same"`).
    """

    pos_embedding: Float[Array, " seq"] | Float[Array, "blocks seq channels"]
    blocks: Stack[NesTBlock] | None
    conv: Conv2d | None
    norm: ChannelLayerNorm | None
    block: int = eqx.field(static=True)
    pool_padding: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        dim_out: int | None,
        heads: int,
        block: int,
        depth: int,
        mlp_mult: int,
        dropout: float,
        *,
        num_blocks: int = 1,
        pos_embedding: PosEmbed = "scalar",
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        pool_padding: PoolPadding = "symmetric",
        key: PRNGKeyArray,
    ):
        pos_key, blocks_key, conv_key = jr.split(key, 3)
        if pos_embedding == "scalar":
            self.pos_embedding = normal(pos_key, (block * block,))
        else:
            self.pos_embedding = 0.02 * normal(pos_key, (num_blocks, block * block, dim))
        self.blocks = (
            Stack(
                lambda _, key: NesTBlock(
                    dim,
                    heads,
                    block,
                    mlp_mult,
                    dropout,
                    qkv_bias=qkv_bias,
                    norm_eps=norm_eps,
                    key=key,
                ),
                depth,
                key=blocks_key,
            )
            if depth > 0
            else None
        )
        if dim_out is None:
            self.conv = self.norm = None
        else:
            self.conv = Conv2d(dim, dim_out, 3, padding=1, key=conv_key)
            self.norm = ChannelLayerNorm(dim_out, eps=norm_eps)
        self.block = block
        self.pool_padding = pool_padding

    def _position_map(self, height: int, width: int) -> Float[Array, "#channels height width"]:
        """The position embedding laid out on the `(height, width)` map."""
        b = self.block
        if self.pos_embedding.ndim == 1:
            return jnp.tile(self.pos_embedding.reshape(b, b), (height // b, width // b))[None]
        blocks, _, channels = self.pos_embedding.shape
        if blocks != (height // b) * (width // b):
            raise ValueError(
                f"NesT: the position embedding holds {blocks} blocks; a {height}x{width} map "
                f"has {(height // b) * (width // b)} blocks of {b}x{b}."
            )
        grid = self.pos_embedding.reshape(height // b, width // b, b, b, channels)
        return grid.transpose(4, 0, 2, 1, 3).reshape(channels, height, width)

    def _pool(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "channels height_out width_out"]:
        if self.pool_padding == "symmetric":
            return max_pool2d(x, 3, 2, 1)
        pads = [_same_padding(size, 3, 2) for size in x.shape[1:]]
        x = jnp.pad(x, ((0, 0), *pads), constant_values=-jnp.inf)
        return max_pool2d(x, 3, 2, 0)

    def encode(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """The position embedding and the blocks: the level's output map, before the
        aggregation."""
        x = self.add_positions(x)
        if self.blocks is not None:
            x = self.blocks(x, key=key)
        return x

    def add_positions(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "channels height width"]:
        """The map plus the position embedding: the input of the first block."""
        _, height, width = x.shape
        return x + self._position_map(height, width).astype(x.dtype)

    def aggregate(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "channels_out height_out width_out"]:
        """Convolution, channel LayerNorm and max pooling (the identity at the last level)."""
        if self.conv is None or self.norm is None:
            return x
        return self._pool(self.norm(self.conv(x)))

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels_out height_out width_out"]:
        return self.aggregate(self.encode(x, key=key))

    def with_block(self, block: int) -> "NesTLevel":
        """This level for blocks of `block x block` pixels (the number of blocks kept): the
        position embedding resized bicubically (torch's `F.interpolate`, as timm's
        `resize_pos_embed`: the whole map of a `"full"` embedding, the block of a
        `"scalar"` one), the attention windows changed."""
        if block == self.block:
            return self
        b = self.block
        if self.pos_embedding.ndim == 1:
            grid = self.pos_embedding.reshape(1, b, b).astype(jnp.float32)
            pos = resize_bicubic(grid, (block, block)).reshape(block * block)
        else:
            blocks, _, channels = self.pos_embedding.shape
            side = math.isqrt(blocks)
            full = self._position_map(side * b, side * b).astype(jnp.float32)
            full = resize_bicubic(full, (side * block, side * block))
            grid = full.reshape(channels, side, block, side, block).transpose(1, 3, 2, 4, 0)
            pos = grid.reshape(blocks, block * block, channels)
        stack = self.blocks
        if stack is not None:
            attn = replace(stack.blocks.attn, window=(block, block))
            stack = replace(stack, blocks=replace(stack.blocks, attn=attn))
        return replace(
            self,
            pos_embedding=pos.astype(self.pos_embedding.dtype),
            blocks=stack,
            block=block,
        )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's `'SAME'` padding of one axis: `ceil(size / stride)` outputs, the
    padding split with the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class NesT(eqx.Module):
    """The Nested Hierarchical Transformer.

    The image is cut into `patch_size` patches, flattened `(p1 p2 c)` and embedded by
    `LayerNorm → Linear → LayerNorm` onto a feature map. Level `i` of `L = num_hierarchies`
    (counting from 0) has `dim·2^i` channels and `heads·2^i` heads; it splits its map into
    `2^(L-1-i) x 2^(L-1-i)` blocks of a fixed size, adds a position embedding and runs
    `block_repeats` pre-norm transformer blocks with attention inside each block
    (1x1-convolution projections, channel LayerNorms), then aggregates: 3x3 convolution,
    channel LayerNorm and max pooling (3, stride 2, padding 1), which halves the map, so
    that the number of blocks falls by four at each level while their size stays. The head
    is a channel LayerNorm, a mean over the map and a Linear.

    Equal to `vit_pytorch.nest.NesT`; load its weights with `eqx_vision.from_vit_pytorch`.
    Reference quirks reproduced:

    - the position embedding holds **one scalar per position** of a block, added to every
      channel, and each level has its own;
    - the `dim_head` argument is unused: each head has `dim // heads` dimensions (the same
      at every level), so with `dim % heads != 0` the attention's inner width
      `heads · (dim // heads)` is smaller than `dim`;
    - the output projection of the attention always exists, even with one head;
    - the last level has no aggregation; the head's channel LayerNorm follows its last block.
    - hence the last level's position embedding, a shift shared by all channels of a pixel
      that every later channel LayerNorm removes, has no effect (its gradient is zero).

    The reference accepts a smaller image silently (with the position embeddings cut short);
    this model accepts only `image_size`.

    timm's `Nest` (`nest_tiny`, `nest_small`, `nest_base` and their `_jx` ports of the
    original JAX weights) is this architecture with other options, and
    `eqx_vision.from_timm` loads it: `patch_embedding="conv"` (a strided convolution, no
    LayerNorms), `pos_embedding="full"` (a `(blocks, seq, channels)` embedding per level),
    `qkv_bias=True`, `norm_eps=1e-6`, widths and heads per level as tuples, and for the
    `_jx` names `pool_padding="same"`.
    """

    to_patch_embedding: PatchEmbedding
    levels: list[NesTLevel]
    norm: ChannelLayerNorm
    mlp_head: Linear | None
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Positive,
        num_classes: NonNegative,
        dim: Positive | tuple[Positive, ...],
        heads: Positive | tuple[Positive, ...],
        num_hierarchies: Positive,
        block_repeats: Annotated[
            NonNegative | tuple[NonNegative, ...], PerStage("num_hierarchies")
        ],
        mlp_mult: Positive = 4,
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        patch_embedding: PatchEmbed = "norm",
        pos_embedding: PosEmbed = "scalar",
        qkv_bias: bool = False,
        norm_eps: Annotated[float, Interval(0.0, math.inf)] = 1e-5,
        pool_padding: PoolPadding = "symmetric",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: height and width of the (square) image.
        - `patch_size`: side of a patch; must divide `image_size`, and the patch grid must
          be divisible by `2^(num_hierarchies - 1)`, the number of blocks per side at the
          first level.
        - `num_classes`: number of output logits; `0` returns the pooled features instead.
        - `dim`: channels at the first level (doubled at each level), or a tuple with the
          channels of every level.
        - `heads`: attention heads at the first level (doubled at each level), or a tuple
          with the heads of every level.
        - `num_hierarchies`: number of levels.
        - `block_repeats`: transformer blocks per level, an int for all levels or a tuple
          with one entry per level.
        - `mlp_mult`: hidden width of the feed-forward blocks, as a multiple of the
          level's channels.
        - `channels`: input channels.
        - `dim_head`: unused, as in the reference (heads have `dim // heads` dimensions).
        - `dropout`: dropout rate in the attention (probabilities and output) and the
          feed-forward blocks.
        - `patch_embedding`: `"norm"` (`LayerNorm → Linear → LayerNorm` on patches
          flattened `(p1 p2 c)`, vit-pytorch) or `"conv"` (a strided convolution: a `Linear`
          with bias on patches flattened `(c p1 p2)`, timm).
        - `pos_embedding`: `"scalar"` (one scalar per position of a block, shared by every
          block and channel, vit-pytorch) or `"full"` (one vector per position of every
          block, timm).
        - `qkv_bias`: whether the query/key/value projections have a bias.
        - `norm_eps`: the epsilon of the LayerNorms of the blocks, the aggregations and
          the head (not of the patch embedding's).
        - `pool_padding`: the max pooling's padding, `"symmetric"` (one pixel on each side)
          or `"same"` (TensorFlow's, for timm's `_jx` weights).
        - `key`: a `jax.random.key` for the initialisation.
        """
        del dim_head
        block, dims, heads_ = _level_sizes(
            image_size, patch_size, num_hierarchies, dim, heads, type(self).__name__
        )
        repeats = cast(tuple[int, ...], block_repeats)  # one per level, from checked_arguments
        embed_key, head_key, *level_keys = jr.split(key, num_hierarchies + 2)
        conv = patch_embedding == "conv"
        self.to_patch_embedding = PatchEmbedding(
            channels,
            (patch_size, patch_size),
            dims[0],
            pre_norm=not conv,
            post_norm=not conv,
            channels_first=conv,
            key=embed_key,
        )
        self.levels = []
        for i in range(num_hierarchies):
            is_last = i == num_hierarchies - 1
            self.levels.append(
                NesTLevel(
                    dims[i],
                    None if is_last else dims[i + 1],
                    heads_[i],
                    block,
                    repeats[i],
                    mlp_mult,
                    dropout,
                    num_blocks=4 ** (num_hierarchies - 1 - i),
                    pos_embedding=pos_embedding,
                    qkv_bias=qkv_bias,
                    norm_eps=norm_eps,
                    pool_padding=pool_padding,
                    key=level_keys[i],
                )
            )
        self.norm = ChannelLayerNorm(dims[-1], eps=norm_eps)
        self.mlp_head = Linear(dims[-1], num_classes, key=head_key) if num_classes else None
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each level's map after its blocks (before
        its aggregation), level `i` of stride `patch_size · 2^i`."""
        return tuple(
            FeatureInfo(i, f"levels[{i}]", dim, (self.patch_size * 2**i,) * 2)
            for i, dim in enumerate(self._level_dims())
        )

    def _level_dims(self) -> tuple[int, ...]:
        """The channels of every level."""
        dims = [level.conv.weight.shape[1] for level in self.levels if level.conv is not None]
        return (*dims, self.norm.weight.shape[0])

    def _embed(self, x: Float[Array, "channels height width"]) -> Float[Array, "dim grid grid"]:
        size = self.image_size
        check_image(x, (self.channels, size, size), type(self).__name__)
        return tokens_to_grid(self.to_patch_embedding(x), size // self.patch_size)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dim fmap fmap"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last level's map after the head's channel LayerNorm, `(channels,
        fmap, fmap)` with `fmap = image_size // (patch_size · 2^(num_hierarchies - 1))`
        (timm's `forward_features`).
        """
        x = self._embed(x)
        check_key(self, key)
        for level, level_key in zip(self.levels, split_key(key, len(self.levels)), strict=True):
            x = level(x, key=level_key)
        return self.norm(x)

    def forward_head(
        self, x: Float[Array, "dim fmap fmap"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or the mean of the map `(channels,)` with `pre_logits` or
        without a head.
        """
        pooled = x.mean(axis=(1, 2))
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
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the output maps of chosen levels.

        **Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `indices`: which levels (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of level indices (negative from the end).
        - `norm`: apply the head's channel LayerNorm to the last level's output (the only
          one it fits, as in timm).
        - `output_fmt`: `"map"` for `(channels, h, w)` maps, `"tokens"` for `(h * w,
          channels)` sequences.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`, each level's map
        after its blocks and before its aggregation. The blocks run in their scanned stacks.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.levels), name)
        x = self._embed(x)
        check_key(self, key)
        last = len(self.levels) - 1
        maps = []
        for level, level_key in zip(self.levels, split_key(key, len(self.levels)), strict=True):
            y = level.encode(x, key=level_key)
            maps.append(y)
            x = level.aggregate(y)
        final = self.norm(x)
        outputs = []
        for i in chosen:
            y = final if norm and i == last else maps[i]
            outputs.append(grid_to_tokens(y) if output_fmt == "tokens" else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "NesT":
        """This model for `(height, width)` images (square, as the model takes): the
        number of blocks per level is kept and their side changes, each level's position
        embedding resized bicubically as timm's `resize_pos_embed` does (see
        [`set_image_size`][eqx_vision.set_image_size]). The patch grid must be divisible by
        the blocks per side of the first level."""
        name = type(self).__name__
        height, width = (int(image_size[0]), int(image_size[1]))
        if height != width:
            raise ValueError(f"{name} takes square images; got image_size {(height, width)}.")
        if height == self.image_size:
            return self
        dims = self._level_dims()
        heads = tuple(1 for _ in dims)
        block, _, _ = _level_sizes(height, self.patch_size, len(self.levels), dims, heads, name)
        levels = [level.with_block(block) for level in self.levels]
        return replace(self, levels=levels, image_size=height)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "NesT":
        """This model with a new classifier of `num_classes` outputs, or none for `0` (see
        [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.norm.weight.shape[0], num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`; with `num_classes=0`, the pooled
        features, `(channels_of_the_last_level,)`: `forward_head(forward_features(x))`.
        """
        return self.forward_head(self.forward_features(x, key=key))


def _level_sizes(
    image_size: int,
    patch_size: int,
    levels: int,
    dim: int | tuple[int, ...],
    heads: int | tuple[int, ...],
    name: str,
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The block side and the channels and heads of every level, checked."""
    if image_size % patch_size:
        raise ValueError(
            f"{name}: image_size must be divisible by patch_size; got image_size={image_size} "
            f"and patch_size={patch_size}."
        )
    fmap = image_size // patch_size
    blocks_per_side = 2 ** (levels - 1)
    if fmap % blocks_per_side:
        raise ValueError(
            f"{name}: the patch grid image_size // patch_size = {fmap} must be divisible by "
            f"2^(num_hierarchies - 1) = {blocks_per_side}, the blocks per side at the first "
            f"level; got image_size={image_size}, patch_size={patch_size}, "
            f"num_hierarchies={levels}."
        )
    sizes = []
    for arg, value in (("dim", dim), ("heads", heads)):
        if isinstance(value, int):
            sizes.append(tuple(value * 2**i for i in range(levels)))
        elif len(value) != levels:
            raise ValueError(
                f"{name}: {arg} must be an int or a tuple of num_hierarchies = {levels} ints; "
                f"got {value!r}."
            )
        else:
            sizes.append(tuple(value))
    dims, heads_ = sizes
    for i, (d, h) in enumerate(zip(dims, heads_, strict=True)):
        if d < h:
            raise ValueError(
                f"{name}: dim must be at least heads at every level (heads have dim // heads "
                f"dimensions); got dim={d}, heads={h} at level {i} (dim={dim}, heads={heads})."
            )
    return fmap // blocks_per_side, dims, heads_
