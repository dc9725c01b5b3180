"""timm's NesT (`timm.models.nest.Nest`) as an eqx_vision `NesT`.

timm's `Nest` is the architecture of `eqx_vision.NesT` with other options: a strided
convolution as patch embedding, a `(blocks, seq, dim)` position embedding per level,
biases in the qkv projections, LayerNorms of epsilon 1e-6, widths and heads per level, and
for the `_jx` names (ports of the original JAX weights) TensorFlow's `'SAME'` padding in
the max pooling of the aggregations (`pad_type='same'`; the 3x3 convolution is padded by
one pixel either way). timm runs the aggregation at the start of the next level
(`levels.{i+1}.pool`); eqx_vision at the end of level `i`: the same computation.

Attention output: timm merges the heads with the head index as the *inner* factor of the
channel axis (`(C', H)`), eqx_vision as the outer one (`(H, C')`); the columns of the
output projection are permuted accordingly.
"""

from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import PRNGKeyArray

from ...layers import LayerNorm, Linear
from ...models.nest import NesT, NesTBlock, NesTLevel
from .._state_dict import (
    StateDict,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_stack,
)
from ._common import (
    TimmArgs,
    convert_conv_patch_embedding,
    convert_mlp,
)


TIMM_CLASSES: tuple[str, ...] = ("Nest",)

_GELU = (None, "torch.nn.modules.activation.GELU")
_TIMM_LAYERNORM = "timm.layers.norm.LayerNorm"  # timm's default, epsilon 1e-6


def _per_level(args: TimmArgs, key: str, default: Any, levels: int) -> tuple[int, ...]:
    """An int or a sequence of `levels` ints (timm's `to_ntuple`)."""
    value = args.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * levels
    if isinstance(value, list | tuple) and len(value) == levels:
        return tuple(value)
    args.unsupported(key, value, f"an int or {levels} ints, one per level, are")
    raise AssertionError  # unreachable


def _norm_eps(args: TimmArgs) -> float:
    """The epsilon of timm's `norm_layer` (None: timm's LayerNorm, 1e-6)."""
    norm = args.get("norm_layer", None)
    if norm is None or norm == _TIMM_LAYERNORM:
        return 1e-6
    if norm == "torch.nn.modules.normalization.LayerNorm":
        return 1e-5
    if isinstance(norm, dict) and norm.get("partial") in (
        _TIMM_LAYERNORM,
        "torch.nn.modules.normalization.LayerNorm",
    ):
        if not norm["args"] and set(norm["kwargs"]) <= {"eps"}:
            default = 1e-6 if norm["partial"] == _TIMM_LAYERNORM else 1e-5
            return float(norm["kwargs"].get("eps", default))
    args.unsupported("norm_layer", norm, "only LayerNorm is")
    raise AssertionError  # unreachable


def _dropout(args: TimmArgs) -> float:
    """eqx_vision's one dropout rate (attention probabilities, attention output, MLP) from
    timm's `attn_drop_rate` and `proj_drop_rate`, which must then be equal. Stochastic depth
    and the head's dropout have no counterpart: `drop_rate` must be 0; `drop_path_rate`
    (timm's default 0.5, a training-time regulariser) is accepted only as that default."""
    attn = args.get("attn_drop_rate", 0.0)
    proj = args.get("proj_drop_rate", 0.0)
    if attn != proj:
        args.unsupported(
            "attn_drop_rate", attn, f"eqx_vision's NesT has one dropout rate: proj_drop_rate={proj}"
        )
    args.expect("drop_rate", (0, 0.0), 0.0)
    if "drop_path_rate" in args:
        args.expect("drop_path_rate", (0, 0.0), 0.0)
    return float(attn)


def build(args: TimmArgs, *, key: PRNGKeyArray) -> NesT:
    """The `NesT` of timm's `Nest` constructor arguments."""
    size = args.get("img_size", 224)
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            args.unsupported("img_size", size, "NesT takes square images")
        size = size[0]
    levels = args.get("num_levels", 3)
    dims = _per_level(args, "embed_dims", (128, 256, 512), levels)
    heads = _per_level(args, "num_heads", (4, 8, 16), levels)
    depths = _per_level(args, "depths", (2, 2, 20), levels)
    for d, h in zip(dims, heads, strict=True):
        if d % h:
            args.unsupported("num_heads", list(heads), f"each must divide its level's width {d}")
    ratio = args.get("mlp_ratio", 4.0)
    if float(ratio) != int(ratio) or ratio < 1:
        args.unsupported("mlp_ratio", ratio, "a whole number is (eqx_vision's mlp_mult)")
    act = args.get("act_layer", None)
    if act not in _GELU:
        args.unsupported("act_layer", act, "only GELU is")
    pad_type = args.expect("pad_type", ("", "same"), "")
    args.expect("global_pool", ("avg",), "avg")
    args.get("weight_init", "")  # initialisation only: the weights are loaded
    model = NesT(
        image_size=size,
        patch_size=args.get("patch_size", 4),
        num_classes=args.get("num_classes", 1000),
        dim=dims,
        heads=heads,
        num_hierarchies=levels,
        block_repeats=depths,
        mlp_mult=int(ratio),
        channels=args.get("in_chans", 3),
        dropout=_dropout(args),
        patch_embedding="conv",
        pos_embedding="full",
        qkv_bias=args.get("qkv_bias", True),
        norm_eps=_norm_eps(args),
        pool_padding="same" if pad_type == "same" else "symmetric",
        key=key,
    )
    args.finish()
    return model


def _convert_block(m: NesTBlock, sd: StateDict, prefix: str) -> NesTBlock:
    """timm's `TransformerLayer`: `norm1`, `attn.qkv`, `attn.proj` (columns permuted from
    timm's `(head_dim, heads)` order to `(heads, head_dim)`), `norm2`, `mlp.fc1/fc2`."""
    attn = m.attn
    assert isinstance(attn.norm, LayerNorm) and isinstance(attn.to_qkv, Linear)
    assert isinstance(attn.to_out, Linear)
    out, inner = attn.to_out.weight.shape
    heads = attn.heads

    def permute(w: np.ndarray) -> np.ndarray:
        return w.reshape(out, inner // heads, heads).transpose(0, 2, 1).reshape(out, inner)

    to_out = eqx.tree_at(
        lambda lin: lin.weight,
        attn.to_out,
        sd.take(prefix + "attn.proj.weight", attn.to_out.weight, transform=permute),
    )
    if to_out.bias is not None:
        to_out = eqx.tree_at(
            lambda lin: lin.bias, to_out, sd.take(prefix + "attn.proj.bias", to_out.bias)
        )
    attn = eqx.tree_at(
        lambda a: (a.norm, a.to_qkv, a.to_out),
        attn,
        (
            convert_layernorm(attn.norm, sd, prefix + "norm1."),
            convert_linear(attn.to_qkv, sd, prefix + "attn.qkv."),
            to_out,
        ),
    )
    ff = convert_mlp(m.ff.ff, sd, prefix + "mlp.", prefix + "norm2.")
    return eqx.tree_at(lambda b: (b.attn, b.ff.ff), m, (attn, ff))


def _convert_level(level: NesTLevel, sd: StateDict, i: int) -> NesTLevel:
    """Level `i`: its position embedding and blocks, and the aggregation that timm keeps at
    the start of level `i + 1`."""
    prefix = f"levels.{i}."
    pos = level.pos_embedding
    subs: dict[str, Any] = {
        "pos_embedding": sd.take(prefix + "pos_embed", pos, torch_shape=(1, *pos.shape))
    }
    if level.blocks is not None:
        subs["blocks"] = convert_stack(
            level.blocks, sd, lambda j: f"{prefix}transformer_encoder.{j}.", _convert_block
        )
    if level.conv is not None and level.norm is not None:
        pool = f"levels.{i + 1}.pool."
        subs["conv"] = convert_conv(level.conv, sd, pool + "conv.")
        subs["norm"] = eqx.tree_at(
            lambda n: (n.weight, n.bias),
            level.norm,
            (
                sd.take(pool + "norm.weight", level.norm.weight),
                sd.take(pool + "norm.bias", level.norm.bias),
            ),
        )
    names = tuple(subs)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], level, list(subs.values()))


def convert(model: NesT, sd: StateDict) -> NesT:
    """The weights of a timm `Nest` state dict."""
    levels = [_convert_level(level, sd, i) for i, level in enumerate(model.levels)]
    head = None if model.mlp_head is None else convert_linear(model.mlp_head, sd, "head.")
    norm = eqx.tree_at(
        lambda n: (n.weight, n.bias),
        model.norm,
        (sd.take("norm.weight", model.norm.weight), sd.take("norm.bias", model.norm.bias)),
    )
    return eqx.tree_at(
        lambda m: (m.to_patch_embedding, m.levels, m.norm, m.mlp_head),
        model,
        (
            convert_conv_patch_embedding(model.to_patch_embedding, sd, "patch_embed."),
            levels,
            norm,
            head,
        ),
        is_leaf=lambda x: x is None,
    )
