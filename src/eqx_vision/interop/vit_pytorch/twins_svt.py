"""vit-pytorch converter of Twins-SVT."""

import equinox as eqx

from ...models.twins_svt import TwinsBlock, TwinsSVT
from .._state_dict import (
    StateDict,
    convert_conv,
    convert_linear,
    convert_map_attention,
    convert_map_feedforward,
    convert_patch_embedding,
    convert_stack,
    required,
)


def convert_twins_svt(model: TwinsSVT, sd: StateDict) -> TwinsSVT:
    """The weights of a `vit_pytorch.twins_svt.TwinsSVT` state dict."""

    def block(m: TwinsBlock, sd: StateDict, prefix: str) -> TwinsBlock:
        subs = {}
        if m.local_attn is not None and m.local_ff is not None:
            subs["local_attn"] = convert_map_attention(m.local_attn, sd, prefix + "0.fn.")
            subs["local_ff"] = convert_map_feedforward(m.local_ff, sd, prefix + "1.fn.")
        subs["global_attn"] = convert_map_attention(m.global_attn, sd, prefix + "2.fn.")
        subs["global_ff"] = convert_map_feedforward(m.global_ff, sd, prefix + "3.fn.")
        return eqx.tree_at(lambda b: [getattr(b, n) for n in subs], m, list(subs.values()))

    stages = []
    for i, stage in enumerate(model.stages):
        prefix = f"layers.{i}."
        subs = {
            "to_patch_embedding": convert_patch_embedding(
                stage.to_patch_embedding, sd, prefix + "0.proj.", feature_map=True, start=0
            ),
            "first": block(stage.first, sd, prefix + "1.layers.0."),
            "peg": eqx.tree_at(
                lambda p: p.proj, stage.peg, convert_conv(stage.peg.proj, sd, prefix + "2.proj.fn.")
            ),
        }
        if stage.blocks is not None:
            subs["blocks"] = convert_stack(
                stage.blocks, sd, lambda j, p=prefix: f"{p}3.layers.{j}.", block
            )
        stages.append(
            eqx.tree_at(
                lambda s, names=tuple(subs): [getattr(s, n) for n in names],
                stage,
                list(subs.values()),
            )
        )
    return eqx.tree_at(
        lambda m: (m.stages, m.mlp_head),
        model,
        (stages, convert_linear(required(model.mlp_head, "the classifier"), sd, "layers.6.")),
    )
