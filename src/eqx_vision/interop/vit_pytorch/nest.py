"""vit-pytorch converter of NesT."""

from typing import Any

import equinox as eqx

from ...models.nest import NesT, NesTBlock
from .._state_dict import (
    StateDict,
    convert_channel_layernorm,
    convert_conv,
    convert_linear,
    convert_map_attention,
    convert_map_feedforward,
    convert_patch_embedding,
    convert_stack,
)


def convert_nest(model: NesT, sd: StateDict) -> NesT:
    """The weights of a `vit_pytorch.nest.NesT` state dict."""
    first = model.levels[0]
    blocks = first.blocks
    if (
        model.to_patch_embedding.pre_norm is None
        or first.pos_embedding.ndim != 1
        or first.pool_padding != "symmetric"
        or (blocks is not None and blocks.blocks.attn.to_qkv is not None
            and blocks.blocks.attn.to_qkv.bias is not None)
    ):  # fmt: skip
        raise TypeError(
            "this NesT has timm's options (patch_embedding, pos_embedding, qkv_bias or "
            "pool_padding), which vit-pytorch's NesT lacks; load timm weights with "
            "eqx_vision.from_timm."
        )

    def block(m: NesTBlock, sd: StateDict, prefix: str) -> NesTBlock:
        return eqx.tree_at(
            lambda b: (b.attn, b.ff),
            m,
            (
                convert_map_attention(m.attn, sd, prefix + "0."),
                convert_map_feedforward(m.ff, sd, prefix + "1."),
            ),
        )

    levels = []
    for i, level in enumerate(model.levels):
        prefix = f"layers.{i}."
        subs: dict[str, Any] = {"pos_embedding": sd.take(prefix + "0.pos_emb", level.pos_embedding)}
        if level.blocks is not None:
            subs["blocks"] = convert_stack(
                level.blocks, sd, lambda j, p=prefix: f"{p}0.layers.{j}.", block
            )
        if level.conv is not None and level.norm is not None:
            subs["conv"] = convert_conv(level.conv, sd, prefix + "1.0.")
            subs["norm"] = convert_channel_layernorm(level.norm, sd, prefix + "1.1.")
        levels.append(
            eqx.tree_at(
                lambda m, names=tuple(subs): [getattr(m, n) for n in names],
                level,
                list(subs.values()),
            )
        )
    head = None if model.mlp_head is None else convert_linear(model.mlp_head, sd, "mlp_head.2.")
    return eqx.tree_at(
        lambda m: (m.to_patch_embedding, m.levels, m.norm, m.mlp_head),
        model,
        (
            convert_patch_embedding(
                model.to_patch_embedding, sd, "to_patch_embedding.", feature_map=True
            ),
            levels,
            convert_channel_layernorm(model.norm, sd, "mlp_head.0."),
            head,
        ),
        is_leaf=lambda x: x is None,
    )
