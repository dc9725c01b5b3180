"""vit-pytorch converter of CrossFormer."""

import equinox as eqx

from ...models.crossformer import CrossFormer, CrossFormerBlock, DistanceAttention
from .._state_dict import (
    StateDict,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_map_attention,
    convert_map_feedforward,
    convert_stack,
    required,
)


def convert_crossformer(model: CrossFormer, sd: StateDict) -> CrossFormer:
    """The weights of a `vit_pytorch.crossformer.CrossFormer` state dict."""

    def attention(m: DistanceAttention, sd: StateDict, prefix: str) -> DistanceAttention:
        dpb = m.dpb
        linears = [
            convert_linear(lin, sd, f"{prefix}dpb.{3 * j}.") for j, lin in enumerate(dpb.linears)
        ]
        norms = [
            convert_layernorm(n, sd, f"{prefix}dpb.{3 * j + 1}.") for j, n in enumerate(dpb.norms)
        ]
        return eqx.tree_at(
            lambda a: (a.attn, a.dpb.linears, a.dpb.norms),
            m,
            (
                convert_map_attention(m.attn, sd, prefix, out="to_out."),
                tuple(linears),
                tuple(norms),
            ),
        )

    def block(m: CrossFormerBlock, sd: StateDict, prefix: str) -> CrossFormerBlock:
        return eqx.tree_at(
            lambda b: (b.short_attn, b.short_ff, b.long_attn, b.long_ff),
            m,
            (
                attention(m.short_attn, sd, prefix + "0."),
                convert_map_feedforward(m.short_ff, sd, prefix + "1.", net=""),
                attention(m.long_attn, sd, prefix + "2."),
                convert_map_feedforward(m.long_ff, sd, prefix + "3.", net=""),
            ),
        )

    embeds, stages = [], []
    for i, (embed, stage) in enumerate(zip(model.embeds, model.stages, strict=True)):
        convs = tuple(
            convert_conv(conv, sd, f"layers.{i}.0.convs.{j}.") for j, conv in enumerate(embed.convs)
        )
        embeds.append(eqx.tree_at(lambda e: e.convs, embed, convs))
        if stage is not None:
            stage = convert_stack(stage, sd, lambda j, i=i: f"layers.{i}.1.layers.{j}.", block)
        stages.append(stage)
    return eqx.tree_at(
        lambda m: (m.embeds, m.stages, m.to_logits),
        model,
        (
            tuple(embeds),
            tuple(stages),
            convert_linear(required(model.to_logits, "the classifier"), sd, "to_logits.1."),
        ),
        is_leaf=lambda x: x is None,
    )
