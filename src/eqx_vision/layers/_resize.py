"""Resizing feature maps and learned position embeddings as torch and timm do."""

import functools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@functools.cache
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """The `(out_size, in_size)` matrix of torch's bicubic interpolation along one axis,
    `F.interpolate(mode="bicubic", align_corners=False)`.

    Without `antialias`: Keys' cubic convolution with `A = -0.75` on the four neighbours of
    each sample, indices clamped at the borders, computed in float32 as torch computes it.
    With `antialias` (timm's `resample_abs_pos_embed`): the cubic with `A = -0.5`, its
    support widened by the scale when shrinking, the weights of each output normalised to
    sum to one (torch's separable antialiased kernel).
    """
    if antialias:
        return _antialiased(in_size, out_size)
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(in_size) / f32(out_size)
    # torch: a float32 scale times a double `dst + 0.5`, rounded to float32 once
    real = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - index.astype(f32), f32(0), f32(1)).astype(f32)

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    rest = f32(1) - t
    coeffs = (far(t + f32(1)), near(t), near(rest), far(rest + f32(1)))
    matrix = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    for offset, c in enumerate(coeffs):
        np.add.at(matrix, (rows, np.clip(index - 1 + offset, 0, in_size - 1)), c)
    return matrix


def _cubic_aa(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _antialiased(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = [_cubic_aa((j - center + 0.5) * inv) for j in range(lo, hi)]
        total = sum(weights)
        matrix[i, lo:hi] = [w / total if total else 0.0 for w in weights]
    return matrix.astype(np.float32)


def resize_bicubic(
    x: Float[Array, "channels height width"],
    size: tuple[int, int],
    *,
    antialias: bool = False,
) -> Float[Array, "channels out_height out_width"]:
    """`x` resized to `size` `(height, width)` by bicubic interpolation, as torch's
    `F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=antialias)`:
    one matrix product per axis."""
    rows = bicubic_matrix(x.shape[1], size[0], antialias)
    cols = bicubic_matrix(x.shape[2], size[1], antialias)
    return jnp.einsum("oh,chw,pw->cop", rows.astype(x.dtype), x, cols.astype(x.dtype))


def resample_pos_embed(
    pos: Float[Array, "seq dim"],
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    *,
    num_prefix: int = 0,
    antialias: bool = True,
) -> Float[Array, "new_seq dim"]:
    """Learned absolute position embeddings for another grid of patches, as timm's
    `resample_abs_pos_embed`: the first `num_prefix` rows (class, distillation, register
    tokens) are kept as they are, the others, read row-major as an `old_grid` map, are
    resized bicubically (antialiased, in float32) to `new_grid`.

    **Arguments:**

    - `pos`: the embeddings `(num_prefix + old_h * old_w, dim)`.
    - `new_grid`: the new `(height, width)` of the patch grid.
    - `old_grid`: the current grid; by default a square one.
    - `num_prefix`: leading rows that belong to no patch.
    - `antialias`: torch's antialiasing (timm's default).

    **Returns:** `(num_prefix + new_h * new_w, dim)`; `pos` itself when the grid is unchanged.
    """
    seq, dim = pos.shape
    if old_grid is None:
        side = math.isqrt(seq - num_prefix)
        if side * side != seq - num_prefix:
            raise ValueError(
                f"resample_pos_embed: {seq - num_prefix} patch positions do not form a square "
                "grid; pass old_grid."
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != seq - num_prefix:
        raise ValueError(
            f"resample_pos_embed: old_grid={old_grid} has {old_grid[0] * old_grid[1]} "
            f"positions, the embeddings {seq - num_prefix} after {num_prefix} prefix rows."
        )
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    dtype = grid.dtype
    grid = grid.astype(jnp.float32).T.reshape(dim, *old_grid)
    grid = resize_bicubic(grid, (new_grid[0], new_grid[1]), antialias=antialias)
    grid = grid.reshape(dim, -1).T.astype(dtype)
    return jnp.concatenate([prefix, grid], axis=0)
