"""Parameter initialisation that compiles a handful of programs, not one per shape.

Eager `jax.random.uniform(key, shape)` compiles a new XLA program for every distinct shape,
and a vision transformer has dozens of them: building a small model took seconds. Here
random numbers are drawn in fixed-size blocks (`fold_in(key, i)` for block `i`, a few
block sizes in all), and cut and shaped with NumPy. Under a trace (building inside
`jax.jit`, `eqx.filter_eval_shape` or `vmap`) the same blocks are cut with `jax.numpy`, so
a key gives the same parameters either way.
"""

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float, PRNGKeyArray


_MIN_BLOCK = 1 << 12
_MAX_BLOCK = 1 << 20


@functools.partial(jax.jit, static_argnames=("size", "normal"))
def _block(key: PRNGKeyArray, index: Array, size: int, normal: bool) -> Float[Array, " size"]:
    block_key = jr.fold_in(key, index)
    return jr.normal(block_key, (size,)) if normal else jr.uniform(block_key, (size,))


def _traced(*values: object) -> bool:
    return any(isinstance(v, Tracer) for v in values)


def _sample(key: PRNGKeyArray, shape: tuple[int, ...], normal: bool) -> Array | np.ndarray:
    n = math.prod(shape)
    size = min(_MAX_BLOCK, max(_MIN_BLOCK, 1 << max(n - 1, 0).bit_length()))
    count = max(1, -(-n // size))
    if _traced(key):
        flat = jnp.concatenate([_block(key, jnp.uint32(i), size, normal) for i in range(count)])
        return flat[:n].reshape(shape)
    parts = [np.asarray(_block(key, np.uint32(i), size, normal)) for i in range(count)]
    return np.concatenate(parts)[:n].reshape(shape)


def uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], minval: float, maxval: float
) -> Float[Array, "..."]:
    """Uniform samples in `[minval, maxval)`, float32."""
    u = _sample(key, shape, normal=False)
    lo, span = np.float32(minval), np.float32(maxval - minval)
    return jnp.asarray(u * span + lo)


def normal(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, "..."]:
    """Standard normal samples, float32."""
    return jnp.asarray(_sample(key, shape, normal=True))


def full(shape: tuple[int, ...], value: float) -> Float[Array, "..."]:
    """A float32 array filled with `value` (built in NumPy: no compilation)."""
    return jnp.asarray(np.full(shape, value, dtype=np.float32))


def keys(key: PRNGKeyArray, num: int) -> list[PRNGKeyArray]:
    """`num` independent keys, `fold_in(key, i)`: one compiled program whatever `num` is."""
    return [_fold_in(key, np.uint32(i)) for i in range(num)]


_fold_in = jax.jit(jr.fold_in)


def stack(arrays: list[Array]) -> Array:
    """`jnp.stack(arrays)`, through NumPy when nothing is traced (no compilation)."""
    if _traced(*arrays):
        return jnp.stack(arrays)
    return jnp.asarray(np.stack([np.asarray(a) for a in arrays]))
