"""SimpleViT: "Better plain ViT baselines for ImageNet-1k".

Beyer, Zhai and Kolesnikov, 2022, https://arxiv.org/abs/2205.01580.
"""

from typing import cast

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    sincos_2d,
)
from ..layers._checks import Positive, PositivePair, checked_arguments


class SimpleViT(eqx.Module):
    """The simplified Vision Transformer.

    The image is cut into patches, each flattened in `(p1 p2 c)` order and embedded by
    `LayerNorm → Linear → LayerNorm`; fixed 2-D sine-cosine position embeddings are added
    (no class token), a pre-norm transformer encoder with a final LayerNorm runs over the
    tokens, and the mean token goes through a linear head. There is no dropout anywhere.

    Equal to `vit_pytorch.simple_vit.SimpleViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. The reference details reproduced:

    - the position embedding is `[sin(x ω), cos(x ω), sin(y ω), cos(y ω)]` with x the
      patch column, y the patch row and `ω_i = 10000^(-i / (dim/4 - 1))`; it is a constant,
      not a parameter, and so not part of the state dict;
    - the query/key/value and output projections of the attention have no bias, and the
      output projection is kept even when `heads == 1` and `dim_head == dim`;
    - the feed-forward blocks are `LayerNorm → Linear → GELU → Linear`.

    Only images of exactly `image_size` are accepted, as in the reference.
    """

    to_patch_embedding: PatchEmbedding
    transformer: Transformer
    linear_head: Linear
    image_size: tuple[int, int] = eqx.field(static=True)
    grid: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair,
        patch_size: PositivePair,
        num_classes: Positive,
        dim: Positive,
        depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        channels: Positive = 3,
        dim_head: Positive = 64,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`.
        - `num_classes`: number of output logits, at least 1.
        - `dim`: token dimension; a multiple of 4 (and at least 8) for the sine-cosine
          position embedding.
        - `depth`: number of transformer blocks.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both sizes as (height, width) pairs
        image_hw, patch_hw = cast(tuple[int, int], image_size), cast(tuple[int, int], patch_size)
        grid = check_divisible(image_hw, patch_hw)
        if dim % 4 or dim < 8:
            raise ValueError(
                "dim must be a multiple of 4 and at least 8 for the sine-cosine position "
                f"embedding; got dim={dim}."
            )
        embed_key, tf_key, head_key = jr.split(key, 3)
        self.to_patch_embedding = PatchEmbedding(channels, patch_hw, dim, key=embed_key)
        self.transformer = Transformer(
            dim, depth, heads, dim_head, mlp_dim, project_out=True, out_bias=False, key=tf_key
        )
        self.linear_head = Linear(dim, num_classes, key=head_key)
        self.image_size = image_hw
        self.grid = grid
        self.channels = channels
        self.dim = dim

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: ignored (the model has no stochastic layers); accepted for a uniform API.

        **Returns:** the logits, `(num_classes,)`.
        """
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        tokens = self.to_patch_embedding(x)
        pos = jnp.asarray(sincos_2d(*self.grid, self.dim), dtype=tokens.dtype)
        tokens = self.transformer(tokens + pos, key=key)
        return self.linear_head(tokens.mean(axis=0))
