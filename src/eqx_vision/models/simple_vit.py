"""SimpleViT: "Better plain ViT baselines for ImageNet-1k".

Beyer, Zhai and Kolesnikov, 2022, https://arxiv.org/abs/2205.01580.
"""

from collections.abc import Sequence
from typing import Any, cast

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
    replace,
    sincos_2d,
    tokens_to_grid,
)
from ..layers._checks import NonNegative, Positive, PositivePair, checked_arguments
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


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
    linear_head: Linear | None
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
        num_classes: NonNegative,
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
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          mean token).
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
        self.linear_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = image_hw
        self.grid = grid
        self.channels = channels
        self.dim = dim

    @property
    def patch_size(self) -> tuple[int, int]:
        """The `(height, width)` of a patch."""
        return cast(tuple[int, int], tuple(self.to_patch_embedding.patch_size))

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the tokens after each block, as
        `(dim, grid_h, grid_w)` maps of stride `patch_size`."""
        return tuple(
            FeatureInfo(i, f"transformer.layers[{i}]", self.dim, self.patch_size)
            for i in range(self.transformer.layers.depth)
        )

    def embed(self, x: Float[Array, "channels height width"]) -> Float[Array, "seq dim"]:
        """The tokens the encoder takes: the patch embeddings plus the fixed sine-cosine
        position embeddings of the grid."""
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        tokens = self.to_patch_embedding(x)
        return tokens + jnp.asarray(sincos_2d(*self.grid, self.dim), dtype=tokens.dtype)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: ignored (the model has no stochastic layers); accepted for a uniform API.

        **Returns:** the encoded patch tokens `(grid_h * grid_w, dim)`, after the final norm.
        """
        check_key(self, key)
        return self.transformer(self.embed(x), key=key)

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the mean token
        `(dim,)`.
        """
        pooled = x.mean(axis=0)
        if pre_logits or self.linear_head is None:
            return pooled
        return self.linear_head(pooled)

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
        """The final features and the tokens after chosen blocks.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which blocks (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of block indices (negative from the end).
        - `norm`: apply the final norm to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps, `"tokens"` for the
          tokens `(grid_h * grid_w, dim)` (there are no prefix tokens).
        - `intermediates_only`: return the list of outputs only.
        - `key`: ignored, as in `forward_features`.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stack, all of them.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, self.transformer.layers.depth, name)
        check_key(self, key)
        final, stacked = self.transformer.forward_intermediates(self.embed(x), key=key)
        assert stacked is not None
        outputs = []
        for i in chosen:
            y = stacked[i]
            if norm and self.transformer.norm is not None:
                y = self.transformer.norm(y)
            outputs.append(tokens_to_grid(y, self.grid[0]) if output_fmt == "map" else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "SimpleViT":
        """This model for `(height, width)` images: the sine-cosine position embeddings are
        those of the new grid (they are not parameters). The patch size must divide the
        new size (see [`set_image_size`][eqx_vision.set_image_size])."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        return replace(self, image_size=hw, grid=check_divisible(hw, self.patch_size))

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "SimpleViT":
        """This model with a new linear classifier of `num_classes` outputs, or none for
        `0` (see [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.dim, num_classes, key=key)
        return eqx.tree_at(lambda m: m.linear_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: ignored (the model has no stochastic layers); accepted for a uniform API.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the mean token
        `(dim,)`: `forward_head(forward_features(x))`.
        """
        return self.forward_head(self.forward_features(x, key=key))
