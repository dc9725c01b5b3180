"""Recognising the stateful parts of a model (BatchNorm statistics held in `eqx.nn.State`)."""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree


def is_state_index(node: Any) -> bool:
    """Whether `node` is an `eqx.nn.StateIndex`: for `is_leaf=` when walking a model."""
    return isinstance(node, eqx.nn.StateIndex)


def is_stateful(model: PyTree) -> bool:
    """Whether `model` holds any state (an `eqx.nn.StateIndex`, e.g. of a BatchNorm): such
    a model is built with `eqx.nn.make_with_state` and called as `model(x, state)`.

    **Arguments:**

    - `model`: a model, or any PyTree holding modules.

    **Returns:** `True` if some node of `model` is an `eqx.nn.StateIndex`.
    """
    return any(is_state_index(leaf) for leaf in jax.tree.leaves(model, is_leaf=is_state_index))
