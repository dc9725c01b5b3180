"""PatchMerger: "Learning to Merge Tokens in Vision Transformers".

Renggli et al., 2022, https://arxiv.org/abs/2202.12015.
"""

from collections.abc import Sequence
from typing import Any, cast

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
    replace,
    resample_pos_embed,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import NonNegative, Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


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
        self._check(x)
        x = self.norm(x)
        return self._probabilities(x) @ x

    def probabilities(self, x: Float[Array, "seq dim"]) -> Float[Array, "num_tokens_out seq"]:
        """The weights of the merge: row `i` is how merged token `i` averages the tokens
        of `x` (each row sums to one)."""
        self._check(x)
        return self._probabilities(self.norm(x))

    def _check(self, x: Array) -> None:
        if x.ndim != 2 or x.shape[-1] != self.queries.shape[-1]:
            raise ValueError(
                f"PatchMerger takes tokens of shape (seq, {self.queries.shape[-1]}); got an "
                f"array of shape {tuple(x.shape)}."
            )

    def _probabilities(self, normed: Array) -> Array:
        sim = (self.queries.astype(normed.dtype) @ normed.T) * self.scale
        attn = jax.nn.softmax(sim.astype(jnp.promote_types(sim.dtype, jnp.float32)), axis=-1)
        return attn.astype(normed.dtype)


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

    As a backbone, only the blocks before the merger have outputs on the patch grid: they
    are the feature maps (`feature_info`, `forward_intermediates`); the tokens after the
    blocks past the merger have no place in the image and come from
    `merged_intermediates`.

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
    mlp_head: Linear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    patch_merge_layer: int = eqx.field(static=True)

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
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          mean of the normalised tokens).
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
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = image_hw
        self.channels = channels
        self.patch_merge_layer = merge_layer

    @property
    def patch_size(self) -> tuple[int, int]:
        """The `(height, width)` of a patch."""
        return cast(tuple[int, int], tuple(self.to_patch_embedding.patch_size))

    @property
    def grid(self) -> tuple[int, int]:
        """The `(height, width)` of the patch grid."""
        (h, w), (ph, pw) = self.image_size, self.patch_size
        return h // ph, w // pw

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the tokens after each block before the
        merger (blocks `0 … patch_merge_layer - 1`), as `(dim, grid_h, grid_w)` maps of
        stride `patch_size`. The blocks after the merger run on `patch_merge_num_tokens`
        merged tokens, which have no grid: they are not feature maps (see
        `merged_intermediates`)."""
        dim = self.pos_embedding.shape[1]
        return tuple(
            FeatureInfo(i, f"transformer.layers[{i}]", dim, self.patch_size)
            for i in range(self.patch_merge_layer)
        )

    def embed(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """The tokens the first encoder takes: the patch embeddings plus the position
        embeddings, after the embedding dropout (with `key`)."""
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        tokens = self.to_patch_embedding(x)
        tokens = tokens + self.pos_embedding[: tokens.shape[0]].astype(tokens.dtype)
        return self.dropout(tokens, key=key)

    def _encode(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None
    ) -> tuple[Array, Array, Array | None]:
        """The normalised final tokens, the outputs of the blocks before the merger and
        those of the blocks after it (`None` without blocks after it), from the scans."""
        check_key(self, key)
        emb_key, before_key, after_key = split_key(key, 3)
        tokens, before = self.transformer.forward_intermediates(
            self.embed(x, key=emb_key), key=before_key
        )
        assert before is not None
        tokens = self.patch_merger(tokens)
        after = None
        if self.merged_transformer is not None:
            tokens, after = self.merged_transformer.forward_intermediates(tokens, key=after_key)
        return self.norm(tokens), before, after

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "num_tokens_out dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the merged tokens after the last block and the final norm,
        `(patch_merge_num_tokens, dim)`.
        """
        check_key(self, key)
        emb_key, before_key, after_key = split_key(key, 3)
        tokens = self.transformer(self.embed(x, key=emb_key), key=before_key)
        tokens = self.patch_merger(tokens)
        if self.merged_transformer is not None:
            tokens = self.merged_transformer(tokens, key=after_key)
        return self.norm(tokens)

    def forward_head(
        self, x: Float[Array, "num_tokens_out dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the mean token
        `(dim,)`.
        """
        pooled = x.mean(axis=0)
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
        """The final features and the tokens after chosen blocks before the merger.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which blocks (see `feature_info`, the blocks before the merger):
          `None` for all, an int `n` for the last `n`, or a sequence of block indices
          (negative from the end).
        - `norm`: apply the final norm to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps, `"tokens"` for the
          tokens `(grid_h * grid_w, dim)` (there are no prefix tokens).
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. Every block
        runs, in its scanned stack.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, self.patch_merge_layer, name)
        final, before, _ = self._encode(x, key)
        outputs = []
        for i in chosen:
            y = self.norm(before[i]) if norm else before[i]
            outputs.append(tokens_to_grid(y, self.grid[0]) if output_fmt == "map" else y)
        return outputs if intermediates_only else (final, outputs)

    def merged_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        norm: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "num_tokens_out dim"], Float[Array, "after num_tokens_out dim"]]:
        """The final features and the merged tokens after every block past the merger
        (which have no grid, so are not in `feature_info`).

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `norm`: apply the final norm to each output.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, `outputs` stacked
        `(depth - patch_merge_layer, patch_merge_num_tokens, dim)`: the output of block
        `patch_merge_layer + i` at `outputs[i]` (no rows when the merger comes last).
        """
        final, _, after = self._encode(x, key)
        if after is None:
            return final, jnp.zeros((0, *final.shape), final.dtype)
        return final, self.norm(after) if norm else after

    def set_image_size(self, image_size: tuple[int, int]) -> "ViTWithPatchMerger":
        """This model for `(height, width)` images: the position embeddings of the patches
        resampled (the unused last row kept), see
        [`set_image_size`][eqx_vision.set_image_size]. The merger takes any number of
        tokens; the patch size must divide the new size."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        grid = check_divisible(hw, self.patch_size)
        used, spare = self.pos_embedding[:-1], self.pos_embedding[-1:]
        pos = resample_pos_embed(used, grid, self.grid)
        pos = jnp.concatenate([pos, spare.astype(pos.dtype)], axis=0)
        return replace(self, pos_embedding=pos, image_size=hw)

    def reset_head(
        self, num_classes: int, *, key: PRNGKeyArray | None = None
    ) -> "ViTWithPatchMerger":
        """This model with a new linear classifier of `num_classes` outputs, or none for
        `0` (see [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.pos_embedding.shape[1], num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the mean token
        `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))
