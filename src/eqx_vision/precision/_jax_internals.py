"""The parts of JAX's internals that defining a primitive needs, imported in one place.

A primitive is the only way to give an operation its own transpose rule (see
`_bfloat16.linear`); `jax.extend.core.Primitive` is public, but registering its JVP,
transpose, batching and lowering rules still goes through `jax.interpreters` and
`jax.core.ShapedArray`, which JAX documents as internal. Should they move, this file is
the one to change.
"""

from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


__all__ = ["Primitive", "ShapedArray", "ad", "batching", "mlir"]
