"""CvT: "CvT: Introducing Convolutions to Vision Transformers".

Wu et al., 2021, https://arxiv.org/abs/2103.15808.
"""

from collections.abc import Sequence
from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    ChannelLayerNorm,
    Conv2d,
    Linear,
    MapAttention,
    MapFeedForward,
    Stack,
    check_image,
    check_key,
    grid_to_tokens,
    split_key,
)
from ..layers._checks import Minimum, NonNegative, Odd, Positive, Rate, checked_arguments
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


DIM_HEAD = 64  # fixed in the reference, not a constructor argument
# The arguments of each stage, `s1_emb_dim` to `s3_mlp_mult`.
STAGE_ARGUMENTS = (
    "emb_dim",
    "emb_kernel",
    "emb_stride",
    "proj_kernel",
    "kv_proj_stride",
    "heads",
    "depth",
    "mlp_mult",
)
OddKernel = Annotated[int, Minimum(1), Odd("an even kernel changes the size of the query map")]


class CvTBlock(eqx.Module):
    """`x + attn(x)` then `x + ff(x)`, where the feed-forward (channel LayerNorm → 1x1 conv →
    GELU → 1x1 conv) acts on every pixel of the map.

    The attention is a `MapAttention` with CvT's convolutional projections: channel
    LayerNorm, queries from a stride-1 depthwise conv → BatchNorm → 1x1 conv, keys and
    values from a stride-`kv_proj_stride` one, heads of dimension 64 split from the
    channels as `'(h d) x y -> h (x y) d'`, and a 1x1 output conv with bias.
    """

    attn: MapAttention
    ff: MapFeedForward

    def __init__(
        self,
        dim: int,
        *,
        proj_kernel: int,
        kv_proj_stride: int,
        heads: int,
        mlp_mult: int,
        dropout: float,
        key: PRNGKeyArray,
    ):
        attn_key, ff_key = jr.split(key)
        self.attn = MapAttention(
            dim,
            heads=heads,
            dim_head=DIM_HEAD,
            dropout=dropout,
            projection="separable",
            projections="q_kv",
            proj_kernel=proj_kernel,
            kv_reduction=kv_proj_stride,
            key=attn_key,
        )
        self.ff = MapFeedForward(dim, dim * mlp_mult, dropout=dropout, key=ff_key)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "channels height width"], eqx.nn.State]:
        attn_key, ff_key = split_key(key, 2)
        y, state = self.attn(x, state, key=attn_key)
        x = x + y
        return x + self.ff(x, key=ff_key), state


class CvTStage(eqx.Module):
    """A convolutional token embedding (conv with padding `k // 2` → channel LayerNorm)
    followed by a scanned stack of `CvTBlock`s."""

    embed: Conv2d
    norm: ChannelLayerNorm
    blocks: Stack[CvTBlock]

    def __init__(
        self,
        in_dim: int,
        dim: int,
        *,
        emb_kernel: int,
        emb_stride: int,
        proj_kernel: int,
        kv_proj_stride: int,
        heads: int,
        depth: int,
        mlp_mult: int,
        dropout: float,
        key: PRNGKeyArray,
    ):
        embed_key, blocks_key = jr.split(key)
        self.embed = Conv2d(
            in_dim, dim, emb_kernel, stride=emb_stride, padding=emb_kernel // 2, key=embed_key
        )
        self.norm = ChannelLayerNorm(dim)

        def make_block(index: int, *, key: PRNGKeyArray) -> CvTBlock:
            del index
            return CvTBlock(
                dim,
                proj_kernel=proj_kernel,
                kv_proj_stride=kv_proj_stride,
                heads=heads,
                mlp_mult=mlp_mult,
                dropout=dropout,
                key=key,
            )

        self.blocks = Stack(make_block, depth, key=blocks_key)

    def __call__(
        self,
        x: Float[Array, "in_channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "channels out_height out_width"], eqx.nn.State]:
        x = self.norm(self.embed(x))
        return self.blocks.call_with_state(x, state, key=key)

    def attention_maps(
        self, x: Float[Array, "in_channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, "depth heads q_seq kv_seq"], Float[Array, "channels h w"]]:
        """The attention probabilities of every block, in inference mode: `(depth, heads,
        height * width, kv_height * kv_width)`, queries on the stage's map and keys on the
        map of the strided key/value projection, and the stage's output map. The blocks run
        in their scanned stack."""
        x = self.norm(self.embed(x))
        dynamic, static = eqx.partition(self.blocks.blocks, eqx.is_array)
        substate = state.substate(self.blocks.blocks)

        def step(carry, layer):
            params, block_state = layer
            block: CvTBlock = eqx.combine(params, static)
            probs = block.attn.conv_probabilities(carry, block_state)
            out, _ = block(carry, block_state)
            return out, probs

        x, probs = jax.lax.scan(step, x, (dynamic, substate))
        return probs, x


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output length of a convolution along one axis (<= 0: the kernel does not fit)."""
    return (size + 2 * padding - kernel) // stride + 1 if size + 2 * padding >= kernel else 0


class CvT(eqx.Module):
    """The Convolutional vision Transformer.

    Three stages, each a strided convolutional token embedding followed by transformer
    blocks whose attention computes queries, keys and values with depthwise-separable
    convolutions (depthwise conv → BatchNorm → 1x1 conv); there is no class token and no
    position embedding. The last map is averaged and fed to a linear head.

    Equal to `vit_pytorch.cvt.CvT`; load its weights with
    `model, state = eqx_vision.from_vit_pytorch(model, sd, state=state)`. The BatchNorm
    statistics live in an `eqx.nn.State`: build the model with `eqx.nn.make_with_state`,
    and in training map it with `jax.vmap(model, axis_name="batch", in_axes=(0, None),
    out_axes=(0, None))` so that the statistics are taken over the batch, as torch does.

    Reproduced from the reference:

    - the head dimension is fixed at 64 (it is not an argument), the score scale is
      `64 ** -0.5`;
    - the convolutions use symmetric padding `kernel // 2`, the projections have no
      biases, and the key/value projection is strided by `s*_kv_proj_stride`;
    - the feed-forward is channel LayerNorm → 1x1 conv → GELU → dropout → 1x1 conv →
      dropout;
    - BatchNorm has torch's train-mode semantics (biased variance to normalise, unbiased
      variance in the running average, momentum 0.1, eps 1e-5).

    The model takes images of any size the convolutions can reduce
    (`min_image_size`, 1x1 for every accepted configuration), square or not, as the
    reference does. Even `s*_proj_kernel`s are rejected: the reference then produces a
    query map one pixel larger than its input and misplaces the attention output.
    """

    stages: tuple[CvTStage, CvTStage, CvTStage]
    head: Linear | None
    channels: int = eqx.field(static=True)
    min_image_size: tuple[int, int] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        num_classes: NonNegative,
        s1_emb_dim: Positive = 64,
        s1_emb_kernel: Positive = 7,
        s1_emb_stride: Positive = 4,
        s1_proj_kernel: OddKernel = 3,
        s1_kv_proj_stride: Positive = 2,
        s1_heads: Positive = 1,
        s1_depth: Positive = 1,
        s1_mlp_mult: Positive = 4,
        s2_emb_dim: Positive = 192,
        s2_emb_kernel: Positive = 3,
        s2_emb_stride: Positive = 2,
        s2_proj_kernel: OddKernel = 3,
        s2_kv_proj_stride: Positive = 2,
        s2_heads: Positive = 3,
        s2_depth: Positive = 2,
        s2_mlp_mult: Positive = 4,
        s3_emb_dim: Positive = 384,
        s3_emb_kernel: Positive = 3,
        s3_emb_stride: Positive = 2,
        s3_proj_kernel: OddKernel = 3,
        s3_kv_proj_stride: Positive = 2,
        s3_heads: Positive = 6,
        s3_depth: Positive = 10,
        s3_mlp_mult: Positive = 4,
        dropout: Rate = 0.0,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        For each stage `s1`, `s2`, `s3`:

        - `s*_emb_dim`: the stage's channels.
        - `s*_emb_kernel`, `s*_emb_stride`: the token-embedding convolution (padding
          `kernel // 2`).
        - `s*_proj_kernel`: kernel of the depthwise query/key/value projections (odd).
        - `s*_kv_proj_stride`: stride of the key/value projection.
        - `s*_heads`: attention heads (of dimension 64 each).
        - `s*_depth`: number of transformer blocks.
        - `s*_mlp_mult`: feed-forward expansion factor.

        And:

        - `num_classes`: number of output logits; `0` for no head (the model then returns
          the pooled features).
        - `dropout`: dropout rate in attention and feed-forward blocks.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        given = locals()
        configs = [{name: given[f"s{i}_{name}"] for name in STAGE_ARGUMENTS} for i in (1, 2, 3)]
        *stage_keys, head_key = jr.split(key, 4)
        stages = []
        in_dim = channels
        for config, stage_key in zip(configs, stage_keys, strict=True):
            dim, options = config["emb_dim"], {k: v for k, v in config.items() if k != "emb_dim"}
            stages.append(CvTStage(in_dim, dim, **options, dropout=dropout, key=stage_key))
            in_dim = dim
        self.stages = (stages[0], stages[1], stages[2])
        self.head = Linear(in_dim, num_classes, key=head_key) if num_classes else None
        self.channels = channels

        def fits(size: int) -> bool:
            for config in configs:
                k, p = config["proj_kernel"], config["proj_kernel"] // 2
                e = config["emb_kernel"]
                size = _conv_out(size, e, config["emb_stride"], e // 2)
                if size <= 0 or _conv_out(size, k, config["kv_proj_stride"], p) <= 0:
                    return False
            return True

        smallest = next(n for n in range(1, 1 << 16) if fits(n))
        self.min_image_size = (smallest, smallest)

    def _check_image(self, x: Float[Array, "channels height width"]) -> None:
        check_image(x, (self.channels, None, None), type(self).__name__)
        height, width = x.shape[1:]
        min_h, min_w = self.min_image_size
        if height < min_h or width < min_w:
            raise ValueError(
                f"CvT needs images of at least {min_h}x{min_w} pixels, shape "
                f"({self.channels}, >={min_h}, >={min_w}); got shape {tuple(x.shape)}."
            )

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: each stage's output map, its channels
        the stage's `emb_dim`, its reduction the product of the embedding strides so far
        (the maps have `ceil(size / reduction)` rows and columns)."""
        info, reduction = [], (1, 1)
        for i, stage in enumerate(self.stages):
            sh, sw = stage.embed.stride
            reduction = (reduction[0] * sh, reduction[1] * sw)
            info.append(FeatureInfo(i, f"stages[{i}]", stage.embed.weight.shape[0], reduction))
        return tuple(info)

    def forward_features(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "dim out_height out_width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, of any size from `min_image_size`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's map `(s3_emb_dim, height, width)` and the updated
        state.
        """
        (final, _), state = self._forward(x, state, key=key)
        return final, state

    def _forward(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None,
    ) -> tuple[tuple[Float[Array, "dim h w"], list[Array]], eqx.nn.State]:
        check_key(self, key)
        self._check_image(x)
        outputs = []
        for stage, stage_key in zip(self.stages, split_key(key, 3), strict=True):
            x, state = stage(x, state, key=stage_key)
            outputs.append(x)
        return (x, outputs), state

    def forward_head(
        self,
        x: Float[Array, "dim height width"],
        state: eqx.nn.State,
        *,
        pre_logits: bool = False,
    ) -> tuple[Float[Array, " num_classes"] | Float[Array, " dim"], eqx.nn.State]:
        """**Arguments:**

        - `x`: the map from `forward_features`.
        - `state`: the BatchNorm statistics (returned as they are: the head has none).
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or the map's mean `(dim,)` with `pre_logits` or without a
        head; and the state.
        """
        pooled = jnp.mean(x, axis=(1, 2))
        if pre_logits or self.head is None:
            return pooled, state
        return self.head(pooled), state

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

        - `x`: one image, `(channels, height, width)`.
        - `state`: the BatchNorm statistics.
        - `indices`: which stages (see `feature_info`): `None` for all three, an int `n`
          for the last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; CvT has no norm after its stages.
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
        (final, maps), state = self._forward(x, state, key=key)
        outputs = [maps[i] if output_fmt == "map" else grid_to_tokens(maps[i]) for i in chosen]
        return (outputs if intermediates_only else (final, outputs)), state

    def set_image_size(self, image_size: tuple[int, int]) -> "CvT":
        """This model for `(height, width)` images: CvT has no position embedding and takes
        any size from `min_image_size`, so it is this model itself; a smaller size is a
        `ValueError` (see [`set_image_size`][eqx_vision.set_image_size])."""
        min_h, min_w = self.min_image_size
        if image_size[0] < min_h or image_size[1] < min_w:
            raise ValueError(
                f"CvT needs images of at least {min_h}x{min_w} pixels; got image_size "
                f"{tuple(image_size)}."
            )
        return self

    def reset_head(
        self,
        num_classes: int,
        *,
        key: PRNGKeyArray | None = None,
        state: eqx.nn.State | None = None,
    ) -> "CvT | tuple[CvT, eqx.nn.State]":
        """This model with a new linear head of `num_classes` outputs, or none for `0`
        (see [`reset_head`][eqx_vision.reset_head]). The head holds no statistics: a
        `state` given is returned with the model, unchanged."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.stages[-1].embed.weight.shape[0], num_classes, key=key)
        model = eqx.tree_at(lambda m: m.head, self, head, is_leaf=lambda n: n is None)
        return model if state is None else (model, state)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " num_classes"] | Float[Array, " dim"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, of any size from `min_image_size`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)` (with `num_classes=0`, the pooled features
        `(s3_emb_dim,)`) and the updated state (unchanged in inference mode):
        `forward_head(*forward_features(x, state, key=key))`.
        """
        x, state = self.forward_features(x, state, key=key)
        return self.forward_head(x, state)
