"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference".

Graham et al., 2021, https://arxiv.org/abs/2104.01136.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..interop import CheckpointError, StateDict, register
from ..interop._vit_pytorch import (
    convert_conv,
    convert_conv_bn,
    convert_feedforward,
    convert_linear,
    convert_stack_with_state,
)
from ..layers import (
    Conv2d,
    ConvBN,
    FeedForward,
    Linear,
    Stack,
    attend,
    check_image,
    check_key,
    gelu,
    grid_to_tokens,
    merge_heads,
    split_heads,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import checked_arguments
from ..layers._init import full, normal


IN_CHANNELS = 3  # hard-coded in the reference's stem


def pos_indices(fmap_size: int, downsample: bool) -> Int[np.ndarray, "q_seq kv_seq"]:
    """The attention-bias index of every (query, key) pair: `|Δrow| * fmap_size + |Δcol|`.

    Keys sit on the `fmap_size x fmap_size` grid; queries on the same grid, or on every
    second row and column of it (`downsample`). Pairs at the same absolute offset share a
    bias whatever the signs of the offsets. Returned as a NumPy constant.
    """
    q = np.arange(0, fmap_size, 2 if downsample else 1)
    k = np.arange(fmap_size)
    q_rows, q_cols = (a.reshape(-1) for a in np.meshgrid(q, q, indexing="ij"))
    k_rows, k_cols = (a.reshape(-1) for a in np.meshgrid(k, k, indexing="ij"))
    d_rows = np.abs(q_rows[:, None] - k_rows[None, :])
    d_cols = np.abs(q_cols[:, None] - k_cols[None, :])
    return d_rows * fmap_size + d_cols


def hard_swish(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`x * relu6(x + 3) / 6`, as `torch.nn.Hardswish`."""
    return jax.nn.hard_swish(x)


class LeViTAttention(eqx.Module):
    """LeViT's attention on a feature map, with a learned attention bias.

    Queries, keys and values are 1x1 convs each followed by BatchNorm (the queries with
    stride 2 in downsampling blocks). The scores `q kᵀ · dim_key^-1/2` get the bias
    `B[|Δrow| * fmap_size + |Δcol|, head] · dim_key^1/2` (the reference adds
    `bias / scale`). The output path is GELU → 1x1 conv (bias) → BatchNorm, whose weight
    starts at zero.
    """

    to_q: ConvBN
    to_k: ConvBN
    to_v: ConvBN
    to_out: ConvBN
    pos_bias: Float[Array, "positions heads"]
    attn_dropout: eqx.nn.Dropout
    out_dropout: eqx.nn.Dropout
    heads: int = eqx.field(static=True)
    dim_key: int = eqx.field(static=True)
    fmap_size: int = eqx.field(static=True)
    downsample: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        *,
        heads: int,
        dim_key: int,
        dim_value: int,
        dropout: float = 0.0,
        dim_out: int | None = None,
        downsample: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: input channels.
        - `fmap_size`: height and width of the (square) input map.
        - `heads`, `dim_key`, `dim_value`: number of heads and their query/key and value
          dimensions.
        - `dropout`: on the attention probabilities and on the output.
        - `dim_out`: output channels (default `dim`).
        - `downsample`: queries on every second row and column, halving the map.
        - `key`: a `jax.random.key` for the initialisation.
        """
        q_key, k_key, v_key, out_key, bias_key = jr.split(key, 5)
        dim_out = dim if dim_out is None else dim_out
        inner_key, inner_value = heads * dim_key, heads * dim_value
        self.to_q = ConvBN(dim, inner_key, stride=2 if downsample else 1, key=q_key)
        self.to_k = ConvBN(dim, inner_key, key=k_key)
        self.to_v = ConvBN(dim, inner_value, key=v_key)
        to_out = ConvBN(inner_value, dim_out, use_bias=True, key=out_key)
        self.to_out = eqx.tree_at(lambda c: c.bn.weight, to_out, full((dim_out,), 0.0))
        self.pos_bias = normal(bias_key, (fmap_size * fmap_size, heads))
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.out_dropout = eqx.nn.Dropout(dropout)
        self.heads = heads
        self.dim_key = dim_key
        self.fmap_size = fmap_size
        self.downsample = downsample

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one `(channels, fmap_size, fmap_size)` feature map.
        - `state`: the model's `eqx.nn.State` (the four BatchNorms' statistics).
        - `key`: needed only for dropout in training mode.

        **Returns:** the output map (half the size with `downsample`) and the updated state.
        """
        attn_key, out_key = split_key(key, 2)
        q, state = self.to_q(x, state)
        k, state = self.to_k(x, state)
        v, state = self.to_v(x, state)
        height = q.shape[1]
        q, k, v = (split_heads(grid_to_tokens(t), self.heads) for t in (q, k, v))
        scale = self.dim_key**-0.5
        index = pos_indices(self.fmap_size, self.downsample)
        bias = jnp.moveaxis(self.pos_bias[index], -1, 0) / scale
        out = attend(q, k, v, scale=scale, bias=bias, dropout=self.attn_dropout, key=attn_key)
        out = gelu(tokens_to_grid(merge_heads(out), height))
        out, state = self.to_out(out, state)
        return self.out_dropout(out, key=out_key), state


class LeViTBlock(eqx.Module):
    """`[x +] attn(x)` then `x + ff(x)`, the feed-forward (1x1 conv → Hardswish → 1x1 conv)
    acting on every pixel. The attention residual is dropped in downsampling blocks."""

    attn: LeViTAttention
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
        self.attn = LeViTAttention(
            dim,
            fmap_size,
            heads=heads,
            dim_key=dim_key,
            dim_value=dim_value,
            dropout=dropout,
            dim_out=dim_out,
            downsample=downsample,
            key=attn_key,
        )
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


def _per_stage(value: int | tuple[int, ...] | list[int], stages: int, name: str) -> list[int]:
    """An int, or a tuple of up to `stages` ints padded with its last one (`cast_tuple`)."""
    values = list(value) if isinstance(value, tuple | list) else [value]
    if not values or len(values) > stages:
        raise ValueError(
            f"{name} must be an int or a tuple of 1 to stages={stages} ints; got {value!r}."
        )
    values += [values[-1]] * (stages - len(values))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must hold positive ints; got {value!r}.")
    return values


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
    mlp_head: Linear
    distill_head: Linear | None
    image_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        dim: int | tuple[int, ...],
        depth: int | tuple[int, ...],
        heads: int | tuple[int, ...],
        mlp_mult: int,
        stages: int = 3,
        dim_key: int = 32,
        dim_value: int = 64,
        dropout: float = 0.0,
        num_distill_classes: int | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: height and width of the (square) images; a multiple of 16.
        - `num_classes`: number of output logits.
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
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive int; got {stages!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int; got {image_size!r}.")
        if image_size % 16:
            raise ValueError(
                f"image_size must be a multiple of 16 (the stem downsamples 16 times); got "
                f"{image_size}."
            )
        dims = _per_stage(dim, stages, "dim")
        depths = _per_stage(depth, stages, "depth")
        layer_heads = _per_stage(heads, stages, "heads")
        for name, value in (
            ("num_classes", num_classes),
            ("mlp_mult", mlp_mult),
            ("dim_key", dim_key),
            ("dim_value", dim_value),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive; got {value}.")
        if num_distill_classes is not None and num_distill_classes <= 0:
            raise ValueError(
                f"num_distill_classes must be positive or None; got {num_distill_classes}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")

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
        self.mlp_head = Linear(dims[-1], num_classes, key=head_key)
        self.distill_head = (
            None
            if num_distill_classes is None
            else Linear(dims[-1], num_distill_classes, key=distill_key)
        )
        self.image_size = image_size

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[
        Float[Array, " num_classes"]
        | tuple[Float[Array, " num_classes"], Float[Array, " num_distill_classes"]],
        eqx.nn.State,
    ]:
        """**Arguments:**

        - `x`: one image, `(3, image_size, image_size)`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)` — or, with `num_distill_classes`, the pair
        `(logits, distill_logits)` of shapes `(num_classes,)` and `(num_distill_classes,)` —
        and the updated state (unchanged in inference mode).
        """
        check_key(self, key)
        check_image(x, (IN_CHANNELS, self.image_size, self.image_size), type(self).__name__)
        keys = split_key(key, len(self.stages) + len(self.downsamples))
        stage_keys, down_keys = keys[: len(self.stages)], keys[len(self.stages) :]
        for conv in self.conv_embedding:
            x = conv(x)
        for i, stage in enumerate(self.stages):
            x, state = stage.call_with_state(x, state, key=stage_keys[i])
            if i < len(self.downsamples):
                x, state = self.downsamples[i](x, state, key=down_keys[i])
        pooled = jnp.mean(x, axis=(1, 2))
        logits = self.mlp_head(pooled)
        if self.distill_head is None:
            return logits, state
        return (logits, self.distill_head(pooled)), state


def _convert_attention(
    m: LeViTAttention, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[LeViTAttention, eqx.nn.State]:
    projections = []
    for name in ("to_q", "to_k", "to_v"):
        conv_bn, state = convert_conv_bn(
            getattr(m, name), sd, f"{prefix}{name}.0.", f"{prefix}{name}.1.", state
        )
        projections.append(conv_bn)
    to_out, state = convert_conv_bn(m.to_out, sd, prefix + "to_out.1.", prefix + "to_out.2.", state)
    expected = pos_indices(m.fmap_size, m.downsample)
    stored = sd.raw(prefix + "pos_indices")
    if stored.shape != expected.shape:
        raise CheckpointError(
            f"shape mismatch for {prefix + 'pos_indices'!r}: the model expects "
            f"{expected.shape}, the state dict has {stored.shape}."
        )
    if not np.array_equal(stored, expected):
        raise CheckpointError(
            f"{prefix + 'pos_indices'!r} differs from the attention-bias indices of a "
            f"{m.fmap_size}x{m.fmap_size} map."
        )
    pos_bias = sd.take(prefix + "pos_bias.weight", m.pos_bias)
    m = eqx.tree_at(
        lambda a: (a.to_q, a.to_k, a.to_v, a.to_out, a.pos_bias),
        m,
        (*projections, to_out, pos_bias),
    )
    return m, state


def _convert_block(
    m: LeViTBlock, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[LeViTBlock, eqx.nn.State]:
    attn, state = _convert_attention(m.attn, sd, prefix + "0.", state)
    ff = convert_feedforward(m.ff, sd, prefix + "1.", indices=(0, 0, 3), feature_map=True)
    return eqx.tree_at(lambda b: (b.attn, b.ff), m, (attn, ff)), state


@register(LeViT)
def _from_vit_pytorch(
    model: LeViT, sd: StateDict, state: eqx.nn.State | None = None
) -> tuple[LeViT, eqx.nn.State]:
    if state is None:
        raise ValueError(
            "LeViT keeps BatchNorm statistics in an eqx.nn.State: load it with "
            "`model, state = from_vit_pytorch(model, state_dict, state=state)`."
        )
    convs = tuple(
        convert_conv(conv, sd, f"conv_embedding.{i}.")
        for i, conv in enumerate(model.conv_embedding)
    )
    # The reference's backbone alternates stages and downsampling blocks.
    stages, downsamples = [], []
    for i, stage in enumerate(model.stages):
        stage, state = convert_stack_with_state(
            stage, sd, lambda j, p=f"backbone.{2 * i}.": f"{p}layers.{j}.", _convert_block, state
        )
        stages.append(stage)
    for i, block in enumerate(model.downsamples):
        block, state = _convert_block(block, sd, f"backbone.{2 * i + 1}.layers.0.", state)
        downsamples.append(block)
    distill = (
        None
        if model.distill_head is None
        else convert_linear(model.distill_head, sd, "distill_head.")
    )
    model = eqx.tree_at(
        lambda m: (m.conv_embedding, m.stages, m.downsamples, m.mlp_head, m.distill_head),
        model,
        (
            convs,
            tuple(stages),
            tuple(downsamples),
            convert_linear(model.mlp_head, sd, "mlp_head."),
            distill,
        ),
        is_leaf=lambda x: x is None,
    )
    return model, state
