"""Cutting a feature map into windows of tokens, and putting the windows back.

Maps are laid out `(height, width, channels)` here, so that the tokens of a window are
contiguous rows for the per-token projections that follow.
"""

from collections.abc import Callable

from jaxtyping import Array, Float

from ._patch import check_image


def window_partition(
    x: Float[Array, "height width channels"], window: tuple[int, int], *, dilated: bool = False
) -> Float[Array, "windows seq channels"]:
    """The `(wh, ww)` windows of a map, each read row by row as `wh * ww` tokens.

    With `dilated=False`, a window is a contiguous block of the map,
    `'(gh wh) (gw ww) c -> (gh gw) (wh ww) c'`. With `dilated=True`, a window gathers the
    pixels spaced `gh` rows and `gw` columns apart, `'(wh gh) (ww gw) c -> (gh gw) (wh ww) c'`
    (the long-distance groups of CrossFormer). Windows are numbered row-major over the
    `(gh, gw)` grid in both cases. The map must be a multiple of the window.
    """
    height, width, c = x.shape
    wh, ww = window
    if height % wh or width % ww:
        raise ValueError(f"a {height}x{width} feature map cannot be cut into {wh}x{ww} windows.")
    gh, gw = height // wh, width // ww
    if dilated:
        x = x.reshape(wh, gh, ww, gw, c).transpose(1, 3, 0, 2, 4)
    else:
        x = x.reshape(gh, wh, gw, ww, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(gh * gw, wh * ww, c)


def window_merge(
    x: Float[Array, "windows seq channels"],
    size: tuple[int, int],
    window: tuple[int, int],
    *,
    dilated: bool = False,
) -> Float[Array, "height width channels"]:
    """The inverse of `window_partition`: windows back onto a map of `size = (height, width)`."""
    height, width = size
    wh, ww = window
    gh, gw = height // wh, width // ww
    c = x.shape[-1]
    x = x.reshape(gh, gw, wh, ww, c)
    if dilated:
        x = x.transpose(2, 0, 3, 1, 4)
    else:
        x = x.transpose(0, 2, 1, 3, 4)
    return x.reshape(height, width, c)


def size_multiple(fits: Callable[[int], bool], *, period: int, limit: int = 1 << 14) -> int | None:
    """The smallest `m <= limit` all of whose multiples `fits`, or `None`.

    Used by the windowed models to describe the image sizes they accept: `fits(n)` says
    whether an image side of `n` pixels reaches every stage with a map its windows tile.
    `period` must be such that `fits(n)` is a minimum-size condition (kept by larger `n`)
    and a condition on `n % period`: then the multiples `m, 2m, ..., period * m` cover every
    case, and checking them is exact. For strided stages that floor or ceil the map size,
    the least common multiple of `cumulative stride x window` over the stages will do.
    """
    for m in range(1, limit + 1):
        if all(fits(j * m) for j in range(1, period + 1)):
            return m
    return None


def check_windowed_image(
    x: Array,
    channels: int,
    fit: Callable[[int], str | None],
    size_multiple: int | None,
    smallest_size: int,
    model: str,
) -> None:
    """Raise a ValueError unless `x` is one float image whose sides the model's windows fit.

    `fit(side)` returns why a side does not fit, or `None`; the message names the side,
    the reason, and the sizes that fit (`size_multiple` and its multiples, or else
    `smallest_size`). Runs on static shapes only, so it is free under `jax.jit`.
    """
    example = size_multiple or smallest_size
    check_image(x, (channels, None, None), model)
    height, width = x.shape[1], x.shape[2]
    for side, axis in ((height, "height"), (width, "width")):
        reason = f"it has {side} pixels" if side < 1 else fit(side)
        if reason is not None:
            hint = (
                f"sides that are multiples of {size_multiple} fit"
                if size_multiple is not None
                else f"the smallest side that fits is {smallest_size}"
            )
            raise ValueError(
                f"{model} cannot take an image of shape {tuple(x.shape)}: for the {axis}, "
                f"{reason}; {hint}, e.g. shape {(channels, example, example)}."
            )
