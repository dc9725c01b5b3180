"""Attention maps in image coordinates of the flat ViT-like models: see
`_core.image_attention`.

Every map is read on the patch grid (stride `patch_size`): the class token's row of
probabilities over the patch tokens where the layers have a class token (ViT with one,
DeepViT, SmallDatasetViT, ParallelViT, CaiT's class-attention blocks), otherwise the mean
over all the queries of the attention each patch receives (SimpleViT, a ViT without class
token, the blocks of ViTWithPatchMerger and CaiT's patch transformer).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..layers import Attention, Parallel, Transformer, TransformerBlock, check_image
from ..models import CaiT, DeepViT, ParallelViT, SimpleViT, SmallDatasetViT, ViT
from ..models.patch_merger import ViTWithPatchMerger
from ._core import AttentionMap, register
from ._token_maps import transformer_attention_maps


def _on_grid(
    probs: Float[Array, "layers heads seq kv_seq"],
    grid: tuple[int, int],
    *,
    num_prefix: int,
    class_row: bool,
) -> Float[Array, "layers heads grid_h grid_w"]:
    """The attention the patch keys (those after `num_prefix` prefix keys) receive, on the
    grid: query row 0 (the class token) with `class_row`, else the mean over the queries."""
    patches = probs[..., num_prefix:]
    received = patches[:, :, 0] if class_row else patches.mean(axis=2)
    return received.reshape(*received.shape[:2], *grid)


def _patch(model: ViT | SimpleViT | CaiT | ViTWithPatchMerger) -> tuple[int, int]:
    return tuple(model.to_patch_embedding.patch_size)  # pyright: ignore[reportReturnType]


@register(ViT)
def _vit(model: ViT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """One map for the encoder, `"transformer"`: the class token's row, or without a class
    token the mean over the queries (prefix tokens included)."""
    check_image(image, (model.channels, *model.image_size), "ViT")
    _, probs = transformer_attention_maps(model.transformer, model.embed(image))
    maps = _on_grid(
        probs,
        model.grid,
        num_prefix=model.num_prefix_tokens,
        class_row=model.cls_token.shape[0] > 0,
    )
    return [AttentionMap(maps, "transformer", _patch(model))]


@register(SimpleViT)
def _simple_vit(
    model: SimpleViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """One map for the encoder, `"transformer"`: the mean over the queries (no class token),
    each map summing to one over the grid."""
    _, probs = transformer_attention_maps(model.transformer, model.embed(image))
    maps = _on_grid(probs, model.grid, num_prefix=0, class_row=False)
    return [AttentionMap(maps, "transformer", model.patch_size)]


@register(DeepViT, SmallDatasetViT)
def _class_token_vit(
    model: DeepViT | SmallDatasetViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """One map for the encoder, `"transformer"`: the class token's row. DeepViT's are the
    re-attention weights (mixed across heads and normalised, not a softmax); the ViT for
    small datasets masks each token's attention to itself, so the class token's row over
    the patches sums to one."""
    _, probs = transformer_attention_maps(model.transformer, model.embed(image))
    maps = _on_grid(probs, model.grid, num_prefix=1, class_row=True)
    return [AttentionMap(maps, "transformer", model.patch_size)]


def _branch_probabilities(
    transformer: Transformer, x: Float[Array, "seq dim"]
) -> Float[Array, "depth branches heads seq seq"]:
    """The attention probabilities of every branch of every block of an encoder of
    `Parallel` branches, out of one scan over the blocks (which run as in the model)."""
    transformer = eqx.nn.inference_mode(transformer)
    dynamic, static = eqx.partition(transformer.layers.blocks, eqx.is_array)

    def step(tokens, params):
        block: TransformerBlock = eqx.combine(params, static)
        attn = block.attn
        assert isinstance(attn, Parallel)
        branches: list[Attention] = [attn[b] for b in range(attn.num_branches)]
        probs = jnp.stack([branch.probabilities(tokens) for branch in branches])
        return block(tokens), probs

    _, probs = jax.lax.scan(step, x, dynamic)
    return probs


@register(ParallelViT)
def _parallel_vit(
    model: ParallelViT, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """One map per parallel attention branch, `"transformer.attn[b]"`, in branch order:
    the class token's row of branch `b` in every layer (the branches of a layer attend
    independently; their mean is `jnp.mean([m.maps for m in maps], axis=0)`). With one
    branch, the single map is named `"transformer"`."""
    tokens = model.embed(image)
    if not isinstance(model.transformer.layers[0].attn, Parallel):
        _, probs = transformer_attention_maps(model.transformer, tokens)
        maps = _on_grid(probs, model.grid, num_prefix=1, class_row=True)
        return [AttentionMap(maps, "transformer", model.patch_size)]
    probs = _branch_probabilities(model.transformer, tokens)
    return [
        AttentionMap(
            _on_grid(probs[:, b], model.grid, num_prefix=1, class_row=True),
            f"transformer.attn[{b}]",
            model.patch_size,
        )
        for b in range(probs.shape[1])
    ]


@register(ViTWithPatchMerger)
def _patch_merger(
    model: ViTWithPatchMerger, image: Float[Array, "channels height width"]
) -> list[AttentionMap]:
    """Up to three maps, in the order they run:

    - `"transformer"`: the blocks before the merger, the mean over the queries (each map
      sums to one over the grid);
    - `"patch_merger"`: one layer whose "heads" axis holds the merger's learned queries,
      `maps[0, i]` the softmax weights with which merged token `i` averages the patches
      (each sums to one);
    - `"merged_transformer"` (when blocks follow the merger): their attention over the
      merged tokens (mean over the queries), carried back to the patches through the
      merger's weights, `mean_i A[h, i, :] @ M`: the share of each patch in what the layer
      attends to (each sums to one).
    """
    grid, stride = model.grid, model.patch_size
    tokens, probs = transformer_attention_maps(model.transformer, model.embed(image))
    out = [
        AttentionMap(_on_grid(probs, grid, num_prefix=0, class_row=False), "transformer", stride)
    ]
    merge = model.patch_merger.probabilities(tokens)
    out.append(AttentionMap(merge.reshape(1, merge.shape[0], *grid), "patch_merger", stride))
    if model.merged_transformer is not None:
        _, after = transformer_attention_maps(model.merged_transformer, model.patch_merger(tokens))
        carried = after.mean(axis=2) @ merge  # (layers, heads, merged) @ (merged, patches)
        out.append(
            AttentionMap(carried.reshape(*carried.shape[:2], *grid), "merged_transformer", stride)
        )
    return out


@register(CaiT)
def _cait(model: CaiT, image: Float[Array, "channels height width"]) -> list[AttentionMap]:
    """Two maps: `"patch_transformer"`, the self-attention over the patches (mean over the
    queries; with talking heads the weights are mixed across heads after the softmax, so
    they need not sum to one), and `"cls_transformer"`, the class token's row over the
    patches in the class-attention blocks (its keys are `[class token; patches]`)."""
    patches, probs = transformer_attention_maps(model.patch_transformer, model.embed(image))
    cls = model.cls_token.astype(patches.dtype)
    _, cls_probs = transformer_attention_maps(model.cls_transformer, cls, patches)
    stride = model.patch_size
    return [
        AttentionMap(
            _on_grid(probs, model.grid, num_prefix=0, class_row=False), "patch_transformer", stride
        ),
        AttentionMap(
            _on_grid(cls_probs, model.grid, num_prefix=1, class_row=True), "cls_transformer", stride
        ),
    ]
