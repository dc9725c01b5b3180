"""PRNG-key plumbing shared by every stochastic layer."""

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import PRNGKeyArray


def split_key(key: PRNGKeyArray | None, num: int) -> list[PRNGKeyArray | None]:
    """Split `key` into `num` keys, or return `num` Nones when there is no key."""
    if key is None:
        return [None] * num
    return list(jr.split(key, num))


def _stochastic_leaf(node: object) -> bool:
    return isinstance(node, eqx.nn.Dropout) or (
        hasattr(node, "inference") and hasattr(node, "p") and isinstance(node, eqx.Module)
    )


def active_rates(module: eqx.Module) -> list[float]:
    """The rates of every stochastic layer of `module` that is in training mode with p > 0."""
    rates = []
    for node in jax.tree.leaves(module, is_leaf=_stochastic_leaf):
        if _stochastic_leaf(node):
            p = node.p  # pyright: ignore[reportAttributeAccessIssue]
            if not node.inference and (not isinstance(p, int | float) or p > 0):  # pyright: ignore[reportAttributeAccessIssue]
                rates.append(p)
    return rates


def check_key(module: eqx.Module, key: PRNGKeyArray | None) -> None:
    """Raise a clear error if `module` has an active stochastic layer and no key was given.

    Called at the top of every model's `__call__`; the check only reads static fields, so it
    costs nothing under `jax.jit`.
    """
    if key is not None:
        return
    rates = active_rates(module)
    if rates:
        name = type(module).__name__
        shown = sorted(set(map(str, rates)))
        raise ValueError(
            f"{name} is in training mode with active dropout (rates {shown}), "
            "so it needs a PRNG key: call it as `model(x, key=jax.random.key(...))`, or switch "
            "dropout off with `model = eqx.nn.inference_mode(model)`."
        )
