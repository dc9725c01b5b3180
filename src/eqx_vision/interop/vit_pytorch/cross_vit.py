"""vit-pytorch converter of CrossViT."""

import equinox as eqx

from ...models.cross_vit import CrossAttention, CrossLayer, CrossViT, ImageEmbedder, MultiScaleBlock
from .._state_dict import (
    StateDict,
    convert_attention,
    convert_layernorm,
    convert_linear,
    convert_patch_embedding,
    convert_stack,
    convert_transformer,
)


# vit-pytorch converters.


def _convert_embedder(m: ImageEmbedder, sd: StateDict, prefix: str) -> ImageEmbedder:
    seq, dim = m.pos_embedding.shape
    return eqx.tree_at(
        lambda e: (e.to_patch_embedding, e.cls_token, e.pos_embedding),
        m,
        (
            convert_patch_embedding(m.to_patch_embedding, sd, prefix + "to_patch_embedding."),
            sd.take(prefix + "cls_token", m.cls_token, torch_shape=(1, 1, dim)),
            sd.take(prefix + "pos_embedding", m.pos_embedding, torch_shape=(1, seq, dim)),
        ),
    )


def _convert_cross_attention(m: CrossAttention, sd: StateDict, prefix: str) -> CrossAttention:
    """vit-pytorch's `ProjectInOut(Attention)`: `project_in`, `fn`, `project_out`."""
    m = eqx.tree_at(lambda c: c.attn, m, convert_attention(m.attn, sd, prefix + "fn."))
    if m.project_in is not None and m.project_out is not None:
        m = eqx.tree_at(
            lambda c: (c.project_in, c.project_out),
            m,
            (
                convert_linear(m.project_in, sd, prefix + "project_in."),
                convert_linear(m.project_out, sd, prefix + "project_out."),
            ),
        )
    return m


def _convert_cross_layer(m: CrossLayer, sd: StateDict, prefix: str) -> CrossLayer:
    return eqx.tree_at(
        lambda c: (c.sm_attend_lg, c.lg_attend_sm),
        m,
        (
            _convert_cross_attention(m.sm_attend_lg, sd, prefix + "0."),
            _convert_cross_attention(m.lg_attend_sm, sd, prefix + "1."),
        ),
    )


def _convert_block(m: MultiScaleBlock, sd: StateDict, prefix: str) -> MultiScaleBlock:
    layers = convert_stack(
        m.cross_attend.layers, sd, lambda i: f"{prefix}2.layers.{i}.", _convert_cross_layer
    )
    return eqx.tree_at(
        lambda b: (b.sm_enc, b.lg_enc, b.cross_attend.layers),
        m,
        (
            convert_transformer(m.sm_enc, sd, prefix + "0."),
            convert_transformer(m.lg_enc, sd, prefix + "1."),
            layers,
        ),
    )


def convert_cross_vit(model: CrossViT, sd: StateDict) -> CrossViT:
    """The weights of a `vit_pytorch.cross_vit.CrossViT` state dict (a model without heads
    takes the head norms only, so the state dict's classifiers are left over)."""
    sm_head, lg_head = model.sm_mlp_head, model.lg_mlp_head
    return eqx.tree_at(
        lambda m: (
            m.sm_image_embedder,
            m.lg_image_embedder,
            m.multi_scale_encoder,
            m.sm_head_norm,
            m.sm_mlp_head,
            m.lg_head_norm,
            m.lg_mlp_head,
        ),
        model,
        (
            _convert_embedder(model.sm_image_embedder, sd, "sm_image_embedder."),
            _convert_embedder(model.lg_image_embedder, sd, "lg_image_embedder."),
            convert_stack(
                model.multi_scale_encoder,
                sd,
                lambda i: f"multi_scale_encoder.layers.{i}.",
                _convert_block,
            ),
            convert_layernorm(model.sm_head_norm, sd, "sm_mlp_head.0."),
            None if sm_head is None else convert_linear(sm_head, sd, "sm_mlp_head.1."),
            convert_layernorm(model.lg_head_norm, sd, "lg_mlp_head.0."),
            None if lg_head is None else convert_linear(lg_head, sd, "lg_mlp_head.1."),
        ),
        is_leaf=lambda n: n is None,
    )
