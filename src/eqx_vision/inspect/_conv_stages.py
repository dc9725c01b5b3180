"""Attention maps in image coordinates: see `_core.image_attention`.

The models with convolutional stages: CvT (keys on the grid of its strided key/value
projection), LeViT and TimmLeViT (attention biases, the subsampling attention of the
downsampling blocks included) and PiT (the stages between its pooling layers).
"""

import equinox as eqx
from jaxtyping import Array, Float

from ..layers import ConvProjection, DepthwiseConv2d
from ..models import CvT
from ._core import AttentionMap, register


def _received(
    probs: Float[Array, "layers heads q_seq kv_seq"], kv_grid: tuple[int, int]
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
