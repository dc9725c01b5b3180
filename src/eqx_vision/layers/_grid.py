"""Moving between a sequence of tokens and the feature map it was read from."""

import math

from jaxtyping import Array, Float


def tokens_to_grid(
    x: Float[Array, "seq dim"], height: int | None = None
) -> Float[Array, "dim height width"]:
    """`'(h w) d -> d h w'`: row-major tokens back onto a `(dim, height, width)` map.

    With `height=None` the grid is square, `height = isqrt(seq)`, as the reference's
    `rearrange(x, 'b (h w) c -> b c h w', h=int(sqrt(n)))` assumes for PiT and T2T-ViT; a
    sequence whose length is not a perfect square is then an error rather than a silently
    misread grid.
    """
    n, d = x.shape
    if height is None:
        height = math.isqrt(n)
        if height * height != n:
            raise ValueError(f"tokens_to_grid: {n} tokens do not form a square grid.")
    if height <= 0 or n % height:
        raise ValueError(f"tokens_to_grid: {n} tokens do not fill {height} rows.")
    return x.T.reshape(d, height, n // height)


def grid_to_tokens(x: Float[Array, "dim height width"]) -> Float[Array, "seq dim"]:
    """`'d h w -> (h w) d'`: a feature map read row by row as tokens."""
    d, h, w = x.shape
    return x.reshape(d, h * w).T
