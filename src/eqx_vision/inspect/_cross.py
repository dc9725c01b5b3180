"""Attention maps in image coordinates: see `_core.image_attention`.

The two-branch models, `CrossViT` and `TimmCrossViT`. For each branch, the class-token
rows of its encoders' self-attention over the branch's patch tokens; then, for each
branch, the cross attention of its class token over the other branch's patch tokens,
on that branch's grid. A row's weight on the class token itself (a key in every one of
these attentions) is left out, so a map sums to less than one.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..layers import Stack
from ..models.cross_vit import CrossLayer, CrossViT, MultiScaleBlock, TimmCrossViT
from ._core import AttentionMap, register
from ._token_maps import transformer_attention_maps


def _on_grid(
    probs: Float[Array, "*layers heads queries keys"], grid: tuple[int, int]
) -> Float[Array, "layers heads grid_h grid_w"]:
    """The class token's rows (query 0) over the patch keys (the keys after the first),
    every leading axis merged into the layers."""
    rows = probs[..., 0, 1:]
    heads = rows.shape[-2]
    return rows.reshape(-1, heads, *grid)


def _cross_vit_block(
    block: MultiScaleBlock, tokens: tuple[Array, Array]
) -> tuple[tuple[Array, Array], tuple[Array, Array, Array, Array]]:
    """One multi-scale block of `CrossViT` and its attention probabilities: both
    encoders', then each cross-attention round's (the class tokens carried from round to
    round as `CrossTransformer` does)."""
    sm, sm_probs = transformer_attention_maps(block.sm_enc, tokens[0])
    lg, lg_probs = transformer_attention_maps(block.lg_enc, tokens[1])
    dynamic, static = eqx.partition(block.cross_attend.layers.blocks, eqx.is_array)

    def round_(cls: tuple[Array, Array], params: Any) -> tuple[Any, Any]:
        layer: CrossLayer = eqx.combine(params, static)
        return layer(cls, sm[1:], lg[1:]), layer.probabilities(cls, sm[1:], lg[1:])

    (sm_cls, lg_cls), (to_lg, to_sm) = jax.lax.scan(round_, (sm[:1], lg[:1]), dynamic)
    out = (jnp.concatenate([sm_cls, sm[1:]]), jnp.concatenate([lg_cls, lg[1:]]))
    return out, (sm_probs, lg_probs, to_lg, to_sm)


@register(CrossViT)
def _cross_vit(model: CrossViT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """Four groups: `multi_scale_encoder.sm_enc` and `.lg_enc` (every block's encoder
    layers, block after block), `multi_scale_encoder.cross_attend.sm_attend_lg` (the
    small-branch class token over the large-branch patches, every round of every block)
    and `.lg_attend_sm`."""
    dynamic, static = eqx.partition(model.multi_scale_encoder.blocks, eqx.is_array)

    def step(tokens: Any, params: Any) -> tuple[Any, Any]:
        return _cross_vit_block(eqx.combine(params, static), tokens)

    _, (sm, lg, to_lg, to_sm) = jax.lax.scan(step, model.embed(image), dynamic)
    sm_grid, lg_grid = model.grids
    sm_stride = model.sm_image_embedder.to_patch_embedding.patch_size
    lg_stride = model.lg_image_embedder.to_patch_embedding.patch_size
    name = "multi_scale_encoder"
    return [
        AttentionMap(_on_grid(sm, sm_grid), f"{name}.sm_enc", sm_stride),
        AttentionMap(_on_grid(lg, lg_grid), f"{name}.lg_enc", lg_stride),
        AttentionMap(_on_grid(to_lg, lg_grid), f"{name}.cross_attend.sm_attend_lg", lg_stride),
        AttentionMap(_on_grid(to_sm, sm_grid), f"{name}.cross_attend.lg_attend_sm", sm_stride),
    ]


def _timm_block(block: Any, tokens: tuple[Array, ...]) -> tuple[Any, Any]:
    """One multi-scale block of `TimmCrossViT` and its attention probabilities: each
    branch's encoder's, then each branch's first cross-attention block's."""
    encoded, probs = [], []
    for encoder, t in zip(block.encoders, tokens, strict=True):
        out, p = transformer_attention_maps(encoder, t)
        encoded.append(out)
        probs.append(p)
    encoded = tuple(encoded)
    return block.fuse(encoded), (tuple(probs), block.fusion_probabilities(encoded))


@register(TimmCrossViT)
def _timm_cross_vit(
    model: TimmCrossViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """`blocks.encoders[b]` for each branch `b` (every block's encoder layers, block after
    block), then `blocks.fusions[b]`: branch `b`'s class token over the patches of the
    next branch (its own with one branch), on that branch's grid, one layer per block.
    A branch's stride is its `feature_info` reduction (its patch size over its image
    scale, rounded)."""
    tokens = model.embed(image)
    if isinstance(model.blocks, Stack):
        dynamic, static = eqx.partition(model.blocks.blocks, eqx.is_array)

        def step(tokens: Any, params: Any) -> tuple[Any, Any]:
            return _timm_block(eqx.combine(params, static), tokens)

        _, (enc, fusion) = jax.lax.scan(step, tokens, dynamic)
        per_block = [(enc, fusion)]
    else:
        per_block = []
        for block in model.blocks:
            tokens, probs = _timm_block(block, tokens)
            per_block.append(probs)
    n = len(model.embeddings)
    depth = len(model.blocks)
    grids = [e.grid for e in model.embeddings]
    strides = [model.feature_info[b * depth].reduction for b in range(n)]
    maps = []
    for b in range(n):
        layers = [_on_grid(enc[b], grids[b]) for enc, _ in per_block]
        maps.append(AttentionMap(jnp.concatenate(layers), f"blocks.encoders[{b}]", strides[b]))
    for b in range(n):
        j = (b + 1) % n
        layers = [_on_grid(fusion[b], grids[j]) for _, fusion in per_block]
        maps.append(AttentionMap(jnp.concatenate(layers), f"blocks.fusions[{b}]", strides[j]))
    return maps
