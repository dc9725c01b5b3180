"""The backbone API shared by every model: what its outputs are, which ones to take, and
the functions that give a model another input size or another classifier.

Every model has `forward_features`, `forward_head` and `forward_intermediates` (timm's
names, in Equinox's calling convention) and a `feature_info` tuple describing the outputs
`forward_intermediates` can return. The two functions here, `set_image_size` and
`reset_head`, return a new model (modules are immutable) through the model's methods of the
same names.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from jaxtyping import PRNGKeyArray


OutputFmt = Literal["map", "tokens"]
"""How `forward_intermediates` returns a token sequence read from a grid: as a feature map
`(dim, height, width)` (`"map"`, timm's `NCHW`) or as the tokens `(seq, dim)` (`"tokens"`,
timm's `NLC`)."""

Model = TypeVar("Model")


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One output that `forward_intermediates` can return, known without running the model
    (timm's `feature_info`): enough to build a detection or segmentation neck.

    - `index`: the position of this output, what `indices` selects.
    - `name`: the block or stage it is read after, as a path in the model
      (`"transformer.layers[3]"`, `"stages[1]"`).
    - `channels`: the channels of the output map (the token dimension).
    - `reduction`: input pixels per output cell, `(height, width)`: an image of
      `(H, W)` gives a map of `(H // reduction[0], W // reduction[1])`.
    """

    index: int
    name: str
    channels: int
    reduction: tuple[int, int]


def feature_indices(
    indices: int | Sequence[int] | None, count: int, owner: str = "model"
) -> tuple[int, ...]:
    """The block or stage indices chosen by `indices`, as non-negative positions.

    - `None`: all `count` of them, in order;
    - an `int` `n`: the last `n` (as timm), `1 <= n <= count`;
    - a sequence: these positions, in the order given; negative ones count from the end.
      Each must lie in `[-count, count)` and appear once.

    A wrong choice is a `ValueError` naming the valid range.
    """
    if indices is None:
        return tuple(range(count))
    if isinstance(indices, bool) or not isinstance(indices, int | Sequence):
        raise TypeError(
            f"{owner}: indices must be None, an int or a sequence of ints; got "
            f"{type(indices).__name__}."
        )
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(
                f"{owner}: indices={indices} asks for the last {indices} of {count} outputs; "
                f"an int must lie in [1, {count}]."
            )
        return tuple(range(count - indices, count))
    chosen: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{owner}: indices must be ints; got {i!r}.")
        if not -count <= i < count:
            raise ValueError(
                f"{owner}: index {i} is out of range; the {count} outputs have indices 0 to "
                f"{count - 1} (or -{count} to -1 from the end)."
            )
        position = i % count
        if position in chosen:
            raise ValueError(f"{owner}: index {i} is chosen twice (as {position}).")
        chosen.append(position)
    if not chosen:
        raise ValueError(f"{owner}: indices is empty; choose at least one of 0 to {count - 1}.")
    return tuple(chosen)


def check_output_fmt(output_fmt: str, owner: str = "model") -> None:
    if output_fmt not in ("map", "tokens"):
        raise ValueError(f'{owner}: output_fmt must be "map" or "tokens"; got {output_fmt!r}.')


def _image_pair(image_size: Any) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(
            f"image_size must be a positive int or a (height, width) pair of them; got "
            f"{image_size!r}."
        )
    return size  # pyright: ignore[reportReturnType]


def set_image_size(model: Model, image_size: int | tuple[int, int]) -> Model:
    """`model` for images of another size.

    Learned absolute position embeddings are resampled as timm's `resample_abs_pos_embed`
    does (bicubic, antialiased, the prefix tokens kept apart); relative-position tables,
    attention biases and window sizes are rebuilt where the architecture allows. A size the
    architecture cannot take (patches or windows that do not tile it) is a `ValueError`
    here, not at the first call. The same size returns `model` itself.

    **Arguments:**

    - `model`: any model of `eqx_vision`.
    - `image_size`: the new `(height, width)`, or one int for a square image.

    **Returns:** the model for the new size, its other parameters shared with `model`.
    """
    size = _image_pair(image_size)
    method = getattr(model, "set_image_size", None)
    if method is None:
        raise TypeError(f"set_image_size: {type(model).__name__} has no set_image_size method.")
    return method(size)


def reset_head(
    model: Any,
    num_classes: int,
    *,
    key: PRNGKeyArray | None = None,
    state: Any = None,
) -> Any:
    """`model` with a new classifier of `num_classes` outputs, initialised as the model
    initialises its own; `num_classes=0` removes it, and the model then returns the pooled
    features (`forward_head(..., pre_logits=True)`).

    **Arguments:**

    - `model`: any model of `eqx_vision`.
    - `num_classes`: the new number of classes, or `0`.
    - `key`: a `jax.random.key` for the new head's initialisation (not needed for `0`).
    - `state`: for a model whose head holds BatchNorm statistics (`TimmLeViT`), its state;
      the new statistics are added to it.

    **Returns:** the new model; with `state`, `(model, state)`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"reset_head: num_classes must be an int >= 0; got {num_classes!r}.")
    if num_classes > 0 and key is None:
        raise ValueError("reset_head: a key is needed to initialise a new head.")
    method = getattr(model, "reset_head", None)
    if method is None:
        raise TypeError(f"reset_head: {type(model).__name__} has no reset_head method.")
    if state is None:
        return method(num_classes, key=key)
    return method(num_classes, key=key, state=state)
