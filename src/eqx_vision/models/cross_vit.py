"""CrossViT: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification".

Chen, Fan and Panda, 2021, https://arxiv.org/abs/2103.14899.

Two ViT branches see the image at two patch sizes; after each round of self-attention in
both branches, the class token of each branch attends to the patch tokens of the other.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Attention,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Stack,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    split_key,
    with_class_tokens,
)
from ..layers._checks import Positive, Rate, checked_arguments
from ..layers._init import normal


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
        image_size: int,
        patch_size: int,
        dropout: float,
        channels: int,
        key: PRNGKeyArray,
    ):
        embed_key, cls_key, pos_key = jr.split(key, 3)
        grid = image_size // patch_size
        self.to_patch_embedding = PatchEmbedding(
            channels, (patch_size, patch_size), dim, key=embed_key
        )
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid * grid + 1, dim))
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
    sm_mlp_head: Linear
    lg_head_norm: LayerNorm
    lg_mlp_head: Linear
    image_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        num_classes: Positive,
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
        - `num_classes`: number of output logits.
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
            image_size=image_size,
            patch_size=sm_patch_size,
            dropout=emb_dropout,
            channels=channels,
            key=sm_key,
        )
        self.lg_image_embedder = ImageEmbedder(
            dim=lg_dim,
            image_size=image_size,
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
        self.sm_mlp_head = Linear(sm_dim, num_classes, key=sm_head_key)
        self.lg_head_norm = LayerNorm(lg_dim)
        self.lg_mlp_head = Linear(lg_dim, num_classes, key=lg_head_key)
        self.image_size = image_size
        self.channels = channels

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode (the
          default dropout rates are 0.1, so a freshly built model needs one; use
          `eqx.nn.inference_mode(model)` for evaluation).

        **Returns:** the logits `(num_classes,)`, the sum of the two branches' heads.
        """
        check_image(x, (self.channels, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        sm_key, lg_key, enc_key = split_key(key, 3)
        sm_tokens = self.sm_image_embedder(x, key=sm_key)
        lg_tokens = self.lg_image_embedder(x, key=lg_key)
        sm_tokens, lg_tokens = self.multi_scale_encoder((sm_tokens, lg_tokens), key=enc_key)
        sm_logits = self.sm_mlp_head(self.sm_head_norm(sm_tokens[0]))
        lg_logits = self.lg_mlp_head(self.lg_head_norm(lg_tokens[0]))
        return sm_logits + lg_logits
