"""PatchMerger: "Learning to Merge Tokens in Vision Transformers".

Renggli et al., 2022, https://arxiv.org/abs/2202.12015.
"""

from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    LayerNorm,
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    split_key,
)
from ..layers._checks import Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal


class PatchMerger(eqx.Module):
    """Merges a sequence of tokens into `num_tokens_out` tokens.

    The tokens are layer-normalised; each of `num_tokens_out` learned queries then takes a
    softmax-weighted average of them: `softmax(queries · LN(x)ᵀ · dim^-1/2) · LN(x)`.
    There is no residual connection and no projection, and the scale is `dim^-1/2` (one
    head over the whole token).

    Equal to `vit_pytorch.vit_with_patch_merger.PatchMerger`; load its weights with
    `eqx_vision.from_vit_pytorch`.
    """

    norm: LayerNorm
    queries: Float[Array, "num_tokens_out dim"]
    scale: float = eqx.field(static=True)

    @checked_arguments
    def __init__(self, dim: Positive, num_tokens_out: Positive, *, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: token dimension, in and out.
        - `num_tokens_out`: number of tokens returned.
        - `key`: a `jax.random.key` for the initialisation of the queries.
        """
        self.norm = LayerNorm(dim)
        self.queries = normal(key, (num_tokens_out, dim))
        self.scale = dim**-0.5

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "num_tokens_out dim"]:
        """**Arguments:**

        - `x`: the tokens, `(seq, dim)`.

        **Returns:** the merged tokens, `(num_tokens_out, dim)`.
        """
        if x.ndim != 2 or x.shape[-1] != self.queries.shape[-1]:
            raise ValueError(
                f"PatchMerger takes tokens of shape (seq, {self.queries.shape[-1]}); got an "
                f"array of shape {tuple(x.shape)}."
            )
        x = self.norm(x)
        sim = (self.queries.astype(x.dtype) @ x.T) * self.scale
        attn = jax.nn.softmax(sim.astype(jnp.promote_types(sim.dtype, jnp.float32)), axis=-1)
        return attn.astype(x.dtype) @ x


class ViTWithPatchMerger(eqx.Module):
    """The Vision Transformer with a PatchMerger half-way through the encoder.

    The image is cut into patches, flattened in `(p1 p2 c)` order and embedded by
    `LayerNorm → Linear → LayerNorm`; learned position embeddings are added (no class
    token). After block `patch_merge_layer` of the pre-norm encoder, a `PatchMerger`
    reduces the tokens to `patch_merge_num_tokens`, and the remaining blocks run on those.
    The encoder ends with a LayerNorm; the tokens are averaged and go through a linear
    head.

    The encoder is stored as two scanned stacks around the merger: `transformer` holds
    blocks `1 … patch_merge_layer` and `merged_transformer` the rest (`None` when the
    merger comes after the last block), followed by the final `norm`.

    Equal to `vit_pytorch.vit_with_patch_merger.ViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. Reference behaviours reproduced:

    - The position table has `num_patches + 1` rows, of which only the first
      `num_patches` are used (the reference keeps a slot for a class token it does not
      have); the last row is a parameter that receives no gradient.
    - The merger scales its scores by `dim^-1/2` and has no residual connection.

    Deliberate differences:

    - A `patch_merge_layer` outside `[1, depth]`, including the default `depth // 2 = 0`
      for `depth == 1`, is rejected; the reference silently never merges.
    - An image of any other size than `image_size` is rejected, where the reference
      silently adds the wrong position embeddings to a smaller one.
    """

    to_patch_embedding: PatchEmbedding
    pos_embedding: Float[Array, "seq_plus_one dim"]
    dropout: eqx.nn.Dropout
    transformer: Transformer
    patch_merger: PatchMerger
    merged_transformer: Transformer | None
    norm: LayerNorm
    mlp_head: Linear
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    patch_merge_layer: int = eqx.field(static=True)

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
        patch_merge_layer: Positive | None = None,
        patch_merge_num_tokens: Positive = 8,
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`.
        - `num_classes`: number of output logits.
        - `dim`: token dimension.
        - `depth`: number of transformer blocks.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `patch_merge_layer`: the 1-based index of the block after which the tokens are
          merged, in `[1, depth]`; defaults to `depth // 2`.
        - `patch_merge_num_tokens`: number of tokens after the merger.
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside the transformer.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both sizes as (height, width) pairs
        image_hw, patch_hw = cast(tuple[int, int], image_size), cast(tuple[int, int], patch_size)
        grid = check_divisible(image_hw, patch_hw)
        merge_layer = depth // 2 if patch_merge_layer is None else patch_merge_layer
        if not 1 <= merge_layer <= depth:
            given = (
                f"the default depth // 2 = {merge_layer}"
                if patch_merge_layer is None
                else f"{patch_merge_layer}"
            )
            raise ValueError(
                f"patch_merge_layer must be in [1, depth] = [1, {depth}]; got {given}."
            )
        embed_key, pos_key, before_key, merge_key, after_key, head_key = jr.split(key, 6)

        def encoder(stack_depth: int, stack_key: PRNGKeyArray) -> Transformer:
            return Transformer(
                dim,
                stack_depth,
                heads,
                dim_head,
                mlp_dim,
                dropout=dropout,
                final_norm=False,
                key=stack_key,
            )

        self.to_patch_embedding = PatchEmbedding(channels, patch_hw, dim, key=embed_key)
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + 1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.transformer = encoder(merge_layer, before_key)
        self.patch_merger = PatchMerger(dim, patch_merge_num_tokens, key=merge_key)
        self.merged_transformer = (
            encoder(depth - merge_layer, after_key) if merge_layer < depth else None
        )
        self.norm = LayerNorm(dim)
        self.mlp_head = Linear(dim, num_classes, key=head_key)
        self.image_size = image_hw
        self.channels = channels
        self.patch_merge_layer = merge_layer

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`.
        """
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, before_key, after_key = split_key(key, 3)
        tokens = self.to_patch_embedding(x)
        n = tokens.shape[0]
        tokens = tokens + self.pos_embedding[:n].astype(tokens.dtype)
        tokens = self.dropout(tokens, key=emb_key)
        tokens = self.transformer(tokens, key=before_key)
        tokens = self.patch_merger(tokens)
        if self.merged_transformer is not None:
            tokens = self.merged_transformer(tokens, key=after_key)
        return self.mlp_head(self.norm(tokens).mean(axis=0))
