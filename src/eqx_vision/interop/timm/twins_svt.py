"""timm's `Twins` with local windows (the `twins_svt_*` names) as `eqx_vision.TwinsSVT`.

timm's model is the original Twins-SVT, `TwinsSVT` with its timm-side options: a
strided-convolution patch embedding followed by a LayerNorm; per-stage heads of
`emb_dim / heads` dimensions; biases in the query/key/value projections; global attention
through a sub-sampling convolution and a LayerNorm before 1x1 key/value projections
(`spatial_reduction`; none in the last stage, `sr_ratios[-1] = 1`); local attention in the
last stage too; the PEG after the first block, which in timm's counting is the first local
attention with its MLP; a final LayerNorm; LayerNorm epsilon 1e-6 in the blocks.

timm counts one block per attention (local and global alternate, local first), so a stage
of `depths[i]` blocks is `depths[i] / 2` of eqx_vision's blocks: the first, then
`s{i}_depth = depths[i] / 2 - 1` more. timm's `pcpvt` names (`wss=None`: global attention
only) are a different layout and are not supported.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ...layers import (
    LayerNorm,
    Linear,
    MapAttention,
    MapFeedForward,
    PatchEmbedding,
    stack_modules,
)
from ...models.twins_svt import TwinsBlock, TwinsStage, TwinsSVT
from .._state_dict import (
    CheckpointError,
    StateDict,
    convert_conv,
    convert_layernorm,
    convert_linear,
)
from ._common import TimmArgs, convert_mlp, norm_eps


TIMM_CLASSES = ("Twins",)

# training-time rates eqx_vision's TwinsSVT has no counterpart of (one dropout rate covers
# attention and feed-forward blocks, and its local attention has none on the probabilities)
_ZERO_RATES = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
_STAGES = 4


def _per_stage(args: TimmArgs, key: str, default: Sequence[Any]) -> list[Any]:
    value = args.get(key, default)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != _STAGES:
        args.unsupported(key, value, f"eqx_vision's TwinsSVT has {_STAGES} stages")
    return list(value)


def _side(args: TimmArgs) -> tuple[int, int]:
    size = args.get("img_size", 224)
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    args.unsupported("img_size", size, "an int or a pair of ints")
    raise AssertionError  # unreachable


def _stage_arguments(args: TimmArgs) -> dict[str, int]:
    """The `s{i}_*` arguments of `TwinsSVT` from timm's per-stage lists."""
    dims = _per_stage(args, "embed_dims", (64, 128, 256, 512))
    heads = _per_stage(args, "num_heads", (1, 2, 4, 8))
    ratios = _per_stage(args, "mlp_ratios", (4, 4, 4, 4))
    depths = _per_stage(args, "depths", (3, 4, 6, 3))
    sr_ratios = _per_stage(args, "sr_ratios", (8, 4, 2, 1))
    wss = args.get("wss", None)
    if wss is None:
        args.unsupported("wss", wss, "the twins_pcpvt models, with global attention only")
    wss = _per_stage(args, "wss", ())
    patch_size = args.get("patch_size", 4)
    out: dict[str, int] = {}
    for i in range(_STAGES):
        if dims[i] % heads[i]:
            args.unsupported("num_heads", heads, f"embed_dims={dims} must be multiples of it")
        if float(ratios[i]) != int(ratios[i]):
            args.unsupported("mlp_ratios", ratios, "whole multiples of embed_dims")
        if depths[i] < 2 or depths[i] % 2:
            args.unsupported("depths", depths, "pairs of local and global blocks: even, >= 2")
        if wss[i] == 1:
            args.unsupported("wss", wss, "windows of 1 make a stage global only")
        stage = dict(
            emb_dim=dims[i],
            patch_size=patch_size if i == 0 else 2,
            local_patch_size=wss[i],
            global_k=sr_ratios[i],
            depth=depths[i] // 2 - 1,
            heads=heads[i],
            dim_head=dims[i] // heads[i],
            mlp_mult=int(ratios[i]),
        )
        out.update({f"s{i + 1}_{k}": v for k, v in stage.items()})
    return out


def build(args: TimmArgs, *, key: PRNGKeyArray) -> TwinsSVT:
    """The `TwinsSVT` of timm's `Twins` constructor arguments (with windows, `wss`)."""
    for name in _ZERO_RATES:
        args.expect(name, (0, 0.0), 0.0)
    args.expect("global_pool", ("avg",), "avg")
    args.expect("block_cls", ("timm.models.twins.Block",), "timm.models.twins.Block")
    num_classes = args.get("num_classes", 1000)
    height, width = _side(args)
    stages, channels, eps = _stage_arguments(args), args.get("in_chans", 3), norm_eps(args, 1e-6)
    args.finish()
    model = TwinsSVT(
        num_classes=num_classes,
        **stages,
        peg_kernel_size=3,
        channels=channels,
        norm_eps=eps,
        qkv_bias=True,
        patch_pre_norm=False,
        spatial_reduction=True,
        last_stage_local=True,
        peg_after_local=True,
        final_norm=True,
        key=key,
    )
    m, low = model.size_multiple, model.min_size
    if height % m or width % m or min(height, width) < low:
        args.unsupported(
            "img_size",
            [height, width],
            f"the windows must tile every stage's map: multiples of {m}, at least {low}",
        )
    return model


def _split_qkv(m: MapAttention, sd: StateDict, prefix: str) -> MapAttention:
    """timm's fused `qkv` Linear (rows: queries, keys, values) into `to_q` and `to_kv`."""
    assert isinstance(m.to_q, Linear) and isinstance(m.to_kv, Linear)
    to_q, to_kv = m.to_q, m.to_kv
    inner = to_q.weight.shape[0]
    subs: list[Array] = []
    for name in ("weight", "bias"):
        q_like, kv_like = getattr(to_q, name), getattr(to_kv, name)
        expected = (inner + kv_like.shape[0], *q_like.shape[1:])
        value = sd.raw(prefix + name)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"shape mismatch for {prefix + name!r}: the model expects {expected}, the "
                f"state dict has {tuple(value.shape)}."
            )
        subs += [
            jnp.array(value[:inner], dtype=q_like.dtype),
            jnp.array(value[inner:], dtype=kv_like.dtype),
        ]
    return eqx.tree_at(
        lambda a: (a.to_q.weight, a.to_kv.weight, a.to_q.bias, a.to_kv.bias), m, tuple(subs)
    )


def _attention(m: MapAttention, sd: StateDict, prefix: str, local: bool) -> MapAttention:
    """A block's `norm1` and its `attn` (local: `qkv`; global: `q`, `sr`, `norm`, `kv`)."""
    assert isinstance(m.norm, LayerNorm) and isinstance(m.to_out, Linear)
    attn = prefix + "attn."
    subs: dict[str, Any] = {
        "norm": convert_layernorm(m.norm, sd, prefix + "norm1."),
        "to_out": convert_linear(m.to_out, sd, attn + "proj."),
    }
    if local:
        m = _split_qkv(m, sd, attn + "qkv.")
    else:
        assert isinstance(m.to_q, Linear) and isinstance(m.to_kv, Linear)
        subs["to_q"] = convert_linear(m.to_q, sd, attn + "q.")
        if m.kv_reduce is not None and m.kv_reduce_norm is not None:
            subs["kv_reduce"] = convert_conv(m.kv_reduce, sd, attn + "sr.")
            subs["kv_reduce_norm"] = convert_layernorm(m.kv_reduce_norm, sd, attn + "norm.")
        subs["to_kv"] = convert_linear(m.to_kv, sd, attn + "kv.")
    return eqx.tree_at(lambda a: [getattr(a, n) for n in subs], m, list(subs.values()))


def _feedforward(m: MapFeedForward, sd: StateDict, prefix: str) -> MapFeedForward:
    ff = convert_mlp(m.ff, sd, prefix + "mlp.", prefix + "norm2.")
    return eqx.tree_at(lambda f: f.ff, m, ff)


def _block(m: TwinsBlock, sd: StateDict, prefix: str, index: int) -> TwinsBlock:
    """eqx_vision's block `index` of a stage: timm's blocks `2 index` (local) and
    `2 index + 1` (global) under `prefix`."""
    local, glob = f"{prefix}{2 * index}.", f"{prefix}{2 * index + 1}."
    assert m.local_attn is not None and m.local_ff is not None
    subs = (
        _attention(m.local_attn, sd, local, local=True),
        _feedforward(m.local_ff, sd, local),
        _attention(m.global_attn, sd, glob, local=False),
        _feedforward(m.global_ff, sd, glob),
    )
    return eqx.tree_at(lambda b: (b.local_attn, b.local_ff, b.global_attn, b.global_ff), m, subs)


def _patch_embedding(m: PatchEmbedding, sd: StateDict, prefix: str) -> PatchEmbedding:
    """timm's `PatchEmbed` of Twins: a strided convolution `proj` (the same linear map on
    patches flattened `(c p1 p2)`) and a LayerNorm `norm`."""
    assert m.pre_norm is None and m.post_norm is not None and m.channels_first
    assert m.linear.bias is not None
    out_dim, patch_dim = m.linear.weight.shape
    p, q = m.patch_size
    shape = (out_dim, patch_dim // (p * q), p, q)
    weight = sd.take(prefix + "proj.weight", m.linear.weight, torch_shape=shape)
    bias = sd.take(prefix + "proj.bias", m.linear.bias)
    linear = eqx.tree_at(lambda lin: (lin.weight, lin.bias), m.linear, (weight, bias))
    norm = convert_layernorm(m.post_norm, sd, prefix + "norm.")
    return eqx.tree_at(lambda e: (e.linear, e.post_norm), m, (linear, norm))


def _stage(m: TwinsStage, sd: StateDict, i: int) -> TwinsStage:
    """Stage `i`: `patch_embeds.{i}`, `blocks.{i}` (pairs of timm blocks) and
    `pos_block.{i}`, the PEG."""
    blocks = f"blocks.{i}."
    peg = convert_conv(m.peg.proj, sd, f"pos_block.{i}.proj.0.")
    subs: dict[str, Any] = {
        "to_patch_embedding": _patch_embedding(m.to_patch_embedding, sd, f"patch_embeds.{i}."),
        "first": _block(m.first, sd, blocks, 0),
        "peg": eqx.tree_at(lambda p: p.proj, m.peg, peg),
    }
    if m.blocks is not None:
        stacked = [_block(m.blocks[j], sd, blocks, j + 1) for j in range(m.blocks.depth)]
        subs["blocks"] = eqx.tree_at(lambda s: s.blocks, m.blocks, stack_modules(stacked))
    return eqx.tree_at(lambda s: [getattr(s, n) for n in subs], m, list(subs.values()))


def convert(model: TwinsSVT, sd: StateDict) -> TwinsSVT:
    """The weights of a timm `Twins` state dict (`patch_embeds`, `blocks`, `pos_block`,
    `norm`, `head`)."""
    assert model.norm is not None
    stages = [_stage(stage, sd, i) for i, stage in enumerate(model.stages)]
    norm = convert_layernorm(model.norm, sd, "norm.")
    model = eqx.tree_at(lambda m: (m.stages, m.norm), model, (stages, norm))
    if model.mlp_head is not None:
        head = convert_linear(model.mlp_head, sd, "head.")
        model = eqx.tree_at(lambda m: m.mlp_head, model, head)
    return model
