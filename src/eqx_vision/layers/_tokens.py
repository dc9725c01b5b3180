"""The class token, position embeddings and pooling around the encoders of the ViT family."""

from typing import Any, Protocol

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_choice
from ._patch import check_image, pair
from ._random import check_key, split_key


def with_class_tokens(
    tokens: Float[Array, "seq dim"],
    cls_token: Float[Array, "num_cls dim"],
    pos_embedding: Float[Array, "num_cls+seq dim"],
) -> Float[Array, "num_cls+seq dim"]:
    """`[cls_token; tokens] + pos_embedding`, the parameters cast to the dtype of `tokens`
    (bfloat16 tokens stay bfloat16). `cls_token` may have no rows."""
    tokens = jnp.concatenate([cls_token.astype(tokens.dtype), tokens], axis=0)
    return tokens + pos_embedding.astype(tokens.dtype)


def encode_with_class_tokens(
    tokens: Float[Array, "seq dim"],
    cls_token: Float[Array, "num_cls dim"],
    pos_embedding: Float[Array, "num_cls+seq dim"],
    dropout: eqx.nn.Dropout,
    encoder: "_Encoder",
    *,
    key: PRNGKeyArray | None,
) -> Float[Array, "num_cls+seq dim"]:
    """`encoder(dropout(with_class_tokens(tokens, cls_token, pos_embedding)))`: the stage
    between the patch embedding and the head of the ViT family, `key` split in two for the
    dropout and the encoder."""
    emb_key, enc_key = split_key(key, 2)
    tokens = dropout(with_class_tokens(tokens, cls_token, pos_embedding), key=emb_key)
    return encoder(tokens, key=enc_key)


def pool_tokens(tokens: Float[Array, "seq dim"], pool: str) -> Float[Array, " dim"]:
    """The mean of all the tokens for `pool="mean"` (a class token included), else the
    first token, the class token."""
    check_choice(pool, "pool", ("cls", "mean"))
    return tokens.mean(axis=0) if pool == "mean" else tokens[0]


class _TokenMap(Protocol):
    def __call__(self, x: Array, /) -> Array: ...


class _Encoder(Protocol):
    def __call__(self, x: Array, /, *, key: Any = None) -> Array: ...


class AbstractClassTokenViT(eqx.Module):
    """The forward pass of a ViT classifier with a `LayerNorm → Linear` head on one pooled
    token, for subclasses that declare the fields below and build them.

    `__call__` embeds the image's patches (`to_patch_embedding`), prepends the class token
    and adds the position embeddings ([`with_class_tokens`][eqx_vision.layers.with_class_tokens]),
    applies `dropout`, runs the encoder (`transformer`), pools the tokens
    ([`pool_tokens`][eqx_vision.layers.pool_tokens] with `pool`) and returns
    `mlp_head(head_norm(pooled))`. An image of any other shape than
    `(channels, *image_size)` is rejected. DeepViT, Parallel ViT and the ViT for small
    datasets are this form with their own patch embedding and encoder; a new variant of
    the same form only declares and builds its fields.
    """

    to_patch_embedding: eqx.AbstractVar[_TokenMap]
    cls_token: eqx.AbstractVar[Array]
    pos_embedding: eqx.AbstractVar[Array]
    dropout: eqx.AbstractVar[eqx.nn.Dropout]
    transformer: eqx.AbstractVar[_Encoder]
    head_norm: eqx.AbstractVar[_TokenMap]
    mlp_head: eqx.AbstractVar[_TokenMap]
    image_size: eqx.AbstractVar[int | tuple[int, int]]
    channels: eqx.AbstractVar[int]
    pool: eqx.AbstractVar[str]

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`.
        """
        check_image(x, (self.channels, *pair(self.image_size, "image_size")), type(self).__name__)
        check_key(self, key)
        tokens = encode_with_class_tokens(
            self.to_patch_embedding(x),
            self.cls_token,
            self.pos_embedding,
            self.dropout,
            self.transformer,
            key=key,
        )
        return self.mlp_head(self.head_norm(pool_tokens(tokens, self.pool)))
