"""Validation of constructor arguments: a ValueError that names the argument and the value."""

import collections.abc
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any


def check_int(value: object, name: str, *, minimum: int | None = 1) -> int:
    """`value` if it is an int (not a bool) of at least `minimum` (`None`: any int)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int; got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return value


def check_rate(value: float, name: str, *, upper: float = 1.0) -> float:
    """`value` if it is a probability in `[0, upper)`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < upper:
        raise ValueError(f"{name} must be a number in [0, {upper:g}); got {value!r}.")
    return float(value)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`."""
    if value not in choices:
        shown = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {shown}; got {value!r}.")
    return value  # pyright: ignore[reportReturnType]


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` is of the type `hint` (the hints of the models' constructors: ints,
    numbers, bools, `None`, literals, unions, tuples and sequences of these; any other hint,
    a callable or a key, is not checked here)."""
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
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
        return (
            isinstance(value, collections.abc.Sequence)
            and not isinstance(value, str)
            and all(_matches(v, args[0]) for v in value)
        )
    return True


def _describe(hint: Any) -> str:
    """`hint` in words: `an int`, `a number`, `'cls' or 'mean'`, `an int or a pair of ints`."""
    words = {int: "an int", float: "a number", bool: "True or False", type(None): "None"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    plural = {int: "ints", float: "numbers"}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in plural:
        return f"a tuple of {plural[args[0]]}"
    if origin is tuple and len(args) == 2 and args[0] is args[1] and args[0] in plural:
        return f"a pair of {plural[args[0]]}"
    if origin is collections.abc.Sequence and args[0] in plural:
        return f"a sequence of {plural[args[0]]}"
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def checked_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate the `__init__` of a model or layer: every argument is checked against its
    annotation (an `int` is an int, not a float or a bool; a tuple has the annotated length;
    a literal is one of its values) and every `*dropout` rate (a float) is in `[0, 1)`,
    before anything is built. A wrong argument is a `ValueError` that names the class, the
    argument, the type expected and the value given."""
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a missing or unknown argument: Python's own message says which
            init(self, *args, **kwargs)
            raise
        for name, value in list(bound.arguments.items())[1:]:
            hint = hints.get(name)
            if name == "key" or hint is None:
                continue
            if not _matches(value, hint):
                raise ValueError(
                    f"{type(self).__name__}: {name} must be {_describe(hint)}; "
                    f"got {value!r} ({type(value).__name__})."
                )
            if name.endswith("dropout") and hint is float:
                check_rate(value, f"{type(self).__name__}: {name}")
        init(self, *args, **kwargs)

    return checked
