"""Validation of constructor arguments, declared in their annotations.

`@checked_arguments` checks every argument of an `__init__` against its annotation before
anything is built. What a type cannot say is written as a marker in `typing.Annotated`'s
metadata:

- `Minimum(n)`: every int of the argument is at least `n`;
- `Odd()`: every int of the argument is odd;
- `Interval(low, high)`: every number of the argument is in `[low, high)`;
- `NonEmpty()`: the (sequence) argument has at least one entry;
- `Pair()`: an int or a pair of ints, passed on as the pair `(height, width)`;
- `PerStage(count, pad=False)`: one value for every stage or one per stage, passed on as
  a tuple of `count` values.

A marker applies to the whole argument, wherever it sits in the annotation, so
`Positive | None` and `tuple[Positive, ...]` read as one would expect. The common cases
have names: `Positive`, `NonNegative`, `Rate` and `PositivePair`.
"""

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any


@dataclasses.dataclass(frozen=True)
class Minimum:
    """Every int of the argument (the int itself, or each int of a pair, a sequence or a
    per-stage value) is at least `value`."""

    value: int


@dataclasses.dataclass(frozen=True)
class Odd:
    """Every int of the argument is odd (a kernel that keeps the size of a map); `reason`,
    if given, is said in the error message."""

    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Interval:
    """Every number of the argument is in `[low, high)`."""

    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    """The argument, a sequence, has at least one entry."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """The argument, annotated `int | tuple[int, int]`, reaches `__init__` as the pair
    `(height, width)`: an int `n` as `(n, n)`."""


@dataclasses.dataclass(frozen=True)
class PerStage:
    """The argument, annotated `T | Sequence[T]` (or `tuple[T, ...]`), holds one value per
    stage: a sequence gives them in turn, any other value is repeated for every stage. It
    reaches `__init__` as a tuple of one value per stage (sequences in it as tuples).

    - `count`: the number of stages: an int; the name of another int argument, whose
      value it is (`"stages"`); or `"len(name)"`, the length of another argument.
    - `pad`: whether a shorter sequence (of at least one value) is padded with its last
      value, as the reference's `cast_tuple` does in LeViT.
    """

    count: int | str
    pad: bool = False


Positive = Annotated[int, Minimum(1)]
NonNegative = Annotated[int, Minimum(0)]
Rate = Annotated[float, Interval(0.0, 1.0)]
PositivePair = Annotated[int | tuple[int, int], Pair(), Minimum(1)]

_Bound = Minimum | Odd | Interval


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`."""
    if value not in choices:
        shown = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {shown}; got {value!r}.")
    return value  # pyright: ignore[reportReturnType]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, collections.abc.Sequence) and not isinstance(value, str)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` is of the type `hint` (the hints of the constructors: ints, numbers,
    bools, `None`, literals, unions, tuples and sequences of these; any other hint, a
    callable or a key, is not checked here)."""
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin is collections.abc.Sequence:
        return _is_sequence(value) and all(_matches(v, args[0]) for v in value)
    return True


def _markers(hint: Any) -> list[object]:
    """The `Annotated` metadata found anywhere in `hint`."""
    found: list[object] = []
    if typing.get_origin(hint) is Annotated:
        found.extend(hint.__metadata__)
        hint = hint.__origin__
    if typing.get_origin(hint) is not typing.Literal:
        for arg in typing.get_args(hint):
            found.extend(_markers(arg))
    return found


def _admits(bound: _Bound, number: int | float) -> bool:
    if isinstance(bound, Minimum):
        return number >= bound.value
    if isinstance(bound, Odd):
        return number % 2 == 1
    return bound.low <= number < bound.high


def _numbers(value: Any) -> Iterator[int | float]:
    """The ints and floats of `value`, an argument (bools and `None` are not numbers)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        yield value
    elif isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
        for v in value:
            yield from _numbers(v)


def _is_many(hint: Any) -> bool:
    """Whether `hint` is `Sequence[T]` or `tuple[T, ...]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    return origin is collections.abc.Sequence or (
        origin is tuple and len(args) == 2 and args[1] is Ellipsis
    )


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _noun(hint: Any, bounds: list[_Bound], *, plural: bool = False, count: str = "") -> str:
    """`hint` in words, with the bounds of its numbers: `an int >= 1`, `'cls' or 'mean'`,
    `a pair of ints >= 1`, `a sequence of 4 ints` (`count`: the number of entries)."""
    if hint in (int, float):
        word = ("odd " if any(isinstance(b, Odd) for b in bounds) else "") + (
            "int" if hint is int else "number"
        )
        text = word + "s" if plural else ("an " if word[0] in "aeiou" else "a ") + word
        for b in bounds:
            if isinstance(b, Minimum):
                text += f" >= {b.value}"
            elif isinstance(b, Interval):
                text += f" in [{b.low:g}, {b.high:g})"
        return text
    if hint is bool or hint is type(None):
        return "True or False" if hint is bool else "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_noun(arg, bounds, plural=plural, count=count) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    if _is_many(hint):
        kind = "tuple" if origin is tuple else "sequence"
        kind = kind + "s" if plural else f"a {kind}"
        return f"{kind} of {count + ' ' if count else ''}{_noun(args[0], bounds, plural=True)}"
    if origin is tuple and len(set(args)) == 1:
        many = _noun(args[0], bounds, plural=True)
        return f"pairs of {many}" if plural else f"a pair of {many}"
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _describe(hint: Any, markers: list[object], count: str = "") -> str:
    """What an argument annotated `hint` with `markers` must be, in words."""
    bounds = [m for m in markers if isinstance(m, _Bound)]
    per_stage = next((m for m in markers if isinstance(m, PerStage)), None)
    reasons = [f" ({m.reason})" for m in markers if isinstance(m, Odd) and m.reason]
    if any(isinstance(m, Pair) for m in markers):
        return f"{_noun(int, bounds)} or a pair of them"
    if per_stage is None:
        text = _noun(hint, bounds)
        if any(isinstance(m, NonEmpty) for m in markers) and text.startswith("a "):
            text = "a non-empty " + text.removeprefix("a ")
        return text + "".join(reasons)
    scalars = [m for m in _members(hint) if not _is_many(m)]
    many = [m for m in _members(hint) if _is_many(m)]
    text = " or ".join(
        [_noun(m, bounds) for m in scalars] + [_noun(m, bounds, count=count) for m in many]
    )
    return text + (" (one per stage, the last repeated)" if per_stage.pad else " (one per stage)")


def _error(owner: object, name: str, expected: str, value: Any) -> ValueError:
    return ValueError(
        f"{type(owner).__name__}: {name} must be {expected}; "
        f"got {value!r} ({type(value).__name__})."
    )


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if _is_sequence(value) else value


def _per_stage(
    owner: object, name: str, value: Any, hint: Any, markers: list[object], arguments: dict
) -> tuple:
    """`value` as a tuple of one value per stage (see `PerStage`)."""
    rule = next(m for m in markers if isinstance(m, PerStage))
    count, text = rule.count, str(rule.count)
    if isinstance(count, str) and count.startswith("len("):
        count = len(arguments[count[4:-1]])
        text = f"{rule.count} = {count}"
    elif isinstance(count, str):
        count = arguments[count]
        text = f"{rule.count} = {count}"
    assert isinstance(count, int)
    if rule.pad:
        text = f"1 to {text}"
    if not any(_is_many(m) and _matches(value, m) for m in _members(hint)):
        return (_tuples(value),) * count
    values = _tuples(value)
    if rule.pad and 1 <= len(values) < count:
        values += (values[-1],) * (count - len(values))
    if len(values) != count:
        raise _error(owner, name, _describe(hint, markers, text), value)
    return values


def checked_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate the `__init__` of a model or layer: every argument is checked against its
    annotation, before anything is built.

    An `int` is an int, not a float or a bool; a tuple has the annotated length; a literal
    is one of its values; and the markers of `typing.Annotated` (`Minimum`, `Odd`,
    `Interval`, `NonEmpty`, `Pair`, `PerStage`) hold. A float argument named `*dropout`
    without an `Interval` is a `Rate`. `Pair` and `PerStage` arguments reach `__init__`
    normalised, as a pair and as a tuple of one value per stage.

    A wrong argument is a `ValueError` that names the class, the argument, what was
    expected and the value given: `CvT: s1_heads must be an int >= 1; got 0 (int).`
    """
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init)
    annotated = typing.get_type_hints(init, include_extras=True)
    markers = {name: _markers(hint) for name, hint in annotated.items()}
    for name, hint in hints.items():
        if hint is float and name.endswith("dropout"):
            if not any(isinstance(m, Interval) for m in markers[name]):
                markers[name].append(Interval(0.0, 1.0))

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a missing or unknown argument: Python's own message says which
            init(self, *args, **kwargs)
            raise
        bound.apply_defaults()
        arguments = bound.arguments
        for name, value in list(arguments.items())[1:]:
            hint = hints.get(name)
            if name == "key" or hint is None:
                continue
            if not _matches(value, hint):
                raise _error(self, name, _describe(hint, []), value)
            found = markers[name]
            bounds = [m for m in found if isinstance(m, _Bound)]
            empty = any(isinstance(m, NonEmpty) for m in found) and len(value) == 0
            if empty or any(not _admits(b, n) for n in _numbers(value) for b in bounds):
                raise _error(self, name, _describe(hint, found), value)
            if any(isinstance(m, Pair) for m in found) and value is not None:
                arguments[name] = (value, value) if _is_int(value) else tuple(value)
        for name, found in markers.items():
            if name in arguments and any(isinstance(m, PerStage) for m in found):
                value = arguments[name]
                arguments[name] = _per_stage(self, name, value, hints[name], found, arguments)
        init(*bound.args, **bound.kwargs)

    return checked
