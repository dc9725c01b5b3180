"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference".

Graham et al., 2021, https://arxiv.org/abs/2104.01136.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..layers import (
    BatchNorm,
    Conv2d,
    ConvBN,
    FeedForward,
    Linear,
    MapAttention,
    Stack,
    attend,
    attention_bias_indices,
    check_image,
    check_key,
    gelu,
    grid_to_tokens,
    merge_heads,
    replace,
    resize_bicubic,
    split_heads,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import (
    Minimum,
    NonEmpty,
    NonNegative,
    PerStage,
    Positive,
    PositivePair,
    Rate,
    checked_arguments,
)
from ..layers._init import full
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


IN_CHANNELS = 3  # hard-coded in the reference's stem


def pos_indices(fmap_size: int, downsample: bool) -> Int[np.ndarray, "q_seq kv_seq"]:
    """The attention-bias index of every (query, key) pair: `|Δrow| * fmap_size + |Δcol|`,
    with queries on every second row and column in downsampling blocks (`downsample`): the
    reference's `pos_indices` buffer, as `attention_bias_indices` computes it."""
    return attention_bias_indices(fmap_size, 2 if downsample else 1)


def hard_swish(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`x * relu6(x + 3) / 6`, as `torch.nn.Hardswish`."""
    return jax.nn.hard_swish(x)


class LeViTBlock(eqx.Module):
    """`[x +] attn(x)` then `x + ff(x)`, the feed-forward (1x1 conv → Hardswish → 1x1 conv)
    acting on every pixel. The attention residual is dropped in downsampling blocks.

    The attention is a `MapAttention` with LeViT's options: queries, keys and values from
    1x1 convs each followed by BatchNorm (the queries with stride 2 in downsampling
    blocks), scores `q kᵀ · dim_key^-1/2` plus the learned bias
    `B[|Δrow| * fmap_size + |Δcol|, head] · dim_key^1/2` (the reference adds
    `bias / scale`), and the output path GELU → 1x1 conv (bias) → BatchNorm, whose weight
    starts at zero.
    """

    attn: MapAttention
    ff: FeedForward
    attn_residual: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        *,
        heads: int,
        dim_key: int,
        dim_value: int,
        mlp_mult: int,
        dropout: float,
        dim_out: int | None = None,
        downsample: bool = False,
        key: PRNGKeyArray,
    ):
        attn_key, ff_key = jr.split(key)
        dim_out = dim if dim_out is None else dim_out
        attn = MapAttention(
            dim,
            heads=heads,
            dim_head=dim_key,
            dim_value=dim_value,
            dim_out=dim_out,
            dropout=dropout,
            projection="conv_bn",
            projections="q_k_v",
            norm=False,
            q_stride=2 if downsample else 1,
            bias_map_size=fmap_size,
            gelu_before_out=True,
            key=attn_key,
        )
        to_out = attn.to_out
        assert isinstance(to_out, ConvBN)
        to_out = eqx.tree_at(lambda c: c.bn.weight, to_out, full((dim_out,), 0.0))
        self.attn = eqx.tree_at(lambda a: a.to_out, attn, to_out)
        self.ff = FeedForward(
            dim_out,
            dim_out * mlp_mult,
            dropout=dropout,
            norm=False,
            activation=hard_swish,
            key=ff_key,
        )
        self.attn_residual = not downsample and dim == dim_out

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        attn_key, ff_key = split_key(key, 2)
        y, state = self.attn(x, state, key=attn_key)
        x = x + y if self.attn_residual else y
        y = self.ff(grid_to_tokens(x), key=ff_key)
        return x + tokens_to_grid(y, x.shape[1]), state


# An int for every stage, or a tuple of up to `stages` ints padded with its last one (the
# reference's `cast_tuple`), passed to `__init__` as a tuple of `stages` ints.
StageInts = Annotated[int | tuple[int, ...], PerStage("stages", pad=True), Minimum(1)]


class LeViT(eqx.Module):
    """LeViT: a convolutional stem, then stages of attention blocks on shrinking maps.

    The stem is four 3x3 stride-2 convolutions (16x downsampling). Each stage is a scanned
    stack of blocks (attention with a learned attention bias, then a Hardswish
    feed-forward), and between stages a downsampling block halves the map with strided
    queries. The last map is averaged and fed to a linear head, and optionally to a
    distillation head.

    Equal to `vit_pytorch.levit.LeViT`; load its weights with
    `model, state = eqx_vision.from_vit_pytorch(model, sd, state=state)`. The BatchNorm
    statistics live in an `eqx.nn.State`: build the model with `eqx.nn.make_with_state`,
    and in training map it with `jax.vmap(model, axis_name="batch", in_axes=(0, None),
    out_axes=(0, None))` so that the statistics are taken over the batch, as torch does.

    Reproduced from the reference:

    - 3 input channels, hard-coded (there is no `channels` argument); the stem convolutions
      have biases and nothing between them (no activation, no norm); there is no
      LayerNorm anywhere;
    - the attention bias is an `Embedding(fmap_size², heads)` indexed by
      `|Δrow| * fmap_size + |Δcol|` (absolute offsets, so mirrored offsets share a bias),
      with queries on every second row and column in downsampling blocks, and it is added
      as `bias / scale`, i.e. times `dim_key ** 0.5`, after the scores are scaled. The
      stored `pos_indices` buffers are checked on load and recomputed as constants;
    - the output BatchNorm of every attention starts with weight zero, so at
      initialisation the first downsampling block (which has no attention residual)
      outputs a constant and the model's inference output does not depend on its input;
    - downsampling blocks have twice the heads, a feed-forward expansion of 2 and no
      dropout, whatever `mlp_mult` and `dropout` are;
    - `dim`, `depth` and `heads` may be tuples shorter than `stages`, padded with their last
      value;
    - BatchNorm has torch's train-mode semantics (biased variance to normalise, unbiased
      variance in the running average, momentum 0.1, eps 1e-5).

    Only images of exactly `image_size` are accepted, and `image_size` must be a multiple
    of 16 (the reference fails for any other size).
    """

    conv_embedding: tuple[Conv2d, Conv2d, Conv2d, Conv2d]
    stages: tuple[Stack[LeViTBlock], ...]
    downsamples: tuple[LeViTBlock, ...]
    mlp_head: Linear | None
    distill_head: Linear | None
    image_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        num_classes: NonNegative,
        dim: StageInts,
        depth: StageInts,
        heads: StageInts,
        mlp_mult: Positive,
        stages: Positive = 3,
        dim_key: Positive = 32,
        dim_value: Positive = 64,
        dropout: Rate = 0.0,
        num_distill_classes: Positive | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: height and width of the (square) images; a multiple of 16.
        - `num_classes`: number of output logits; `0` for no heads (the model then returns
          the pooled features).
        - `dim`: channels of each stage, an int or a tuple (one per stage).
        - `depth`: blocks in each stage, an int or a tuple.
        - `heads`: attention heads in each stage, an int or a tuple.
        - `mlp_mult`: feed-forward expansion factor of the stage blocks.
        - `stages`: number of stages.
        - `dim_key`, `dim_value`: query/key and value dimension of each head.
        - `dropout`: dropout rate in the stage blocks.
        - `num_distill_classes`: if given, a second linear head whose logits are returned
          too (the distillation token's head of DeiT-style training).
        - `key`: a `jax.random.key` for the initialisation.
        """
        if image_size % 16:
            raise ValueError(
                f"image_size must be a multiple of 16 (the stem downsamples 16 times); got "
                f"{image_size}."
            )
        # checked_arguments passes every per-stage argument as a tuple of `stages` ints
        dims, depths = cast(tuple[int, ...], dim), cast(tuple[int, ...], depth)
        layer_heads = cast(tuple[int, ...], heads)

        stem_key, stage_key, down_key, head_key, distill_key = jr.split(key, 5)
        widths = [IN_CHANNELS, 32, 64, 128, dims[0]]
        convs = [
            Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, key=k)
            for i, k in enumerate(jr.split(stem_key, 4))
        ]
        self.conv_embedding = (convs[0], convs[1], convs[2], convs[3])

        fmap = image_size // 16
        stage_list, down_list = [], []
        stage_keys, down_keys = jr.split(stage_key, stages), jr.split(down_key, stages)
        for i in range(stages):

            def make_block(index: int, *, key: PRNGKeyArray, i: int = i, fmap: int = fmap):
                del index
                return LeViTBlock(
                    dims[i],
                    fmap,
                    heads=layer_heads[i],
                    dim_key=dim_key,
                    dim_value=dim_value,
                    mlp_mult=mlp_mult,
                    dropout=dropout,
                    key=key,
                )

            stage_list.append(Stack(make_block, depths[i], key=stage_keys[i]))
            if i < stages - 1:
                down_list.append(
                    LeViTBlock(
                        dims[i],
                        fmap,
                        heads=layer_heads[i] * 2,
                        dim_key=dim_key,
                        dim_value=dim_value,
                        mlp_mult=2,
                        dropout=0.0,
                        dim_out=dims[i + 1],
                        downsample=True,
                        key=down_keys[i],
                    )
                )
                fmap = math.ceil(fmap / 2)
        self.stages = tuple(stage_list)
        self.downsamples = tuple(down_list)
        self.mlp_head = Linear(dims[-1], num_classes, key=head_key) if num_classes else None
        self.distill_head = (
            None
            if num_distill_classes is None or not num_classes
            else Linear(dims[-1], num_distill_classes, key=distill_key)
        )
        self.image_size = image_size

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's output map (before the
        downsampling block that follows it), of reduction `16 * 2 ** i`."""
        return tuple(
            FeatureInfo(i, f"stages[{i}]", _levit_width(stage), (16 * 2**i, 16 * 2**i))
            for i, stage in enumerate(self.stages)
        )

    def _forward(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        key: PRNGKeyArray | None,
    ) -> tuple[tuple[Float[Array, "dim h w"], list[Array]], eqx.nn.State]:
        check_key(self, key)
        check_image(x, (IN_CHANNELS, self.image_size, self.image_size), type(self).__name__)
        keys = split_key(key, len(self.stages) + len(self.downsamples))
        stage_keys, down_keys = keys[: len(self.stages)], keys[len(self.stages) :]
        for conv in self.conv_embedding:
            x = conv(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x, state = stage.call_with_state(x, state, key=stage_keys[i])
            outputs.append(x)
            if i < len(self.downsamples):
                x, state = self.downsamples[i](x, state, key=down_keys[i])
        return (x, outputs), state

    def forward_features(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "dim fmap_height fmap_width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(3, image_size, image_size)`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's map `(dim[-1], height, width)` and the updated state.
        """
        (final, _), state = self._forward(x, state, key)
        return final, state

    def forward_head(
        self,
        x: Float[Array, "dim fmap_height fmap_width"],
        state: eqx.nn.State,
        *,
        pre_logits: bool = False,
    ) -> tuple[Any, eqx.nn.State]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `state`: the BatchNorm statistics (returned as they are: the heads have none).
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits (with a distillation head, the pair `(logits,
        distill_logits)`), or the map's mean `(dim,)` with `pre_logits` or without a head;
        and the state.
        """
        pooled = jnp.mean(x, axis=(1, 2))
        if pre_logits or self.mlp_head is None:
            return pooled, state
        logits = self.mlp_head(pooled)
        if self.distill_head is None:
            return logits, state
        return (logits, self.distill_head(pooled)), state

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Any, eqx.nn.State]:
        """The final features and the output maps of chosen stages.

        **Arguments:**

        - `x`: one image, `(3, image_size, image_size)`.
        - `state`: the BatchNorm statistics.
        - `indices`: which stages (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; LeViT has no norm after its stages.
        - `output_fmt`: `"map"` for `(channels, height, width)` maps, `"tokens"` for
          `(height * width, channels)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `((forward_features(x), outputs), state)`, or `(outputs, state)` with
        `intermediates_only`; `outputs` is a list in the order of `indices`.
        """
        del norm
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.stages), name)
        (final, maps), state = self._forward(x, state, key)
        outputs = [maps[i] if output_fmt == "map" else grid_to_tokens(maps[i]) for i in chosen]
        return (outputs if intermediates_only else (final, outputs)), state

    def set_image_size(self, image_size: tuple[int, int]) -> "LeViT":
        """This model for `(size, size)` images, `size` a multiple of 16: every attention
        bias table (one `(map, map)` table of absolute offsets per head) resized
        bicubically with antialiasing to the new map, as timm's
        `resize_rel_pos_bias_table_levit` resizes LeViT-style tables (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        if image_size[0] != image_size[1] or image_size[0] % 16:
            raise ValueError(
                f"LeViT takes square images whose side is a multiple of 16; got image_size "
                f"{tuple(image_size)}."
            )
        size = int(image_size[0])
        if size == self.image_size:
            return self
        fmap = size // 16
        stages, downs = [], []
        for i, stage in enumerate(self.stages):
            attn = _resized_bias(stage.blocks.attn, fmap, stacked=True)
            stages.append(replace(stage, blocks=replace(stage.blocks, attn=attn)))
            if i < len(self.downsamples):
                down = self.downsamples[i]
                downs.append(replace(down, attn=_resized_bias(down.attn, fmap, stacked=False)))
                fmap = math.ceil(fmap / 2)
        return replace(self, stages=tuple(stages), downsamples=tuple(downs), image_size=size)

    def reset_head(
        self,
        num_classes: int,
        *,
        key: PRNGKeyArray | None = None,
        state: eqx.nn.State | None = None,
    ) -> "LeViT | tuple[LeViT, eqx.nn.State]":
        """This model with a new linear head (and distillation head, if it has one) of
        `num_classes` outputs, or none for `0` (see [`reset_head`][eqx_vision.reset_head]).
        The heads hold no statistics: a `state` given is returned with the model."""
        dim = _levit_width(self.stages[-1])
        head = dist = None
        if num_classes > 0:
            assert key is not None
            head_key, dist_key = jr.split(key)
            head = Linear(dim, num_classes, key=head_key)
            if self.distill_head is not None:
                dist = Linear(dim, num_classes, key=dist_key)
        model = eqx.tree_at(
            lambda m: (m.mlp_head, m.distill_head),
            self,
            (head, dist),
            is_leaf=lambda n: n is None,
        )
        return model if state is None else (model, state)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Any, eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(3, image_size, image_size)`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)` — or, with `num_distill_classes`, the pair
        `(logits, distill_logits)` of shapes `(num_classes,)` and `(num_distill_classes,)`;
        with `num_classes=0`, the pooled features `(dim[-1],)` — and the updated state
        (unchanged in inference mode): `forward_head(*forward_features(x, state))`.
        """
        x, state = self.forward_features(x, state, key=key)
        return self.forward_head(x, state)


def _levit_width(stage: Stack[LeViTBlock]) -> int:
    """The channels of a stage's map (the input channels of its query projections)."""
    to_q = stage.blocks.attn.to_q
    assert isinstance(to_q, ConvBN)
    return to_q.conv.weight.shape[-3]


def resize_bias_table(
    table: Float[Array, "heads height width"], size: tuple[int, int]
) -> Float[Array, "heads new_height new_width"]:
    """An attention-bias table of absolute offsets, one `(height, width)` map per head,
    resized bicubically with antialiasing (in float32) as timm's
    `resize_rel_pos_bias_table_levit` does; the same size returns it unchanged."""
    if tuple(table.shape[1:]) == tuple(size):
        return table
    return resize_bicubic(table.astype(jnp.float32), size, antialias=True).astype(table.dtype)


def _resized_bias(attn: MapAttention, fmap: int, *, stacked: bool) -> MapAttention:
    """A LeViT attention (of a stack's blocks with `stacked`) whose learned bias is for
    keys on an `fmap x fmap` map."""
    assert attn.pos_bias is not None and attn.bias_map_size is not None
    old = attn.bias_map_size

    def one(bias: Float[Array, "positions heads"]) -> Float[Array, "new_positions heads"]:
        table = bias.T.reshape(-1, old, old)
        return resize_bias_table(table, (fmap, fmap)).reshape(-1, fmap * fmap).T

    pos_bias = jax.vmap(one)(attn.pos_bias) if stacked else one(attn.pos_bias)
    return replace(attn, pos_bias=pos_bias, bias_map_size=fmap)


# timm's LeViT: the architecture of the paper's official code, which timm ports.

ACTIVATIONS = {
    "hard_swish": jax.nn.hard_swish,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
"""The activations of `TimmLeViT` by name."""


def grid_bias_indices(
    resolution: tuple[int, int], stride: int = 1
) -> Int[np.ndarray, "q_seq kv_seq"]:
    """The attention-bias index of every (query, key) pair on a `(height, width)` map:
    `|Δrow| * width + |Δcol|`, with queries on every `stride`-th row and column (the
    rectangular form of `attention_bias_indices`). A NumPy constant."""
    height, width = resolution
    k_rows, k_cols = (
        a.reshape(-1) for a in np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    )
    q_rows, q_cols = (
        a.reshape(-1)
        for a in np.meshgrid(
            np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij"
        )
    )
    d_rows = np.abs(q_rows[:, None] - k_rows[None, :])
    d_cols = np.abs(q_cols[:, None] - k_cols[None, :])
    return d_rows * width + d_cols


class LinearBN(eqx.Module):
    """A token-wise `Linear` without bias, then `BatchNorm` over its output features with
    the statistics over the batch and every token: timm's `LinearNorm`, and its
    `ConvNorm` with a 1x1 kernel (the same map on a feature map)."""

    linear: Linear
    bn: BatchNorm

    def __init__(
        self, in_features: int, out_features: int, *, bn_weight: float = 1.0, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `in_features`, `out_features`: of the `Linear`.
        - `bn_weight`: the initial BatchNorm scale (timm starts some at zero).
        - `key`: a `jax.random.key` for the initialisation.
        """
        self.linear = Linear(in_features, out_features, use_bias=False, key=key)
        self.bn = BatchNorm(out_features)
        if bn_weight != 1.0:
            self.bn = eqx.tree_at(lambda b: b.weight, self.bn, full((out_features,), bn_weight))

    def __call__(
        self, x: Float[Array, "seq in_features"], state: eqx.nn.State
    ) -> tuple[Float[Array, "seq out_features"], eqx.nn.State]:
        y, state = self.bn(self.linear(x).T, state)
        return y.T, state


class TimmLeViTAttention(eqx.Module):
    """LeViT's attention on the tokens of a `(height, width)` map, as timm's `Attention`
    (`stride=1`) and `AttentionDownsample` (`stride=2`).

    Queries and keys have `key_dim` features per head, values `value_dim`. With `stride=1`
    one `LinearBN` (`qkv`) gives each head's `[q, k, v]` features in turn; with `stride > 1`
    `kv` gives each head's `[k, v]` and `q` the queries of the tokens on every `stride`-th
    row and column. The scores `q kᵀ · key_dim^-1/2` get the learned bias
    `attention_biases[head, |Δrow| * width + |Δcol|]` (added as it is, after the scaling);
    the heads' outputs, concatenated, pass through the activation and a `LinearBN`
    (`proj`) to `dim_out` features.
    """

    qkv: LinearBN | None
    kv: LinearBN | None
    q: LinearBN | None
    proj: LinearBN
    attention_biases: Float[Array, "heads positions"]
    heads: int = eqx.field(static=True)
    key_dim: int = eqx.field(static=True)
    value_dim: int = eqx.field(static=True)
    resolution: tuple[int, int] = eqx.field(static=True)
    stride: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        heads: int,
        key_dim: int,
        value_dim: int,
        resolution: tuple[int, int],
        stride: int = 1,
        activation: str = "hard_swish",
        proj_bn_weight: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`, `dim_out`: features of the input and output tokens.
        - `heads`, `key_dim`, `value_dim`: the heads and their query/key and value sizes.
        - `resolution`: the `(height, width)` of the input map.
        - `stride`: `1`, or the query subsampling of a downsampling attention.
        - `activation`: the name (in `ACTIVATIONS`) of the activation before `proj`.
        - `proj_bn_weight`: the initial scale of `proj`'s BatchNorm.
        - `key`: a `jax.random.key` for the initialisation.
        """
        qkv_key, q_key, proj_key = jr.split(key, 3)
        self.qkv = self.kv = self.q = None
        if stride == 1:
            self.qkv = LinearBN(dim, heads * (2 * key_dim + value_dim), key=qkv_key)
        else:
            self.kv = LinearBN(dim, heads * (key_dim + value_dim), key=qkv_key)
            self.q = LinearBN(dim, heads * key_dim, key=q_key)
        self.proj = LinearBN(heads * value_dim, dim_out, bn_weight=proj_bn_weight, key=proj_key)
        self.attention_biases = full((heads, resolution[0] * resolution[1]), 0.0)
        self.heads = heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.resolution = resolution
        self.stride = stride
        self.activation = activation

    def __call__(
        self, x: Float[Array, "seq dim"], state: eqx.nn.State
    ) -> tuple[Float[Array, "q_seq dim_out"], eqx.nn.State]:
        """**Arguments:**

        - `x`: the tokens of the map, row by row.
        - `state`: the BatchNorm statistics.

        **Returns:** the output tokens (of the subsampled map if `stride > 1`) and the
        updated state.
        """
        q, k, v, state = self._heads(x, state)
        bias = self.attention_biases[:, grid_bias_indices(self.resolution, self.stride)]
        out = merge_heads(attend(q, k, v, scale=self.key_dim**-0.5, bias=bias))
        return self.proj(ACTIVATIONS[self.activation](out), state)

    def probabilities(
        self, x: Float[Array, "seq dim"], state: eqx.nn.State
    ) -> Float[Array, "heads q_seq seq"]:
        """The weights that multiply the values in `self(x, state)`: the softmax of the
        scaled scores plus the attention biases, `(heads, q_seq, seq)` (queries on the
        subsampled map with `stride > 1`). The state is read, not updated (use it in
        inference mode)."""
        q, k, _, _ = self._heads(x, state)
        bias = self.attention_biases[:, grid_bias_indices(self.resolution, self.stride)]
        dots = jnp.einsum("hid,hjd->hij", q, k) * self.key_dim**-0.5 + bias.astype(q.dtype)
        probs = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
        return probs.astype(q.dtype)

    def _heads(
        self, x: Float[Array, "seq dim"], state: eqx.nn.State
    ) -> tuple[Array, Array, Array, eqx.nn.State]:
        """Queries, keys and values `(heads, seq, dim)` and the updated state."""
        heads, kd = self.heads, self.key_dim
        if self.qkv is not None:
            qkv, state = self.qkv(x, state)
            qkv = split_heads(qkv, heads)
            q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
        else:
            assert self.kv is not None and self.q is not None
            kv, state = self.kv(x, state)
            kv = split_heads(kv, heads)
            k, v = kv[..., :kd], kv[..., kd:]
            height, width = self.resolution
            s = self.stride
            sub = x.reshape(height, width, -1)[::s, ::s].reshape(-1, x.shape[-1])
            q, state = self.q(sub, state)
            q = split_heads(q, heads)
        return q, k, v, state


class TimmLeViTMlp(eqx.Module):
    """`LinearBN` → activation → `LinearBN` (whose BatchNorm scale starts at zero): timm's
    `LevitMlp`."""

    ln1: LinearBN
    ln2: LinearBN
    activation: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, *, activation: str, key: PRNGKeyArray):
        key1, key2 = jr.split(key)
        self.ln1 = LinearBN(dim, hidden, key=key1)
        self.ln2 = LinearBN(hidden, dim, bn_weight=0.0, key=key2)
        self.activation = activation

    def __call__(
        self, x: Float[Array, "seq dim"], state: eqx.nn.State
    ) -> tuple[Float[Array, "seq dim"], eqx.nn.State]:
        x, state = self.ln1(x, state)
        return self.ln2(ACTIVATIONS[self.activation](x), state)


class TimmLeViTBlock(eqx.Module):
    """`x + attn(x)` then `x + mlp(x)` (timm's `LevitBlock`); with `stride=2`, the
    downsampling block between stages, whose attention subsamples the queries and changes
    the width and has no residual (timm's `LevitDownsample`)."""

    attn: TimmLeViTAttention
    mlp: TimmLeViTMlp
    residual: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        heads: int,
        key_dim: int,
        value_dim: int,
        mlp_hidden: int,
        resolution: tuple[int, int],
        stride: int = 1,
        activation: str,
        attn_activation: str,
        key: PRNGKeyArray,
    ):
        attn_key, mlp_key = jr.split(key)
        self.attn = TimmLeViTAttention(
            dim,
            dim_out,
            heads=heads,
            key_dim=key_dim,
            value_dim=value_dim,
            resolution=resolution,
            stride=stride,
            activation=attn_activation,
            proj_bn_weight=1.0 if stride > 1 else 0.0,
            key=attn_key,
        )
        self.mlp = TimmLeViTMlp(dim_out, mlp_hidden, activation=activation, key=mlp_key)
        self.residual = stride == 1

    def __call__(
        self, x: Float[Array, "seq dim"], state: eqx.nn.State, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "out_seq dim_out"], eqx.nn.State]:
        del key
        y, state = self.attn(x, state)
        x = x + y if self.residual else y
        y, state = self.mlp(x, state)
        return x + y, state


class NormLinear(eqx.Module):
    """BatchNorm → dropout → `Linear`: timm's classifier `NormLinear` of pooled features."""

    bn: BatchNorm
    dropout: eqx.nn.Dropout
    linear: Linear

    def __init__(self, dim: int, num_classes: int, *, dropout: float, key: PRNGKeyArray):
        self.bn = BatchNorm(dim)
        self.dropout = eqx.nn.Dropout(dropout)
        self.linear = Linear(dim, num_classes, key=key)

    def __call__(
        self, x: Float[Array, " dim"], state: eqx.nn.State, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        x, state = self.bn(x, state)
        return self.linear(self.dropout(x, key=key)), state


# An int or float for every stage, or a tuple of one per stage.
StageInt = Annotated[int | tuple[int, ...], PerStage("len(dim)"), Minimum(1)]
StageFloat = Annotated[float | tuple[float, ...], PerStage("len(dim)")]


class TimmLeViT(eqx.Module):
    """LeViT as the paper's official code and timm (`timm.models.levit.Levit` and
    `LevitDistilled`) build it: the same design as `LeViT` (vit-pytorch's), another
    implementation of it, with different weights and outputs.

    A stem of 3x3 stride-2 convolutions, each followed by BatchNorm, with an activation
    between them (four for `stem_stride=16`, three for `8`); the map, read as tokens, goes
    through stages of blocks `x + attn(x)`, `x + mlp(x)` and is averaged into one BatchNorm
    → Linear head, or two whose logits are averaged (`distilled`). Before every stage but
    the first, a downsampling block: an attention whose queries sit on every second row
    and column, with `dim[i - 1] // key_dim` heads, value size `4 * key_dim` and no
    residual, then a residual MLP of expansion 2. Unlike `LeViT`:

    - every projection is a Linear without bias followed by BatchNorm (`LinearBN`); queries,
      keys and values of a block come from one projection, `[q, k, v]` per head;
    - values have `int(value_ratio * key_dim)` features per head;
    - the learned attention bias `(heads, height * width)` is added to the scaled scores as
      it is (vit-pytorch's is multiplied by `key_dim ** 0.5`), indexed by
      `|Δrow| * width + |Δcol|`;
    - the activation (Hardswish by default, SiLU in some timm variants) follows every
      stem convolution but the last, the attention and the MLP's first layer;
    - the head normalises the pooled features with BatchNorm first, and the distillation
      head's logits are averaged with the class head's (timm's output in eval mode, and in
      training unless distillation training is switched on there);
    - there is an MLP after every downsampling attention, and the head count of a
      downsampling attention comes from the width, not the stage's `heads`;
    - `channels` is free, and the image may be rectangular (a multiple of the stem's
      stride on both sides).

    timm's `use_conv=True` variants (`levit_conv_*`) compute the same function with 1x1
    convolutions on the map; `use_conv` only records that layout, in which
    `forward_features` returns the map `(dim, height, width)` (tokens `(seq, dim)`
    otherwise) and the timm checkpoint stores its weights. Load timm weights with
    `eqx_vision.from_timm` (which returns `(model, state)`). The BatchNorm statistics live
    in an `eqx.nn.State`, as for `LeViT`.
    """

    stem: tuple[ConvBN, ...]
    downsamples: tuple[TimmLeViTBlock, ...]
    stages: tuple[Stack[TimmLeViTBlock], ...]
    head: NormLinear | None
    head_dist: NormLinear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    use_conv: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair = 224,
        num_classes: NonNegative = 1000,
        dim: Annotated[tuple[int, ...], NonEmpty(), Minimum(1)] = (192,),
        depth: StageInt = 12,
        heads: StageInt = 3,
        key_dim: Positive = 64,
        value_ratio: StageFloat = 2.0,
        mlp_ratio: StageFloat = 2.0,
        channels: Positive = 3,
        stem_stride: Literal[8, 16] = 16,
        activation: str = "hard_swish",
        attn_activation: str | None = None,
        distilled: bool = False,
        dropout: Rate = 0.0,
        use_conv: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments** (timm's name in brackets):

        - `image_size` (`img_size`): an int or `(height, width)`, multiples of
          `stem_stride`.
        - `num_classes`: logits of the head; `0` for no head (the pooled features are
          returned).
        - `dim` (`embed_dim`): the width of each stage; its length is the number of stages.
        - `depth`, `heads` (`num_heads`): blocks and attention heads of each stage, an int
          for all or one per stage.
        - `key_dim`: the query/key size of every head.
        - `value_ratio` (`attn_ratio`), `mlp_ratio`: a head's value size over `key_dim` and
          the MLP's expansion in the stages' blocks, one for all or one per stage.
        - `channels` (`in_chans`): input channels.
        - `stem_stride` (`stem_type` `'s16'`/`'s8'`): 16 (four convolutions) or 8 (three).
        - `activation` (`act_layer`), `attn_activation` (`attn_act_layer`, default
          `activation`): names in `ACTIVATIONS`.
        - `distilled`: a second head (`LevitDistilled`'s `head_dist`), averaged with the
          first.
        - `dropout` (`drop_rate`): dropout before the head's Linear.
        - `use_conv`: the layout of timm's `levit_conv_*` models (see above).
        - `key`: a `jax.random.key` for the initialisation.
        """
        attn_activation = activation if attn_activation is None else attn_activation
        # checked_arguments passes the pair and the per-stage tuples
        size = cast(tuple[int, int], image_size)
        depths, stage_heads = cast(tuple[int, ...], depth), cast(tuple[int, ...], heads)
        ratios = cast(tuple[float, ...], value_ratio), cast(tuple[float, ...], mlp_ratio)
        _check_timm_levit(size, dim, key_dim, stem_stride, activation, attn_activation)
        stem_key, block_key, head_key = jr.split(key, 3)
        self.stem = _timm_stem(channels, dim[0], stem_stride, stem_key)
        resolution = (size[0] // stem_stride, size[1] // stem_stride)
        downsamples, stages = [], []
        for i, k in enumerate(jr.split(block_key, len(dim))):
            down_key, stage_key = jr.split(k)
            if i > 0:
                down = TimmLeViTBlock(
                    dim[i - 1],
                    dim[i],
                    heads=dim[i - 1] // key_dim,
                    value_dim=4 * key_dim,
                    mlp_hidden=2 * dim[i],
                    resolution=resolution,
                    stride=2,
                    key=down_key,
                    key_dim=key_dim,
                    activation=activation,
                    attn_activation=attn_activation,
                )
                downsamples.append(down)
                resolution = ((resolution[0] - 1) // 2 + 1, (resolution[1] - 1) // 2 + 1)

            def make_block(index: int, *, key: PRNGKeyArray, i: int = i, res=resolution):
                del index
                return TimmLeViTBlock(
                    dim[i],
                    dim[i],
                    heads=stage_heads[i],
                    value_dim=int(ratios[0][i] * key_dim),
                    mlp_hidden=int(ratios[1][i] * dim[i]),
                    resolution=res,
                    key=key,
                    key_dim=key_dim,
                    activation=activation,
                    attn_activation=attn_activation,
                )

            stages.append(Stack(make_block, depths[i], key=stage_key))
        self.downsamples, self.stages = tuple(downsamples), tuple(stages)
        head_key, dist_key = jr.split(head_key)
        self.head = self.head_dist = None
        if num_classes:
            self.head = NormLinear(dim[-1], num_classes, dropout=dropout, key=head_key)
            if distilled:
                self.head_dist = NormLinear(dim[-1], num_classes, dropout=dropout, key=dist_key)
        self.image_size = size
        self.channels = channels
        self.activation = activation
        self.use_conv = use_conv

    def forward_features(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "seq dim"] | Float[Array, "dim fmap_height fmap_width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: unused (there is no dropout before the head); accepted for symmetry.

        **Returns:** the last stage's features, as tokens `(seq, dim)`, or as the map
        `(dim, height, width)` with `use_conv` (timm's layouts), and the updated state.
        """
        del key
        (x, maps), state = self._forward(x, state)
        return (maps[-1] if self.use_conv else x), state

    def _forward(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State
    ) -> tuple[tuple[Float[Array, "seq dim"], list[Array]], eqx.nn.State]:
        """The last stage's tokens and every stage's output map."""
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        act = ACTIVATIONS[self.activation]
        for i, conv in enumerate(self.stem):
            x, state = conv(x, state)
            if i < len(self.stem) - 1:
                x = act(x)
        height, width = x.shape[1:]
        x = grid_to_tokens(x)
        maps = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x, state = self.downsamples[i - 1](x, state)
                height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
            x, state = stage.call_with_state(x, state)
            maps.append(tokens_to_grid(x, height))
        return (x, maps), state

    def forward_head(
        self,
        x: Float[Array, "seq dim"] | Float[Array, "dim fmap_height fmap_width"],
        state: eqx.nn.State,
        *,
        pre_logits: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " num_classes"] | Float[Array, " dim"], eqx.nn.State]:
        """**Arguments:**

        - `x`: the output of `forward_features`.
        - `state`: the BatchNorm statistics.
        - `pre_logits`: return the pooled features instead of the logits.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits (the mean of both heads' with `distilled`), or the pooled
        features `(dim,)` with `pre_logits` or without a head; and the updated state.
        """
        pooled = jnp.mean(x, axis=(1, 2)) if self.use_conv else jnp.mean(x, axis=0)
        if pre_logits or self.head is None:
            return pooled, state
        head_key, dist_key = split_key(key, 2)
        logits, state = self.head(pooled, state, key=head_key)
        if self.head_dist is None:
            return logits, state
        dist, state = self.head_dist(pooled, state, key=dist_key)
        return (logits + dist) / 2, state

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's output map (after its
        downsampling block and its blocks, as timm's stages), of reduction
        `stem_stride * 2 ** i`."""
        stride = 2 ** len(self.stem)
        return tuple(
            FeatureInfo(
                i,
                f"stages[{i}]",
                stage.blocks.mlp.ln2.linear.weight.shape[-2],
                (stride * 2**i, stride * 2**i),
            )
            for i, stage in enumerate(self.stages)
        )

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Any, eqx.nn.State]:
        """The final features and the output maps of chosen stages, as timm's
        `forward_intermediates`.

        **Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `state`: the BatchNorm statistics.
        - `indices`: which stages (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; LeViT has no norm after its stages.
        - `output_fmt`: `"map"` for `(channels, height, width)` maps, `"tokens"` for
          `(height * width, channels)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: unused (there is no dropout before the head).

        **Returns:** `((forward_features(x), outputs), state)`, or `(outputs, state)` with
        `intermediates_only`; `outputs` is a list in the order of `indices`.
        """
        del norm
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.stages), name)
        (final, maps), state = self._forward(x, state)
        final = maps[-1] if self.use_conv else final
        outputs = [maps[i] if output_fmt == "map" else grid_to_tokens(maps[i]) for i in chosen]
        return (outputs if intermediates_only else (final, outputs)), state

    def set_image_size(self, image_size: tuple[int, int]) -> "TimmLeViT":
        """This model for `(height, width)` images, multiples of `stem_stride`: every
        attention's bias table (one `(height, width)` map of absolute offsets per head)
        resized bicubically with antialiasing to the new map, as timm's
        `resize_rel_pos_bias_table_levit` (see
        [`set_image_size`][eqx_vision.set_image_size])."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        stride = 2 ** len(self.stem)
        if hw[0] % stride or hw[1] % stride:
            raise ValueError(
                f"TimmLeViT: image_size must be a multiple of stem_stride={stride} on both "
                f"sides; got {hw}."
            )
        res = (hw[0] // stride, hw[1] // stride)
        stages, downs = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                down = self.downsamples[i - 1]
                downs.append(replace(down, attn=_timm_resized(down.attn, res, stacked=False)))
                res = ((res[0] - 1) // 2 + 1, (res[1] - 1) // 2 + 1)
            attn = _timm_resized(stage.blocks.attn, res, stacked=True)
            stages.append(replace(stage, blocks=replace(stage.blocks, attn=attn)))
        return replace(self, stages=tuple(stages), downsamples=tuple(downs), image_size=hw)

    def reset_head(
        self,
        num_classes: int,
        *,
        key: PRNGKeyArray | None = None,
        state: eqx.nn.State | None = None,
    ) -> "TimmLeViT | tuple[TimmLeViT, eqx.nn.State]":
        """This model with a new head (both heads if distilled) of `num_classes` outputs,
        BatchNorm → Linear initialised as the constructor does, or none for `0` (timm's
        `reset_classifier`; see [`reset_head`][eqx_vision.reset_head]). The new heads'
        BatchNorm statistics are added to `state` (the body's kept); without `state`, only
        the model is returned (then build the state anew, `eqx.nn.State(model)`)."""
        dim = self.stages[-1].blocks.mlp.ln2.linear.weight.shape[-2]
        dropout = 0.0
        for old in (self.head, self.head_dist):
            if old is not None:
                dropout = old.dropout.p
        head = dist = None
        if num_classes > 0:
            assert key is not None
            head_key, dist_key = jr.split(key)
            head = NormLinear(dim, num_classes, dropout=dropout, key=head_key)
            if self.head_dist is not None:
                dist = NormLinear(dim, num_classes, dropout=dropout, key=dist_key)
            if self.head is not None and self.head.dropout.inference:
                head, dist = eqx.nn.inference_mode((head, dist))
        head_state = None if head is None else eqx.nn.State((head, dist))
        head, dist = eqx.nn.delete_init_state((head, dist))
        model = eqx.tree_at(
            lambda m: (m.head, m.head_dist), self, (head, dist), is_leaf=lambda n: n is None
        )
        if state is None:
            return model
        values, keys = state.substate((self.stem, self.downsamples, self.stages)).tree_flatten()
        if head_state is not None:
            head_values, head_keys = head_state.tree_flatten()
            values, keys = values + head_values, keys + head_keys
        return model, eqx.nn.State.tree_unflatten(keys, values)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, *image_size)`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)` (the pooled features `(dim[-1],)` when
        `num_classes=0`) and the updated state (unchanged in inference mode).
        """
        check_key(self, key)
        x, state = self.forward_features(x, state)
        return self.forward_head(x, state, key=key)


def _check_timm_levit(
    size: tuple[int, int],
    dim: tuple[int, ...],
    key_dim: int,
    stem_stride: int,
    activation: str,
    attn_activation: str,
) -> None:
    """The `TimmLeViT` arguments that `checked_arguments` cannot check alone."""
    for name, value in (("activation", activation), ("attn_activation", attn_activation)):
        if value not in ACTIVATIONS:
            raise ValueError(
                f"TimmLeViT: {name} must be one of {', '.join(map(repr, ACTIVATIONS))}; "
                f"got {value!r}."
            )
    if size[0] % stem_stride or size[1] % stem_stride:
        raise ValueError(
            f"TimmLeViT: image_size must be a multiple of stem_stride={stem_stride} on both "
            f"sides; got {size}."
        )
    smallest = stem_stride // 2  # the first convolution has dim[0] // smallest channels
    if dim[0] < smallest:
        raise ValueError(
            f"TimmLeViT: dim[0] must be at least {smallest} with stem_stride={stem_stride} "
            f"(the stem's first convolution has dim[0] // {smallest} channels); got {dim[0]}."
        )
    for i in range(1, len(dim)):
        if dim[i - 1] < key_dim:
            raise ValueError(
                f"TimmLeViT: the downsampling attention before stage {i} has "
                f"dim[{i - 1}] // key_dim heads, so dim[{i - 1}] must be at least "
                f"key_dim={key_dim}; got {dim[i - 1]}."
            )


def _timm_stem(channels: int, dim: int, stride: int, key: PRNGKeyArray) -> tuple[ConvBN, ...]:
    """The 3x3 stride-2 convolutions (no bias, padding 1), each with BatchNorm, from
    `channels` to `dim` channels: widths `dim // 8, dim // 4, dim // 2, dim` (stride 16) or
    `dim // 4, dim // 2, dim` (stride 8)."""
    widths = [channels] + [dim // d for d in ((8, 4, 2, 1) if stride == 16 else (4, 2, 1))]
    keys = jr.split(key, len(widths) - 1)
    return tuple(
        ConvBN(widths[i], widths[i + 1], 3, stride=2, padding=1, key=k) for i, k in enumerate(keys)
    )


def _timm_resized(
    attn: TimmLeViTAttention, resolution: tuple[int, int], *, stacked: bool
) -> TimmLeViTAttention:
    """A timm LeViT attention (of a stack's blocks with `stacked`) for a `resolution`
    input map, its bias table resized."""
    old = attn.resolution

    def one(bias: Float[Array, "heads positions"]) -> Float[Array, "heads new_positions"]:
        table = resize_bias_table(bias.reshape(-1, *old), resolution)
        return table.reshape(table.shape[0], -1)

    biases = jax.vmap(one)(attn.attention_biases) if stacked else one(attn.attention_biases)
    return replace(attn, attention_biases=biases, resolution=resolution)
