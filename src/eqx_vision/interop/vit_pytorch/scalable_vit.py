"""vit-pytorch converter of ScalableViT."""

import equinox as eqx

from ...models.scalable_vit import ScalableBlock, ScalableViT
from .._state_dict import (
    StateDict,
    convert_channel_layernorm,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_map_attention,
    convert_map_feedforward,
    convert_stack,
    required,
)


def convert_scalable_vit(model: ScalableViT, sd: StateDict) -> ScalableViT:
    """The weights of a `vit_pytorch.scalable_vit.ScalableViT` state dict."""

    def block(m: ScalableBlock, sd: StateDict, prefix: str) -> ScalableBlock:
        peg = (
            None
            if m.peg is None
            else eqx.tree_at(
                lambda p: p.proj, m.peg, convert_conv(m.peg.proj, sd, prefix + "2.proj.")
            )
        )
        return eqx.tree_at(
            lambda b: (b.ssa, b.ff1, b.peg, b.ff2, b.iwsa),
            m,
            (
                convert_map_attention(m.ssa, sd, prefix + "0."),
                convert_map_feedforward(m.ff1, sd, prefix + "1."),
                peg,
                convert_map_feedforward(m.ff2, sd, prefix + "3."),
                convert_map_attention(m.iwsa, sd, prefix + "4."),
            ),
            is_leaf=lambda x: x is None,
        )

    stages = []
    for i, stage in enumerate(model.stages):
        prefix = f"layers.{i}."
        first = None if stage.first is None else block(stage.first, sd, f"{prefix}0.layers.0.")
        rest = stage.rest
        if rest is not None:
            rest = convert_stack(rest, sd, lambda j, p=prefix: f"{p}0.layers.{j + 1}.", block)
        norm = stage.norm
        if norm is not None:
            norm = convert_channel_layernorm(norm, sd, f"{prefix}0.norm.")
        down = stage.downsample
        if down is not None:
            down = convert_conv(down, sd, f"{prefix}1.conv.")
        stages.append(
            eqx.tree_at(
                lambda s: (s.first, s.rest, s.norm, s.downsample),
                stage,
                (first, rest, norm, down),
                is_leaf=lambda x: x is None,
            )
        )
    return eqx.tree_at(
        lambda m: (m.to_patches, m.stages, m.norm, m.head),
        model,
        (
            convert_conv(model.to_patches, sd, "to_patches."),
            tuple(stages),
            convert_layernorm(model.norm, sd, "mlp_head.1."),
            convert_linear(required(model.head, "the classifier"), sd, "mlp_head.2."),
        ),
    )
