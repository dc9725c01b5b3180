"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference".

Graham et al., 2021, https://arxiv.org/abs/2104.01136.
"""

import math
from typing import Annotated, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..layers import (
    Conv2d,
    ConvBN,
    FeedForward,
    Linear,
    MapAttention,
    Stack,
    attention_bias_indices,
    check_image,
    check_key,
    grid_to_tokens,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import Minimum, PerStage, Positive, Rate, checked_arguments
from ..layers._init import full


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
    mlp_head: Linear
    distill_head: Linear | None
    image_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        num_classes: Positive,
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
