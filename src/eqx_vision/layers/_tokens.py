"""The class token, position embeddings and pooling around the encoders of the ViT family."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_choice


def with_class_tokens(
    tokens: Float[Array, "seq dim"],
    cls_token: Float[Array, "num_cls dim"],
    pos_embedding: Float[Array, "num_cls+seq dim"],
) -> Float[Array, "num_cls+seq dim"]:
    """`[cls_token; tokens] + pos_embedding`, the parameters cast to the dtype of `tokens`
    (bfloat16 tokens stay bfloat16). `cls_token` may have no rows."""
    tokens = jnp.concatenate([cls_token.astype(tokens.dtype), tokens], axis=0)
    return tokens + pos_embedding.astype(tokens.dtype)


def pool_tokens(tokens: Float[Array, "seq dim"], pool: str) -> Float[Array, " dim"]:
    """The mean of all the tokens for `pool="mean"` (a class token included), else the
    first token, the class token."""
    check_choice(pool, "pool", ("cls", "mean"))
    return tokens.mean(axis=0) if pool == "mean" else tokens[0]
