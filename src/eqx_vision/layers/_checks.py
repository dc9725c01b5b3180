"""Validation of constructor arguments: a ValueError that names the argument and the value."""


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
