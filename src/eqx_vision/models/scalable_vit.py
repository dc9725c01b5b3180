"""ScalableViT: "ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer".

Yang et al., 2022, https://arxiv.org/abs/2203.10790.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any, cast

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    PEG,
    ChannelLayerNorm,
    Conv2d,
    LayerNorm,
    Linear,
    MapAttention,
    MapFeedForward,
    Stack,
    check_key,
    check_windowed_image,
    grid_to_tokens,
    size_multiple as find_size_multiple,
    split_key,
)
from ..layers._checks import (
    Minimum,
    NonEmpty,
    NonNegative,
    PerStage,
    Positive,
    Rate,
    checked_arguments,
)
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


# One value for every stage or one per stage (the reference's `cast_tuple(value, len(depth))`),
# passed to `__init__` as a tuple with one value per stage.
StageInts = Annotated[Positive | Sequence[Positive], PerStage("len(depth)")]
StageWindows = Annotated[Positive | None | Sequence[Positive | None], PerStage("len(depth)")]


class ScalableBlock(eqx.Module):
    """One block as the reference runs it: SSA → FF → [PEG] → FF → IWSA.

    Scalable self-attention (keys and values from a stride-`r` convolution of the map),
    feed-forward, the position generator (first block of a stage only), a second
    feed-forward, then interactive windowed self-attention; every branch but the PEG is a
    pre-norm residual.
    """

    ssa: MapAttention
    ff1: MapFeedForward
    peg: PEG | None
    ff2: MapFeedForward
    iwsa: MapAttention

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        ff_expansion_factor: int,
        dropout: float,
        ssa_dim_key: int,
        ssa_dim_value: int,
        reduction_factor: int,
        iwsa_dim_key: int,
        iwsa_dim_value: int,
        window_size: int | None,
        peg: bool,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        self.ssa = MapAttention(
            dim,
            heads=heads,
            dim_head=ssa_dim_key,
            dim_value=ssa_dim_value,
            dropout=dropout,
            projections="q_k_v",
            kv_reduction=reduction_factor,
            key=k1,
        )
        hidden = dim * ff_expansion_factor
        self.ff1 = MapFeedForward(dim, hidden, dropout=dropout, key=k2)
        self.peg = PEG(dim, 3, key=k3) if peg else None
        self.ff2 = MapFeedForward(dim, hidden, dropout=dropout, key=k4)
        self.iwsa = MapAttention(
            dim,
            heads=heads,
            dim_head=iwsa_dim_key,
            dim_value=iwsa_dim_value,
            dropout=dropout,
            projections="q_k_v",
            window=window_size,
            value_conv=3,
            key=k5,
        )

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        first_key, iwsa_key = split_key(key, 2)
        x = self.before_iwsa(x, key=first_key)
        return x + self.iwsa(x, key=iwsa_key)

    def before_iwsa(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """SSA, FF, [PEG], FF: the input of the windowed attention."""
        k1, k2, k3 = split_key(key, 3)
        x = x + self.ssa(x, key=k1)
        x = x + self.ff1(x, key=k2)
        if self.peg is not None:
            x = self.peg(x)
        return x + self.ff2(x, key=k3)


class ScalableStage(eqx.Module):
    """A stage: the first block (with the PEG), a scanned stack of the others, then a
    channel LayerNorm and a stride-2 3x3 convolution doubling the channels (both absent
    in the last stage)."""

    first: ScalableBlock | None
    rest: Stack[ScalableBlock] | None
    norm: ChannelLayerNorm | None
    downsample: Conv2d | None

    def __init__(self, dim: int, depth: int, *, last: bool, key: PRNGKeyArray, **block_options):
        first_key, rest_key, down_key = jr.split(key, 3)

        def make_block(index: int, *, key: PRNGKeyArray) -> ScalableBlock:
            return ScalableBlock(dim, peg=False, key=key, **block_options)

        self.first = ScalableBlock(dim, peg=True, key=first_key, **block_options) if depth else None
        self.rest = Stack(make_block, depth - 1, key=rest_key) if depth > 1 else None
        self.norm = None if last else ChannelLayerNorm(dim)
        self.downsample = (
            None if last else Conv2d(dim, 2 * dim, 3, stride=2, padding=1, key=down_key)
        )

    def encode(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """The blocks and the channel LayerNorm: the stage's output map (vit-pytorch's
        `Transformer`), before the downsampling."""
        first_key, rest_key = split_key(key, 2)
        if self.first is not None:
            x = self.first(x, key=first_key)
        if self.rest is not None:
            x = self.rest(x, key=rest_key)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "out_channels out_height out_width"]:
        x = self.encode(x, key=key)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class ScalableViT(eqx.Module):
    """ScalableViT, a hierarchical vision transformer alternating scalable self-attention
    (SSA) and interactive windowed self-attention (IWSA).

    A 7x7 stride-4 convolution makes the first map; each stage `i` (of `len(depth)`) works
    on `dim * 2**i` channels with `depth[i]` blocks, then (but the last) a channel LayerNorm
    and a stride-2 convolution. SSA takes its keys and values from an `r x r` stride-`r`
    convolution of the map (`reduction_factor`); IWSA attends within windows
    (`window_size`, `None` for the whole map) and adds a 3x3 convolution of the full value
    map (the local interactive module) before its output projection. The last map is
    averaged and classified by `LayerNorm → Linear`.

    Equal to `vit_pytorch.scalable_vit.ScalableViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. Reproduced from the reference:

    - **Block order.** The reference builds each block as `[SSA, FF, PEG, FF, IWSA]` but
      unpacks it as `(ssa, ff1, peg, iwsa, ff2)`, so what runs is
      **SSA → FF → PEG → FF → IWSA**: the fourth module (`layers.i.3` in the state dict, a
      feed-forward) runs where IWSA should, and IWSA (`layers.i.4`) runs last.
    - The PEG (a residual 3x3 depthwise convolution) is only in the first block of each
      stage.
    - The SSA key/value convolutions have no bias and no padding; a map side that is not
      a multiple of the reduction factor is floored.

    The image sides accepted are those for which every stage's map is tiled by its IWSA
    window and is at least its reduction factor, as in the reference; `size_multiple` is
    the smallest side whose multiples all work (256 for the reference usage configuration).
    """

    to_patches: Conv2d
    stages: tuple[ScalableStage, ...]
    norm: LayerNorm
    head: Linear | None
    channels: int = eqx.field(static=True)
    reduction_factor: tuple[int, ...] = eqx.field(static=True)
    window_size: tuple[int | None, ...] = eqx.field(static=True)
    size_multiple: int | None = eqx.field(static=True)
    smallest_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        num_classes: NonNegative,
        dim: Positive,
        depth: Annotated[Sequence[int], NonEmpty(), Minimum(0)],
        heads: StageInts,
        reduction_factor: StageInts,
        window_size: StageWindows = None,
        iwsa_dim_key: StageInts = 32,
        iwsa_dim_value: StageInts = 32,
        ssa_dim_key: StageInts = 32,
        ssa_dim_value: StageInts = 32,
        ff_expansion_factor: Positive = 4,
        channels: Positive = 3,
        dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_classes`: number of output logits; `0` returns the pooled features instead.
        - `dim`: channels of the first stage; stage `i` has `dim * 2**i`.
        - `depth`: a tuple, the number of blocks of each stage; its length is the number
          of stages.
        - `heads`: attention heads per stage (an int for all, or one per stage).
        - `reduction_factor`: the SSA key/value reduction per stage (an int or one per
          stage).
        - `window_size`: the IWSA window side per stage (an int, `None` for the whole map,
          or one per stage).
        - `iwsa_dim_key`, `iwsa_dim_value`, `ssa_dim_key`, `ssa_dim_value`: per-head
          query/key and value dimensions of the two attentions (an int or one per stage).
        - `ff_expansion_factor`: the feed-forward hidden width, as a multiple of the
          stage's channels.
        - `channels`: input channels.
        - `dropout`: dropout rate on the attention probabilities and outputs and in the
          feed-forward blocks.
        - `key`: a `jax.random.key` for the initialisation.
        """
        num_stages = len(depth)
        # checked_arguments passes every per-stage argument as a tuple of `num_stages`
        per_stage = {
            name: cast(tuple[int, ...], value)
            for name, value in (
                ("heads", heads),
                ("ssa_dim_key", ssa_dim_key),
                ("ssa_dim_value", ssa_dim_value),
                ("reduction_factor", reduction_factor),
                ("iwsa_dim_key", iwsa_dim_key),
                ("iwsa_dim_value", iwsa_dim_value),
            )
        }
        windows = cast(tuple[int | None, ...], window_size)

        keys = jr.split(key, num_stages + 2)
        self.to_patches = Conv2d(channels, dim, 7, stride=4, padding=3, key=keys[0])
        self.stages = tuple(
            ScalableStage(
                dim * 2**i,
                depth[i],
                last=i == num_stages - 1,
                heads=per_stage["heads"][i],
                ff_expansion_factor=ff_expansion_factor,
                dropout=dropout,
                ssa_dim_key=per_stage["ssa_dim_key"][i],
                ssa_dim_value=per_stage["ssa_dim_value"][i],
                reduction_factor=per_stage["reduction_factor"][i],
                iwsa_dim_key=per_stage["iwsa_dim_key"][i],
                iwsa_dim_value=per_stage["iwsa_dim_value"][i],
                window_size=windows[i],
                key=keys[i + 1],
            )
            for i in range(num_stages)
        )
        last_dim = dim * 2 ** (num_stages - 1)
        self.norm = LayerNorm(last_dim)
        self.head = Linear(last_dim, num_classes, key=keys[-1]) if num_classes else None
        self.channels = channels
        self.reduction_factor = per_stage["reduction_factor"]
        self.window_size = windows
        period = math.lcm(*(4 * 2**i * w for i, w in enumerate(windows) if w is not None))
        self.size_multiple = find_size_multiple(lambda n: self._fit(n) is None, period=period)
        fitting = next((n for n in range(1, 1 << 14) if self._fit(n) is None), None)
        if fitting is None:  # pragma: no cover - a window of 1 always fits some size
            raise ValueError(f"no image size fits window_size {windows}.")
        self.smallest_size = fitting

    def _fit(self, side: int) -> str | None:
        """Why an image side of `side` pixels does not fit, or `None` if it does."""
        n = (side - 1) // 4 + 1
        for i, (r, w) in enumerate(zip(self.reduction_factor, self.window_size, strict=True)):
            if i:
                n = (n - 1) // 2 + 1
            if n < r:
                return f"the stage-{i + 1} map side {n} is smaller than reduction_factor {r}"
            if w is not None and n % w:
                return f"the stage-{i + 1} map side {n} is not a multiple of window_size {w}"
        return None

    def _check(self, x: Float[Array, "channels height width"]) -> None:
        check_windowed_image(
            x,
            self.channels,
            self._fit,
            self.size_multiple,
            self.smallest_size,
            type(self).__name__,
        )

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's map after its blocks and its
        channel LayerNorm (before the downsampling), stage `i` of stride `4 · 2^i`."""
        dim = self.to_patches.weight.shape[0]
        return tuple(
            FeatureInfo(i, f"stages[{i}]", dim * 2**i, (4 * 2**i, 4 * 2**i))
            for i in range(len(self.stages))
        )

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dim h w"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with sides the windows fit (see the
          class docstring).
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's map `(channels, h, w)` (the head's LayerNorm follows
        the pooling, in `forward_head`).
        """
        self._check(x)
        check_key(self, key)
        x = self.to_patches(x)
        for stage, stage_key in zip(self.stages, split_key(key, len(self.stages)), strict=True):
            x = stage(x, key=stage_key)
        return x

    def forward_head(
        self, x: Float[Array, "dim h w"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the mean of the
        map after the LayerNorm, `(channels,)`.
        """
        pooled = self.norm(x.mean(axis=(1, 2)))
        if pre_logits or self.head is None:
            return pooled
        return self.head(pooled)

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
        - `norm`: no effect: every stage but the last ends with its own channel LayerNorm,
          and the head's LayerNorm acts on the pooled vector, not on a map.
        - `output_fmt`: `"map"` for `(channels, h, w)` maps, `"tokens"` for `(h * w,
          channels)` sequences.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stacks.
        """
        del norm
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.stages), name)
        self._check(x)
        check_key(self, key)
        x = self.to_patches(x)
        maps = []
        for stage, stage_key in zip(self.stages, split_key(key, len(self.stages)), strict=True):
            x = stage.encode(x, key=stage_key)
            maps.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        outputs = [grid_to_tokens(maps[i]) if output_fmt == "tokens" else maps[i] for i in chosen]
        return outputs if intermediates_only else (x, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "ScalableViT":
        """This model for `(height, width)` images: itself, which takes every size whose
        stage maps its windows tile and its reductions fit (it has no position embeddings,
        and its windows are fixed in pixels of each stage's map), or a `ValueError` naming
        why a side does not fit (see [`set_image_size`][eqx_vision.set_image_size])."""
        name = type(self).__name__
        for side, axis in zip(image_size, ("height", "width"), strict=True):
            reason = f"it has {side} pixels" if side < 1 else self._fit(int(side))
            if reason is not None:
                hint = (
                    f"sides that are multiples of {self.size_multiple} fit"
                    if self.size_multiple is not None
                    else f"the smallest side that fits is {self.smallest_size}"
                )
                raise ValueError(
                    f"{name} cannot take images of size {tuple(image_size)}: for the {axis}, "
                    f"{reason}; {hint}."
                )
        return self

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "ScalableViT":
        """This model with a new classifier of `num_classes` outputs after the head's
        LayerNorm, or none for `0` (see [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.norm.weight.shape[0], num_classes, key=key)
        return eqx.tree_at(lambda m: m.head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with sides the windows fit (see the
          class docstring).
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`; with `num_classes=0`, the pooled
        features after the LayerNorm: `forward_head(forward_features(x))`.
        """
        return self.forward_head(self.forward_features(x, key=key))
