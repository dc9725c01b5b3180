"""NesT: "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable
Visual Understanding".

Zhang et al., 2021, https://arxiv.org/abs/2105.12723.
"""

from typing import Annotated, cast

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
    max_pool2d,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import NonNegative, PerStage, Positive, Rate, checked_arguments
from ..layers._init import normal


class NesTBlock(eqx.Module):
    """`x + attn(x)` then `x + ff(x)` on a feature map, attention within each block."""

    attn: MapAttention
    ff: MapFeedForward

    def __init__(
        self, dim: int, heads: int, block: int, mlp_mult: int, dropout: float, *, key: PRNGKeyArray
    ):
        attn_key, ff_key = jr.split(key)
        self.attn = MapAttention(
            dim,
            heads=heads,
            dim_head=dim // heads,
            dropout=dropout,
            projections="qkv",
            window=block,
            key=attn_key,
        )
        self.ff = MapFeedForward(dim, dim * mlp_mult, dropout=dropout, key=ff_key)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        attn_key, ff_key = split_key(key, 2)
        x = x + self.attn(x, key=attn_key)
        return x + self.ff(x, key=ff_key)


class NesTLevel(eqx.Module):
    """One level of the hierarchy: position embedding, blocks, then the aggregation.

    The map is cut into `block x block` blocks; every block gets the same learned position
    embedding (one scalar per position, shared by all channels) and attends within itself.
    Except at the last level, a 3x3 convolution, a channel LayerNorm and a 3x3 stride-2 max
    pooling then halve the map and change its channels.
    """

    pos_embedding: Float[Array, " seq"]
    blocks: Stack[NesTBlock] | None
    conv: Conv2d | None
    norm: ChannelLayerNorm | None
    block: int = eqx.field(static=True)

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
        key: PRNGKeyArray,
    ):
        pos_key, blocks_key, conv_key = jr.split(key, 3)
        self.pos_embedding = normal(pos_key, (block * block,))
        self.blocks = (
            Stack(
                lambda _, key: NesTBlock(dim, heads, block, mlp_mult, dropout, key=key),
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
            self.norm = ChannelLayerNorm(dim_out)
        self.block = block

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels_out height_out width_out"]:
        _, height, width = x.shape
        b = self.block
        pos = jnp.tile(self.pos_embedding.reshape(b, b), (height // b, width // b))
        x = x + pos.astype(x.dtype)
        if self.blocks is not None:
            x = self.blocks(x, key=key)
        if self.conv is None or self.norm is None:
            return x
        return max_pool2d(self.norm(self.conv(x)), 3, 2, 1)


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
    """

    to_patch_embedding: PatchEmbedding
    levels: list[NesTLevel]
    norm: ChannelLayerNorm
    mlp_head: Linear
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Positive,
        num_classes: Positive,
        dim: Positive,
        heads: Positive,
        num_hierarchies: Positive,
        block_repeats: Annotated[
            NonNegative | tuple[NonNegative, ...], PerStage("num_hierarchies")
        ],
        mlp_mult: Positive = 4,
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: height and width of the (square) image.
        - `patch_size`: side of a patch; must divide `image_size`, and the patch grid must
          be divisible by `2^(num_hierarchies - 1)`, the number of blocks per side at the
          first level.
        - `num_classes`: number of output logits.
        - `dim`: channels at the first level (doubled at each level).
        - `heads`: attention heads at the first level (doubled at each level).
        - `num_hierarchies`: number of levels.
        - `block_repeats`: transformer blocks per level, an int for all levels or a tuple
          with one entry per level.
        - `mlp_mult`: hidden width of the feed-forward blocks, as a multiple of the
          level's channels.
        - `channels`: input channels.
        - `dim_head`: unused, as in the reference (heads have `dim // heads` dimensions).
        - `dropout`: dropout rate in the attention (probabilities and output) and the
          feed-forward blocks.
        - `key`: a `jax.random.key` for the initialisation.
        """
        if image_size % patch_size:
            raise ValueError(
                f"image_size must be divisible by patch_size; got image_size={image_size} "
                f"and patch_size={patch_size}."
            )
        fmap = image_size // patch_size
        blocks_per_side = 2 ** (num_hierarchies - 1)
        if fmap % blocks_per_side:
            raise ValueError(
                f"the patch grid image_size // patch_size = {fmap} must be divisible by "
                f"2^(num_hierarchies - 1) = {blocks_per_side}, the blocks per side at the first "
                f"level; got image_size={image_size}, patch_size={patch_size}, "
                f"num_hierarchies={num_hierarchies}."
            )
        if dim < heads:
            raise ValueError(
                f"dim must be at least heads (heads have dim // heads dimensions); got "
                f"dim={dim}, heads={heads}."
            )
        repeats = cast(tuple[int, ...], block_repeats)  # one per level, from checked_arguments
        block = fmap // blocks_per_side
        embed_key, head_key, *level_keys = jr.split(key, num_hierarchies + 2)
        self.to_patch_embedding = PatchEmbedding(
            channels, (patch_size, patch_size), dim, key=embed_key
        )
        self.levels = []
        for i in range(num_hierarchies):
            is_last = i == num_hierarchies - 1
            self.levels.append(
                NesTLevel(
                    dim * 2**i,
                    None if is_last else dim * 2 ** (i + 1),
                    heads * 2**i,
                    block,
                    repeats[i],
                    mlp_mult,
                    dropout,
                    key=level_keys[i],
                )
            )
        last_dim = dim * 2 ** (num_hierarchies - 1)
        self.norm = ChannelLayerNorm(last_dim)
        self.mlp_head = Linear(last_dim, num_classes, key=head_key)
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`.
        """
        size = self.image_size
        check_image(x, (self.channels, size, size), type(self).__name__)
        check_key(self, key)
        tokens = self.to_patch_embedding(x)
        x = tokens_to_grid(tokens, size // self.patch_size)
        for level, level_key in zip(self.levels, split_key(key, len(self.levels)), strict=True):
            x = level(x, key=level_key)
        return self.mlp_head(self.norm(x).mean(axis=(1, 2)))
