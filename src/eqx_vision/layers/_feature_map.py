"""Transformer sub-blocks that work on feature maps `(channels, height, width)`.

The convolutional vision transformers (CrossFormer, ScalableViT, Twins, NesT, ...) keep
their tokens on a 2-D grid and project them with 1x1 convolutions. A 1x1 convolution is a
`Linear` over the channels of every pixel, so these blocks move the map to
`(height, width, channels)`, apply the token-wise layers of the library there (a
`LayerNorm` over the last axis is the reference's channel LayerNorm) and move it back.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._attention import attend, merge_heads, split_heads
from ._checks import checked_arguments
from ._conv import Conv2d
from ._feedforward import FeedForward
from ._linear import LayerNorm, Linear, gelu
from ._patch import pair
from ._random import split_key
from ._window import window_merge, window_partition


def _project(
    layer: Linear | Conv2d, x: Float[Array, "height width channels"]
) -> Float[Array, "out_height out_width out_channels"]:
    """A 1x1 projection (`Linear`) or a strided reduction (`Conv2d`) of a channels-last map."""
    if isinstance(layer, Linear):
        return layer(x)
    return layer(x.transpose(2, 0, 1)).transpose(1, 2, 0)


class MapAttention(eqx.Module):
    """Pre-norm multi-head attention over a feature map, with 1x1-convolution projections.

    `LayerNorm` over the channels of every pixel, query/key/value projections, attention
    over the whole map or within windows, then a 1x1 output projection with bias. Options
    cover the variants of the convolutional vision transformers:

    - `projections`: one fused `to_qkv` (`"qkv"`), `to_q` and `to_kv` (`"q_kv"`), or
      `to_q`, `to_k` and `to_v` (`"q_k_v"`); none has a bias.
    - `kv_reduction = r > 1`: keys and values come from an `r x r` convolution with stride
      `r` (no bias, no padding) instead of a 1x1 one, attending to a coarser map (Twins
      global attention, ScalableViT's scalable self-attention).
    - `window`: attention only within `(wh, ww)` windows, contiguous or, with
      `dilated=True`, made of pixels spaced evenly across the map (see `window_partition`).
    - `value_conv = k > 0`: a `k x k` convolution (padding `k // 2`, bias) of the full value
      map, added to the attention output before the output projection (ScalableViT's
      local interactive module).
    - `dropout` acts on the attention probabilities (`attn_dropout=True`) and on the output
      (`out_dropout=True`).

    `to_q`, `to_k`, ... are `Linear`s over channels; their weights are the torch 1x1
    convolution weights `(out, in, 1, 1)` reshaped to `(out, in)`.
    """

    norm: LayerNorm
    to_qkv: Linear | None
    to_q: Linear | None
    to_kv: Linear | Conv2d | None
    to_k: Linear | Conv2d | None
    to_v: Linear | Conv2d | None
    value_conv: Conv2d | None
    to_out: Linear
    attn_dropout: eqx.nn.Dropout | None
    out_dropout: eqx.nn.Dropout | None
    heads: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    window: tuple[int, int] | None = eqx.field(static=True)
    dilated: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        dim_value: int | None = None,
        dropout: float = 0.0,
        projections: Literal["qkv", "q_kv", "q_k_v"] = "qkv",
        kv_reduction: int = 1,
        window: int | tuple[int, int] | None = None,
        dilated: bool = False,
        value_conv: int = 0,
        attn_dropout: bool = True,
        out_dropout: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of the map, in and out.
        - `heads`: number of attention heads.
        - `dim_head`: dimension of each head's queries and keys; the scale is
          `dim_head ** -0.5`.
        - `dim_value`: dimension of each head's values; defaults to `dim_head`.
        - `dropout`: dropout rate, on the sites chosen by `attn_dropout` and `out_dropout`.
        - `projections`, `kv_reduction`, `window`, `dilated`, `value_conv`: the variants
          described above.
        - `key`: a `jax.random.key` for the initialisation.
        """
        dim_value = dim_head if dim_value is None else dim_value
        if min(dim, heads, dim_head, dim_value, kv_reduction) <= 0 or value_conv < 0:
            raise ValueError(
                "MapAttention needs positive dim, heads, dim_head, dim_value and kv_reduction "
                f"and value_conv >= 0; got dim={dim}, heads={heads}, dim_head={dim_head}, "
                f"dim_value={dim_value}, kv_reduction={kv_reduction}, value_conv={value_conv}."
            )
        if projections not in ("qkv", "q_kv", "q_k_v"):
            raise ValueError(f"projections must be 'qkv', 'q_kv' or 'q_k_v'; got {projections!r}.")
        if projections == "qkv" and (kv_reduction != 1 or dim_value != dim_head):
            raise ValueError("fused qkv projections need kv_reduction=1 and dim_value == dim_head.")
        if projections == "q_kv" and dim_value != dim_head:
            raise ValueError("q_kv projections need dim_value == dim_head.")
        if kv_reduction != 1 and (window is not None or value_conv):
            raise ValueError("kv_reduction > 1 cannot be combined with windows or value_conv.")
        inner_qk, inner_v = heads * dim_head, heads * dim_value
        keys = iter(jr.split(key, 6))

        def reduce(out: int, *, key: PRNGKeyArray) -> Linear | Conv2d:
            if kv_reduction == 1:
                return Linear(dim, out, use_bias=False, key=key)
            r = kv_reduction
            return Conv2d(dim, out, r, stride=r, padding=0, use_bias=False, key=key)

        self.norm = LayerNorm(dim)
        self.to_qkv = self.to_q = self.to_kv = self.to_k = self.to_v = None
        if projections == "qkv":
            self.to_qkv = Linear(dim, 3 * inner_qk, use_bias=False, key=next(keys))
        else:
            self.to_q = Linear(dim, inner_qk, use_bias=False, key=next(keys))
            if projections == "q_kv":
                self.to_kv = reduce(2 * inner_qk, key=next(keys))
            else:
                self.to_k = reduce(inner_qk, key=next(keys))
                self.to_v = reduce(inner_v, key=next(keys))
        self.value_conv = (
            Conv2d(inner_v, inner_v, value_conv, padding=value_conv // 2, key=next(keys))
            if value_conv
            else None
        )
        self.to_out = Linear(inner_v, dim, key=next(keys))
        self.attn_dropout = eqx.nn.Dropout(dropout) if attn_dropout else None
        self.out_dropout = eqx.nn.Dropout(dropout) if out_dropout else None
        self.heads = heads
        self.scale = dim_head**-0.5
        self.window = None if window is None else pair(window, "window")
        self.dilated = dilated

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        *,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `x`: the feature map.
        - `bias`: added to the attention scores: `(seq, kv_seq)` shared by all windows and
          heads (a relative position bias, say), `(heads, seq, kv_seq)` shared by all
          windows, or `(windows, heads, seq, kv_seq)`.
        - `key`: needed only for dropout in training mode.

        **Returns:** a map of the same shape as `x`.
        """
        _, height, width = x.shape
        attn_key, out_key = split_key(key, 2)
        x = self.norm(x.transpose(1, 2, 0))
        if self.to_qkv is not None:
            q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
        elif self.to_kv is not None:
            assert self.to_q is not None
            q = self.to_q(x)
            k, v = jnp.split(_project(self.to_kv, x), 2, axis=-1)
        else:
            assert self.to_q is not None and self.to_k is not None and self.to_v is not None
            q, k, v = self.to_q(x), _project(self.to_k, x), _project(self.to_v, x)
        local = None
        if self.value_conv is not None:
            local = self.value_conv(v.transpose(2, 0, 1)).transpose(1, 2, 0)
        if self.window is None:
            q, k, v = (t.reshape(1, -1, t.shape[-1]) for t in (q, k, v))
        else:
            q, k, v = (window_partition(t, self.window, dilated=self.dilated) for t in (q, k, v))
        bias_axis = None
        if bias is not None and bias.ndim == 4:
            bias_axis = 0
        elif bias is not None:
            bias = jnp.broadcast_to(bias, (self.heads, q.shape[1], k.shape[1]))
        keys = None if attn_key is None else jr.split(attn_key, q.shape[0])

        def window_attention(
            q: Float[Array, "seq qk_inner"],
            k: Float[Array, "kv_seq qk_inner"],
            v: Float[Array, "kv_seq v_inner"],
            bias: Float[Array, "heads seq kv_seq"] | None,
            key: PRNGKeyArray | None,
        ) -> Float[Array, "seq v_inner"]:
            heads = [split_heads(t, self.heads) for t in (q, k, v)]
            out = attend(*heads, scale=self.scale, bias=bias, dropout=self.attn_dropout, key=key)
            return merge_heads(out)

        out = jax.vmap(window_attention, in_axes=(0, 0, 0, bias_axis, 0))(q, k, v, bias, keys)
        if self.window is None:
            out = out.reshape(height, width, -1)
        else:
            out = window_merge(out, (height, width), self.window, dilated=self.dilated)
        if local is not None:
            out = out + local
        out = self.to_out(out)
        if self.out_dropout is not None:
            out = self.out_dropout(out, key=out_key)
        return out.transpose(2, 0, 1)


class MapFeedForward(eqx.Module):
    """The feed-forward block at every pixel of a map.

    `channel LayerNorm → 1x1 conv → GELU → Dropout → 1x1 conv [→ Dropout]`: a
    `FeedForward` over the channels. Its weights are the torch 1x1 convolution weights
    reshaped to `(out, in)`.
    """

    ff: FeedForward

    @checked_arguments
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dropout: float = 0.0,
        out_dropout: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of the map, in and out.
        - `hidden_dim`: width of the hidden layer.
        - `dropout`: dropout rate after the activation and (with `out_dropout`) at the end.
        - `key`: a `jax.random.key` for the initialisation.
        """
        self.ff = FeedForward(
            dim, hidden_dim, dropout=dropout, out_dropout=out_dropout, activation=gelu, key=key
        )

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `x`: the feature map.
        - `key`: needed only for dropout in training mode.

        **Returns:** a map of the same shape as `x`.
        """
        return self.ff(x.transpose(1, 2, 0), key=key).transpose(2, 0, 1)
