"""vit-pytorch converter of PiT."""

import equinox as eqx

from ...models.pit import PiT, PiTPool
from .._state_dict import (
    StateDict,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_transformer,
    required,
)


def _convert_pool(m: PiTPool, sd: StateDict, prefix: str) -> PiTPool:
    """The reference's `Pool`: `downsample.net.0` (depthwise), `downsample.net.1`
    (pointwise) and `cls_ff`."""
    return eqx.tree_at(
        lambda p: (p.depthwise, p.pointwise, p.cls_ff),
        m,
        (
            convert_conv(m.depthwise, sd, prefix + "downsample.net.0."),
            convert_conv(
                required(m.pointwise, "the pointwise pooling conv"),
                sd,
                prefix + "downsample.net.1.",
            ),
            convert_linear(m.cls_ff, sd, prefix + "cls_ff."),
        ),
    )


def convert_pit(model: PiT, sd: StateDict) -> PiT:
    """The weights of a `vit_pytorch.pit.PiT` state dict."""
    # `layers` is an nn.Sequential alternating stages (even indices) and pools (odd).
    stages = tuple(
        convert_transformer(s, sd, f"layers.{2 * i}.") for i, s in enumerate(model.stages)
    )
    pools = tuple(_convert_pool(p, sd, f"layers.{2 * i + 1}.") for i, p in enumerate(model.pools))
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.stages,
            m.pools,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            convert_linear(model.to_patch_embedding, sd, "to_patch_embedding.2."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            stages,
            pools,
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_linear(required(model.mlp_head, "the classifier"), sd, "mlp_head.1."),
        ),
    )
