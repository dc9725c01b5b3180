"""Attention maps in image coordinates (see `_core.image_attention`) of the models with
windowed, regional or tokens-to-token attention: CrossFormer, RegionViT and T2T-ViT."""

import equinox as eqx
import jax
from jaxtyping import Array, Float

from ..models.crossformer import CrossFormer, CrossFormerBlock
from ._core import AttentionMap, register


def _scan_blocks(stack: eqx.Module, method: str, carry: object, *args: object) -> tuple:
    """Run `block.<method>(carry, *args)` over the blocks of a scanned `Stack` (one
    `lax.scan`, the blocks kept stacked); each call returns `(carry, maps)`. Returns the
    last carry and the maps stacked along a leading layer axis."""
    dynamic, static = eqx.partition(stack.blocks, eqx.is_array)  # pyright: ignore[reportAttributeAccessIssue]

    def step(carry, params):
        return getattr(eqx.combine(params, static), method)(carry, *args)

    return jax.lax.scan(step, carry, dynamic)


@register(CrossFormer)
def _crossformer(
    model: CrossFormer, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """Per stage with blocks, two maps: `stages[i].short_attn` (within contiguous windows)
    and `stages[i].long_attn` (within the interleaved long-distance groups), each
    `(depth, heads, h, w)` on the stage's map: what each pixel receives, averaged over the
    queries of its window, every window put back at its place (each window sums to one)."""
    model._check(image)
    maps = []
    x = image
    for i, (embed, stage, info) in enumerate(
        zip(model.embeds, model.stages, model.feature_info, strict=True)
    ):
        x = embed(x)
        if stage is None:
            continue
        x, (short, long) = _scan_blocks(stage, CrossFormerBlock.attention_maps.__name__, x)
        maps.append(AttentionMap(short, f"stages[{i}].short_attn", info.reduction))
        maps.append(AttentionMap(long, f"stages[{i}].long_attn", info.reduction))
    return maps
