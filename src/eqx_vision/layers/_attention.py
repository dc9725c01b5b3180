"""Multi-head self- and cross-attention, with the variants of the ViT family as options."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..precision import _bfloat16 as bfloat16
from ._checks import checked_arguments
from ._init import full, normal
from ._linear import LayerNorm, Linear
from ._random import split_key


def split_heads(x: Float[Array, "seq inner"], heads: int) -> Float[Array, "heads seq head_dim"]:
    """`'n (h d) -> h n d'`: the head index is the outer factor of the feature axis."""
    n, inner = x.shape
    return x.reshape(n, heads, inner // heads).transpose(1, 0, 2)


def merge_heads(x: Float[Array, "heads seq head_dim"]) -> Float[Array, "seq inner"]:
    """`'h n d -> n (h d)'`, the inverse of `split_heads`."""
    h, n, d = x.shape
    return x.transpose(1, 0, 2).reshape(n, h * d)


def mix_heads(
    attn: Float[Array, "heads q_seq kv_seq"],
    weight: Float[Array, "heads heads2"],
    *,
    keep_bits: bool = False,
) -> Float[Array, "heads2 q_seq kv_seq"]:
    """`einsum('h i j, h g -> g i j')`: a learned linear map across the head axis.

    In bfloat16 this short product (over the few heads) runs in float32 and is rounded
    once; `keep_bits` keeps its bfloat16 output for a stack's backward pass as bits (see
    [`Linear`][eqx_vision.layers.Linear])."""
    if attn.dtype == jnp.bfloat16:
        return bfloat16.mix_heads(attn, weight, keep_bits=keep_bits)
    return jnp.einsum("hij,hg->gij", attn, weight.astype(attn.dtype))


# The most attention scores (heads x queries x keys) that `attend` and `Attention` compute at
# once for one call (one image, one window); beyond it the queries are taken in chunks.
MAX_SCORES = 2**19


def attend(
    q: Float[Array, "heads q_seq head_dim"],
    k: Float[Array, "heads kv_seq head_dim"],
    v: Float[Array, "heads kv_seq v_dim"],
    *,
    scale: float,
    bias: Float[Array, "heads q_seq kv_seq"] | None = None,
    dropout: eqx.nn.Dropout | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "heads q_seq v_dim"]:
    """`softmax(q kᵀ · scale + bias) v` for every head, with dropout on the probabilities.

    The core of the attention blocks that compute their queries, keys and values in their
    own way (convolutional projections on feature maps in CvT and LeViT, windows in the
    hierarchical transformers). The softmax is taken in float32 at least.

    Long sequences are attended in chunks of queries: when `heads x q_seq x kv_seq` exceeds
    `MAX_SCORES` (2^19, 2 MiB of float32 scores per image), the queries are split into
    the fewest chunks under that size, each chunk is computed in turn (`lax.map`) and
    recomputed in the backward pass (`jax.checkpoint`) rather than stored. The results are
    those of the whole computation (the softmax is over the keys); the working memory of
    a training step no longer holds whole score and probability matrices (measured in the
    [performance notes](../performance.md), "Long attention runs in chunks of queries").
    """

    def compute(q: Array, bias: Array | None, offset: Any, key: PRNGKeyArray | None) -> Array:
        del offset
        return _attend(q, k, v, scale=scale, bias=bias, dropout=dropout, key=key)

    return in_query_chunks(compute, q, k.shape[1], bias=bias, key=key)


def in_query_chunks(
    compute: Callable[..., Array],
    q: Float[Array, "heads q_seq head_dim"],
    kv_len: int,
    *,
    bias: Float[Array, "heads q_seq kv_seq"] | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "heads q_seq v_dim"]:
    """`compute(q, bias, offset, key)`, the attention output of queries `q` (with their rows
    of `bias`, the index `offset` of their first query, and a dropout key), evaluated in
    chunks of queries when `heads x q_seq x kv_len` exceeds `MAX_SCORES`.

    The queries are split into the fewest chunks under that size (the last one shorter
    when they do not divide), computed in turn (`lax.map`) and recomputed in the backward
    pass (`jax.checkpoint`); each chunk gets its own dropout key. Below the threshold,
    `compute(q, bias, 0, key)` is called once. Inside `lax.map` the offset is traced.
    """
    heads, n, _ = q.shape
    chunks = -(-heads * n * kv_len // MAX_SCORES)
    if chunks <= 1:
        return compute(q, bias, 0, key)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (heads, n, kv_len))
    size = -(-n // chunks)
    full = n // size  # chunks of `size` queries, then the `n - full * size` left over
    keys = None if key is None else jr.split(key, full + 1)
    chunk = jax.checkpoint(compute)

    def split(x: Array) -> Array:  # (heads, full * size, ...) -> (full, heads, size, ...)
        x = x[:, : full * size].reshape(heads, full, size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    outs = jax.lax.map(
        lambda args: chunk(*args),
        (
            split(q),
            None if bias is None else split(bias),
            jnp.arange(full) * size,
            None if keys is None else keys[:full],
        ),
    )
    out = jnp.moveaxis(outs, 0, 1).reshape(heads, full * size, -1)
    if full * size < n:
        rest = chunk(
            q[:, full * size :],
            None if bias is None else bias[:, full * size :],
            full * size,
            None if keys is None else keys[full],
        )
        out = jnp.concatenate([out, rest], axis=1)
    return out


def _attend(
    q: Float[Array, "heads q_seq head_dim"],
    k: Float[Array, "heads kv_seq head_dim"],
    v: Float[Array, "heads kv_seq v_dim"],
    *,
    scale: float,
    bias: Float[Array, "heads q_seq kv_seq"] | None,
    dropout: eqx.nn.Dropout | None,
    key: PRNGKeyArray | None,
) -> Float[Array, "heads q_seq v_dim"]:
    """`attend` in one piece."""
    dots = jnp.einsum("hid,hjd->hij", q, k) * scale
    if bias is not None:
        dots = dots + bias.astype(dots.dtype)
    attn = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
    attn = attn.astype(v.dtype)
    if dropout is not None:
        attn = dropout(attn, key=key)
    return jnp.einsum("hij,hjd->hid", attn, v)


class Attention(eqx.Module):
    """Pre-norm multi-head attention over a sequence of tokens, with optional variants.

    The plain form is `softmax(q kᵀ · dim_head^-1/2) v` on `LayerNorm(x)`, followed by an
    output projection, as in ViT. Options switch on the variants of the ViT family, each
    as its paper defines it:

    - `talking_heads` (CaiT): learned `(heads, heads)` mixes of the scores before the softmax
      and of the probabilities after it; with `talking_heads_bias`, each mix adds a learned
      per-head bias (timm's `proj_l` and `proj_w` are `Linear` layers over the heads).
    - `reattention` (DeepViT): the probabilities are mixed across heads by a learned
      `(heads, heads)` matrix, then layer-normalised over the head axis.
    - `locality` (LSA, ViT for small datasets): the scale is a learned temperature,
      `exp(t)` with `t` initialised to `log(dim_head^-1/2)`, and each token's score with
      itself is masked out.

    Called with a `context`, the queries come from `x` and the keys and values from the
    concatenation `[LayerNorm(x); context]`, with the context not normalised: the class
    attention of CaiT and the cross attention of CrossViT. With `norm_context=True` the
    context goes through the same LayerNorm, `LayerNorm([x; context])` (timm's CaiT).
    """

    norm: LayerNorm | None
    to_qkv: Linear | None
    to_q: Linear | None
    to_kv: Linear | None
    to_out: Linear | None
    mix_pre: Float[Array, "heads heads"] | None
    mix_post: Float[Array, "heads heads"] | None
    mix_pre_bias: Float[Array, " heads"] | None
    mix_post_bias: Float[Array, " heads"] | None
    reattn_weights: Float[Array, "heads heads"] | None
    reattn_norm: LayerNorm | None
    temperature: Float[Array, ""] | None
    attn_dropout: eqx.nn.Dropout
    out_dropout: eqx.nn.Dropout
    keep_bits: bool | None
    heads: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    norm_context: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        norm: bool = True,
        norm_eps: float = 1e-5,
        fused_qkv: bool = True,
        qkv_bias: bool = False,
        project_out: bool | None = None,
        out_bias: bool = True,
        scale: float | None = None,
        talking_heads: bool = False,
        talking_heads_bias: bool = False,
        reattention: bool = False,
        locality: bool = False,
        norm_context: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension, in and out.
        - `heads`: number of attention heads.
        - `dim_head`: dimension of each head's queries, keys and values.
        - `dropout`: dropout rate on the attention probabilities and on the output.
        - `norm`: whether to layer-normalise the input first (pre-norm).
        - `norm_eps`: the epsilon of that LayerNorm.
        - `fused_qkv`: one `to_qkv` projection (self-attention only) rather than separate
          `to_q` and `to_kv` projections (needed to attend to a `context`).
        - `qkv_bias`: whether the query/key/value projections have a bias.
        - `project_out`: whether to project the heads back to `dim`. The default does so
          unless `heads == 1 and dim_head == dim`, as the reference does.
        - `out_bias`: whether the output projection has a bias.
        - `scale`: the score scale; defaults to `dim_head ** -0.5`.
        - `talking_heads`, `reattention`, `locality`: the variants described above.
        - `talking_heads_bias`: with `talking_heads`, a learned bias per head on each mix
          (initialised to zero).
        - `norm_context`: whether a `context` is layer-normalised too (with `norm`).
        - `key`: a `jax.random.key` for the initialisation.

        `keep_bits`, an ordinary field, is `None` until a
        [`Stack`][eqx_vision.layers.Stack] that runs this layer sets it, as it does
        [`Linear`][eqx_vision.layers.Linear]'s: with `True` the bfloat16 head mixes keep
        their outputs for the backward pass as 16-bit patterns.
        """
        if dim <= 0 or heads <= 0 or dim_head <= 0:
            raise ValueError(
                f"Attention needs positive dim, heads and dim_head; got dim={dim}, "
                f"heads={heads}, dim_head={dim_head}."
            )
        inner = heads * dim_head
        if project_out is None:
            project_out = not (heads == 1 and dim_head == dim)
        if not project_out and inner != dim:
            raise ValueError(
                f"project_out=False needs heads * dim_head == dim; got {heads} * {dim_head} "
                f"!= {dim}."
            )
        if talking_heads_bias and not talking_heads:
            raise ValueError("talking_heads_bias=True needs talking_heads=True.")
        if norm_context and not norm:
            raise ValueError("norm_context=True needs norm=True.")
        qkv_key, kv_key, out_key, pre_key, post_key = jr.split(key, 5)
        self.norm = LayerNorm(dim, eps=norm_eps) if norm else None
        if fused_qkv:
            self.to_qkv = Linear(dim, 3 * inner, use_bias=qkv_bias, key=qkv_key)
            self.to_q = self.to_kv = None
        else:
            self.to_qkv = None
            self.to_q = Linear(dim, inner, use_bias=qkv_bias, key=qkv_key)
            self.to_kv = Linear(dim, 2 * inner, use_bias=qkv_bias, key=kv_key)
        self.to_out = Linear(inner, dim, use_bias=out_bias, key=out_key) if project_out else None
        self.mix_pre = normal(pre_key, (heads, heads)) if talking_heads else None
        self.mix_post = normal(post_key, (heads, heads)) if talking_heads else None
        self.mix_pre_bias = full((heads,), 0.0) if talking_heads_bias else None
        self.mix_post_bias = full((heads,), 0.0) if talking_heads_bias else None
        self.reattn_weights = normal(pre_key, (heads, heads)) if reattention else None
        self.reattn_norm = LayerNorm(heads) if reattention else None
        self.temperature = jnp.asarray(math.log(dim_head**-0.5)) if locality else None
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.out_dropout = eqx.nn.Dropout(dropout)
        self.keep_bits = None
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5 if scale is None else scale
        self.norm_context = norm_context

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx_seq dim"] | None = None,
        *,
        bias: Float[Array, "heads q_seq kv_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: the tokens, `(seq, dim)`.
        - `context`: optional extra keys/values `(ctx_seq, dim)`; see the class docstring.
        - `bias`: optional `(heads, seq, kv_seq)` added to the scaled scores before the
          softmax (a relative-position bias, for instance).
        - `key`: needed only for dropout in training mode.

        **Returns:** `(seq, dim)`.
        """
        attn_key, out_key = split_key(key, 2)
        q, k, v = self._heads(x, context)

        def compute(q: Array, bias: Array | None, offset: Any, key: Any) -> Array:
            attn = self._weights(q, k, bias, offset=offset, dropout_key=key, dropout=True)
            return jnp.einsum("hij,hjd->hid", attn, v)

        # Long sequences in chunks of queries, as `attend`: same values, less memory.
        out = merge_heads(in_query_chunks(compute, q, k.shape[1], bias=bias, key=attn_key))
        if self.to_out is None:
            return out
        return self.out_dropout(self.to_out(out), key=out_key)

    def probabilities(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx_seq dim"] | None = None,
        *,
        bias: Float[Array, "heads q_seq kv_seq"] | None = None,
    ) -> Float[Array, "heads seq kv_seq"]:
        """The weights that multiply the values in `self(x, context, bias=bias)`, without
        dropout: the softmax of the scaled scores, after the head mixes of the variants and
        with the diagonal masked for locality. `(heads, seq, kv_seq)`, keys ordered
        `[x; context]`."""
        q, k, _ = self._heads(x, context)
        return self._weights(q, k, bias, dropout_key=None, dropout=False)

    def _heads(
        self, x: Float[Array, "seq dim"], context: Float[Array, "ctx_seq dim"] | None
    ) -> tuple[Array, Array, Array]:
        """Queries, keys and values, `(heads, seq, dim_head)` each."""
        if self.norm is not None:
            x = self.norm(x)
            if context is not None and self.norm_context:
                context = self.norm(context)
        if self.to_qkv is not None:
            if context is not None:
                raise ValueError("an Attention with fused_qkv=True cannot attend to a context.")
            q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
        else:
            assert self.to_q is not None and self.to_kv is not None
            kv_input = x if context is None else jnp.concatenate([x, context], axis=0)
            q = self.to_q(x)
            k, v = jnp.split(self.to_kv(kv_input), 2, axis=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def _weights(
        self,
        q: Float[Array, "heads q_seq head_dim"],
        k: Float[Array, "heads kv_seq head_dim"],
        bias: Float[Array, "heads q_seq kv_seq"] | None,
        *,
        offset: Any = 0,
        dropout_key: PRNGKeyArray | None,
        dropout: bool,
    ) -> Float[Array, "heads q_seq kv_seq"]:
        """The attention weights from queries and keys, in the dtype of `q`; `offset` is
        the position of the first query among the keys (for locality's diagonal mask)."""
        if self.temperature is None:
            scale = self.scale
        else:  # a float32 parameter: cast, or it would promote bfloat16 scores to float32
            scale = jnp.exp(self.temperature).astype(q.dtype)
        dots = jnp.einsum("hid,hjd->hij", q, k) * scale
        if bias is not None:
            dots = dots + bias.astype(dots.dtype)
        if self.temperature is not None:
            rows = jax.lax.broadcasted_iota(jnp.int32, dots.shape[-2:], 0) + offset
            diagonal = rows == jax.lax.broadcasted_iota(jnp.int32, dots.shape[-2:], 1)
            dots = jnp.where(diagonal, -jnp.finfo(dots.dtype).max, dots)
        if self.mix_pre is not None:
            dots = mix_heads(dots, self.mix_pre, keep_bits=bool(self.keep_bits))
            dots = _add_head_bias(dots, self.mix_pre_bias)
        attn = jax.nn.softmax(dots.astype(jnp.promote_types(dots.dtype, jnp.float32)), axis=-1)
        attn = attn.astype(q.dtype)
        if dropout:
            attn = self.attn_dropout(attn, key=dropout_key)
        if self.mix_post is not None:
            attn = mix_heads(attn, self.mix_post, keep_bits=bool(self.keep_bits))
            attn = _add_head_bias(attn, self.mix_post_bias)
        if self.reattn_weights is not None:
            assert self.reattn_norm is not None
            attn = mix_heads(attn, self.reattn_weights, keep_bits=bool(self.keep_bits))
            attn = jnp.moveaxis(self.reattn_norm(jnp.moveaxis(attn, 0, -1)), -1, 0)
        return attn


def _add_head_bias(
    x: Float[Array, "heads q_seq kv_seq"], bias: Float[Array, " heads"] | None
) -> Float[Array, "heads q_seq kv_seq"]:
    """`x + bias[h]` on every head's scores (the bias of a head mix), in the dtype of `x`."""
    return x if bias is None else x + bias.astype(x.dtype)[:, None, None]
