"""Parallel ViT: "Three things everyone should know about Vision Transformers".

Touvron et al., 2022, https://arxiv.org/abs/2203.09795.
"""

from typing import Literal, cast

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    AbstractClassTokenViT,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
)
from ..layers._checks import NonNegative, Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal


class ParallelViT(AbstractClassTokenViT):
    """The Vision Transformer with parallel residual branches.

    Each layer sums `num_parallel_branches` independent attention blocks applied to the same
    input, `x = x + Σ_b attn_b(x)`, then as many feed-forward blocks,
    `x = x + Σ_b ff_b(x)`: a shallower, wider network with the same number of blocks. The
    branches of a layer are stored stacked and evaluated together.

    The image is cut into patches, each flattened in `(p1 p2 c)` order and embedded by a
    single Linear (no LayerNorm before or after it); a class token is prepended, learned
    position embeddings are added, and the pre-norm parallel transformer runs over the
    tokens. The class token (or the mean of all tokens) goes through `LayerNorm → Linear`.

    Equal to `vit_pytorch.parallel_vit.ViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. The reference details reproduced:

    - the encoder has no final LayerNorm; the head has one instead;
    - the attention output projection is dropped when `heads == 1` and `dim_head == dim`;
    - the class token exists for both pools, so `pool="mean"` averages it with the patch
      tokens;
    - the vit-pytorch position embedding and class token have a leading axis of 1, which is
      dropped here: `pos_embedding` is `(num_patches + 1, dim)`, `cls_token` is `(1, dim)`.

    Unlike the reference, which silently adds the wrong position embeddings to a smaller
    image, an image of any other size than `image_size` is rejected.
    """

    to_patch_embedding: PatchEmbedding
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair,
        patch_size: PositivePair,
        num_classes: NonNegative,
        dim: Positive,
        depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        pool: Literal["cls", "mean"] = "cls",
        num_parallel_branches: Positive = 2,
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`.
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features, `head_norm` of the pooled token).
        - `dim`: token dimension.
        - `depth`: number of layers, each with its parallel attention and feed-forward
          branches.
        - `heads`: attention heads per attention branch.
        - `mlp_dim`: hidden width of the feed-forward branches.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of all tokens, class token
          included).
        - `num_parallel_branches`: attention and feed-forward branches per layer, at least 1.
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside every branch.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both sizes as (height, width) pairs
        image_hw, patch_hw = cast(tuple[int, int], image_size), cast(tuple[int, int], patch_size)
        grid = check_divisible(image_hw, patch_hw)
        embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 5)
        self.to_patch_embedding = PatchEmbedding(
            channels, patch_hw, dim, pre_norm=False, post_norm=False, key=embed_key
        )
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + 1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.transformer = Transformer(
            dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            dropout=dropout,
            final_norm=False,
            num_branches=num_parallel_branches,
            key=tf_key,
        )
        self.head_norm = LayerNorm(dim)
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool
