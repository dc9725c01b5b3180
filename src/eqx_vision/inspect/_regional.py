"""Attention maps in image coordinates (see `_core.image_attention`) of the models with
windowed, regional or tokens-to-token attention: CrossFormer, RegionViT and T2T-ViT."""

import functools

import equinox as eqx
import jax
from jaxtyping import Array, Float

from ..layers import Transformer, check_image, window_merge
from ..models.crossformer import CrossFormer, CrossFormerBlock
from ..models.regionvit import R2LBlock, RegionViT
from ..models.t2t import T2TViT
from ._core import AttentionMap, register
from ._token_maps import transformer_attention_maps


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


@register(RegionViT)
def _regionvit(
    model: RegionViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """Per stage, two maps of `(depth, heads, h, w)`: `stages[i].regional`, what each
    region token receives from the regional attention averaged over the region tokens
    (sums to one), on the region map; and `stages[i].local`, each window's local
    attention as its region token reads the window's local tokens (the row of the region
    token, which acts as the window's class token; its weight on itself is left out),
    every window put back at its place on the local map."""
    model._check(image)
    maps = []
    c, p = model.channels, model.region_patch_size
    h, w = image.shape[1] // p, image.shape[2] // p
    patches = image.reshape(c, h, p, w, p).transpose(0, 2, 4, 1, 3).reshape(c * p * p, h, w)
    local, region = model.local_encoder(image), model.region_encoder(patches)
    for i, (stage, info) in enumerate(zip(model.stages, model.feature_info, strict=True)):
        tokens, bias, size, window = stage.enter(local, region)
        tokens, (regional, local_probs) = _scan_blocks(
            stage.layers, R2LBlock.attention_maps.__name__, tokens, bias
        )
        local, region = stage.leave(tokens, size, window)
        depth, heads = regional.shape[:2]
        regional = regional.mean(axis=2).reshape(depth, heads, *region.shape[1:])
        read = local_probs[:, :, :, 0, 1:].transpose(0, 1, 3, 2)  # (depth, windows, seq, heads)
        local_map = jax.vmap(functools.partial(window_merge, size=size, window=window))(read)
        stride = model.region_patch_size * 2**i
        maps.append(AttentionMap(regional, f"stages[{i}].regional", (stride, stride)))
        maps.append(
            AttentionMap(local_map.transpose(0, 3, 1, 2), f"stages[{i}].local", info.reduction)
        )
    return maps


@register(T2TViT)
def _t2t_vit(model: T2TViT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """`t2t_transformers[i]`, `(1, 1, grid, grid)` for each tokens-to-token transformer
    (one head, no class token): what each token receives, averaged over the queries (sums
    to one); then `transformer`, `(depth, heads, grid, grid)`: the class token's row over
    the patch tokens of the main encoder (none for a custom main transformer)."""
    size = model.image_size
    check_image(image, (model.channels, size, size), type(model).__name__)
    maps = []
    tokens = image
    for i in range(len(model.t2t_layers)):
        tokens = model.soft_split(i, tokens)
        if i < len(model.t2t_transformers):
            tokens, probs = transformer_attention_maps(model.t2t_transformers[i], tokens)
            grid = model.grid_sizes[i]
            received = probs.mean(axis=2).reshape(*probs.shape[:2], grid, grid)
            stride = (size // grid, size // grid)
            maps.append(AttentionMap(received, f"t2t_transformers[{i}]", stride))
    if isinstance(model.transformer, Transformer):
        _, probs = transformer_attention_maps(model.transformer, model.embed(tokens))
        grid = model.grid_sizes[-1]
        cls = probs[:, :, 0, 1:].reshape(*probs.shape[:2], grid, grid)
        maps.append(AttentionMap(cls, "transformer", (size // grid, size // grid)))
    return maps
