"""How bfloat16 runs fast on XLA's CPU backend: the machinery behind `Precision("bfloat16")`.

The layers of `eqx_vision` are written as the maths in float32 and take the dtype of their
input; on a bfloat16 input, three of them delegate here:

- `linear`: a bfloat16 linear layer is one primitive, `round_bf16(x @ w.T + b)` with the
  product accumulated in float32, whose backward products take the same form.
- `mix_heads`: the short product across attention heads, in float32 and rounded once.
- `keeping_value_and_slope`: an activation whose value and slope are rounded to bfloat16
  and kept (GELU), so that the backward pass evaluates no `erf`.

With `keep_bits` (set by a [`Stack`][eqx_vision.layers.Stack] on the layers it runs
under the `"linear"` checkpointing policy, see [`remat`][eqx_vision.remat]) the values
the backward pass keeps are routed through their `uint16` bit patterns, which the policy
saves (`kept_by_linear_policy`): XLA's CPU backend reads and writes a scanned backward
pass's per-layer buffers of bfloat16 by converting them to float32 and back, while a
`uint16` buffer moves as it is. A bit pattern has no derivative: such a value is
differentiable once (any mode), and a second derivative raises an error that says so.

The measurements behind each choice are in the [performance notes](../performance.md).
This module imports nothing from `eqx_vision`: the layers import it.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._jax_internals import Primitive, ShapedArray, ad, batching, mlir


__all__ = ["keeping_value_and_slope", "kept_by_linear_policy", "linear", "mix_heads"]


# ------------------------------------------------------------------------- bit patterns


def _to_bits_impl(x: Array) -> Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _to_bits_jvp(primals: tuple, tangents: tuple) -> Any:
    raise NotImplementedError(
        "second derivatives of a bfloat16 block stack are not supported under its default "
        "checkpointing policy, which keeps bfloat16 values as bit patterns; differentiate "
        "in float32, or use `eqx_vision.remat(model, 'all')` (or 'inputs')."
    )


# A primitive rather than `bitcast_convert_type`, whose derivative to an integer type is
# silently zero: a second derivative through it fails loudly instead.
_to_bits_p = Primitive("eqx_vision_bfloat16_bits")
_to_bits_p.def_impl(_to_bits_impl)
_to_bits_p.def_abstract_eval(lambda x: ShapedArray(x.shape, jnp.uint16))
mlir.register_lowering(_to_bits_p, mlir.lower_fun(_to_bits_impl, multiple_results=False))
ad.primitive_jvps[_to_bits_p] = _to_bits_jvp
batching.defvectorized(_to_bits_p)


def _through_bits(x: Array) -> Array:
    """A bfloat16 `x` rebuilt from its bit pattern (the same values)."""
    return jax.lax.bitcast_convert_type(_to_bits_p.bind(x), jnp.bfloat16)


@jax.custom_jvp
def _saved_as_bits(x: Array) -> Array:
    """`x` unchanged; differentiated, it is rebuilt from its `uint16` pattern, which the
    `"linear"` policy saves."""
    return x


@_saved_as_bits.defjvp
def _saved_as_bits_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x,), (tx,) = primals, tangents
    return _through_bits(x), tx


def kept_by_linear_policy(prim: Any) -> bool:
    """Whether the `"linear"` checkpointing policy saves the outputs of `prim`: a bfloat16
    linear layer's product, and the bit patterns of the values kept as bits."""
    return prim is _linear_p or prim is _to_bits_p


# ---------------------------------------------------------------------- linear layers


def linear(
    x: Float[Array, "*batch in_features"],
    weight: Float[Array, "out_features in_features"],
    bias: Float[Array, " out_features"] | None,
    *,
    keep_bits: bool,
) -> Float[Array, "*batch out_features"]:
    """`x @ weight.T + bias` for a bfloat16 `x`: the product accumulates in float32 and is
    rounded once, and so are the two products of its backward pass; the weight and bias
    gradients are accumulated in float32 and returned in the parameters' dtype. With
    `keep_bits`, the output is kept as bits (see the module docstring)."""
    y = _linear_p.bind(x, weight, *(() if bias is None else (bias,)))
    return _saved_as_bits(y) if keep_bits else y


# As a primitive the cotangent stays bfloat16 (through `dot_general(...,
# preferred_element_type=float32)` and a cast it would arrive in float32, and both backward
# products would run in float32), and the backward products take the forward's form:
# `dx = g @ w` and `dw = gᵀ x`, accumulated in float32. Under `vmap` the leading axes of
# `x` are free, so a batch stays one matrix product.


def _dot_f32(a: Array, b: Array, a_axes: tuple[int, ...], b_axes: tuple[int, ...]) -> Array:
    """`a` and `b` (cast to `a`'s dtype) contracted over the given axes, in float32."""
    dims = ((a_axes, b_axes), ((), ()))
    return jax.lax.dot_general(a, b.astype(a.dtype), dims, preferred_element_type=jnp.float32)


def _linear_impl(x: Array, weight: Array, *bias: Array) -> Array:
    y = _dot_f32(x, weight, (x.ndim - 1,), (1,))
    if bias:
        y = y + bias[0].astype(jnp.float32)
    return y.astype(x.dtype)


def _linear_abstract(x: Any, weight: Any, *bias: Any) -> ShapedArray:
    return ShapedArray((*x.shape[:-1], weight.shape[0]), x.dtype)


def _linear_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Any]:
    x, weight, *bias = primals
    tx, tw, *tb = tangents
    y = _linear_p.bind(x, weight, *bias)
    terms = []
    if type(tx) is not ad.Zero:
        terms.append(_linear_p.bind(tx, weight))
    if type(tw) is not ad.Zero:
        terms.append(_linear_p.bind(x, tw))
    if tb and type(tb[0]) is not ad.Zero:  # transposed to a float32 sum
        terms.append(jnp.broadcast_to(tb[0].astype(jnp.float32), y.shape).astype(y.dtype))
    if not terms:
        return y, ad.Zero(ShapedArray(y.shape, y.dtype))
    return y, functools.reduce(jnp.add, terms)


def _linear_transpose(g: Any, x: Any, weight: Any, *bias: Any) -> tuple[Any, Any]:
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


def _linear_batch(args: tuple, dims: tuple) -> tuple[Array, int]:
    x, weight, *bias = args
    x_dim, *param_dims = dims
    if x_dim is not None and all(d is None for d in param_dims):
        return _linear_p.bind(jnp.moveaxis(x, x_dim, 0), weight, *bias), 0
    # Per-example weights (rare): the plain form, batched.
    return jax.vmap(_linear_impl, in_axes=tuple(dims))(*args), 0


_linear_p = Primitive("eqx_vision_bf16_linear")
_linear_p.def_impl(_linear_impl)
_linear_p.def_abstract_eval(_linear_abstract)
mlir.register_lowering(_linear_p, mlir.lower_fun(_linear_impl, multiple_results=False))
ad.primitive_jvps[_linear_p] = _linear_jvp
ad.primitive_transposes[_linear_p] = _linear_transpose
batching.primitive_batchers[_linear_p] = _linear_batch


# ------------------------------------------------------------------ head mixing, GELU


def mix_heads(
    attn: Float[Array, "heads q_seq kv_seq"],
    weight: Float[Array, "heads heads2"],
    *,
    keep_bits: bool,
) -> Float[Array, "heads2 q_seq kv_seq"]:
    """`einsum('h i j, h g -> g i j')` for a bfloat16 `attn`: this short product (over the
    few heads) runs in float32 and is rounded once, so that the weight's gradient is a
    float32 sum. With `keep_bits`, the output is kept as bits."""
    wide = jnp.einsum("hij,hg->gij", attn.astype(jnp.float32), weight.astype(jnp.float32))
    out = wide.astype(attn.dtype)
    return _saved_as_bits(out) if keep_bits else out


def keeping_value_and_slope(
    value_and_slope: Callable[[Array], tuple[Array, Array]],
) -> Callable[[Array], Array]:
    """The bfloat16 activation whose value and slope are `value_and_slope(x)` (computed
    wide), each rounded to bfloat16 and, differentiated, kept as bits: the backward pass
    multiplies by the kept slope and evaluates nothing again."""

    @jax.custom_jvp
    def activation(x: Array) -> Array:
        return value_and_slope(x)[0].astype(x.dtype)

    @activation.defjvp
    def activation_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
        (x,), (tx,) = primals, tangents
        value, slope = value_and_slope(x)
        slope = _through_bits(slope.astype(x.dtype))
        return _through_bits(value.astype(x.dtype)), tx * slope

    return activation
