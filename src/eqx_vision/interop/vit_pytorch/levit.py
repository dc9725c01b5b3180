"""vit-pytorch converter of LeViT (with its BatchNorm statistics)."""

import equinox as eqx
import numpy as np

from ...layers import ConvBN, MapAttention, attention_bias_indices
from ...models.levit import LeViT, LeViTBlock
from .._state_dict import (
    CheckpointError,
    StateDict,
    convert_conv,
    convert_conv_bn,
    convert_feedforward,
    convert_linear,
    convert_stack_with_state,
)


def _convert_attention(
    m: MapAttention, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[MapAttention, eqx.nn.State]:
    """LeViT's `Attention`: `to_q`, `to_k`, `to_v` (1x1 conv, BatchNorm), `to_out` (GELU,
    1x1 conv, BatchNorm), the bias table `pos_bias` and its index buffer `pos_indices`,
    which is checked against the indices computed here."""
    projections = []
    for name in ("to_q", "to_k", "to_v"):
        layer = getattr(m, name)
        assert isinstance(layer, ConvBN)
        conv_bn, state = convert_conv_bn(
            layer, sd, f"{prefix}{name}.0.", f"{prefix}{name}.1.", state
        )
        projections.append(conv_bn)
    assert isinstance(m.to_out, ConvBN)
    assert m.pos_bias is not None and m.bias_map_size is not None
    to_out, state = convert_conv_bn(m.to_out, sd, prefix + "to_out.1.", prefix + "to_out.2.", state)
    size = m.bias_map_size
    expected = attention_bias_indices(size, m.q_stride)
    stored = sd.raw(prefix + "pos_indices")
    if stored.shape != expected.shape:
        raise CheckpointError(
            f"shape mismatch for {prefix + 'pos_indices'!r}: the model expects "
            f"{expected.shape}, the state dict has {stored.shape}."
        )
    if not np.array_equal(stored, expected):
        raise CheckpointError(
            f"{prefix + 'pos_indices'!r} differs from the attention-bias indices of a "
            f"{size}x{size} map."
        )
    pos_bias = sd.take(prefix + "pos_bias.weight", m.pos_bias)
    m = eqx.tree_at(
        lambda a: (a.to_q, a.to_k, a.to_v, a.to_out, a.pos_bias),
        m,
        (*projections, to_out, pos_bias),
    )
    return m, state


def _convert_block(
    m: LeViTBlock, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[LeViTBlock, eqx.nn.State]:
    attn, state = _convert_attention(m.attn, sd, prefix + "0.", state)
    ff = convert_feedforward(m.ff, sd, prefix + "1.", indices=(0, 0, 3), feature_map=True)
    return eqx.tree_at(lambda b: (b.attn, b.ff), m, (attn, ff)), state


def convert_levit(model: LeViT, sd: StateDict, state: eqx.nn.State) -> tuple[LeViT, eqx.nn.State]:
    """The weights of a `vit_pytorch.levit.LeViT` state dict, and its BatchNorm statistics into
    `state`."""
    convs = tuple(
        convert_conv(conv, sd, f"conv_embedding.{i}.")
        for i, conv in enumerate(model.conv_embedding)
    )
    # The reference's backbone alternates stages and downsampling blocks.
    stages, downsamples = [], []
    for i, stage in enumerate(model.stages):
        stage, state = convert_stack_with_state(
            stage, sd, lambda j, p=f"backbone.{2 * i}.": f"{p}layers.{j}.", _convert_block, state
        )
        stages.append(stage)
    for i, block in enumerate(model.downsamples):
        block, state = _convert_block(block, sd, f"backbone.{2 * i + 1}.layers.0.", state)
        downsamples.append(block)
    distill = (
        None
        if model.distill_head is None
        else convert_linear(model.distill_head, sd, "distill_head.")
    )
    model = eqx.tree_at(
        lambda m: (m.conv_embedding, m.stages, m.downsamples, m.mlp_head, m.distill_head),
        model,
        (
            convs,
            tuple(stages),
            tuple(downsamples),
            None if model.mlp_head is None else convert_linear(model.mlp_head, sd, "mlp_head."),
            distill,
        ),
        is_leaf=lambda x: x is None,
    )
    return model, state
