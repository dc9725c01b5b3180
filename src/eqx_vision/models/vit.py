"""ViT: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".

Dosovitskiy et al., 2020, https://arxiv.org/abs/2010.11929.
"""

from typing import Literal, cast

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    pool_tokens,
)
from ..layers._checks import NonNegative, Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal
from ..layers._tokens import encode_with_class_tokens


class ViT(eqx.Module):
    """The Vision Transformer.

    The image is cut into patches, each flattened in `(p1 p2 c)` order and embedded by
    `LayerNorm → Linear → LayerNorm`; a class token is prepended (for `pool="cls"`),
    learned position embeddings are added, and a pre-norm transformer encoder with a final
    LayerNorm runs over the tokens. The class token (or the mean of all tokens) goes through
    a linear head.

    Equal to `vit_pytorch.vit.ViT`; load its weights with `eqx_vision.from_vit_pytorch`.
    Unlike the reference, which silently adds the wrong position embeddings to a smaller
    image, an image of any other size than `image_size` is rejected.
    """

    to_patch_embedding: PatchEmbedding
    cls_token: Float[Array, "num_cls dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    transformer: Transformer
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
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`.
        - `num_classes`: number of output logits; `0` returns the encoded tokens instead.
        - `dim`: token dimension.
        - `depth`: number of transformer blocks.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of all tokens).
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside the transformer.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both sizes as (height, width) pairs
        image_hw, patch_hw = cast(tuple[int, int], image_size), cast(tuple[int, int], patch_size)
        grid = check_divisible(image_hw, patch_hw)
        embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 5)
        num_cls = 1 if pool == "cls" else 0
        self.to_patch_embedding = PatchEmbedding(channels, patch_hw, dim, key=embed_key)
        self.cls_token = normal(cls_key, (num_cls, dim))
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + num_cls, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.transformer = Transformer(
            dim, depth, heads, dim_head, mlp_dim, dropout=dropout, key=tf_key
        )
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the encoded tokens
        `(seq, dim)`.
        """
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        tokens = encode_with_class_tokens(
            self.to_patch_embedding(x),
            self.cls_token,
            self.pos_embedding,
            self.dropout,
            self.transformer,
            key=key,
        )
        if self.mlp_head is None:
            return tokens
        pooled = pool_tokens(tokens, self.pool)
        return self.mlp_head(pooled)
