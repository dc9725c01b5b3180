"""CrossViT: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification".

Chen, Fan and Panda, 2021, https://arxiv.org/abs/2103.14899.

Two ViT branches see the image at two patch sizes; after each round of self-attention in
both branches, the class token of each branch attends to the patch tokens of the other.
`CrossViT` is vit-pytorch's version; `TimmCrossViT` is timm's (`crossvit_*`), a different
network after the authors' code.
"""

from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Attention,
    Conv2d,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Stack,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    gelu,
    replace,
    resample_pos_embed,
    split_key,
    tokens_to_grid,
    with_class_tokens,
)
from ..layers._checks import (
    NonNegative,
    Positive,
    PositivePair,
    Rate,
    checked_arguments,
)
from ..layers._init import normal
from ..layers._resize import resize_bicubic
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


class ImageEmbedder(eqx.Module):
    """Square patches → `LayerNorm → Linear → LayerNorm`, a class token, learned position
    embeddings and dropout: the token embedding of one CrossViT branch."""

    to_patch_embedding: PatchEmbedding
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        *,
        dim: int,
        image_size: tuple[int, int],
        patch_size: int,
        dropout: float,
        channels: int,
        key: PRNGKeyArray,
    ):
        embed_key, cls_key, pos_key = jr.split(key, 3)
        grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.to_patch_embedding = PatchEmbedding(
            channels, (patch_size, patch_size), dim, key=embed_key
        )
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + 1, dim))
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        tokens = self.to_patch_embedding(x)
        tokens = with_class_tokens(tokens, self.cls_token, self.pos_embedding)
        return self.dropout(tokens, key=key)


class CrossAttention(eqx.Module):
    """A class token of one branch attending to the patch tokens of the other.

    The class token is projected to the other branch's dimension (when the two differ),
    attends with queries from `LayerNorm(cls)` and keys/values from
    `[LayerNorm(cls); context]`, and is projected back.
    """

    project_in: Linear | None
    attn: Attention
    project_out: Linear | None

    def __init__(
        self,
        dim: int,
        context_dim: int,
        *,
        heads: int,
        dim_head: int,
        dropout: float,
        key: PRNGKeyArray,
    ):
        in_key, attn_key, out_key = jr.split(key, 3)
        project = dim != context_dim
        self.project_in = Linear(dim, context_dim, key=in_key) if project else None
        self.attn = Attention(
            context_dim,
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
            fused_qkv=False,
            project_out=True,
            key=attn_key,
        )
        self.project_out = Linear(context_dim, dim, key=out_key) if project else None

    def __call__(
        self,
        cls: Float[Array, "1 dim"],
        context: Float[Array, "ctx_seq ctx_dim"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "1 dim"]:
        x = cls if self.project_in is None else self.project_in(cls)
        x = self.attn(x, context, key=key)
        return x if self.project_out is None else self.project_out(x)

    def probabilities(
        self, cls: Float[Array, "1 dim"], context: Float[Array, "ctx_seq ctx_dim"]
    ) -> Float[Array, "heads 1 1+ctx_seq"]:
        """The attention probabilities of the class token over `[itself; context]`."""
        x = cls if self.project_in is None else self.project_in(cls)
        return self.attn.probabilities(x, context)


class CrossLayer(eqx.Module):
    """One round of cross attention: each branch's class token attends to the other
    branch's patch tokens, with a residual connection."""

    sm_attend_lg: CrossAttention
    lg_attend_sm: CrossAttention

    def __init__(
        self,
        sm_dim: int,
        lg_dim: int,
        *,
        heads: int,
        dim_head: int,
        dropout: float,
        key: PRNGKeyArray,
    ):
        sm_key, lg_key = jr.split(key)
        self.sm_attend_lg = CrossAttention(
            sm_dim, lg_dim, heads=heads, dim_head=dim_head, dropout=dropout, key=sm_key
        )
        self.lg_attend_sm = CrossAttention(
            lg_dim, sm_dim, heads=heads, dim_head=dim_head, dropout=dropout, key=lg_key
        )

    def __call__(
        self,
        cls_tokens: tuple[Float[Array, "1 sm_dim"], Float[Array, "1 lg_dim"]],
        sm_patches: Float[Array, "sm_seq sm_dim"],
        lg_patches: Float[Array, "lg_seq lg_dim"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "1 sm_dim"], Float[Array, "1 lg_dim"]]:
        sm_key, lg_key = split_key(key, 2)
        sm_cls, lg_cls = cls_tokens
        sm_cls = sm_cls + self.sm_attend_lg(sm_cls, lg_patches, key=sm_key)
        lg_cls = lg_cls + self.lg_attend_sm(lg_cls, sm_patches, key=lg_key)
        return sm_cls, lg_cls

    def probabilities(
        self,
        cls_tokens: tuple[Float[Array, "1 sm_dim"], Float[Array, "1 lg_dim"]],
        sm_patches: Float[Array, "sm_seq sm_dim"],
        lg_patches: Float[Array, "lg_seq lg_dim"],
    ) -> tuple[Float[Array, "heads 1 1+lg_seq"], Float[Array, "heads 1 1+sm_seq"]]:
        """The attention probabilities of this round, as `__call__` computes them: the
        small-branch class token over `[itself; large patches]`, then the large-branch one
        (after the small one's update, which it does not see) over `[itself; small
        patches]`."""
        sm_cls, lg_cls = cls_tokens
        return (
            self.sm_attend_lg.probabilities(sm_cls, lg_patches),
            self.lg_attend_sm.probabilities(lg_cls, sm_patches),
        )


class CrossTransformer(eqx.Module):
    """`depth` scanned `CrossLayer`s. Only the class tokens change: every layer attends to
    the patch tokens the cross transformer was given."""

    layers: Stack[CrossLayer]

    def __init__(
        self,
        sm_dim: int,
        lg_dim: int,
        depth: int,
        *,
        heads: int,
        dim_head: int,
        dropout: float,
        key: PRNGKeyArray,
    ):
        def make_layer(index: int, *, key: PRNGKeyArray) -> CrossLayer:
            del index
            return CrossLayer(
                sm_dim, lg_dim, heads=heads, dim_head=dim_head, dropout=dropout, key=key
            )

        self.layers = Stack(make_layer, depth, key=key)

    def __call__(
        self,
        sm_tokens: Float[Array, "sm_seq sm_dim"],
        lg_tokens: Float[Array, "lg_seq lg_dim"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]]:
        sm_cls, lg_cls = self.layers(
            (sm_tokens[:1], lg_tokens[:1]), sm_tokens[1:], lg_tokens[1:], key=key
        )
        sm_tokens = jnp.concatenate([sm_cls, sm_tokens[1:]], axis=0)
        lg_tokens = jnp.concatenate([lg_cls, lg_tokens[1:]], axis=0)
        return sm_tokens, lg_tokens


class MultiScaleBlock(eqx.Module):
    """One layer of the multi-scale encoder: a transformer encoder in each branch (each
    with its final LayerNorm), then a `CrossTransformer`."""

    sm_enc: Transformer
    lg_enc: Transformer
    cross_attend: CrossTransformer

    def __call__(
        self,
        tokens: tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]]:
        sm_key, lg_key, cross_key = split_key(key, 3)
        sm_tokens, lg_tokens = tokens
        sm_tokens = self.sm_enc(sm_tokens, key=sm_key)
        lg_tokens = self.lg_enc(lg_tokens, key=lg_key)
        return self.cross_attend(sm_tokens, lg_tokens, key=cross_key)


def _encoder(
    dim: int,
    depth: int,
    heads: int,
    dim_head: int,
    mlp_dim: int,
    dropout: float,
    *,
    key: PRNGKeyArray,
) -> Transformer:
    """A branch's transformer encoder: separate query and key/value projections, and an
    output projection in every case, as in the reference."""
    return Transformer(
        dim,
        depth,
        heads,
        dim_head,
        mlp_dim,
        dropout=dropout,
        fused_qkv=False,
        project_out=True,
        key=key,
    )


class CrossViT(eqx.Module):
    """The Cross-Attention Multi-Scale Vision Transformer.

    A small-patch branch (`sm_*`) and a large-patch branch (`lg_*`) each embed the image as
    a ViT does (`LayerNorm → Linear → LayerNorm` on `(p1 p2 c)` patches, a class token,
    learned position embeddings). The multi-scale encoder repeats `depth` times: a
    transformer encoder in each branch, then `cross_attn_depth` rounds of cross attention in
    which each class token, projected to the other branch's dimension, attends to
    `[itself; the other branch's patch tokens]` and is projected back. The logits are the
    sum of `LayerNorm → Linear` on each branch's class token.

    Equal to `vit_pytorch.cross_vit.CrossViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. As in the reference, the patch tokens are never updated
    by cross attention (the large-branch class token attends to the small-branch patch
    tokens as they were before the round), the projections exist only when
    `sm_dim != lg_dim`, every attention keeps its output projection even with one head of
    full width, and the dropout rates default to 0.1. Unlike the reference, which silently
    adds the wrong position embeddings to a smaller image, an image of any other size than
    `image_size` is rejected.
    """

    sm_image_embedder: ImageEmbedder
    lg_image_embedder: ImageEmbedder
    multi_scale_encoder: Stack[MultiScaleBlock]
    sm_head_norm: LayerNorm
    sm_mlp_head: Linear | None
    lg_head_norm: LayerNorm
    lg_mlp_head: Linear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        num_classes: NonNegative,
        sm_dim: Positive,
        lg_dim: Positive,
        sm_patch_size: Positive = 12,
        sm_enc_depth: Positive = 1,
        sm_enc_heads: Positive = 8,
        sm_enc_mlp_dim: Positive = 2048,
        sm_enc_dim_head: Positive = 64,
        lg_patch_size: Positive = 16,
        lg_enc_depth: Positive = 4,
        lg_enc_heads: Positive = 8,
        lg_enc_mlp_dim: Positive = 2048,
        lg_enc_dim_head: Positive = 64,
        cross_attn_depth: Positive = 2,
        cross_attn_heads: Positive = 8,
        cross_attn_dim_head: Positive = 64,
        depth: Positive = 3,
        dropout: Rate = 0.1,
        emb_dropout: Rate = 0.1,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int (images are square); must be a
          multiple of both patch sizes.
        - `num_classes`: number of output logits; `0` for no heads (the model returns the
          pooled features, both branches' normalised class tokens concatenated).
        - `sm_dim`, `lg_dim`: token dimensions of the small- and large-patch branches.
        - `sm_patch_size`, `lg_patch_size`: patch sizes of the two branches, ints.
        - `sm_enc_depth`, `sm_enc_heads`, `sm_enc_mlp_dim`, `sm_enc_dim_head`: shape of the
          small-patch branch's transformer encoder in each multi-scale layer.
        - `lg_enc_depth`, `lg_enc_heads`, `lg_enc_mlp_dim`, `lg_enc_dim_head`: the same for
          the large-patch branch.
        - `cross_attn_depth`: rounds of cross attention in each multi-scale layer.
        - `cross_attn_heads`, `cross_attn_dim_head`: shape of the cross attention.
        - `depth`: number of multi-scale layers.
        - `dropout`: dropout rate in the encoders and the cross attention.
        - `emb_dropout`: dropout rate on the embedded tokens of both branches.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        image_hw = (image_size, image_size)
        check_divisible(image_hw, (sm_patch_size, sm_patch_size), "sm_patch_size")
        check_divisible(image_hw, (lg_patch_size, lg_patch_size), "lg_patch_size")

        sm_key, lg_key, enc_key, sm_head_key, lg_head_key = jr.split(key, 5)
        self.sm_image_embedder = ImageEmbedder(
            dim=sm_dim,
            image_size=image_hw,
            patch_size=sm_patch_size,
            dropout=emb_dropout,
            channels=channels,
            key=sm_key,
        )
        self.lg_image_embedder = ImageEmbedder(
            dim=lg_dim,
            image_size=image_hw,
            patch_size=lg_patch_size,
            dropout=emb_dropout,
            channels=channels,
            key=lg_key,
        )

        sm_shape = (sm_dim, sm_enc_depth, sm_enc_heads, sm_enc_dim_head, sm_enc_mlp_dim)
        lg_shape = (lg_dim, lg_enc_depth, lg_enc_heads, lg_enc_dim_head, lg_enc_mlp_dim)

        def make_block(index: int, *, key: PRNGKeyArray) -> MultiScaleBlock:
            del index
            sm_enc_key, lg_enc_key, cross_key = jr.split(key, 3)
            return MultiScaleBlock(
                sm_enc=_encoder(*sm_shape, dropout, key=sm_enc_key),
                lg_enc=_encoder(*lg_shape, dropout, key=lg_enc_key),
                cross_attend=CrossTransformer(
                    sm_dim,
                    lg_dim,
                    cross_attn_depth,
                    heads=cross_attn_heads,
                    dim_head=cross_attn_dim_head,
                    dropout=dropout,
                    key=cross_key,
                ),
            )

        self.multi_scale_encoder = Stack(make_block, depth, key=enc_key)
        self.sm_head_norm = LayerNorm(sm_dim)
        self.lg_head_norm = LayerNorm(lg_dim)
        self.sm_mlp_head, self.lg_mlp_head = _heads(
            sm_dim, lg_dim, num_classes, sm_head_key, lg_head_key
        )
        self.image_size = image_hw
        self.channels = channels

    @property
    def grids(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The `(height, width)` of the small- and large-branch patch grids."""
        h, w = self.image_size
        out = []
        for embedder in (self.sm_image_embedder, self.lg_image_embedder):
            ph, pw = embedder.to_patch_embedding.patch_size
            out.append((h // ph, w // pw))
        return out[0], out[1]

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the patch tokens of each branch after
        each multi-scale block, as `(dim, grid_h, grid_w)` maps. Ordered by branch, then
        block (as timm's CrossViT): with `depth` blocks, indices `0` to `depth - 1` are the
        small-patch branch (stride `sm_patch_size`), `depth` to `2 * depth - 1` the
        large-patch branch (stride `lg_patch_size`), so the reductions never decrease."""
        depth = self.multi_scale_encoder.depth
        info = []
        for b, (name, embedder) in enumerate(
            (("sm", self.sm_image_embedder), ("lg", self.lg_image_embedder))
        ):
            dim = embedder.pos_embedding.shape[1]
            patch = cast(tuple[int, int], tuple(embedder.to_patch_embedding.patch_size))
            for i in range(depth):
                info.append(
                    FeatureInfo(b * depth + i, f"multi_scale_encoder[{i}].{name}", dim, patch)
                )
        return tuple(info)

    def embed(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]]:
        """The tokens the multi-scale encoder takes, `(small, large)`: each branch's patch
        embeddings with its class token and position embeddings, after the embedding
        dropout (with `key`)."""
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        sm_key, lg_key = split_key(key, 2)
        return self.sm_image_embedder(x, key=sm_key), self.lg_image_embedder(x, key=lg_key)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the tokens of both branches after the multi-scale encoder,
        `(small, large)`, each `(1 + grid_h * grid_w, dim)`, class token first (the patch
        tokens as each branch's encoder normalised them last; the head norms are applied in
        `forward_head`).
        """
        embed_key, enc_key = split_key(key, 2)
        return self.multi_scale_encoder(self.embed(x, embed_key), key=enc_key)

    def forward_head(
        self,
        features: tuple[Float[Array, "sm_seq sm_dim"], Float[Array, "lg_seq lg_dim"]],
        *,
        pre_logits: bool = False,
    ) -> Float[Array, " num_classes"] | Float[Array, " sm_dim+lg_dim"]:
        """**Arguments:**

        - `features`: the `(small, large)` tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, the sum of both branches' heads; or, with `pre_logits` or
        without heads, the two normalised class tokens concatenated `(sm_dim + lg_dim,)`.
        """
        sm_tokens, lg_tokens = features
        sm_cls = self.sm_head_norm(sm_tokens[0])
        lg_cls = self.lg_head_norm(lg_tokens[0])
        if pre_logits or self.sm_mlp_head is None or self.lg_mlp_head is None:
            return jnp.concatenate([sm_cls, lg_cls])
        return self.sm_mlp_head(sm_cls) + self.lg_mlp_head(lg_cls)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        prefix_tokens: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the patch tokens of each branch after chosen multi-scale
        blocks.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which outputs (see `feature_info`: the small branch after each block,
          then the large branch): `None` for all, an int `n` for the last `n`, or a
          sequence of indices (negative from the end).
        - `norm`: apply the branch's head norm to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps of the patch tokens,
          `"tokens"` for the patch tokens `(grid_h * grid_w, dim)`.
        - `prefix_tokens`: return each output as `(patch output, class token)`, the class
          token `(1, dim)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stack, all of them.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        depth = self.multi_scale_encoder.depth
        chosen = feature_indices(indices, 2 * depth, name)
        embed_key, enc_key = split_key(key, 2)
        final, stacked = self.multi_scale_encoder(
            self.embed(x, embed_key), key=enc_key, intermediates=True
        )
        norms = (self.sm_head_norm, self.lg_head_norm)
        outputs = []
        for index in chosen:
            branch, block = divmod(index, depth)
            y = stacked[branch][block]
            if norm:
                y = norms[branch](y)
            cls, y = y[:1], y[1:]
            if output_fmt == "map":
                y = tokens_to_grid(y, self.grids[branch][0])
            outputs.append((y, cls) if prefix_tokens else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "CrossViT":
        """This model for `(height, width)` images, a multiple of both patch sizes (the
        sides may differ): each branch's position embeddings of the patches resampled (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        embedders = []
        for embedder, old in zip(
            (self.sm_image_embedder, self.lg_image_embedder), self.grids, strict=True
        ):
            patch = cast(tuple[int, int], tuple(embedder.to_patch_embedding.patch_size))
            try:
                grid = check_divisible(hw, patch)
            except ValueError as e:
                raise ValueError(f"CrossViT.set_image_size: {e}") from None
            pos = resample_pos_embed(embedder.pos_embedding, grid, old, num_prefix=1)
            embedders.append(eqx.tree_at(lambda e: e.pos_embedding, embedder, pos))
        return replace(
            self, sm_image_embedder=embedders[0], lg_image_embedder=embedders[1], image_size=hw
        )

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "CrossViT":
        """This model with new heads of `num_classes` outputs on both branches (the head
        norms kept), or none for `0` (see [`reset_head`][eqx_vision.reset_head])."""
        sm_dim = self.sm_head_norm.weight.shape[0]
        lg_dim = self.lg_head_norm.weight.shape[0]
        keys = jr.split(key) if num_classes > 0 and key is not None else (None, None)
        heads = _heads(sm_dim, lg_dim, num_classes, keys[0], keys[1])
        return eqx.tree_at(
            lambda m: (m.sm_mlp_head, m.lg_mlp_head), self, heads, is_leaf=lambda n: n is None
        )

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " sm_dim+lg_dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode (the
          default dropout rates are 0.1, so a freshly built model needs one; use
          `eqx.nn.inference_mode(model)` for evaluation).

        **Returns:** the logits `(num_classes,)`, the sum of the two branches' heads (with
        `num_classes=0`, the pooled features `(sm_dim + lg_dim,)`):
        `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))


def _heads(
    sm_dim: int,
    lg_dim: int,
    num_classes: int,
    sm_key: PRNGKeyArray | None,
    lg_key: PRNGKeyArray | None,
) -> tuple[Linear | None, Linear | None]:
    """The classifiers of both CrossViT branches, or none for `num_classes=0`."""
    if num_classes == 0:
        return None, None
    assert sm_key is not None and lg_key is not None
    return Linear(sm_dim, num_classes, key=sm_key), Linear(lg_dim, num_classes, key=lg_key)


# timm's CrossViT: a different architecture under the same name.


def scale_image(
    x: Float[Array, "channels height width"], size: tuple[int, int], crop: bool
) -> Float[Array, "channels out_height out_width"]:
    """`x` at `size`: unchanged if it has that size, else its centre crop (with `crop`, when
    `size` fits in it; offsets rounded half to even) or its bicubic resize."""
    _, h, w = x.shape
    if (h, w) == size:
        return x
    if crop and size[0] <= h and size[1] <= w:
        top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
        return x[:, top : top + size[0], left : left + size[1]]
    return resize_bicubic(x, size)


# The (kernel, stride, padding) of the three convolutions of the multi-conv ("dagger")
# patch embedding, for the patch sizes it is defined for.
_MULTI_CONV = {
    12: ((7, 4, 3), (3, 3, 0), (3, 1, 1)),
    16: ((7, 4, 3), (3, 2, 1), (3, 2, 1)),
}


class MultiConvEmbedding(eqx.Module):
    """The patch embedding of timm's `crossvit_*_dagger_*`: three convolutions with ReLUs
    between them (`dim/4`, `dim/2`, `dim` channels; a 7x7 convolution of stride 4, then
    3x3 ones of strides 3, 1 for 12-pixel patches or 2, 2 for 16-pixel patches)."""

    convs: tuple[Conv2d, Conv2d, Conv2d]

    def __init__(self, channels: int, patch_size: int, dim: int, *, key: PRNGKeyArray):
        if patch_size not in _MULTI_CONV:
            raise ValueError(
                f"the multi-conv patch embedding is defined for patch sizes 12 and 16; got "
                f"patch_size={patch_size}."
            )
        widths = (channels, dim // 4, dim // 2, dim)
        self.convs = tuple(  # pyright: ignore[reportAttributeAccessIssue]
            Conv2d(widths[i], widths[i + 1], k, stride=s, padding=p, key=ck)
            for i, ((k, s, p), ck) in enumerate(
                zip(_MULTI_CONV[patch_size], jr.split(key, 3), strict=True)
            )
        )

    @staticmethod
    def grid(patch_size: int, size: tuple[int, int]) -> tuple[int, int]:
        """The token grid `(h, w)` of an image of `size`."""
        out = list(size)
        for k, s, p in _MULTI_CONV[patch_size]:
            out = [(n + 2 * p - k) // s + 1 for n in out]
        return out[0], out[1]

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "seq dim"]:
        first, second, third = self.convs
        y = third(jax.nn.relu(second(jax.nn.relu(first(x)))))
        return y.reshape(y.shape[0], -1).T


def branch_grid(size: tuple[int, int], patch_size: int, multi_conv: bool) -> tuple[int, int]:
    """The patch grid of a branch of timm's CrossViT that sees `size` images; a ValueError
    if `patch_size` does not tile `size` (or the multi-conv embedding gives another grid)."""
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(
            f"a branch's image size (image_size scaled by its image_scale, {size}) must be "
            f"a multiple of its patch size {patch_size}."
        )
    grid = (size[0] // patch_size, size[1] // patch_size)
    if multi_conv:
        conv_grid = MultiConvEmbedding.grid(patch_size, size)
        if conv_grid != grid:
            raise ValueError(
                f"the multi-conv embedding of a {size} image gives a {conv_grid} grid of "
                f"tokens, not the {grid} of {patch_size}-pixel patches; choose another "
                "image size."
            )
    return grid


class BranchEmbedding(eqx.Module):
    """One branch's tokens in timm's CrossViT: the image at the branch's size
    (`scale_image`), its patches embedded (a strided convolution or `MultiConvEmbedding`),
    a class token and learned position embeddings. The branch's image size must be a
    multiple of its patch size."""

    patch_embedding: PatchEmbedding | MultiConvEmbedding
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    size: tuple[int, int] = eqx.field(static=True)
    crop: bool = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        channels: int,
        size: tuple[int, int],
        patch_size: int,
        dim: int,
        multi_conv: bool,
        crop: bool,
        key: PRNGKeyArray,
    ):
        embed_key, cls_key, pos_key = jr.split(key, 3)
        if multi_conv:
            self.patch_embedding = MultiConvEmbedding(channels, patch_size, dim, key=embed_key)
        grid = branch_grid(size, patch_size, multi_conv)
        if not multi_conv:
            self.patch_embedding = PatchEmbedding(
                channels,
                (patch_size, patch_size),
                dim,
                pre_norm=False,
                post_norm=False,
                channels_first=True,
                key=embed_key,
            )
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + 1, dim))
        self.size = size
        self.crop = crop
        self.patch_size = patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """The `(height, width)` of the branch's patch grid."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "seq dim"]:
        x = scale_image(x, self.size, self.crop)
        tokens = self.patch_embedding(x)
        return with_class_tokens(tokens, self.cls_token, self.pos_embedding)


class BranchProjection(eqx.Module):
    """`LayerNorm → GELU → Linear`: a class token carried from one branch's dimension to
    another's."""

    norm: LayerNorm
    linear: Linear

    def __init__(self, dim: int, out_dim: int, *, norm_eps: float, key: PRNGKeyArray):
        self.norm = LayerNorm(dim, eps=norm_eps)
        self.linear = Linear(dim, out_dim, key=key)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq out_dim"]:
        return self.linear(gelu(self.norm(x)))


class CrossAttentionBlock(eqx.Module):
    """timm's cross-attention block: `cls + attn(LayerNorm([cls; context]))`, the query
    from the class token only, keys and values from all the normalised tokens."""

    norm: LayerNorm
    attn: Attention

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qkv_bias: bool,
        norm_eps: float,
        dropout: float,
        attn_dropout: float,
        key: PRNGKeyArray,
    ):
        self.norm = LayerNorm(dim, eps=norm_eps)
        attn = Attention(
            dim,
            heads=heads,
            dim_head=dim // heads,
            dropout=dropout,
            norm=False,
            fused_qkv=False,
            qkv_bias=qkv_bias,
            project_out=True,
            key=key,
        )
        self.attn = _with_attn_dropout(attn, attn_dropout)

    def __call__(
        self,
        cls: Float[Array, "1 dim"],
        context: Float[Array, "ctx_seq dim"] | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "1 dim"]:
        tokens = cls if context is None else jnp.concatenate([cls, context], axis=0)
        tokens = self.norm(tokens)
        context = None if context is None else tokens[1:]
        return cls + self.attn(tokens[:1], context, key=key)

    def probabilities(
        self, cls: Float[Array, "1 dim"], context: Float[Array, "ctx_seq dim"]
    ) -> Float[Array, "heads 1 1+ctx_seq"]:
        """The attention probabilities of the class token over `[itself; context]`."""
        tokens = self.norm(jnp.concatenate([cls, context], axis=0))
        return self.attn.probabilities(tokens[:1], tokens[1:])


def _with_attn_dropout(module: Any, rate: float) -> Any:
    """`module` with the dropout on the attention probabilities of each of its `Attention`s
    at `rate` (timm's `attn_drop_rate`, apart from the `proj_drop_rate` of the outputs)."""

    def dropouts(tree: Any) -> list[eqx.nn.Dropout]:
        found = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, Attention))
        return [n.attn_dropout for n in found if isinstance(n, Attention)]

    count = len(dropouts(module))
    return eqx.tree_at(dropouts, module, [eqx.nn.Dropout(rate) for _ in range(count)])


class TimmMultiScaleBlock(eqx.Module):
    """One multi-scale block of timm's CrossViT, for any number of branches.

    Each branch runs its transformer encoder (no final norm). Then, for each branch `i`
    and the next one `j = (i + 1) % branches`: branch `i`'s class token is projected to
    `j`'s dimension (`BranchProjection`), attends to `[itself; j's patch tokens]` in the
    cross-attention blocks of `fusions[i]` (after the first, a block sees the class token
    alone, as timm's `nn.Sequential` of blocks gives it), and is projected back; the result
    replaces the class token (no residual around the round trip).
    """

    encoders: tuple[Transformer, ...]
    projections: tuple[BranchProjection, ...]
    fusions: tuple[tuple[CrossAttentionBlock, ...], ...]
    reverts: tuple[BranchProjection, ...]
    cross_depth: int = eqx.field(static=True)

    def __init__(
        self,
        dims: tuple[int, ...],
        depths: tuple[int, ...],
        heads: tuple[int, ...],
        mlp_ratios: tuple[float, ...],
        *,
        qkv_bias: bool,
        norm_eps: float,
        dropout: float,
        attn_dropout: float,
        key: PRNGKeyArray,
    ):
        """`depths` holds the encoder depth of each branch, then the number of
        cross-attention blocks (0 stands for one block, stored outside a sequence)."""
        n = len(dims)
        enc_keys, proj_keys, fusion_keys, revert_keys = (list(k) for k in jr.split(key, (4, n)))
        encoders = []
        for i in range(n):
            encoder = Transformer(
                dims[i],
                depths[i],
                heads[i],
                dims[i] // heads[i],
                int(dims[i] * mlp_ratios[i]),
                dropout=dropout,
                final_norm=False,
                norm_eps=norm_eps,
                qkv_bias=qkv_bias,
                project_out=True,
                key=enc_keys[i],
            )
            encoders.append(_with_attn_dropout(encoder, attn_dropout))
        self.encoders = tuple(encoders)
        nxt = [(i + 1) % n for i in range(n)]
        self.projections = tuple(
            BranchProjection(dims[i], dims[nxt[i]], norm_eps=norm_eps, key=proj_keys[i])
            for i in range(n)
        )
        self.cross_depth = depths[n]
        self.fusions = tuple(
            tuple(
                CrossAttentionBlock(
                    dims[nxt[i]],
                    heads[nxt[i]],
                    qkv_bias=qkv_bias,
                    norm_eps=norm_eps,
                    dropout=dropout,
                    attn_dropout=attn_dropout,
                    key=k,
                )
                for k in jr.split(fusion_keys[i], max(self.cross_depth, 1))
            )
            for i in range(n)
        )
        self.reverts = tuple(
            BranchProjection(dims[nxt[i]], dims[i], norm_eps=norm_eps, key=revert_keys[i])
            for i in range(n)
        )

    def __call__(
        self, tokens: tuple[Float[Array, "_ _"], ...], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "_ _"], ...]:
        """**Arguments:** `tokens`, each branch's `(seq, dim)` tokens, class token first.

        **Returns:** the tokens of every branch, same shapes.
        """
        n = len(self.encoders)
        enc_key, fusion_key = split_key(key, 2)
        enc_keys = split_key(enc_key, n)
        encoded = [enc(t, key=k) for enc, t, k in zip(self.encoders, tokens, enc_keys, strict=True)]
        return self.fuse(tuple(encoded), key=fusion_key)

    def fuse(
        self, encoded: tuple[Float[Array, "_ _"], ...], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "_ _"], ...]:
        """The cross-attention half of the block, on the tokens its encoders returned."""
        n = len(self.encoders)
        fusion_keys = split_key(key, n)
        out = []
        for i in range(n):
            cls = self.projections[i](encoded[i][:1])
            context: Array | None = encoded[(i + 1) % n][1:]
            for block, k in zip(
                self.fusions[i], split_key(fusion_keys[i], len(self.fusions[i])), strict=True
            ):
                cls = block(cls, context, key=k)
                context = None
            out.append(jnp.concatenate([self.reverts[i](cls), encoded[i][1:]], axis=0))
        return tuple(out)

    def fusion_probabilities(
        self, encoded: tuple[Float[Array, "_ _"], ...]
    ) -> tuple[Float[Array, "_ 1 _"], ...]:
        """For each branch `i`, the attention probabilities `(heads, 1, 1 + seq_j)` of its
        projected class token over `[itself; the next branch's patch tokens]` in its first
        cross-attention block (the later ones see the class token alone), as `fuse`
        computes them."""
        n = len(self.encoders)
        return tuple(
            self.fusions[i][0].probabilities(
                self.projections[i](encoded[i][:1]), encoded[(i + 1) % n][1:]
            )
            for i in range(n)
        )


class TimmCrossViT(eqx.Module):
    """CrossViT as timm implements it (`timm.models.crossvit.CrossVit`, the
    `crossvit_*` models), a different network from [`CrossViT`][eqx_vision.CrossViT]
    (vit-pytorch's), after the authors' code.

    Each branch sees the image at its own size (`image_scales`: timm's 240-pixel models
    shrink it to 224 pixels for the 16-pixel-patch branch, by bicubic interpolation as
    torch's `F.interpolate` or, with `crop_scale`, by a centre crop) and embeds it with a
    strided convolution (or, with `multi_conv`, the three convolutions of the `_dagger`
    models), adding a class token and learned position embeddings. Each multi-scale block
    (`TimmMultiScaleBlock`) runs timm's ViT blocks in every branch (per-branch depth,
    heads and MLP ratio, a bias in the query/key/value projections, LayerNorm eps 1e-6),
    then each branch's class token crosses to the next branch through
    `LayerNorm → GELU → Linear`, attends there (`CrossAttentionBlock`, whose LayerNorm
    covers the other branch's patch tokens too) and comes back through another
    `LayerNorm → GELU → Linear`, which replaces the class token (no residual). The logits
    are the mean of the branches' heads on their final-LayerNormed class tokens (or mean
    patch tokens with `pool="mean"`).

    How it differs from `CrossViT`: per-branch image sizes, no LayerNorms around the
    patch projection, no final norm inside the encoders, `GELU` in the projections
    between branches, a LayerNorm over the other branch's tokens in cross attention, a
    non-residual return of the class token, any number of branches, logits averaged
    instead of summed. Load timm's weights with `eqx_vision.from_timm`. As timm's, the
    model takes images of `image_size` only.
    """

    embeddings: tuple[BranchEmbedding, ...]
    emb_dropout: eqx.nn.Dropout
    blocks: Stack[TimmMultiScaleBlock] | tuple[TimmMultiScaleBlock, ...]
    norms: tuple[LayerNorm, ...]
    head_dropout: eqx.nn.Dropout
    mlp_heads: tuple[Linear, ...] | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)
    image_scales: tuple[float, ...] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair,
        num_classes: NonNegative,
        dims: Sequence[Positive],
        patch_sizes: Sequence[Positive],
        depth: Sequence[Sequence[NonNegative]],
        heads: Sequence[Positive],
        mlp_ratios: Sequence[float],
        image_scales: Sequence[float] | None = None,
        multi_conv: bool = False,
        crop_scale: bool = False,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        pool: Literal["cls", "mean"] = "cls",
        dropout: Rate = 0.0,
        attn_dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        head_dropout: Rate = 0.0,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: the input's height and width, an int or a pair.
        - `num_classes`: number of logits; 0 for none (the model then returns the
          concatenated pooled tokens of the branches).
        - `dims`, `patch_sizes`, `heads`, `mlp_ratios`: one per branch (timm's `embed_dim`,
          `patch_size`, `num_heads`, `mlp_ratio`).
        - `depth`: one entry per multi-scale block: the encoder depth (>= 1) of each branch,
          then the number of cross-attention blocks (0: one block, as timm's models).
        - `image_scales`: per branch, the factor from `image_size` to the branch's image
          size, `int(side * scale)` (default 1.0 for every branch).
        - `multi_conv`: the three-convolution patch embedding (patch sizes 12 and 16).
        - `crop_scale`: reach a smaller branch size by a centre crop, not a resize.
        - `qkv_bias`: a bias in the query/key/value projections.
        - `norm_eps`: the epsilon of every LayerNorm.
        - `pool`: `"cls"`, the class tokens, or `"mean"`, the mean of the patch tokens.
        - `dropout`: dropout rate after the attention outputs and in the MLPs.
        - `attn_dropout`: dropout rate on the attention probabilities.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `head_dropout`: dropout rate on the pooled tokens before the heads.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        dims, patch_sizes, heads = tuple(dims), tuple(patch_sizes), tuple(heads)
        n = len(dims)
        scales = (1.0,) * n if image_scales is None else tuple(image_scales)
        _check_branches(dims, patch_sizes, heads, tuple(mlp_ratios), scales, depth)
        configs = [tuple(int(d) for d in c) for c in depth]
        size = cast(tuple[int, int], image_size)
        emb_key, block_key, head_key = jr.split(key, 3)
        self.embeddings = tuple(
            BranchEmbedding(
                channels=channels,
                size=(int(size[0] * s), int(size[1] * s)),
                patch_size=p,
                dim=d,
                multi_conv=multi_conv,
                crop=crop_scale,
                key=k,
            )
            for s, p, d, k in zip(scales, patch_sizes, dims, jr.split(emb_key, n), strict=True)
        )
        options = dict(qkv_bias=qkv_bias, norm_eps=norm_eps, dropout=dropout)

        def make_block(index: int, *, key: PRNGKeyArray) -> TimmMultiScaleBlock:
            return TimmMultiScaleBlock(
                dims,
                configs[index],
                heads,
                tuple(mlp_ratios),
                attn_dropout=attn_dropout,
                key=key,
                **options,  # pyright: ignore[reportArgumentType]
            )

        if len(set(configs)) == 1:
            self.blocks = Stack(make_block, len(configs), key=block_key)
        else:  # blocks of different shapes run one after the other
            keys = jr.split(block_key, len(configs))
            self.blocks = tuple(make_block(i, key=keys[i]) for i in range(len(configs)))
        self.norms = tuple(LayerNorm(d, eps=norm_eps) for d in dims)
        self.emb_dropout = eqx.nn.Dropout(emb_dropout)
        self.head_dropout = eqx.nn.Dropout(head_dropout)
        self.mlp_heads = (
            tuple(
                Linear(d, num_classes, key=k)
                for d, k in zip(dims, jr.split(head_key, n), strict=True)
            )
            if num_classes
            else None
        )
        self.image_size = size
        self.channels = channels
        self.pool = pool
        self.image_scales = scales

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the patch tokens of each branch after
        each multi-scale block, as `(dim, grid_h, grid_w)` maps, ordered by branch, then
        block (timm's order): index `b * len(depth) + i` is branch `b` after block `i`.
        A branch's reduction is its patch size over its image scale, rounded (as timm's
        `round(patch_size / img_scale)`; exact when the scale is 1)."""
        depth = len(self.blocks)
        info = []
        for b, embedding in enumerate(self.embeddings):
            dim = embedding.pos_embedding.shape[1]
            reduction = cast(
                tuple[int, int],
                tuple(
                    round(embedding.patch_size * side / branch)
                    for side, branch in zip(self.image_size, embedding.size, strict=True)
                ),
            )
            for i in range(depth):
                info.append(FeatureInfo(b * depth + i, f"blocks[{i}][{b}]", dim, reduction))
        return tuple(info)

    def embed(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "_ _"], ...]:
        """The tokens the multi-scale blocks take, one `(seq, dim)` array per branch: the
        branch's image, its patch embeddings with its class token and position embeddings,
        after the embedding dropout (with `key`)."""
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        keys = split_key(key, len(self.embeddings))
        return tuple(
            self.emb_dropout(embed(x), key=k)
            for embed, k in zip(self.embeddings, keys, strict=True)
        )

    def _encode(
        self, tokens: tuple[Float[Array, "_ _"], ...], key: PRNGKeyArray | None
    ) -> tuple[tuple[Float[Array, "_ _"], ...], list[tuple[Float[Array, "_ _ _"], ...]]]:
        """The tokens after the last block, and those after each block (a list with one
        tuple of stacked `(depth, seq, dim)` outputs for a stack of blocks, or one tuple
        per block)."""
        if isinstance(self.blocks, Stack):
            tokens, stacked = self.blocks(tokens, key=key, intermediates=True)
            return tokens, [stacked]
        outputs = []
        for block, k in zip(self.blocks, split_key(key, len(self.blocks)), strict=True):
            tokens = block(tokens, key=k)
            outputs.append(tuple(t[None] for t in tokens))
        return tokens, outputs

    def _final(self, tokens: tuple[Float[Array, "_ _"], ...]) -> tuple[Float[Array, "_ _"], ...]:
        return tuple(norm(t) for norm, t in zip(self.norms, tokens, strict=True))

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "_ _"], ...]:
        """**Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the tokens of every branch after the multi-scale blocks and the
        branch's final LayerNorm, a tuple (for two branches `(small, large)`), each
        `(1 + grid_h * grid_w, dim)`, class token first.
        """
        embed_key, block_key = split_key(key, 2)
        tokens = self.embed(x, embed_key)
        if isinstance(self.blocks, Stack):
            tokens = self.blocks(tokens, key=block_key)
        else:
            for block, k in zip(self.blocks, split_key(block_key, len(self.blocks)), strict=True):
                tokens = block(tokens, key=k)
        return self._final(tokens)

    def forward_head(
        self,
        features: tuple[Float[Array, "_ _"], ...],
        *,
        pre_logits: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " num_classes"] | Float[Array, " sum_dims"]:
        """**Arguments:**

        - `features`: the tokens of every branch from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.
        - `key`: a `jax.random.key`, needed only for the head dropout in training mode.

        **Returns:** the logits, the mean of the branches' heads; or, with `pre_logits` or
        without heads, the branches' pooled tokens (class tokens, or mean patch tokens with
        `pool="mean"`) concatenated, `(sum(dims),)`.
        """
        keys = split_key(key, len(features))
        pooled = [
            self.head_dropout(_pool(t, self.pool), key=k)
            for t, k in zip(features, keys, strict=True)
        ]
        if pre_logits or self.mlp_heads is None:
            return jnp.concatenate(pooled)
        logits = [head(p) for head, p in zip(self.mlp_heads, pooled, strict=True)]
        return jnp.mean(jnp.stack(logits), axis=0)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        prefix_tokens: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the patch tokens of each branch after chosen multi-scale
        blocks, as timm's `forward_intermediates`.

        **Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `indices`: which outputs (see `feature_info`: the first branch after each block,
          then the next branch): `None` for all, an int `n` for the last `n`, or a
          sequence of indices (negative from the end).
        - `norm`: apply the branch's final norm to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps of the patch tokens,
          `"tokens"` for the patch tokens `(grid_h * grid_w, dim)`.
        - `prefix_tokens`: return each output as `(patch output, class token)`, the class
          token `(1, dim)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. A stack of
        blocks runs in its scan, all of them.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        depth = len(self.blocks)
        chosen = feature_indices(indices, len(self.embeddings) * depth, name)
        embed_key, block_key = split_key(key, 2)
        tokens, parts = self._encode(self.embed(x, embed_key), block_key)
        stacked = [jnp.concatenate(ys, axis=0) for ys in zip(*parts, strict=True)]
        outputs = []
        for index in chosen:
            branch, block = divmod(index, depth)
            y = stacked[branch][block]
            if norm:
                y = self.norms[branch](y)
            cls, y = y[:1], y[1:]
            if output_fmt == "map":
                y = tokens_to_grid(y, self.embeddings[branch].grid[0])
            outputs.append((y, cls) if prefix_tokens else y)
        return outputs if intermediates_only else (self._final(tokens), outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "TimmCrossViT":
        """This model for `(height, width)` images: each branch sees `int(side * scale)`
        images of its own (its `image_scales` entry, as timm computes a branch's size), and
        its position embeddings of the patches are resampled to that grid (see
        [`set_image_size`][eqx_vision.set_image_size]). A size whose branch sizes are not a
        multiple of their patch sizes is a ValueError."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        embeddings = []
        for embedding, scale in zip(self.embeddings, self.image_scales, strict=True):
            size = (int(hw[0] * scale), int(hw[1] * scale))
            multi_conv = isinstance(embedding.patch_embedding, MultiConvEmbedding)
            try:
                grid = branch_grid(size, embedding.patch_size, multi_conv)
            except ValueError as e:
                raise ValueError(f"TimmCrossViT.set_image_size to {hw}: {e}") from None
            pos = resample_pos_embed(embedding.pos_embedding, grid, embedding.grid, num_prefix=1)
            embeddings.append(replace(embedding, pos_embedding=pos, size=size))
        return replace(self, embeddings=tuple(embeddings), image_size=hw)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "TimmCrossViT":
        """This model with a new head of `num_classes` outputs on every branch, or none
        for `0` (see [`reset_head`][eqx_vision.reset_head])."""
        heads = None
        if num_classes > 0:
            assert key is not None
            dims = [e.pos_embedding.shape[1] for e in self.embeddings]
            keys = jr.split(key, len(dims))
            heads = tuple(Linear(d, num_classes, key=k) for d, k in zip(dims, keys, strict=True))
        return replace(self, mlp_heads=heads)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " sum_dims"]:
        """**Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, the mean of the branches' heads (with
        `num_classes=0`, the branches' pooled tokens concatenated, `(sum(dims),)`):
        `forward_head(forward_features(x, key=key), key=key)` with the key split between
        the two.
        """
        features_key, head_key = split_key(key, 2)
        return self.forward_head(self.forward_features(x, key=features_key), key=head_key)


def _pool(tokens: Float[Array, "seq dim"], pool: str) -> Float[Array, " dim"]:
    """The class token, or the mean of the patch tokens (the class token left out)."""
    return tokens[0] if pool == "cls" else tokens[1:].mean(axis=0)


def _check_branches(
    dims: tuple[int, ...],
    patch_sizes: tuple[int, ...],
    heads: tuple[int, ...],
    mlp_ratios: tuple[float, ...],
    scales: tuple[float, ...],
    depth: Sequence[Sequence[int]],
) -> None:
    """Raise a ValueError unless the per-branch arguments describe the same branches."""
    n = len(dims)
    lengths = dict(
        patch_sizes=len(patch_sizes),
        heads=len(heads),
        mlp_ratios=len(mlp_ratios),
        image_scales=len(scales),
    )
    wrong = {k: v for k, v in lengths.items() if v != n}
    if n == 0 or wrong:
        raise ValueError(
            f"dims, patch_sizes, heads, mlp_ratios and image_scales need one entry per "
            f"branch; got {n} dims and {wrong}."
        )
    for d, h in zip(dims, heads, strict=True):
        if d % h:
            raise ValueError(f"each branch's dim must be divisible by its heads; got {d} and {h}.")
    if any(r <= 0 for r in mlp_ratios) or any(s <= 0 for s in scales):
        raise ValueError(
            f"mlp_ratios and image_scales must be positive; got {mlp_ratios} and {scales}."
        )
    if not depth:
        raise ValueError("depth needs at least one multi-scale block.")
    for config in depth:
        if len(config) != n + 1 or min(config[:n]) < 1:
            raise ValueError(
                f"each entry of depth holds the encoder depth (>= 1) of each of the {n} "
                f"branches, then the number of cross-attention blocks; got {tuple(config)}."
            )
