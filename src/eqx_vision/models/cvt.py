"""CvT: "CvT: Introducing Convolutions to Vision Transformers".

Wu et al., 2021, https://arxiv.org/abs/2103.15808.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..interop import StateDict, register
from ..interop._vit_pytorch import (
    convert_channel_layernorm,
    convert_conv,
    convert_conv_bn,
    convert_linear,
    convert_map_feedforward,
    convert_stack_with_state,
)
from ..layers import (
    ChannelLayerNorm,
    Conv2d,
    ConvBN,
    Linear,
    MapFeedForward,
    Stack,
    attend,
    check_image,
    check_key,
    grid_to_tokens,
    merge_heads,
    split_heads,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import checked_arguments


DIM_HEAD = 64  # fixed in the reference, not a constructor argument


class ConvProjection(eqx.Module):
    """CvT's convolutional projection: depthwise conv → BatchNorm → 1x1 conv, no biases.

    The depthwise convolution has padding `kernel_size // 2`; with `stride > 1` (the keys
    and values) it shrinks the map.
    """

    depthwise: ConvBN
    pointwise: Conv2d

    def __init__(self, dim: int, out_dim: int, kernel_size: int, stride: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: input channels.
        - `out_dim`: output channels.
        - `kernel_size`, `stride`: of the depthwise convolution.
        - `key`: a `jax.random.key` for the initialisation.
        """
        dw_key, pw_key = jr.split(key)
        self.depthwise = ConvBN(
            dim,
            dim,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            depthwise=True,
            key=dw_key,
        )
        self.pointwise = Conv2d(dim, out_dim, 1, use_bias=False, key=pw_key)

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        x, state = self.depthwise(x, state)
        return self.pointwise(x), state


class CvTAttention(eqx.Module):
    """Multi-head self-attention on a feature map with convolutional projections.

    Channel LayerNorm, then queries from a stride-1 `ConvProjection` and keys and values
    from a stride-`kv_proj_stride` one; heads are split from the channels as
    `'(h d) x y -> h (x y) d'`, and the output goes back onto the map through a 1x1 conv
    with bias.
    """

    norm: ChannelLayerNorm
    to_q: ConvProjection
    to_kv: ConvProjection
    to_out: Conv2d
    attn_dropout: eqx.nn.Dropout
    out_dropout: eqx.nn.Dropout
    heads: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        proj_kernel: int,
        kv_proj_stride: int,
        heads: int,
        dim_head: int = DIM_HEAD,
        dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of the map.
        - `proj_kernel`: kernel size of the depthwise projections (odd).
        - `kv_proj_stride`: stride of the key/value projection.
        - `heads`, `dim_head`: number and size of the attention heads.
        - `dropout`: on the attention probabilities and on the output.
        - `key`: a `jax.random.key` for the initialisation.
        """
        q_key, kv_key, out_key = jr.split(key, 3)
        inner = heads * dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_q = ConvProjection(dim, inner, proj_kernel, 1, key=q_key)
        self.to_kv = ConvProjection(dim, 2 * inner, proj_kernel, kv_proj_stride, key=kv_key)
        self.to_out = Conv2d(inner, dim, 1, key=out_key)
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.out_dropout = eqx.nn.Dropout(dropout)
        self.heads = heads
        self.scale = dim_head**-0.5

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "channels height width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one feature map.
        - `state`: the model's `eqx.nn.State` (the projections' BatchNorm statistics).
        - `key`: needed only for dropout in training mode.

        **Returns:** the attention output, the shape of `x`, and the updated state.
        """
        attn_key, out_key = split_key(key, 2)
        height = x.shape[1]
        x = self.norm(x)
        q, state = self.to_q(x, state)
        kv, state = self.to_kv(x, state)
        k, v = jnp.split(kv, 2, axis=0)
        q, k, v = (split_heads(grid_to_tokens(t), self.heads) for t in (q, k, v))
        out = attend(q, k, v, scale=self.scale, dropout=self.attn_dropout, key=attn_key)
        out = self.to_out(tokens_to_grid(merge_heads(out), height))
        return self.out_dropout(out, key=out_key), state


class CvTBlock(eqx.Module):
    """`x + attn(x)` then `x + ff(x)`, where the feed-forward (channel LayerNorm → 1x1 conv →
    GELU → 1x1 conv) acts on every pixel of the map."""

    attn: CvTAttention
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
        self.attn = CvTAttention(
            dim,
            proj_kernel=proj_kernel,
            kv_proj_stride=kv_proj_stride,
            heads=heads,
            dropout=dropout,
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
    head: Linear
    channels: int = eqx.field(static=True)
    min_image_size: tuple[int, int] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        num_classes: int,
        s1_emb_dim: int = 64,
        s1_emb_kernel: int = 7,
        s1_emb_stride: int = 4,
        s1_proj_kernel: int = 3,
        s1_kv_proj_stride: int = 2,
        s1_heads: int = 1,
        s1_depth: int = 1,
        s1_mlp_mult: int = 4,
        s2_emb_dim: int = 192,
        s2_emb_kernel: int = 3,
        s2_emb_stride: int = 2,
        s2_proj_kernel: int = 3,
        s2_kv_proj_stride: int = 2,
        s2_heads: int = 3,
        s2_depth: int = 2,
        s2_mlp_mult: int = 4,
        s3_emb_dim: int = 384,
        s3_emb_kernel: int = 3,
        s3_emb_stride: int = 2,
        s3_proj_kernel: int = 3,
        s3_kv_proj_stride: int = 2,
        s3_heads: int = 6,
        s3_depth: int = 10,
        s3_mlp_mult: int = 4,
        dropout: float = 0.0,
        channels: int = 3,
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

        - `num_classes`: number of output logits.
        - `dropout`: dropout rate in attention and feed-forward blocks.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        configs = [
            dict(
                emb_dim=s1_emb_dim,
                emb_kernel=s1_emb_kernel,
                emb_stride=s1_emb_stride,
                proj_kernel=s1_proj_kernel,
                kv_proj_stride=s1_kv_proj_stride,
                heads=s1_heads,
                depth=s1_depth,
                mlp_mult=s1_mlp_mult,
            ),
            dict(
                emb_dim=s2_emb_dim,
                emb_kernel=s2_emb_kernel,
                emb_stride=s2_emb_stride,
                proj_kernel=s2_proj_kernel,
                kv_proj_stride=s2_kv_proj_stride,
                heads=s2_heads,
                depth=s2_depth,
                mlp_mult=s2_mlp_mult,
            ),
            dict(
                emb_dim=s3_emb_dim,
                emb_kernel=s3_emb_kernel,
                emb_stride=s3_emb_stride,
                proj_kernel=s3_proj_kernel,
                kv_proj_stride=s3_kv_proj_stride,
                heads=s3_heads,
                depth=s3_depth,
                mlp_mult=s3_mlp_mult,
            ),
        ]
        for i, config in enumerate(configs, start=1):
            for name, value in config.items():
                if value <= 0:
                    raise ValueError(f"s{i}_{name} must be positive; got {value}.")
            if config["proj_kernel"] % 2 == 0:
                raise ValueError(
                    f"s{i}_proj_kernel must be odd (an even kernel changes the size of the "
                    f"query map); got {config['proj_kernel']}."
                )
        for name, value in (("num_classes", num_classes), ("channels", channels)):
            if value <= 0:
                raise ValueError(f"{name} must be positive; got {value}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")

        *stage_keys, head_key = jr.split(key, 4)
        stages = []
        in_dim = channels
        for config, stage_key in zip(configs, stage_keys, strict=True):
            stages.append(
                CvTStage(
                    in_dim,
                    config["emb_dim"],
                    emb_kernel=config["emb_kernel"],
                    emb_stride=config["emb_stride"],
                    proj_kernel=config["proj_kernel"],
                    kv_proj_stride=config["kv_proj_stride"],
                    heads=config["heads"],
                    depth=config["depth"],
                    mlp_mult=config["mlp_mult"],
                    dropout=dropout,
                    key=stage_key,
                )
            )
            in_dim = config["emb_dim"]
        self.stages = (stages[0], stages[1], stages[2])
        self.head = Linear(in_dim, num_classes, key=head_key)
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

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, of any size from `min_image_size`.
        - `state`: the BatchNorm statistics, from `eqx.nn.make_with_state`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)` and the updated state (unchanged in
        inference mode).
        """
        check_key(self, key)
        height, width = x.shape[-2:] if x.ndim >= 2 else (0, 0)
        check_image(x, (self.channels, height, width), type(self).__name__)
        min_h, min_w = self.min_image_size
        if height < min_h or width < min_w:
            raise ValueError(
                f"CvT needs images of at least {min_h}x{min_w} pixels, shape "
                f"({self.channels}, >={min_h}, >={min_w}); got shape {tuple(x.shape)}."
            )
        for stage, stage_key in zip(self.stages, split_key(key, 3), strict=True):
            x, state = stage(x, state, key=stage_key)
        return self.head(jnp.mean(x, axis=(1, 2))), state


def _convert_projection(
    m: ConvProjection, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[ConvProjection, eqx.nn.State]:
    depthwise, state = convert_conv_bn(m.depthwise, sd, prefix + "0.", prefix + "1.", state)
    pointwise = convert_conv(m.pointwise, sd, prefix + "2.")
    return eqx.tree_at(lambda p: (p.depthwise, p.pointwise), m, (depthwise, pointwise)), state


def _convert_block(
    m: CvTBlock, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[CvTBlock, eqx.nn.State]:
    attn = m.attn
    to_q, state = _convert_projection(attn.to_q, sd, prefix + "0.to_q.net.", state)
    to_kv, state = _convert_projection(attn.to_kv, sd, prefix + "0.to_kv.net.", state)
    attn = eqx.tree_at(
        lambda a: (a.norm, a.to_q, a.to_kv, a.to_out),
        attn,
        (
            convert_channel_layernorm(attn.norm, sd, prefix + "0.norm."),
            to_q,
            to_kv,
            convert_conv(attn.to_out, sd, prefix + "0.to_out.0."),
        ),
    )
    ff = convert_map_feedforward(m.ff, sd, prefix + "1.")
    return eqx.tree_at(lambda b: (b.attn, b.ff), m, (attn, ff)), state


@register(CvT)
def _from_vit_pytorch(
    model: CvT, sd: StateDict, state: eqx.nn.State | None = None
) -> tuple[CvT, eqx.nn.State]:
    if state is None:
        raise ValueError(
            "CvT keeps BatchNorm statistics in an eqx.nn.State: load it with "
            "`model, state = from_vit_pytorch(model, state_dict, state=state)`."
        )
    stages = []
    for i, stage in enumerate(model.stages):
        prefix = f"layers.{i}."
        blocks, state = convert_stack_with_state(
            stage.blocks, sd, lambda j, p=prefix: f"{p}2.layers.{j}.", _convert_block, state
        )
        stages.append(
            eqx.tree_at(
                lambda s: (s.embed, s.norm, s.blocks),
                stage,
                (
                    convert_conv(stage.embed, sd, prefix + "0."),
                    convert_channel_layernorm(stage.norm, sd, prefix + "1."),
                    blocks,
                ),
            )
        )
    model = eqx.tree_at(
        lambda m: (m.stages, m.head),
        model,
        (tuple(stages), convert_linear(model.head, sd, "to_logits.2.")),
    )
    return model, state
