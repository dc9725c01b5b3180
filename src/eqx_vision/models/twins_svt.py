"""Twins-SVT: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers".

Chu et al., 2021, https://arxiv.org/abs/2104.13840.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    PEG,
    LayerNorm,
    Linear,
    MapAttention,
    MapFeedForward,
    PatchEmbedding,
    Stack,
    check_image,
    check_key,
    grid_to_tokens,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import (
    Interval,
    Minimum,
    NonNegative,
    Odd,
    Positive,
    Rate,
    checked_arguments,
)
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


HEADS = 8
DIM_HEAD = 64
MLP_MULT = 4
CHANNELS = 3


class TwinsBlock(eqx.Module):
    """Locally-grouped then global sub-sampled attention, each followed by a feed-forward.

    `x + local(x)`, `x + ff(x)`, `x + global(x)`, `x + ff(x)` on a feature map. The local
    attention runs within `local_patch_size` windows, with dropout on its output only; the
    global attention has every pixel attend to a map reduced by a `global_k x global_k`
    convolution of stride `global_k` (with `spatial_reduction`, a convolution to `dim`
    channels and a LayerNorm before the key/value projection). Without a local part (the
    last stage of vit-pytorch's model), only the last two steps remain. A `peg` passed to
    the call runs between the two halves.
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
        heads: int = HEADS,
        dim_head: int = DIM_HEAD,
        mlp_mult: int = MLP_MULT,
        norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        spatial_reduction: bool = False,
        key: PRNGKeyArray,
    ):
        local_key, ff1_key, global_key, ff2_key = jr.split(key, 4)
        attention = dict(
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
            projections="q_kv",
            qkv_bias=qkv_bias,
            norm_eps=norm_eps,
        )
        feedforward = dict(dropout=dropout, norm_eps=norm_eps)
        if local_patch_size is None:
            self.local_attn = self.local_ff = None
        else:
            self.local_attn = MapAttention(
                dim, window=local_patch_size, attn_dropout=False, key=local_key, **attention
            )
            self.local_ff = MapFeedForward(dim, dim * mlp_mult, key=ff1_key, **feedforward)
        if spatial_reduction:
            attention["spatial_reduction"] = True
        self.global_attn = MapAttention(dim, kv_reduction=global_k, key=global_key, **attention)
        self.global_ff = MapFeedForward(dim, dim * mlp_mult, key=ff2_key, **feedforward)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        *,
        peg: PEG | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `x`: the feature map.
        - `peg`: a position encoding generator to apply after the local half, if any.
        - `key`: needed only for dropout in training mode.

        **Returns:** a map of the same shape as `x`.
        """
        local_key, global_key = split_key(key, 2)
        return self.global_half(self.local_half(x, peg=peg, key=local_key), key=global_key)

    def local_half(
        self,
        x: Float[Array, "channels height width"],
        *,
        peg: PEG | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "channels height width"]:
        """The local attention and its feed-forward (if any), then `peg`: the input of the
        global attention."""
        keys = split_key(key, 2)
        if self.local_attn is not None and self.local_ff is not None:
            x = x + self.local_attn(x, key=keys[0])
            x = x + self.local_ff(x, key=keys[1])
        if peg is not None:
            x = peg(x)
        return x

    def global_half(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """The global sub-sampled attention and its feed-forward."""
        keys = split_key(key, 2)
        x = x + self.global_attn(x, key=keys[0])
        return x + self.global_ff(x, key=keys[1])


class TwinsStage(eqx.Module):
    """Patch embedding, one `TwinsBlock`, a position encoding generator, `depth` blocks.

    The patches are flattened `(c p1 p2)` and embedded by [channel LayerNorm →] 1x1
    convolution → channel LayerNorm. With `peg_after_local`, the PEG runs inside the first
    block, after its local half.
    """

    to_patch_embedding: PatchEmbedding
    first: TwinsBlock
    peg: PEG
    blocks: Stack[TwinsBlock] | None
    patch_size: int = eqx.field(static=True)
    peg_after_local: bool = eqx.field(static=True)

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
        patch_pre_norm: bool = True,
        peg_after_local: bool = False,
        key: PRNGKeyArray,
        **block_options: Any,
    ):
        embed_key, first_key, peg_key, blocks_key = jr.split(key, 4)
        self.to_patch_embedding = PatchEmbedding(
            dim_in,
            (patch_size, patch_size),
            dim,
            pre_norm=patch_pre_norm,
            channels_first=True,
            key=embed_key,
        )

        def block(key: PRNGKeyArray) -> TwinsBlock:
            return TwinsBlock(dim, local_patch_size, global_k, dropout, key=key, **block_options)

        self.first = block(first_key)
        self.peg = PEG(dim, peg_kernel_size, key=peg_key)
        self.blocks = Stack(lambda _, key: block(key), depth, key=blocks_key) if depth else None
        self.patch_size = patch_size
        self.peg_after_local = peg_after_local

    def __call__(
        self, x: Float[Array, "channels_in height_in width_in"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        first_key, blocks_key = split_key(key, 2)
        x = self.first_block(self.embed(x), key=first_key)
        if self.blocks is not None:
            x = self.blocks(x, key=blocks_key)
        return x

    def embed(
        self, x: Float[Array, "channels_in height_in width_in"]
    ) -> Float[Array, "channels height width"]:
        """The patch embedding, as a map."""
        return tokens_to_grid(self.to_patch_embedding(x), x.shape[1] // self.patch_size)

    def first_block(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """The first block and the PEG (inside it with `peg_after_local`)."""
        if self.peg_after_local:
            return self.first(x, peg=self.peg, key=key)
        return self.peg(self.first(x, key=key))


class TwinsSVT(eqx.Module):
    """Twins-SVT, the spatially separable vision transformer.

    Four stages, each a patch embedding (`s{i}_patch_size`, to `s{i}_emb_dim` channels), one
    transformer block, a position encoding generator (a residual `peg_kernel_size`
    depthwise convolution) and `s{i}_depth` more blocks; then global average pooling and a
    Linear. A block alternates locally-grouped attention within `s{i}_local_patch_size`
    windows and global sub-sampled attention, whose keys and values come from an
    `s{i}_global_k` convolution of stride `s{i}_global_k`, each followed by a feed-forward
    block of width `s{i}_mlp_mult · emb_dim`; all use channel LayerNorms and
    1x1-convolution projections, `s{i}_heads` heads of `s{i}_dim_head` dimensions.

    By default equal to `vit_pytorch.twins_svt.TwinsSVT`; load its weights with
    `eqx_vision.from_vit_pytorch`. Reference quirks reproduced:

    - every attention has **8 heads of 64** dimensions, whatever `emb_dim`;
    - patches are flattened in `(c p1 p2)` order;
    - each stage has `1 + s{i}_depth` blocks, the PEG after the first;
    - the last stage has no local attention and no first feed-forward (and ignores
      `s4_local_patch_size`);
    - the local attention has no dropout on its probabilities, only on its output;
    - the key/value convolution has no padding, so a map that is not a multiple of
      `global_k` loses its last rows and columns there;
    - there is no norm before the head.

    The options after `dropout` give the original model (timm's `Twins` with `wss`, the
    `twins_svt_*` names, loaded by `eqx_vision.from_timm`): with `qkv_bias`,
    `patch_pre_norm=False`, `spatial_reduction`, `last_stage_local`, `peg_after_local`,
    `final_norm`, `norm_eps=1e-6`, per-stage heads of `emb_dim / heads` dimensions and
    `global_k=1` in the last stage. timm counts `2 · (1 + s{i}_depth)` blocks per stage,
    one attention and one feed-forward each.

    The image height and width may differ. Each must be a multiple of `size_multiple`
    (the windows must tile every stage's map) and at least `min_size` (the key/value
    convolution must fit); for the default configuration both are 224. Other sizes are
    rejected when called.
    """

    stages: list[TwinsStage]
    norm: LayerNorm | None
    mlp_head: Linear | None
    size_multiple: int = eqx.field(static=True)
    min_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        num_classes: NonNegative,
        s1_emb_dim: Positive = 64,
        s1_patch_size: Positive = 4,
        s1_local_patch_size: Positive = 7,
        s1_global_k: Positive = 7,
        s1_depth: NonNegative = 1,
        s1_heads: Positive = HEADS,
        s1_dim_head: Positive = DIM_HEAD,
        s1_mlp_mult: Positive = MLP_MULT,
        s2_emb_dim: Positive = 128,
        s2_patch_size: Positive = 2,
        s2_local_patch_size: Positive = 7,
        s2_global_k: Positive = 7,
        s2_depth: NonNegative = 1,
        s2_heads: Positive = HEADS,
        s2_dim_head: Positive = DIM_HEAD,
        s2_mlp_mult: Positive = MLP_MULT,
        s3_emb_dim: Positive = 256,
        s3_patch_size: Positive = 2,
        s3_local_patch_size: Positive = 7,
        s3_global_k: Positive = 7,
        s3_depth: NonNegative = 5,
        s3_heads: Positive = HEADS,
        s3_dim_head: Positive = DIM_HEAD,
        s3_mlp_mult: Positive = MLP_MULT,
        s4_emb_dim: Positive = 512,
        s4_patch_size: Positive = 2,
        s4_local_patch_size: Positive = 7,
        s4_global_k: Positive = 7,
        s4_depth: NonNegative = 4,
        s4_heads: Positive = HEADS,
        s4_dim_head: Positive = DIM_HEAD,
        s4_mlp_mult: Positive = MLP_MULT,
        peg_kernel_size: Annotated[int, Minimum(1), Odd("an even kernel changes the map size")] = 3,
        dropout: Rate = 0.0,
        channels: Positive = CHANNELS,
        norm_eps: Annotated[float, Interval(0.0, 1.0)] = 1e-5,
        qkv_bias: bool = False,
        patch_pre_norm: bool = True,
        spatial_reduction: bool = False,
        last_stage_local: bool = False,
        peg_after_local: bool = False,
        final_norm: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_classes`: number of output logits; `0` returns the pooled features instead.
        - `s{i}_emb_dim`: channels of stage `i` (1 to 4).
        - `s{i}_patch_size`: side of the patches merged when entering stage `i`.
        - `s{i}_local_patch_size`: side of the local-attention windows of stage `i`
          (unused for stage 4 unless `last_stage_local`).
        - `s{i}_global_k`: kernel and stride of the key/value reduction of the global
          attention of stage `i` (1: no reduction).
        - `s{i}_depth`: blocks after the PEG in stage `i` (>= 0).
        - `s{i}_heads`, `s{i}_dim_head`: attention heads of stage `i` and their dimension.
        - `s{i}_mlp_mult`: feed-forward width of stage `i`, in multiples of `s{i}_emb_dim`.
        - `peg_kernel_size`: kernel of the position encoding generators; odd.
        - `dropout`: dropout rate in the attention and feed-forward blocks.
        - `channels`: channels of the input image.
        - `norm_eps`: epsilon of the LayerNorms before every attention and feed-forward
          (and of the final norm); the patch-embedding norms keep 1e-5.
        - `qkv_bias`: biases in the query, key and value projections.
        - `patch_pre_norm`: a LayerNorm on each flattened patch before its projection.
        - `spatial_reduction`: the global attention reduces the map with a `global_k`
          convolution to `emb_dim` channels (with bias) and a LayerNorm (eps 1e-5), then
          projects keys and values 1x1, instead of projecting them with the strided
          convolution itself.
        - `last_stage_local`: the last stage alternates local and global attention too.
        - `peg_after_local`: the PEG follows the local half of each stage's first block
          instead of the whole block.
        - `final_norm`: a LayerNorm over the channels before the pooling.
        - `key`: a `jax.random.key` for the initialisation.
        """
        args = dict(locals())
        stage_configs = [
            {k[3:]: v for k, v in args.items() if k.startswith(f"s{i}_")} for i in range(1, 5)
        ]
        options = dict(
            peg_kernel_size=peg_kernel_size,
            dropout=dropout,
            norm_eps=norm_eps,
            qkv_bias=qkv_bias,
            patch_pre_norm=patch_pre_norm,
            spatial_reduction=spatial_reduction,
            peg_after_local=peg_after_local,
        )
        stage_keys = jr.split(key, 5)
        self.stages, self.size_multiple, self.min_size = _stages(
            stage_configs, channels, last_stage_local, options, list(stage_keys[:4])
        )
        dim = stage_configs[-1]["emb_dim"]
        self.norm = LayerNorm(dim, eps=norm_eps) if final_norm else None
        self.mlp_head = Linear(dim, num_classes, key=stage_keys[4]) if num_classes else None
        self.channels = channels

    def _check_size(self, height: int, width: int, got: str) -> None:
        m, low = self.size_multiple, self.min_size
        if any(side % m or side < low for side in (height, width)):
            raise ValueError(
                f"{type(self).__name__} takes images whose height and width are multiples of "
                f"{m} and at least {low} (so that every stage's windows tile its map and its "
                f"key/value convolution fits); got {got}."
            )

    def _check(self, x: Float[Array, "channels height width"]) -> None:
        check_image(x, (self.channels, None, None), type(self).__name__)
        self._check_size(x.shape[1], x.shape[2], f"shape {tuple(x.shape)}")

    def _final_norm(self, x: Float[Array, "dim h w"]) -> Float[Array, "dim h w"]:
        if self.norm is None:
            return x
        return self.norm(x.transpose(1, 2, 0)).transpose(2, 0, 1)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's output map, of stride the
        product of the patch sizes so far."""
        info, stride = [], 1
        for i, stage in enumerate(self.stages):
            stride *= stage.patch_size
            dim = stage.to_patch_embedding.linear.weight.shape[0]
            info.append(FeatureInfo(i, f"stages[{i}]", dim, (stride, stride)))
        return tuple(info)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dim h w"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, each side a multiple of
          `size_multiple` and at least `min_size`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's map `(s4_emb_dim, h, w)`, after the final norm with
        `final_norm` (timm's `forward_features`, as a map).
        """
        self._check(x)
        check_key(self, key)
        for stage, stage_key in zip(self.stages, split_key(key, 4), strict=True):
            x = stage(x, key=stage_key)
        return self._final_norm(x)

    def forward_head(
        self, x: Float[Array, "dim h w"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or the mean of the map `(s4_emb_dim,)` with `pre_logits`
        or without a head.
        """
        pooled = x.mean(axis=(1, 2))
        if pre_logits or self.mlp_head is None:
            return pooled
        return self.mlp_head(pooled)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the output maps of chosen stages.

        **Arguments:**

        - `x`: one image, as `__call__` takes it.
        - `indices`: which stages (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: apply the final norm (with `final_norm`) to the last stage's output, the
          only one it fits (as timm).
        - `output_fmt`: `"map"` for `(channels, h, w)` maps, `"tokens"` for `(h * w,
          channels)` sequences.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stacks.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.stages), name)
        self._check(x)
        check_key(self, key)
        maps = []
        for stage, stage_key in zip(self.stages, split_key(key, 4), strict=True):
            x = stage(x, key=stage_key)
            maps.append(x)
        final = self._final_norm(x)
        outputs = []
        for i in chosen:
            y = final if norm and i == len(self.stages) - 1 else maps[i]
            outputs.append(grid_to_tokens(y) if output_fmt == "tokens" else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "TwinsSVT":
        """This model for `(height, width)` images: itself, which takes every size whose
        sides are multiples of `size_multiple` and at least `min_size` (it has no position
        embeddings; its windows and key/value reductions are fixed in pixels of each stage's
        map), or a `ValueError` for another size (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        height, width = int(image_size[0]), int(image_size[1])
        self._check_size(height, width, f"image_size {(height, width)}")
        return self

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "TwinsSVT":
        """This model with a new classifier of `num_classes` outputs, or none for `0` (see
        [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            dim = self.feature_info[-1].channels
            head = Linear(dim, num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, each side a multiple of
          `size_multiple` and at least `min_size`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`; with `num_classes=0`, the pooled
        features, `(s4_emb_dim,)`: `forward_head(forward_features(x))`.
        """
        return self.forward_head(self.forward_features(x, key=key))


def _stages(
    configs: list[dict[str, Any]],
    channels: int,
    last_stage_local: bool,
    options: dict[str, Any],
    keys: list[PRNGKeyArray],
) -> tuple[list[TwinsStage], int, int]:
    """The four stages, the multiple every image side must be and the least side."""
    stages = []
    dim_in, stride = channels, 1
    multiple, min_size = 1, 1
    for i, cfg in enumerate(configs):
        stride *= cfg["patch_size"]
        local = cfg["local_patch_size"] if i < 3 or last_stage_local else None
        multiple = math.lcm(multiple, stride * (1 if local is None else local))
        min_size = max(min_size, stride * cfg["global_k"])
        stages.append(
            TwinsStage(
                dim_in,
                cfg["emb_dim"],
                cfg["patch_size"],
                local,
                cfg["global_k"],
                cfg["depth"],
                heads=cfg["heads"],
                dim_head=cfg["dim_head"],
                mlp_mult=cfg["mlp_mult"],
                key=keys[i],
                **options,
            )
        )
        dim_in = cfg["emb_dim"]
    return stages, multiple, -(-min_size // multiple) * multiple
