"""Reusable building blocks: every architecture of `eqx_vision` is composed from these."""

from ._attention import (
    Attention as Attention,
    attend as attend,
    merge_heads as merge_heads,
    mix_heads as mix_heads,
    split_heads as split_heads,
)
from ._batch_norm import BatchNorm as BatchNorm, ConvBN as ConvBN
from ._conv import (
    ChannelLayerNorm as ChannelLayerNorm,
    Conv2d as Conv2d,
    DepthwiseConv2d as DepthwiseConv2d,
    max_pool2d as max_pool2d,
    unfold as unfold,
)
from ._feature_map import (
    ConvProjection as ConvProjection,
    MapAttention as MapAttention,
    MapFeedForward as MapFeedForward,
    attention_bias_indices as attention_bias_indices,
)
from ._feedforward import FeedForward as FeedForward
from ._grid import grid_to_tokens as grid_to_tokens, tokens_to_grid as tokens_to_grid
from ._linear import (
    LayerNorm as LayerNorm,
    Linear as Linear,
    gelu as gelu,
    layer_norm as layer_norm,
)
from ._patch import (
    PatchEmbedding as PatchEmbedding,
    check_divisible as check_divisible,
    check_image as check_image,
    pair as pair,
    patchify as patchify,
    sincos_2d as sincos_2d,
)
from ._peg import PEG as PEG
from ._random import check_key as check_key, split_key as split_key
from ._replace import replace as replace
from ._resize import (
    bicubic_matrix as bicubic_matrix,
    resample_pos_embed as resample_pos_embed,
    resize_bicubic as resize_bicubic,
)
from ._stack import (
    REMAT as REMAT,
    LayerDrop as LayerDrop,
    Stack as Stack,
    checkpoint_blocks as checkpoint_blocks,
    remat as remat,
    stack_modules as stack_modules,
)
from ._state import is_state_index as is_state_index, is_stateful as is_stateful
from ._tokens import (
    AbstractClassTokenViT as AbstractClassTokenViT,
    pool_tokens as pool_tokens,
    with_class_tokens as with_class_tokens,
)
from ._transformer import (
    DropPath as DropPath,
    Parallel as Parallel,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
    layer_scale_init as layer_scale_init,
)
from ._window import (
    check_windowed_image as check_windowed_image,
    size_multiple as size_multiple,
    window_merge as window_merge,
    window_partition as window_partition,
)
