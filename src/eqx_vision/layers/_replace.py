"""A copy of a module with some fields changed, static ones included."""

import dataclasses
from typing import Any, TypeVar


M = TypeVar("M")


def replace(module: M, **changes: Any) -> M:
    """`module` with the fields named in `changes` set to new values, the others shared.

    Unlike `eqx.tree_at`, this also changes static fields (an image size, a grid), which
    are part of the tree's structure rather than its leaves; `__init__` is not run again, so
    the caller keeps the fields consistent with each other.
    """
    assert dataclasses.is_dataclass(module) and not isinstance(module, type)
    names = {f.name for f in dataclasses.fields(module)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"{type(module).__name__} has no field(s) {sorted(unknown)}.")
    new = object.__new__(type(module))
    for name in names:
        object.__setattr__(new, name, changes[name] if name in changes else getattr(module, name))
    return new
