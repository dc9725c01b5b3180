"""Attention maps in image coordinates of the windowed and spatial-reduction models (NesT,
Twins-SVT, ScalableViT): see `_core.image_attention`.

These models have no class token: each map is the attention a cell receives, averaged over
the queries that attend to it (those of its window for windowed attention, every pixel of
the map for global attention). Windows are stitched back onto the map; keys on a reduced
grid (Twins' global sub-sampled attention, ScalableViT's scalable self-attention) give a
map on that grid, of the stage's stride times the reduction.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..layers import PEG, MapAttention, Stack
from ..layers._attention import split_heads
from ..layers._window import window_merge, window_partition
from ..models.nest import NesT, NesTBlock
from ..models.scalable_vit import ScalableBlock, ScalableViT
from ..models.twins_svt import TwinsBlock, TwinsSVT
from ._core import AttentionMap, register


def received_attention(
    attn: MapAttention, x: Float[Array, "channels height width"]
) -> Float[Array, "heads kv_height kv_width"]:
    """The attention each key of a `MapAttention` with `"linear"` projections receives on
    `x`, averaged over the queries that attend to it, on the key map: windows stitched
    back; keys reduced by a strided convolution on their reduced map. The softmax
    probabilities of `attn(x)` (without dropout), so each window's cells (the whole key map
    without windows) sum to one per head."""
    _, height, width = x.shape
    y = x.transpose(1, 2, 0)
    if attn.norm is not None:
        y = attn.norm(y)
    q, k, _ = attn._linear_qkv(y)
    kv_size = (k.shape[0], k.shape[1])
    if attn.window is None:
        q, k = q.reshape(1, -1, q.shape[-1]), k.reshape(1, -1, k.shape[-1])
    else:
        q, k = (window_partition(t, attn.window, dilated=attn.dilated) for t in (q, k))

    def window(q: Array, k: Array) -> Array:  # (seq, inner), (kv_seq, inner) -> (kv_seq, heads)
        qh, kh = split_heads(q, attn.heads), split_heads(k, attn.heads)
        dots = jnp.einsum("hid,hjd->hij", qh, kh) * attn.scale
        probs = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
        return probs.mean(axis=1).T

    received = jax.vmap(window)(q, k)  # (windows, kv_seq, heads)
    if attn.window is None:
        out = received.reshape(*kv_size, attn.heads)
    else:
        out = window_merge(received, (height, width), attn.window, dilated=attn.dilated)
    return out.transpose(2, 0, 1)


def _scan_blocks(step: Callable[..., Any], x: Array, stack: Stack) -> tuple[Array, Any]:
    """`lax.scan` of `step(block, x) -> (x, maps)` over the blocks of a stack."""
    dynamic, static = eqx.partition(stack.blocks, eqx.is_array)
    return jax.lax.scan(lambda x, params: step(eqx.combine(params, static), x), x, dynamic)


def _stride(stride: int, map_size: tuple[int, int], grid: tuple[int, ...]) -> tuple[int, int]:
    return stride * (map_size[0] // grid[0]), stride * (map_size[1] // grid[1])


@register(NesT)
def _nest(model: NesT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """One map per level with blocks (`"levels[i]"`): the block-local attention of each of
    its blocks, stitched back onto the level's map, of stride `patch_size · 2^i`."""
    x = model._embed(image)
    maps = []
    for i, level in enumerate(model.levels):
        x = level.add_positions(x)
        if level.blocks is not None:

            def step(block: NesTBlock, x: Array) -> tuple[Array, Array]:
                return block(x), received_attention(block.attn, x)

            x, layers = _scan_blocks(step, x, level.blocks)
            stride = model.feature_info[i].reduction
            maps.append(AttentionMap(layers, f"levels[{i}]", stride))
        x = level.aggregate(x)
    return maps


def _twins_block(
    block: TwinsBlock, x: Array, peg: PEG | None = None
) -> tuple[Array | None, Array, Array]:
    """The local and global maps of one block, and the global attention's input."""
    local = None if block.local_attn is None else received_attention(block.local_attn, x)
    before_global = block.local_half(x, peg=peg)
    return local, received_attention(block.global_attn, before_global), before_global


@register(TwinsSVT)
def _twins(model: TwinsSVT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """Per stage `"stages[i].local"` (locally-grouped attention, windows stitched back, of
    the stage's stride; absent without local attention) and `"stages[i].global"` (global
    sub-sampled attention, on the key grid reduced by `global_k`), one layer per block."""
    model._check(image)
    x = image
    maps = []
    for i, (stage, info) in enumerate(zip(model.stages, model.feature_info, strict=True)):
        x = stage.embed(x)
        peg = stage.peg if stage.peg_after_local else None
        local, glob, _ = _twins_block(stage.first, x, peg)
        locals_ = [] if local is None else [local[None]]
        globals_ = [glob[None]]
        x = stage.first_block(x)
        if stage.blocks is not None:

            def step(block: TwinsBlock, x: Array) -> tuple[Array, tuple[Array | None, Array]]:
                local, glob, _ = _twins_block(block, x)
                return block(x), (local, glob)

            x, (more_local, more_global) = _scan_blocks(step, x, stage.blocks)
            if more_local is not None:
                locals_.append(more_local)
            globals_.append(more_global)
        size = (x.shape[1], x.shape[2])
        stride = info.reduction[0]
        if locals_:
            layers = jnp.concatenate(locals_)
            maps.append(AttentionMap(layers, f"stages[{i}].local", (stride, stride)))
        layers = jnp.concatenate(globals_)
        grid_stride = _stride(stride, size, layers.shape[2:])
        maps.append(AttentionMap(layers, f"stages[{i}].global", grid_stride))
    return maps


@register(ScalableViT)
def _scalable(
    model: ScalableViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """Per stage with blocks `"stages[i].ssa"` (scalable self-attention, on the key grid
    reduced by `reduction_factor`) and `"stages[i].iwsa"` (interactive windowed
    self-attention, windows stitched back, of the stage's stride), one layer per block.
    The IWSA map is its softmax only; the local interactive module (a convolution of the
    values) adds no attention weights."""
    model._check(image)
    x = model.to_patches(image)
    maps = []

    def block_maps(block: ScalableBlock, x: Array) -> tuple[Array, tuple[Array, Array]]:
        ssa = received_attention(block.ssa, x)
        iwsa = received_attention(block.iwsa, block.before_iwsa(x))
        return block(x), (ssa, iwsa)

    for i, (stage, info) in enumerate(zip(model.stages, model.feature_info, strict=True)):
        if stage.first is not None:
            size = (x.shape[1], x.shape[2])
            _, (ssa, iwsa) = block_maps(stage.first, x)
            ssa, iwsa = ssa[None], iwsa[None]
            if stage.rest is not None:
                _, (more_ssa, more_iwsa) = _scan_blocks(block_maps, stage.first(x), stage.rest)
                ssa = jnp.concatenate([ssa, more_ssa])
                iwsa = jnp.concatenate([iwsa, more_iwsa])
            stride = info.reduction[0]
            maps.append(AttentionMap(ssa, f"stages[{i}].ssa", _stride(stride, size, ssa.shape[2:])))
            maps.append(AttentionMap(iwsa, f"stages[{i}].iwsa", (stride, stride)))
        x = stage(x)
    return maps
