"""vit-pytorch converter of CvT (with its BatchNorm statistics)."""

import equinox as eqx

from ...layers import Conv2d, ConvProjection, MapAttention
from ...models.cvt import CvT, CvTBlock
from .._state_dict import (
    StateDict,
    convert_channel_layernorm,
    convert_conv,
    convert_conv_bn,
    convert_linear,
    convert_map_feedforward,
    convert_stack_with_state,
)


def _convert_projection(
    m: ConvProjection, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[ConvProjection, eqx.nn.State]:
    depthwise, state = convert_conv_bn(m.depthwise, sd, prefix + "0.", prefix + "1.", state)
    pointwise = convert_conv(m.pointwise, sd, prefix + "2.")
    return eqx.tree_at(lambda p: (p.depthwise, p.pointwise), m, (depthwise, pointwise)), state


def _convert_attention(
    m: MapAttention, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[MapAttention, eqx.nn.State]:
    """CvT's `Attention`: `norm` (`g`, `b`), `to_q.net` and `to_kv.net` (depthwise conv,
    BatchNorm, 1x1 conv) and the 1x1 output conv `to_out.0`."""
    assert isinstance(m.to_q, ConvProjection) and isinstance(m.to_kv, ConvProjection)
    assert isinstance(m.to_out, Conv2d) and m.norm is not None
    to_q, state = _convert_projection(m.to_q, sd, prefix + "to_q.net.", state)
    to_kv, state = _convert_projection(m.to_kv, sd, prefix + "to_kv.net.", state)
    m = eqx.tree_at(
        lambda a: (a.norm, a.to_q, a.to_kv, a.to_out),
        m,
        (
            convert_channel_layernorm(m.norm, sd, prefix + "norm."),
            to_q,
            to_kv,
            convert_conv(m.to_out, sd, prefix + "to_out.0."),
        ),
    )
    return m, state


def _convert_block(
    m: CvTBlock, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[CvTBlock, eqx.nn.State]:
    attn, state = _convert_attention(m.attn, sd, prefix + "0.", state)
    ff = convert_map_feedforward(m.ff, sd, prefix + "1.")
    return eqx.tree_at(lambda b: (b.attn, b.ff), m, (attn, ff)), state


def convert_cvt(model: CvT, sd: StateDict, state: eqx.nn.State) -> tuple[CvT, eqx.nn.State]:
    """The weights of a `vit_pytorch.cvt.CvT` state dict, and its BatchNorm statistics into
    `state`."""
    stages = []
    for i, stage in enumerate(model.stages):
        prefix = f"layers.{i}."
        blocks, state = convert_stack_with_state(
            stage.blocks, sd, lambda j, p=prefix: f"{p}2.layers.{j}.", _convert_block, state
        )
        stages.append(
            eqx.tree_at(
                lambda s: (s.embed, s.norm, s.blocks),
                stage,
                (
                    convert_conv(stage.embed, sd, prefix + "0."),
                    convert_channel_layernorm(stage.norm, sd, prefix + "1."),
                    blocks,
                ),
            )
        )
    model = eqx.tree_at(
        lambda m: (m.stages, m.head),
        model,
        (
            tuple(stages),
            None if model.head is None else convert_linear(model.head, sd, "to_logits.2."),
        ),
        is_leaf=lambda n: n is None,
    )
    return model, state
