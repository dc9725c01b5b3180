"""Token-wise linear maps and normalisation over the feature axis."""

import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float, PRNGKeyArray

from ._bits import keeps_bits, saved_as_bits, through_bits
from ._checks import checked_arguments
from ._init import full, uniform


class Linear(eqx.Module):
    """An affine map over the last axis, applied to every leading position at once.

    Unlike `eqx.nn.Linear`, which maps one vector, this layer takes any number of leading
    axes (`(seq, dim)` tokens, `(windows, seq, dim)`, ...), so a sequence of tokens is one
    matrix multiply. The weight has shape `(out_features, in_features)`, as in
    `torch.nn.Linear`, and is initialised the same way: uniform in
    $\\pm 1/\\sqrt{\\text{in\\_features}}$.

    On a bfloat16 input the product accumulates in float32 and is rounded once, and so are
    the two products of its backward pass; the weight and bias gradients are accumulated
    in float32.
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `in_features`: size of the last axis of the input.
        - `out_features`: size of the last axis of the output.
        - `use_bias`: whether to add a learned bias.
        - `key`: a `jax.random.key` for the initialisation.
        """
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                "a Linear layer needs positive sizes; got in_features="
                f"{in_features}, out_features={out_features} (check the dimensions given)."
            )
        wkey, bkey = jr.split(key)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = uniform(wkey, (out_features, in_features), -bound, bound)
        self.bias = uniform(bkey, (out_features,), -bound, bound) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features

    def __call__(
        self, x: Float[Array, "*batch in_features"]
    ) -> Float[Array, "*batch out_features"]:
        return dense(x, self.weight, self.bias)


def dense(
    x: Float[Array, "*batch in_features"],
    weight: Float[Array, "out_features in_features"],
    bias: Float[Array, " out_features"] | None = None,
) -> Float[Array, "*batch out_features"]:
    """`x @ weight.T + bias` in the dtype of `x` (the parameters are cast at use). In
    bfloat16 the product accumulates in float32 and is rounded once, forward and backward
    (see `_bf16_linear_p`)."""
    if x.dtype == jnp.bfloat16:
        return saved_as_bits(_bf16_linear_p.bind(x, weight, *(() if bias is None else (bias,))))
    y = x @ weight.astype(x.dtype).T
    return y if bias is None else y + bias.astype(x.dtype)


# A bfloat16 linear layer is one primitive, `round_bf16(x @ w.T + b)` with the product
# accumulated in float32: the form XLA's CPU backend runs on its bfloat16 matrix units
# (several times faster than float32; a bfloat16-out product is slower than float32).
# Written as `dot_general(..., preferred_element_type=float32)` and a cast, the cotangent
# would arrive in float32 and both backward products would run in float32. As a primitive
# the cotangent stays bfloat16, and the backward products take the same fast form:
# `dx = g @ w` and `dw = gᵀ x`, accumulated in float32; `dw` and the bias gradient come
# out in the parameters' dtype, summed in float32. Under `vmap` the leading axes of `x`
# are free, so a batch stays one matrix product.


def _dot_f32(a: Array, b: Array, a_axes: tuple[int, ...], b_axes: tuple[int, ...]) -> Array:
    """`a` and `b` (cast to `a`'s dtype) contracted over the given axes, in float32."""
    dims = ((a_axes, b_axes), ((), ()))
    return jax.lax.dot_general(a, b.astype(a.dtype), dims, preferred_element_type=jnp.float32)


def _bf16_linear_impl(x: Array, weight: Array, *bias: Array) -> Array:
    y = _dot_f32(x, weight, (x.ndim - 1,), (1,))
    if bias:
        y = y + bias[0].astype(jnp.float32)
    return y.astype(x.dtype)


def _bf16_linear_abstract(x: Any, weight: Any, *bias: Any) -> ShapedArray:
    return ShapedArray((*x.shape[:-1], weight.shape[0]), x.dtype)


def _bf16_linear_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Any]:
    x, weight, *bias = primals
    tx, tw, *tb = tangents
    y = _bf16_linear_p.bind(x, weight, *bias)
    terms = []
    if type(tx) is not ad.Zero:
        terms.append(_bf16_linear_p.bind(tx, weight))
    if type(tw) is not ad.Zero:
        terms.append(_bf16_linear_p.bind(x, tw))
    if tb and type(tb[0]) is not ad.Zero:  # transposed to a float32 sum
        terms.append(jnp.broadcast_to(tb[0].astype(jnp.float32), y.shape).astype(y.dtype))
    if not terms:
        return y, ad.Zero(ShapedArray(y.shape, y.dtype))
    return y, functools.reduce(jnp.add, terms)


def _bf16_linear_transpose(g: Any, x: Any, weight: Any, *bias: Any) -> tuple[Any, Any]:
    # The tangent terms above are linear in exactly one of `x` and `weight`, without bias.
    assert not bias
    if ad.is_undefined_primal(x):
        if type(g) is ad.Zero:
            return ad.Zero(x.aval), None
        return _dot_f32(g, weight, (g.ndim - 1,), (0,)).astype(x.aval.dtype), None
    if type(g) is ad.Zero:
        return None, ad.Zero(weight.aval)
    lead = tuple(range(g.ndim - 1))
    return None, _dot_f32(g, x, lead, lead).astype(weight.aval.dtype)


def _bf16_linear_batch(args: tuple, dims: tuple) -> tuple[Array, int]:
    x, weight, *bias = args
    x_dim, *param_dims = dims
    if x_dim is not None and all(d is None for d in param_dims):
        return _bf16_linear_p.bind(jnp.moveaxis(x, x_dim, 0), weight, *bias), 0
    # Per-example weights (rare): the plain form, batched.
    return jax.vmap(_bf16_linear_impl, in_axes=tuple(dims))(*args), 0


_bf16_linear_p = Primitive("eqx_vision_bf16_linear")
_bf16_linear_p.def_impl(_bf16_linear_impl)
_bf16_linear_p.def_abstract_eval(_bf16_linear_abstract)
mlir.register_lowering(_bf16_linear_p, mlir.lower_fun(_bf16_linear_impl, multiple_results=False))
ad.primitive_jvps[_bf16_linear_p] = _bf16_linear_jvp
ad.primitive_transposes[_bf16_linear_p] = _bf16_linear_transpose
batching.primitive_batchers[_bf16_linear_p] = _bf16_linear_batch


def gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The exact (erf) GELU, as `torch.nn.GELU()`; `jax.nn.gelu` defaults to the tanh form.
    Evaluated in float32 at least and rounded once (a bfloat16 erf rounds at every step)."""
    if x.dtype == jnp.bfloat16 and keeps_bits():
        return _gelu_bf16(x)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return _gelu(wide).astype(x.dtype)


def _gelu_and_slope(x: Array) -> tuple[Array, Array]:
    """`gelu(x)` and `gelu'(x) = Φ(x) + x φ(x)`, in float32 at least, from one `erf`."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    cdf = 0.5 * (1.0 + jax.lax.erf(wide * (1.0 / math.sqrt(2.0))))
    density = jnp.exp(-0.5 * wide * wide) * (1.0 / math.sqrt(2.0 * math.pi))
    return wide * cdf, cdf + wide * density


@jax.custom_jvp
def _gelu(x: Array) -> Array:
    return _gelu_and_slope(x)[0]


@_gelu.defjvp
def _gelu_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # The slope shares the value's `erf`. The backward pass of a stack recomputes GELU from
    # the kept linear output; differentiated as written (`jax.nn.gelu` uses `erfc`), the
    # value and the slope took five loops over the hidden activations there, and ViT-S/16's
    # float32 training step is 1.06x faster with this rule.
    (x,), (tx,) = primals, tangents
    value, slope = _gelu_and_slope(x)
    return value, tx * slope


@jax.custom_jvp
def _gelu_bf16(x: Array) -> Array:
    return _gelu_and_slope(x)[0].astype(x.dtype)


@_gelu_bf16.defjvp
def _gelu_bf16_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # Inside a stack that keeps bits: the slope is rounded to bfloat16 like the value, and
    # the stack's backward pass keeps both (as bits) and evaluates no `erf`, which in
    # float32 costs more than the bfloat16 products around it.
    (x,), (tx,) = primals, tangents
    value, slope = _gelu_and_slope(x)
    slope = through_bits(slope.astype(x.dtype))
    return through_bits(value.astype(x.dtype)), tx * slope


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, with a learned scale and shift.

    `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, as
    `torch.nn.LayerNorm(dim)`. The statistics are computed in float32 whatever the input
    dtype. Applied to `(channels, height, width)` feature maps by `ChannelLayerNorm`.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    @checked_arguments
    def __init__(self, dim: int, *, eps: float = 1e-5):
        """**Arguments:**

        - `dim`: size of the normalised (last) axis.
        - `eps`: added to the variance.
        """
        if dim <= 0:
            raise ValueError(f"LayerNorm needs a positive dimension; got dim={dim}.")
        self.weight = full((dim,), 1.0)
        self.bias = full((dim,), 0.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        return layer_norm(x, self.weight, self.bias, self.eps, axis=-1)


def layer_norm(
    x: Float[Array, "..."],
    weight: Float[Array, " dim"],
    bias: Float[Array, " dim"],
    eps: float,
    axis: int,
) -> Float[Array, "..."]:
    """Normalise `x` over `axis` and apply a per-feature affine map along that axis."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    y = y * weight.reshape(shape) + bias.reshape(shape)
    return y.astype(dtype)
