"""Twins-SVT: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers".

Chu et al., 2021, https://arxiv.org/abs/2104.13840.
"""

import math
from typing import Annotated

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    PEG,
    Linear,
    MapAttention,
    MapFeedForward,
    PatchEmbedding,
    Stack,
    check_image,
    check_key,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import Minimum, NonNegative, Odd, Positive, Rate, checked_arguments


HEADS = 8
DIM_HEAD = 64
MLP_MULT = 4
CHANNELS = 3


class TwinsBlock(eqx.Module):
    """Locally-grouped then global sub-sampled attention, each followed by a feed-forward.

    `x + local(x)`, `x + ff(x)`, `x + global(x)`, `x + ff(x)` on a feature map. The local
    attention runs within `local_patch_size` windows, with dropout on its output only; the
    global attention has every pixel attend to a map reduced by a `global_k x global_k`
    convolution of stride `global_k`. Without a local part (the last stage), only the last
    two steps remain.
    """

    local_attn: MapAttention | None
    local_ff: MapFeedForward | None
    global_attn: MapAttention
    global_ff: MapFeedForward

    def __init__(
        self,
        dim: int,
        local_patch_size: int | None,
        global_k: int,
        dropout: float,
        *,
        key: PRNGKeyArray,
    ):
        local_key, ff1_key, global_key, ff2_key = jr.split(key, 4)
        if local_patch_size is None:
            self.local_attn = self.local_ff = None
        else:
            self.local_attn = MapAttention(
                dim,
                heads=HEADS,
                dim_head=DIM_HEAD,
                dropout=dropout,
                projections="q_kv",
                window=local_patch_size,
                attn_dropout=False,
                key=local_key,
            )
            self.local_ff = MapFeedForward(dim, dim * MLP_MULT, dropout=dropout, key=ff1_key)
        self.global_attn = MapAttention(
            dim,
            heads=HEADS,
            dim_head=DIM_HEAD,
            dropout=dropout,
            projections="q_kv",
            kv_reduction=global_k,
            key=global_key,
        )
        self.global_ff = MapFeedForward(dim, dim * MLP_MULT, dropout=dropout, key=ff2_key)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        keys = split_key(key, 4)
        if self.local_attn is not None and self.local_ff is not None:
            x = x + self.local_attn(x, key=keys[0])
            x = x + self.local_ff(x, key=keys[1])
        x = x + self.global_attn(x, key=keys[2])
        return x + self.global_ff(x, key=keys[3])


class TwinsStage(eqx.Module):
    """Patch embedding, one `TwinsBlock`, a position encoding generator, `depth` blocks.

    The patches are flattened `(c p1 p2)` and embedded by channel LayerNorm → 1x1
    convolution → channel LayerNorm.
    """

    to_patch_embedding: PatchEmbedding
    first: TwinsBlock
    peg: PEG
    blocks: Stack[TwinsBlock] | None
    patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        dim_in: int,
        dim: int,
        patch_size: int,
        local_patch_size: int | None,
        global_k: int,
        depth: int,
        peg_kernel_size: int,
        dropout: float,
        *,
        key: PRNGKeyArray,
    ):
        embed_key, first_key, peg_key, blocks_key = jr.split(key, 4)
        self.to_patch_embedding = PatchEmbedding(
            dim_in, (patch_size, patch_size), dim, channels_first=True, key=embed_key
        )
        self.first = TwinsBlock(dim, local_patch_size, global_k, dropout, key=first_key)
        self.peg = PEG(dim, peg_kernel_size, key=peg_key)
        self.blocks = (
            Stack(
                lambda _, key: TwinsBlock(dim, local_patch_size, global_k, dropout, key=key),
                depth,
                key=blocks_key,
            )
            if depth > 0
            else None
        )
        self.patch_size = patch_size

    def __call__(
        self, x: Float[Array, "channels_in height_in width_in"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        first_key, blocks_key = split_key(key, 2)
        tokens = self.to_patch_embedding(x)
        x = tokens_to_grid(tokens, x.shape[1] // self.patch_size)
        x = self.peg(self.first(x, key=first_key))
        if self.blocks is not None:
            x = self.blocks(x, key=blocks_key)
        return x


class TwinsSVT(eqx.Module):
    """Twins-SVT, the spatially separable vision transformer.

    Four stages, each a patch embedding (`s{i}_patch_size`, to `s{i}_emb_dim` channels), one
    transformer block, a position encoding generator (a residual `peg_kernel_size`
    depthwise convolution) and `s{i}_depth` more blocks; then global average pooling and a
    Linear. A block alternates locally-grouped attention within `s{i}_local_patch_size`
    windows and global sub-sampled attention, whose keys and values come from an
    `s{i}_global_k` convolution of stride `s{i}_global_k`, each followed by a feed-forward
    block of width `4 · emb_dim`; all use channel LayerNorms and 1x1-convolution
    projections.

    Equal to `vit_pytorch.twins_svt.TwinsSVT`; load its weights with
    `eqx_vision.from_vit_pytorch`. Reference quirks reproduced:

    - the input has **3 channels**, and every attention has **8 heads of 64** dimensions,
      whatever `emb_dim`;
    - patches are flattened in `(c p1 p2)` order;
    - each stage has `1 + s{i}_depth` blocks, the PEG after the first;
    - the last stage has no local attention and no first feed-forward (and ignores
      `s4_local_patch_size`);
    - the local attention has no dropout on its probabilities, only on its output;
    - the key/value convolution has no padding, so a map that is not a multiple of
      `global_k` loses its last rows and columns there;
    - there is no norm before the head.

    The image height and width may differ. Each must be a multiple of `size_multiple`
    (the windows must tile every stage's map) and at least `min_size` (the key/value
    convolution must fit); for the default configuration both are 224. Other sizes are
    rejected when called.
    """

    stages: list[TwinsStage]
    mlp_head: Linear
    size_multiple: int = eqx.field(static=True)
    min_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        num_classes: Positive,
        s1_emb_dim: Positive = 64,
        s1_patch_size: Positive = 4,
        s1_local_patch_size: Positive = 7,
        s1_global_k: Positive = 7,
        s1_depth: NonNegative = 1,
        s2_emb_dim: Positive = 128,
        s2_patch_size: Positive = 2,
        s2_local_patch_size: Positive = 7,
        s2_global_k: Positive = 7,
        s2_depth: NonNegative = 1,
        s3_emb_dim: Positive = 256,
        s3_patch_size: Positive = 2,
        s3_local_patch_size: Positive = 7,
        s3_global_k: Positive = 7,
        s3_depth: NonNegative = 5,
        s4_emb_dim: Positive = 512,
        s4_patch_size: Positive = 2,
        s4_local_patch_size: Positive = 7,
        s4_global_k: Positive = 7,
        s4_depth: NonNegative = 4,
        peg_kernel_size: Annotated[int, Minimum(1), Odd("an even kernel changes the map size")] = 3,
        dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_classes`: number of output logits.
        - `s{i}_emb_dim`: channels of stage `i` (1 to 4).
        - `s{i}_patch_size`: side of the patches merged when entering stage `i`.
        - `s{i}_local_patch_size`: side of the local-attention windows of stage `i`
          (unused for stage 4).
        - `s{i}_global_k`: kernel and stride of the key/value reduction of the global
          attention of stage `i`.
        - `s{i}_depth`: blocks after the PEG in stage `i` (>= 0).
        - `peg_kernel_size`: kernel of the position encoding generators; odd.
        - `dropout`: dropout rate in the attention and feed-forward blocks.
        - `key`: a `jax.random.key` for the initialisation.
        """
        args = dict(locals())
        stage_configs = [
            {k[3:]: v for k, v in args.items() if k.startswith(f"s{i}_")} for i in range(1, 5)
        ]

        stage_keys = jr.split(key, 5)
        self.stages = []
        dim_in, stride = CHANNELS, 1
        multiple, min_size = 1, 1
        for i, cfg in enumerate(stage_configs):
            is_last = i == 3
            stride *= cfg["patch_size"]
            local = None if is_last else cfg["local_patch_size"]
            multiple = math.lcm(multiple, stride * (1 if local is None else local))
            min_size = max(min_size, stride * cfg["global_k"])
            self.stages.append(
                TwinsStage(
                    dim_in,
                    cfg["emb_dim"],
                    cfg["patch_size"],
                    local,
                    cfg["global_k"],
                    cfg["depth"],
                    peg_kernel_size,
                    dropout,
                    key=stage_keys[i],
                )
            )
            dim_in = cfg["emb_dim"]
        self.mlp_head = Linear(dim_in, num_classes, key=stage_keys[4])
        self.size_multiple = multiple
        self.min_size = -(-min_size // multiple) * multiple

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(3, height, width)`, each side a multiple of `size_multiple` and
          at least `min_size`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`.
        """
        name = type(self).__name__
        check_image(x, (CHANNELS, None, None), name)
        m, low = self.size_multiple, self.min_size
        if any(side % m or side < low for side in x.shape[1:]):
            raise ValueError(
                f"{name} takes images whose height and width are multiples of {m} and at least "
                f"{low} (so that every stage's windows tile its map and its key/value "
                f"convolution fits); got shape {tuple(x.shape)}."
            )
        check_key(self, key)
        for stage, stage_key in zip(self.stages, split_key(key, 4), strict=True):
            x = stage(x, key=stage_key)
        return self.mlp_head(x.mean(axis=(1, 2)))
