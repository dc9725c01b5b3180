"""vit-pytorch converter of CaiT."""

import equinox as eqx

from ...layers import Attention, FeedForward, Transformer, TransformerBlock
from ...models.cait import CaiT
from .._state_dict import (
    StateDict,
    convert_attention,
    convert_feedforward,
    convert_layernorm,
    convert_linear,
    convert_patch_embedding,
    convert_stack,
    required,
)


def _convert_block(m: TransformerBlock, sd: StateDict, prefix: str) -> TransformerBlock:
    """A CaiT block: `{prefix}0.fn` (attention) and `{prefix}1.fn` (feed-forward), each with
    its LayerScale vector `.scale` of shape `(1, 1, dim)`."""
    attn, ff = m.attn, m.ff
    assert isinstance(attn, Attention) and isinstance(ff, FeedForward)
    assert m.attn_scale is not None and m.ff_scale is not None
    dim = m.attn_scale.shape[0]
    return eqx.tree_at(
        lambda b: (b.attn, b.attn_scale, b.ff, b.ff_scale),
        m,
        (
            convert_attention(attn, sd, prefix + "0.fn."),
            sd.take(prefix + "0.scale", m.attn_scale, torch_shape=(1, 1, dim)),
            convert_feedforward(ff, sd, prefix + "1.fn."),
            sd.take(prefix + "1.scale", m.ff_scale, torch_shape=(1, 1, dim)),
        ),
    )


def _convert_encoder(m: Transformer, sd: StateDict, prefix: str) -> Transformer:
    layers = convert_stack(m.layers, sd, lambda i: f"{prefix}layers.{i}.", _convert_block)
    return eqx.tree_at(lambda t: t.layers, m, layers)


def convert_cait(model: CaiT, sd: StateDict) -> CaiT:
    """The weights of a `vit_pytorch.cait.CaiT` state dict."""
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.pos_embedding,
            m.cls_token,
            m.patch_transformer,
            m.cls_transformer,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            _convert_encoder(model.patch_transformer, sd, "patch_transformer."),
            _convert_encoder(model.cls_transformer, sd, "cls_transformer."),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_linear(required(model.mlp_head, "the classifier"), sd, "mlp_head.1."),
        ),
    )
