"""bfloat16 values kept by a block stack's backward pass as their 16-bit patterns.

XLA's CPU backend computes most bfloat16 operations, slicing and updating slices
included, by converting to float32 and back. Differentiating a `lax.scan` keeps what the
checkpointing policy saves in buffers with one slot per layer, written and read with
dynamic slices: kept as bfloat16, these buffers are converted whole to float32 and back.
Inside a stack whose policy keeps the linear outputs, `saved_as_bits` routes a bfloat16
value through its `uint16` pattern, and the policy keeps that pattern, which moves without
conversion.

The pattern has no derivative: inside such a stack, a bfloat16 value is differentiable
once (any mode), and a second derivative raises an error that says so. Outside stacks, or
under the other policies, nothing changes.
"""

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array


_KEEP_BITS = contextvars.ContextVar("eqx_vision_keep_bits", default=False)


@contextlib.contextmanager
def keeping_bits(enabled: bool = True) -> Iterator[None]:
    """While tracing inside, `saved_as_bits` routes bfloat16 values through their bits."""
    token = _KEEP_BITS.set(enabled)
    try:
        yield
    finally:
        _KEEP_BITS.reset(token)


def keeps_bits() -> bool:
    return _KEEP_BITS.get()


def _to_bits_impl(x: Array) -> Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _to_bits_jvp(primals: tuple, tangents: tuple) -> Any:
    raise NotImplementedError(
        "second derivatives of a bfloat16 block stack are not supported under its default "
        "checkpointing policy, which keeps bfloat16 values as bit patterns; differentiate "
        "in float32, or use `eqx_vision.checkpoint_blocks(model, 'all')` (or 'inputs')."
    )


# A primitive rather than `bitcast_convert_type`, whose derivative to an integer type is
# silently zero: a second derivative through it fails loudly instead.
_to_bits_p = Primitive("eqx_vision_bfloat16_bits")
_to_bits_p.def_impl(_to_bits_impl)
_to_bits_p.def_abstract_eval(lambda x: ShapedArray(x.shape, jnp.uint16))
mlir.register_lowering(_to_bits_p, mlir.lower_fun(_to_bits_impl, multiple_results=False))
ad.primitive_jvps[_to_bits_p] = _to_bits_jvp
batching.defvectorized(_to_bits_p)


def through_bits(x: Array) -> Array:
    """A bfloat16 `x` rebuilt from its bit pattern (the same values)."""
    return jax.lax.bitcast_convert_type(_to_bits_p.bind(x), jnp.bfloat16)


def saved_as_bits(x: Array) -> Array:
    """`x` unchanged. Traced inside a stack that keeps bits, a bfloat16 `x` is marked so
    that, differentiated, it is rebuilt from its `uint16` pattern, which the stack's
    policy saves. (Decided when the forward pass is traced: the derivative rule runs
    later, outside the stack's tracing.)"""
    if x.dtype != jnp.bfloat16 or not keeps_bits():
        return x
    return _rebuilt_from_bits(x)


@jax.custom_jvp
def _rebuilt_from_bits(x: Array) -> Array:
    return x


@_rebuilt_from_bits.defjvp
def _rebuilt_from_bits_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x,), (tx,) = primals, tangents
    return through_bits(x), tx
