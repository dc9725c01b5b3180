"""Tiny configurations of every public model, for the tests that run across all of them."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax

import eqx_vision as ev


@dataclass(frozen=True)
class Entry:
    cls: Callable[..., Any]
    config: dict[str, Any]
    input_shape: tuple[int, int, int]
    stateful: bool = False
    stochastic: bool = True  # has an active dropout-like layer in training mode
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, key: jax.Array, **overrides: Any) -> tuple[Any, Any]:
        """`(model, state)`; state is None for stateless models."""
        config = {**self.config, **overrides}
        if self.stateful:
            return eqx.nn.make_with_state(self.cls)(**config, key=key)
        return self.cls(**config, key=key), None


VIT = dict(
    image_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=16,
    dim_head=8, dropout=0.1, emb_dropout=0.1,
)  # fmt: skip

ZOO: dict[str, Entry] = {
    "ViT": Entry(ev.ViT, VIT, (3, 16, 16)),
}


def call(entry: Entry, model: Any, state: Any, x: jax.Array, key: jax.Array | None = None):
    """Logits of one image, whatever the model's calling convention."""
    if entry.stateful:
        out, _ = model(x, state, key=key)
    else:
        out = model(x, key=key)
    return out[0] if isinstance(out, tuple) else out


def batched(entry: Entry, model: Any, state: Any, x: jax.Array) -> jax.Array:
    if entry.stateful:
        out, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    else:
        out = jax.vmap(model)(x)
    return out[0] if isinstance(out, tuple) else out
