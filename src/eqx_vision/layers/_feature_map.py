"""Transformer sub-blocks that work on feature maps `(channels, height, width)`.

The convolutional vision transformers (CrossFormer, ScalableViT, Twins, NesT, CvT, LeViT,
...) keep their tokens on a 2-D grid. Most project them with 1x1 convolutions: a 1x1
convolution is a `Linear` over the channels of every pixel, so these blocks move the map
to `(height, width, channels)`, apply the token-wise layers of the library there (a
`LayerNorm` over the last axis is the reference's channel LayerNorm) and move it back.
CvT and LeViT project with convolutions followed by BatchNorm instead, with their
statistics in an `eqx.nn.State`; `MapAttention` covers both.
"""

from collections.abc import Iterator
from typing import Annotated, Literal, cast, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._attention import attend, merge_heads, split_heads
from ._batch_norm import ConvBN
from ._checks import Minimum, NonNegative, Pair, Positive, Rate, checked_arguments
from ._conv import ChannelLayerNorm, Conv2d
from ._feedforward import FeedForward
from ._grid import grid_to_tokens, tokens_to_grid
from ._init import normal
from ._linear import LayerNorm, Linear, gelu
from ._random import split_key
from ._window import window_merge, window_partition


class ConvProjection(eqx.Module):
    """CvT's convolutional projection: depthwise conv → BatchNorm → 1x1 conv, no biases.

    The depthwise convolution has padding `kernel_size // 2`; with `stride > 1` it shrinks
    the map. Called as `y, state = projection(x, state)`.
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
        """**Arguments:**

        - `x`: the feature map.
        - `state`: holds the BatchNorm statistics.

        **Returns:** the projected map and the updated state.
        """
        x, state = self.depthwise(x, state)
        return self.pointwise(x), state


def attention_bias_indices(fmap_size: int, q_stride: int = 1) -> Int[np.ndarray, "q_seq kv_seq"]:
    """The attention-bias index of every (query, key) pair: `|Δrow| * fmap_size + |Δcol|`.

    Keys sit on the `fmap_size x fmap_size` grid; queries on the same grid, or on every
    `q_stride`-th row and column of it. Pairs at the same absolute offset share a bias
    whatever the signs of the offsets (LeViT's attention bias). Returned as a NumPy
    constant.
    """
    q = np.arange(0, fmap_size, q_stride)
    k = np.arange(fmap_size)
    q_rows, q_cols = (a.reshape(-1) for a in np.meshgrid(q, q, indexing="ij"))
    k_rows, k_cols = (a.reshape(-1) for a in np.meshgrid(k, k, indexing="ij"))
    d_rows = np.abs(q_rows[:, None] - k_rows[None, :])
    d_cols = np.abs(q_cols[:, None] - k_cols[None, :])
    return d_rows * fmap_size + d_cols


def _project(
    layer: Linear | Conv2d, x: Float[Array, "height width channels"]
) -> Float[Array, "out_height out_width out_channels"]:
    """A 1x1 projection (`Linear`) or a strided reduction (`Conv2d`) of a channels-last map."""
    if isinstance(layer, Linear):
        return layer(x)
    return layer(x.transpose(2, 0, 1)).transpose(1, 2, 0)


def _check_options(
    projection: str,
    projections: str,
    dims: dict[str, int],
    *,
    kv_reduction: int,
    q_stride: int,
    proj_kernel: int,
    value_conv: int,
    windowed: bool,
    bias_map_size: int | None,
) -> None:
    """The combinations of `MapAttention` options that it implements."""
    allowed = {"linear": ("qkv", "q_kv", "q_k_v"), "separable": ("q_kv",), "conv_bn": ("q_k_v",)}
    if projection not in allowed:
        raise ValueError(
            f"projection must be 'linear', 'separable' or 'conv_bn'; got {projection!r}."
        )
    if projections not in allowed[projection]:
        raise ValueError(
            f"projection={projection!r} supports projections in {allowed[projection]}; got "
            f"{projections!r}."
        )
    if projections == "qkv" and kv_reduction != 1:
        raise ValueError("fused qkv projections need kv_reduction=1.")
    if projections != "q_k_v" and dims["dim_value"] != dims["dim_head"]:
        raise ValueError(f"{projections} projections need dim_value == dim_head.")
    if projection != "separable" and proj_kernel != 1:
        raise ValueError("proj_kernel applies to projection='separable' only.")
    if projection == "linear" and q_stride != 1:
        raise ValueError("q_stride > 1 needs convolutional projections ('separable', 'conv_bn').")
    if projection == "conv_bn" and kv_reduction != 1:
        raise ValueError("kv_reduction > 1 is not available with projection='conv_bn'.")
    if projection == "linear" and bias_map_size is not None:
        raise ValueError("bias_map_size needs convolutional projections ('separable', 'conv_bn').")
    if projection != "linear" and (windowed or value_conv):
        raise ValueError("windows and value_conv need projection='linear'.")
    if kv_reduction != 1 and (windowed or value_conv or bias_map_size is not None):
        raise ValueError(
            "kv_reduction > 1 cannot be combined with windows, value_conv or bias_map_size."
        )


class MapAttention(eqx.Module):
    """Pre-norm multi-head attention over a feature map: the attention of the convolutional
    vision transformers.

    Optional channel LayerNorm, query/key/value projections, attention over the whole map
    or within windows, then an output projection. Options cover the variants:

    - `projection`, how queries, keys and values are computed:
        - `"linear"`: 1x1 convolutions without bias, stored as `Linear`s over channels
          (weights `(out, in)`); the output projection is a `Linear` with bias and the norm
          a `LayerNorm` over channels. CrossFormer, NesT, ScalableViT, Twins.
        - `"separable"`: `ConvProjection`s (depthwise `proj_kernel` conv → BatchNorm → 1x1
          conv); the output projection is a 1x1 `Conv2d` with bias and the norm a
          `ChannelLayerNorm`. CvT.
        - `"conv_bn"`: 1x1 convolutions each followed by BatchNorm (`ConvBN`); the output
          projection is a `ConvBN` whose convolution has a bias. LeViT.

      The convolutional projections keep BatchNorm statistics in an `eqx.nn.State`.
    - `projections`: one fused `to_qkv` (`"qkv"`), `to_q` and `to_kv` (`"q_kv"`), or
      `to_q`, `to_k` and `to_v` (`"q_k_v"`).
    - `kv_reduction = r > 1`: keys and values on a map `r` times coarser: from an `r x r`
      convolution with stride `r` (no bias, no padding) with `"linear"` projections (Twins
      global attention, ScalableViT's scalable self-attention), from a depthwise
      convolution of stride `r` with `"separable"` ones (CvT).
    - `spatial_reduction`, with `"linear"` projections and `kv_reduction = r > 1`: the
      map is first reduced by an `r x r` convolution of stride `r` to `dim` channels
      (with bias, no padding) and a LayerNorm (eps 1e-5), then projected to keys and
      values 1x1 (the spatial-reduction attention of PVT, and the global attention of
      the original Twins).
    - `q_stride = s > 1`, with convolutional projections: queries on every `s`-th row and
      column, so the output map is smaller than the input (LeViT's downsampling attention).
    - `bias_map_size = n`, with convolutional projections: a learned attention bias
      `pos_bias` of shape `(n * n, heads)` for keys on an `n x n` map, indexed by
      `attention_bias_indices` and added to the scores as `bias / scale`, i.e. times
      `dim_head ** 0.5` (LeViT).
    - `window`, with `"linear"` projections: attention only within `(wh, ww)` windows,
      contiguous or, with `dilated=True`, made of pixels spaced evenly across the map (see
      `window_partition`), with one dropout key per window.
    - `value_conv = k > 0`, with `"linear"` projections: a `k x k` convolution (padding
      `k // 2`, bias) of the full value map, added to the attention output before the
      output projection (ScalableViT's local interactive module).
    - `gelu_before_out`: a GELU on the attention output before its projection (LeViT).
    - `dropout` acts on the attention probabilities (`attn_dropout=True`) and on the output
      (`out_dropout=True`).
    """

    norm: LayerNorm | ChannelLayerNorm | None
    to_qkv: Linear | None
    to_q: Linear | ConvBN | ConvProjection | None
    to_kv: Linear | Conv2d | ConvProjection | None
    to_k: Linear | Conv2d | ConvBN | None
    to_v: Linear | Conv2d | ConvBN | None
    kv_reduce: Conv2d | None
    kv_reduce_norm: LayerNorm | None
    value_conv: Conv2d | None
    to_out: Linear | Conv2d | ConvBN
    pos_bias: Float[Array, "positions heads"] | None
    attn_dropout: eqx.nn.Dropout | None
    out_dropout: eqx.nn.Dropout | None
    heads: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    window: tuple[int, int] | None = eqx.field(static=True)
    dilated: bool = eqx.field(static=True)
    q_stride: int = eqx.field(static=True)
    bias_map_size: int | None = eqx.field(static=True)
    gelu_before_out: bool = eqx.field(static=True)
    keep_bits: bool | None

    @checked_arguments
    def __init__(
        self,
        dim: Positive,
        *,
        heads: Positive,
        dim_head: Positive,
        dim_value: Positive | None = None,
        dim_out: Positive | None = None,
        dropout: Rate = 0.0,
        projection: Literal["linear", "separable", "conv_bn"] = "linear",
        projections: Literal["qkv", "q_kv", "q_k_v"] = "qkv",
        norm: bool = True,
        kv_reduction: Positive = 1,
        q_stride: Positive = 1,
        proj_kernel: Positive = 1,
        bias_map_size: Positive | None = None,
        window: Annotated[int | tuple[int, int] | None, Pair(), Minimum(1)] = None,
        dilated: bool = False,
        value_conv: NonNegative = 0,
        gelu_before_out: bool = False,
        attn_dropout: bool = True,
        out_dropout: bool = True,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        spatial_reduction: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of the input map.
        - `heads`: number of attention heads.
        - `dim_head`: dimension of each head's queries and keys; the scale is
          `dim_head ** -0.5`.
        - `dim_value`: dimension of each head's values; defaults to `dim_head`.
        - `dim_out`: channels of the output map; defaults to `dim`.
        - `dropout`: dropout rate, on the sites chosen by `attn_dropout` and `out_dropout`.
        - `norm`: whether to normalise the input over its channels first.
        - `norm_eps`: the epsilon of that norm.
        - `qkv_bias`: whether the `"linear"` query/key/value projections have a bias.
        - `proj_kernel`: kernel of the depthwise convolutions of `"separable"` projections.
        - `projection`, `projections`, `kv_reduction`, `spatial_reduction`, `q_stride`,
          `bias_map_size`, `window`, `dilated`, `value_conv`, `gelu_before_out`: the
          variants described above.
        - `key`: a `jax.random.key` for the initialisation.
        """
        dim_value = dim_head if dim_value is None else dim_value
        dim_out = dim if dim_out is None else dim_out
        dims = dict(dim=dim, heads=heads, dim_head=dim_head, dim_value=dim_value, dim_out=dim_out)
        _check_options(
            projection,
            projections,
            dims,
            kv_reduction=kv_reduction,
            q_stride=q_stride,
            proj_kernel=proj_kernel,
            value_conv=value_conv,
            windowed=window is not None,
            bias_map_size=bias_map_size,
        )
        if qkv_bias and projection != "linear":
            raise ValueError(f"qkv_bias applies to projection='linear' only; got {projection!r}.")
        if spatial_reduction and (projection != "linear" or projections == "qkv"):
            raise ValueError("spatial_reduction needs projection='linear', 'q_kv' or 'q_k_v'.")
        inner_qk, inner_v = heads * dim_head, heads * dim_value
        self.to_qkv = self.to_q = self.to_kv = self.to_k = self.to_v = None
        self.value_conv = self.kv_reduce = self.kv_reduce_norm = None
        self.pos_bias = None
        if projection == "linear":
            self.norm = LayerNorm(dim, eps=norm_eps) if norm else None
            keys = iter(jr.split(key, 6))
            if spatial_reduction and kv_reduction > 1:
                r, kv_reduction = kv_reduction, 1  # the projections then work on the reduced map
                self.kv_reduce = Conv2d(dim, dim, r, stride=r, key=jr.fold_in(key, 6))
                self.kv_reduce_norm = LayerNorm(dim)
            layers = _linear_projections(
                dim, inner_qk, inner_v, projections, kv_reduction, keys, bias=qkv_bias
            )
            self.to_qkv, self.to_q, self.to_kv, self.to_k, self.to_v = layers
            if value_conv:
                pad = value_conv // 2
                self.value_conv = Conv2d(inner_v, inner_v, value_conv, padding=pad, key=next(keys))
            self.to_out = Linear(inner_v, dim_out, key=next(keys))
            bias_key = next(keys)
        elif projection == "separable":
            self.norm = ChannelLayerNorm(dim, eps=norm_eps) if norm else None
            q_key, kv_key, out_key, *rest = jr.split(key, 3 if bias_map_size is None else 4)
            self.to_q = ConvProjection(dim, inner_qk, proj_kernel, q_stride, key=q_key)
            self.to_kv = ConvProjection(dim, 2 * inner_qk, proj_kernel, kv_reduction, key=kv_key)
            self.to_out = Conv2d(inner_v, dim_out, 1, key=out_key)
            bias_key = rest[0] if rest else out_key
        else:
            self.norm = ChannelLayerNorm(dim, eps=norm_eps) if norm else None
            q_key, k_key, v_key, out_key, bias_key = jr.split(key, 5)
            self.to_q = ConvBN(dim, inner_qk, stride=q_stride, key=q_key)
            self.to_k = ConvBN(dim, inner_qk, key=k_key)
            self.to_v = ConvBN(dim, inner_v, key=v_key)
            self.to_out = ConvBN(inner_v, dim_out, use_bias=True, key=out_key)
        if bias_map_size is not None:
            self.pos_bias = normal(bias_key, (bias_map_size * bias_map_size, heads))
        self.attn_dropout = eqx.nn.Dropout(dropout) if attn_dropout else None
        self.out_dropout = eqx.nn.Dropout(dropout) if out_dropout else None
        self.heads = heads
        self.scale = dim_head**-0.5
        self.window = cast(tuple[int, int] | None, window)  # a pair, from checked_arguments
        self.dilated = dilated
        self.q_stride = q_stride
        self.bias_map_size = bias_map_size
        self.gelu_before_out = gelu_before_out
        self.keep_bits = None  # set by a Stack (see Linear.keep_bits)

    def is_stateful(self) -> bool:
        """Whether the projections hold BatchNorm statistics (then `__call__` needs `state`)."""
        return not isinstance(self.to_out, Linear)

    @overload
    def __call__(
        self,
        x: Float[Array, "channels height width"],
        *,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "out_channels out_height out_width"]: ...

    @overload
    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]: ...

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State | None = None,
        *,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> (
        Float[Array, "out_channels out_height out_width"]
        | tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]
    ):
        """**Arguments:**

        - `x`: the feature map.
        - `state`: the model's `eqx.nn.State`, needed by the convolutional projections
          (`"separable"`, `"conv_bn"`) for their BatchNorm statistics.
        - `bias`: added to the attention scores: `(seq, kv_seq)` shared by all windows and
          heads (a relative position bias, say), `(heads, seq, kv_seq)` shared by all
          windows, or `(windows, heads, seq, kv_seq)`.
        - `key`: needed only for dropout in training mode.

        **Returns:** the output map, the shape of `x` unless `dim_out` or `q_stride` change
        it; with `state`, the pair `(output, state)`.
        """
        if state is None and self.is_stateful():
            raise ValueError(
                "this MapAttention keeps BatchNorm statistics: call it as "
                "`y, state = attn(x, state)`."
            )
        attn_key, out_key = split_key(key, 2)
        if isinstance(self.to_out, Linear):
            out, new_state = self._channels_last(x, bias, attn_key, out_key), state
        else:
            out, new_state = self._channels_first(x, state, bias, attn_key, out_key)
        if state is None:
            return out
        assert new_state is not None
        return out, new_state

    def _heads_attend(
        self,
        q: Float[Array, "seq qk_inner"],
        k: Float[Array, "kv_seq qk_inner"],
        v: Float[Array, "kv_seq v_inner"],
        bias: Float[Array, "heads seq kv_seq"] | None,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "seq v_inner"]:
        """Multi-head attention of token sequences, heads split from the channels."""
        heads = [split_heads(t, self.heads) for t in (q, k, v)]
        out = attend(*heads, scale=self.scale, bias=bias, dropout=self.attn_dropout, key=key)
        return merge_heads(out)

    def _channels_last(
        self,
        x: Float[Array, "channels height width"],
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None,
        attn_key: PRNGKeyArray | None,
        out_key: PRNGKeyArray | None,
    ) -> Float[Array, "out_channels height width"]:
        """`"linear"` projections: the map channels last, attention over the whole map (one
        window) or within windows, one dropout key per window."""
        _, height, width = x.shape
        x = x.transpose(1, 2, 0)
        if self.norm is not None:
            x = self.norm(x)
        q, k, v = self._linear_qkv(x)
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
        attention = jax.vmap(self._heads_attend, in_axes=(0, 0, 0, bias_axis, 0))
        out = attention(q, k, v, bias, keys)
        if self.window is None:
            out = out.reshape(height, width, -1)
        else:
            out = window_merge(out, (height, width), self.window, dilated=self.dilated)
        if local is not None:
            out = out + local
        if self.gelu_before_out:
            out = gelu(out, keep_bits=bool(self.keep_bits))
        assert isinstance(self.to_out, Linear)
        out = self.to_out(out)
        if self.out_dropout is not None:
            out = self.out_dropout(out, key=out_key)
        return out.transpose(2, 0, 1)

    def _linear_qkv(
        self, x: Float[Array, "height width channels"]
    ) -> tuple[
        Float[Array, "height width qk_inner"],
        Float[Array, "kv_height kv_width qk_inner"],
        Float[Array, "kv_height kv_width v_inner"],
    ]:
        """Queries, keys and values of a channels-last map, from `"linear"` projections."""
        if self.to_qkv is not None:
            q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
            return q, k, v
        assert isinstance(self.to_q, Linear)
        q = self.to_q(x)
        if self.kv_reduce is not None and self.kv_reduce_norm is not None:
            x = self.kv_reduce_norm(_project(self.kv_reduce, x))
        if self.to_kv is not None:
            assert not isinstance(self.to_kv, ConvProjection)
            k, v = jnp.split(_project(self.to_kv, x), 2, axis=-1)
            return q, k, v
        assert not isinstance(self.to_k, ConvBN | None)
        assert not isinstance(self.to_v, ConvBN | None)
        return q, _project(self.to_k, x), _project(self.to_v, x)

    def _channels_first(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State | None,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None,
        attn_key: PRNGKeyArray | None,
        out_key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        """Convolutional projections (`"separable"`, `"conv_bn"`): the map channels first,
        BatchNorm statistics in `state`, attention over the whole map."""
        assert state is not None
        q, k, v, bias, height, state = self._conv_heads(x, state, bias)
        out = attend(q, k, v, scale=self.scale, bias=bias, dropout=self.attn_dropout, key=attn_key)
        out = tokens_to_grid(merge_heads(out), height)
        if self.gelu_before_out:
            out = gelu(out, keep_bits=bool(self.keep_bits))
        if isinstance(self.to_out, ConvBN):
            out, state = self.to_out(out, state)
        else:
            assert isinstance(self.to_out, Conv2d)
            out = self.to_out(out)
        if self.out_dropout is not None:
            out = self.out_dropout(out, key=out_key)
        return out, state

    def _conv_heads(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None,
    ) -> tuple[Array, Array, Array, Array | None, int, eqx.nn.State]:
        """Convolutional projections: queries, keys and values `(heads, seq, dim)`, the
        score bias (the learned one included), the height of the query map and the
        state."""
        assert isinstance(self.to_q, ConvBN | ConvProjection)
        if self.norm is not None:
            x = self.norm(x)
        q, state = self.to_q(x, state)
        if isinstance(self.to_kv, ConvProjection):
            kv, state = self.to_kv(x, state)
            k, v = jnp.split(kv, 2, axis=0)
        else:
            assert isinstance(self.to_k, ConvBN) and isinstance(self.to_v, ConvBN)
            k, state = self.to_k(x, state)
            v, state = self.to_v(x, state)
        height = q.shape[1]
        q, k, v = (split_heads(grid_to_tokens(t), self.heads) for t in (q, k, v))
        if bias is not None:
            bias = jnp.broadcast_to(bias, (1, self.heads, q.shape[1], k.shape[1]))[0]
        bias = self._learned_bias(bias, q.shape[1], k.shape[1])
        return q, k, v, bias, height, state

    def conv_probabilities(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        bias: Float[Array, "*#bias_batch q_seq kv_seq"] | None = None,
    ) -> Float[Array, "heads q_seq kv_seq"]:
        """The weights that multiply the values in `self(x, state, bias=bias)`, for the
        convolutional projections (`"separable"`, `"conv_bn"`), without dropout: the
        softmax of the scaled scores plus the biases, `(heads, q_seq, kv_seq)`, queries
        and keys on their maps row by row. The state is read, not updated (use it in
        inference mode)."""
        if isinstance(self.to_out, Linear):
            raise ValueError("conv_probabilities needs convolutional projections.")
        q, k, _, bias, _, _ = self._conv_heads(x, state, bias)
        dots = jnp.einsum("hid,hjd->hij", q, k) * self.scale
        if bias is not None:
            dots = dots + bias.astype(dots.dtype)
        probs = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
        return probs.astype(q.dtype)

    def _learned_bias(
        self, bias: Float[Array, "heads q_seq kv_seq"] | None, q_seq: int, kv_seq: int
    ) -> Float[Array, "heads q_seq kv_seq"] | None:
        """`bias` plus the learned attention bias, if there is one."""
        if self.pos_bias is None:
            return bias
        assert self.bias_map_size is not None
        index = attention_bias_indices(self.bias_map_size, self.q_stride)
        if index.shape != (q_seq, kv_seq):
            raise ValueError(
                f"the attention bias is learned for {index.shape[0]} queries and "
                f"{index.shape[1]} keys ({self.bias_map_size}x{self.bias_map_size} map); "
                f"got {q_seq} queries and {kv_seq} keys."
            )
        learned = jnp.moveaxis(self.pos_bias[index], -1, 0) / self.scale
        return learned if bias is None else bias + learned


def _linear_projections(
    dim: int,
    inner_qk: int,
    inner_v: int,
    projections: str,
    kv_reduction: int,
    keys: Iterator[PRNGKeyArray],
    *,
    bias: bool = False,
) -> tuple[
    Linear | None,
    Linear | None,
    Linear | Conv2d | None,
    Linear | Conv2d | None,
    Linear | Conv2d | None,
]:
    """`(to_qkv, to_q, to_kv, to_k, to_v)` of `"linear"` projections, one key each, with
    biases if `bias`."""
    if projections == "qkv":
        return Linear(dim, 3 * inner_qk, use_bias=bias, key=next(keys)), None, None, None, None
    to_q = Linear(dim, inner_qk, use_bias=bias, key=next(keys))
    if projections == "q_kv":
        to_kv = _reduce(dim, 2 * inner_qk, kv_reduction, bias=bias, key=next(keys))
        return None, to_q, to_kv, None, None
    to_k = _reduce(dim, inner_qk, kv_reduction, bias=bias, key=next(keys))
    return None, to_q, None, to_k, _reduce(dim, inner_v, kv_reduction, bias=bias, key=next(keys))


def _reduce(
    dim: int, out: int, reduction: int, *, bias: bool = False, key: PRNGKeyArray
) -> Linear | Conv2d:
    """A 1x1 projection, or an `r x r` convolution of stride `r` for `reduction = r > 1`."""
    if reduction == 1:
        return Linear(dim, out, use_bias=bias, key=key)
    return Conv2d(dim, out, reduction, stride=reduction, padding=0, use_bias=bias, key=key)


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
        dim: Positive,
        hidden_dim: Positive,
        *,
        dropout: Rate = 0.0,
        out_dropout: bool = True,
        norm_eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: channels of the map, in and out.
        - `hidden_dim`: width of the hidden layer.
        - `dropout`: dropout rate after the activation and (with `out_dropout`) at the end.
        - `norm_eps`: the epsilon of the channel LayerNorm.
        - `key`: a `jax.random.key` for the initialisation.
        """
        self.ff = FeedForward(
            dim,
            hidden_dim,
            dropout=dropout,
            out_dropout=out_dropout,
            norm_eps=norm_eps,
            activation=gelu,
            key=key,
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
