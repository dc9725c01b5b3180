"""Attention maps in image coordinates: see `_core.image_attention`.

The models with convolutional stages: CvT (keys on the grid of its strided key/value
projection), LeViT and TimmLeViT (attention biases, the subsampling attention of the
downsampling blocks included) and PiT (the stages between its pooling layers).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float

from ..layers import (
    ConvProjection,
    DepthwiseConv2d,
    MapAttention,
    Stack,
    check_image,
    grid_to_tokens,
)
from ..models import CvT, LeViT, PiT
from ..models.levit import ACTIVATIONS, IN_CHANNELS, TimmLeViT
from ._core import AttentionMap, register
from ._token_maps import transformer_attention_maps


def _received(
    probs: Float[Array, "layers heads q_seq kv_seq"], kv_grid: tuple[int, ...]
) -> Float[Array, "layers heads grid_h grid_w"]:
    """The attention each key receives, averaged over the queries, on the keys' grid."""
    layers, heads = probs.shape[:2]
    return probs.mean(axis=2).reshape(layers, heads, *kv_grid)


@register(CvT)
def _cvt(model: CvT, image: Float[Array, "channels height width"], state: eqx.nn.State):
    """One map per stage, `stages[i]`: the attention every key receives, averaged over the
    queries (CvT has no class token), on the grid of the key/value projection, whose stride
    is the stage's reduction times `s*_kv_proj_stride`."""
    model._check_image(image)
    maps = []
    x = image
    for info, stage in zip(model.feature_info, model.stages, strict=True):
        probs, x = stage.attention_maps(x, state)
        to_kv = stage.blocks.blocks.attn.to_kv
        assert isinstance(to_kv, ConvProjection)
        assert isinstance(to_kv.depthwise.conv, DepthwiseConv2d)
        stride = to_kv.depthwise.conv.stride
        grid = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
        cell = (info.reduction[0] * stride, info.reduction[1] * stride)
        maps.append(AttentionMap(_received(probs, grid), f"stages[{info.index}]", cell))
    return maps


@register(PiT)
def _pit(model: PiT, image: Float[Array, "channels height width"]):
    """One map per stage, `stages[i]`: the class token's attention over the patch tokens
    of the stage's grid (the pooled grid after the first stage), of stride
    `stride * 2 ** i`. The rows leave out what the class token gives the prefix tokens, so
    they sum to at most one."""
    check_image(image, (model.channels, model.image_size, model.image_size), "PiT")
    tokens = model._embed(image, None)
    n = model.num_prefix_tokens
    maps = []
    for i, (info, stage) in enumerate(zip(model.feature_info, model.stages, strict=True)):
        tokens, probs = transformer_attention_maps(stage, tokens)
        grid = model.grid_sizes[i]
        cls_rows = probs[:, :, 0, n:].reshape(*probs.shape[:2], grid, grid)
        maps.append(AttentionMap(cls_rows, f"stages[{i}]", info.reduction))
        if i < len(model.pools):
            tokens = model.pools[i](tokens, n)
    return maps


def _scan_probabilities(
    stack: Stack[Any],
    x: Any,
    state: eqx.nn.State,
    probabilities: Callable[[Any, Any, eqx.nn.State], Array],
) -> tuple[Any, Array]:
    """Run a stack of stateful blocks in inference mode, in its scan, and collect
    `probabilities(block, x, block_state)` of every block: `(output, (depth, ...))`."""
    dynamic, static = eqx.partition(stack.blocks, eqx.is_array)
    substate = state.substate(stack.blocks)

    def step(carry, layer):
        params, block_state = layer
        block = eqx.combine(params, static)
        probs = probabilities(block, carry, block_state)
        out, _ = block(carry, block_state)
        return out, probs

    return jax.lax.scan(step, x, (dynamic, substate))


def _levit_probs(block: Any, x: Array, state: eqx.nn.State) -> Array:
    attn: MapAttention = block.attn
    return attn.conv_probabilities(x, state)


@register(LeViT)
def _levit(model: LeViT, image: Float[Array, "channels height width"], state: eqx.nn.State):
    """One map per stage, `stages[i]`, and per downsampling block, `downsamples[i]`, in the
    order they run: the attention every key of the block's input map receives (the
    attention bias included), averaged over the queries (on every second row and column in
    the downsampling blocks), of stride `16 * 2 ** i`."""
    check_image(image, (IN_CHANNELS, model.image_size, model.image_size), "LeViT")
    x = image
    for conv in model.conv_embedding:
        x = conv(x)
    maps = []
    for i, (info, stage) in enumerate(zip(model.feature_info, model.stages, strict=True)):
        grid = x.shape[1:]
        x, probs = _scan_probabilities(stage, x, state, _levit_probs)
        maps.append(AttentionMap(_received(probs, grid), f"stages[{i}]", info.reduction))
        if i < len(model.downsamples):
            down = model.downsamples[i]
            probs = _levit_probs(down, x, state)[None]
            maps.append(AttentionMap(_received(probs, grid), f"downsamples[{i}]", info.reduction))
            x, _ = down(x, state)
    return maps


@register(TimmLeViT)
def _timm_levit(
    model: TimmLeViT, image: Float[Array, "channels height width"], state: eqx.nn.State
):
    """One map per stage, `stages[i]`, and per downsampling block, `downsamples[i]` (before
    stage `i + 1`), in the order they run: the attention every key of the block's input
    map receives (the attention bias included), averaged over the queries (on every second
    row and column in the downsampling blocks), of the stride of that map."""
    check_image(image, (model.channels, *model.image_size), "TimmLeViT")
    x = image
    for i, conv in enumerate(model.stem):
        x, _ = conv(x, state)
        if i < len(model.stem) - 1:
            x = ACTIVATIONS[model.activation](x)
    grid = x.shape[1:]
    x = grid_to_tokens(x)
    maps = []
    infos = model.feature_info
    for i, stage in enumerate(model.stages):
        if i > 0:
            down = model.downsamples[i - 1]
            probs = down.attn.probabilities(x, state)[None]
            maps.append(
                AttentionMap(
                    _received(probs, grid), f"downsamples[{i - 1}]", infos[i - 1].reduction
                )
            )
            x, _ = down(x, state)
            grid = ((grid[0] - 1) // 2 + 1, (grid[1] - 1) // 2 + 1)
        x, probs = _scan_probabilities(
            stage, x, state, lambda block, x, s: block.attn.probabilities(x, s)
        )
        maps.append(AttentionMap(_received(probs, grid), f"stages[{i}]", infos[i].reduction))
    return maps
