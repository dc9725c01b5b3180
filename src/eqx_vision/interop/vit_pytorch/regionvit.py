"""vit-pytorch converter of RegionViT."""

import equinox as eqx

from ...layers import FeedForward
from ...models.regionvit import ConvTokenizer, R2LBlock, R2LStage, RegionViT
from .._state_dict import (
    StateDict,
    convert_attention,
    convert_channel_layernorm,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_stack,
    required,
)


def _convert_feedforward(m: FeedForward, sd: StateDict, prefix: str) -> FeedForward:
    """The reference's feed-forward: a bare `nn.Sequential` (norm 0, Linears 1 and 4)."""
    assert m.norm is not None
    return eqx.tree_at(
        lambda f: (f.norm, f.fc1, f.fc2),
        m,
        (
            convert_layernorm(m.norm, sd, prefix + "0."),
            convert_linear(m.fc1, sd, prefix + "1."),
            convert_linear(m.fc2, sd, prefix + "4."),
        ),
    )


def _convert_block(m: R2LBlock, sd: StateDict, prefix: str) -> R2LBlock:
    return eqx.tree_at(
        lambda b: (b.attn, b.ff),
        m,
        (
            convert_attention(m.attn, sd, prefix + "0."),
            _convert_feedforward(m.ff, sd, prefix + "1."),
        ),
    )


def _convert_stage(m: R2LStage, sd: StateDict, prefix: str) -> R2LStage:
    if m.downsample is not None:
        down = convert_conv(m.downsample, sd, prefix + "0.conv.")
        m = eqx.tree_at(lambda s: s.downsample, m, down)
    if m.peg is not None:
        peg = eqx.tree_at(lambda g: g.proj, m.peg, convert_conv(m.peg.proj, sd, prefix + "1.proj."))
        m = eqx.tree_at(lambda s: s.peg, m, peg)
    return eqx.tree_at(
        lambda s: (s.rel_pos_bias, s.layers),
        m,
        (
            sd.take(prefix + "2.local_rel_pos_bias.weight", m.rel_pos_bias),
            convert_stack(m.layers, sd, lambda i: f"{prefix}2.layers.{i}.", _convert_block),
        ),
    )


def _convert_tokenizer(m: ConvTokenizer, sd: StateDict, prefix: str) -> ConvTokenizer:
    return eqx.tree_at(
        lambda t: (t.conv1, t.norm1, t.conv2, t.norm2, t.conv3),
        m,
        (
            convert_conv(m.conv1, sd, prefix + "0."),
            convert_channel_layernorm(m.norm1, sd, prefix + "1."),
            convert_conv(m.conv2, sd, prefix + "3."),
            convert_channel_layernorm(m.norm2, sd, prefix + "4."),
            convert_conv(m.conv3, sd, prefix + "6."),
        ),
    )


def convert_regionvit(model: RegionViT, sd: StateDict) -> RegionViT:
    """The weights of a `vit_pytorch.regionvit.RegionViT` state dict."""
    if isinstance(model.local_encoder, ConvTokenizer):
        local = _convert_tokenizer(model.local_encoder, sd, "local_encoder.")
    else:
        local = convert_conv(model.local_encoder, sd, "local_encoder.")
    return eqx.tree_at(
        lambda m: (m.local_encoder, m.region_encoder, m.stages, m.head_norm, m.mlp_head),
        model,
        (
            local,
            convert_conv(model.region_encoder, sd, "region_encoder.1."),
            tuple(_convert_stage(s, sd, f"layers.{i}.") for i, s in enumerate(model.stages)),
            convert_layernorm(model.head_norm, sd, "to_logits.1."),
            convert_linear(required(model.mlp_head, "the classifier"), sd, "to_logits.2."),
        ),
    )
