"""Homogeneous stacks of blocks, stored with a leading depth axis and run with `lax.scan`."""

import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, PRNGKeyArray

from ..precision import _bfloat16 as bfloat16
from . import _init as init
from ._checks import checked_arguments
from ._state import is_state_index


Block = TypeVar("Block", bound=eqx.Module)


def _linear_outputs(prim: Any, *_: Any, **params: Any) -> bool:
    """Save the outputs of weight products: matrix products without batch dimensions
    (token-wise linear layers, also under `vmap`) and convolutions; in bfloat16, those of
    the values kept as bit patterns too (see `Stack`)."""
    if prim is jax.lax.dot_general_p:
        (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        return not lhs_batch and not rhs_batch
    return prim is jax.lax.conv_general_dilated_p or bfloat16.kept_by_linear_policy(prim)


REMAT: dict[str, Callable[..., bool] | None] = {
    "linear": _linear_outputs,
    "inputs": jax.checkpoint_policies.nothing_saveable,
    "all": None,
}
"""The recomputation policies of a [`Stack`][eqx_vision.layers.Stack] by name (see
[`remat`][eqx_vision.remat]), each a `jax.checkpoint` policy (`None`: keep everything)."""


class LayerDrop(eqx.Module):
    """Drops whole layers of a stack at random in training (LayerDrop, Fan et al. 2019).

    Each layer is skipped with probability `p`; if every layer is drawn for dropping, one
    chosen uniformly at random is kept. Switched off by `eqx.nn.inference_mode`.
    """

    p: float
    inference: bool

    @checked_arguments
    def __init__(self, p: float = 0.0, *, inference: bool = False):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"layer dropout must be in [0, 1); got {p}.")
        self.p = p
        self.inference = inference

    def active(self) -> bool:
        return not self.inference and self.p > 0

    def __call__(self, depth: int, *, key: PRNGKeyArray) -> Bool[Array, " depth"]:
        """Draw the mask of dropped layers, `True` meaning skip."""
        draw_key, keep_key = jr.split(key)
        drop = jr.bernoulli(draw_key, self.p, (depth,))
        keep = jr.randint(keep_key, (), 0, depth)
        return jnp.where(jnp.all(drop), drop & (jnp.arange(depth) != keep), drop)


class Stack(eqx.Module, Generic[Block]):
    """`depth` blocks of one structure, stored stacked and applied in turn with `lax.scan`.

    Every array leaf of `blocks` has a leading axis of size `depth`, so the compiled program
    holds one block however deep the stack is. `stack[i]` returns block `i` as an ordinary
    module. The blocks are called as `block(x, *args, key=key)` with a fresh key each.
    A stack within the blocks of another runs unrolled (`unroll` equal to its depth).

    Two execution options are ordinary fields holding Python values, changed with
    [`with_options`][eqx_vision.layers.Stack.with_options] or
    [`remat`][eqx_vision.remat]: `remat`, the recomputation policy (`"linear"` by
    default), and `unroll`. Under `"linear"` the layers of the blocks have their
    `keep_bits` field set: in bfloat16 they keep what the backward pass needs as 16-bit
    patterns (see [`Linear`][eqx_vision.layers.Linear] and the
    [performance notes](../performance.md)).
    """

    blocks: Block
    layer_drop: LayerDrop
    remat: str
    unroll: int
    depth: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        make_block: Callable[..., Block],
        depth: int,
        *,
        layer_dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `make_block`: called as `make_block(index, key=key)` for each 0-based layer
          index; the blocks must share one structure.
        - `depth`: number of blocks; at least 1.
        - `layer_dropout`: the probability of skipping each block in training.
        - `key`: a `jax.random.key`, from which each block gets its own key.
        """
        if depth < 1:
            raise ValueError(f"a stack needs depth >= 1; got {depth}.")
        blocks = stack_modules([make_block(i, key=k) for i, k in enumerate(init.keys(key, depth))])
        # A stack inside each block runs in every iteration of this one; as a loop of its
        # own, its per-layer buffers would be written and sliced within each iteration.
        # Unrolled (these are short: CrossViT's two or three layers) its layers are plain
        # code in the loop body (docs/performance.md, "Stacks within stacks are unrolled").
        inner = _stacks(blocks)
        if inner:
            blocks = eqx.tree_at(_stacks, blocks, [s.with_options(unroll=s.depth) for s in inner])
        self.blocks = _keeping_bits(blocks, True)
        self.layer_drop = LayerDrop(layer_dropout)
        self.remat = "linear"
        self.unroll = 1
        self.depth = depth

    def with_options(
        self, *, remat: str | None = None, unroll: int | None = None
    ) -> "Stack[Block]":
        """This stack with other execution options (the parameters are shared, not copied).
        Outputs and gradients are the same whatever the options.

        - `remat`: what the backward pass keeps of each block's forward pass, one of
          `REMAT` (see [`remat`][eqx_vision.remat]).
        - `unroll`: blocks per iteration of the compiled loop (`lax.scan`'s `unroll`).
        """
        if remat is not None and remat not in REMAT:
            raise ValueError(f"remat must be one of {sorted(REMAT)}; got {remat!r}.")
        if unroll is not None and unroll < 1:
            raise ValueError(f"unroll must be at least 1; got {unroll}.")
        new = self
        if remat is not None:
            blocks = _keeping_bits(self.blocks, remat == "linear")
            new = eqx.tree_at(lambda s: (s.remat, s.blocks), new, (remat, blocks))
        if unroll is not None:
            new = eqx.tree_at(lambda s: s.unroll, new, unroll)
        return new

    def _scan(self, step: Callable, init: Any, xs: Any) -> Any:
        if self.remat != "all":
            step = jax.checkpoint(step, policy=REMAT[self.remat], prevent_cse=False)
        return jax.lax.scan(step, init, xs, unroll=min(self.unroll, self.depth))

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, index: int) -> Block:
        if not -self.depth <= index < self.depth:
            raise IndexError(f"block index {index} out of range for depth {self.depth}.")
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[index], dynamic), static)

    def __call__(
        self,
        x: Any,
        *args: Any,
        key: PRNGKeyArray | None = None,
        per_layer: dict[str, Array] | None = None,
        intermediates: bool = False,
    ) -> Any:
        """Apply the blocks in order: `x = block_i(x, *args, key=key_i)`.

        `per_layer` maps keyword names to arrays with a leading axis of size `depth`: block
        `i` is called with `name=array[i]` as well (a per-layer rate, for instance).

        With `intermediates`, returns `(x, outputs)`, where `outputs` holds every block's
        output stacked along a leading axis of size `depth` (the scan's outputs: the blocks
        stay in one loop).
        """
        per_layer = per_layer or {}
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        keys = drop = None
        if key is not None:
            block_key, drop_key = jr.split(key)
            keys = jr.split(block_key, self.depth)
            if self.layer_drop.active():
                drop = self.layer_drop(self.depth, key=drop_key)

        def step(carry, layer):
            params, block_key, skip, extra = layer
            out = eqx.combine(params, static)(carry, *args, key=block_key, **extra)
            if skip is not None:
                out = jax.tree.map(lambda new, old: jnp.where(skip, old, new), out, carry)
            return out, (out if intermediates else None)

        x, outputs = self._scan(step, x, (dynamic, keys, drop, per_layer))
        return (x, outputs) if intermediates else x

    def call_with_state(
        self,
        x: Any,
        state: eqx.nn.State,
        *args: Any,
        key: PRNGKeyArray | None = None,
        intermediates: bool = False,
    ) -> tuple[Any, eqx.nn.State]:
        """Apply stateful blocks in order: `x, s_i = block_i(x, s_i, *args, key=key_i)`.

        Each block's slice of `state` (e.g. its BatchNorm statistics) is scanned along with
        its parameters, and the updated slices are written back. With `intermediates`,
        returns `((x, outputs), state)`, `outputs` every block's output stacked along a
        leading axis of size `depth`.
        """
        if self.layer_drop.active():
            raise NotImplementedError("layer dropout is not supported for stateful blocks.")
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        substate = state.substate(self.blocks)
        keys = None if key is None else jr.split(key, self.depth)

        def step(carry, layer):
            params, block_state, block_key = layer
            out, block_state = eqx.combine(params, static)(carry, block_state, *args, key=block_key)
            return out, (block_state, out if intermediates else None)

        x, (substate, outputs) = self._scan(step, x, (dynamic, substate, keys))
        result = (x, outputs) if intermediates else x
        if not _updates_state(self.blocks):
            # Inference: nothing changed; returning the caller's state keeps it usable in
            # eager code (`State.update` retires the object it is called on).
            return result, state
        return result, state.update(substate)


def _is_stateful_layer(node: Any) -> bool:
    return hasattr(node, "state_index") and hasattr(node, "inference")


def _updates_state(module: Any) -> bool:
    """Whether a stateful layer (e.g. BatchNorm) of `module` is in training mode."""
    nodes = jax.tree.leaves(module, is_leaf=_is_stateful_layer)
    return any(_is_stateful_layer(n) and not n.inference for n in nodes)


def _state_indices(module: Any) -> list[eqx.nn.StateIndex]:
    return [n for n in jax.tree.leaves(module, is_leaf=is_state_index) if is_state_index(n)]


def stack_modules(modules: list[Block]) -> Block:
    """Stack modules of one structure into one whose array leaves gain a leading axis.

    Stateful modules (BatchNorm) keep the `eqx.nn.StateIndex`es of the first module, each
    holding the stacked initial values of the modules' indices at its position: restacking
    the blocks of a stack (`stack[i]` for every `i`) gives a module that the stack's state
    still fits.
    """
    first = _state_indices(modules[0])
    if first:
        # Each module built on its own has indices of its own: give every module the first
        # one's indices, each holding the module's own initial value, to stack them.
        modules = [
            eqx.tree_at(
                _state_indices,
                m,
                [
                    eqx.tree_at(lambda i: i.init, f, own.init)
                    for f, own in zip(first, _state_indices(m), strict=True)
                ],
            )
            for m in modules
        ]
    dynamic = [eqx.filter(m, eqx.is_array) for m in modules]
    static = eqx.partition(modules[0], eqx.is_array)[1]
    for other in modules[1:]:
        if not eqx.tree_equal(eqx.partition(other, eqx.is_array)[1], static):
            raise ValueError("stacked modules must share one structure and static fields.")
    return eqx.combine(jax.tree.map(lambda *a: init.stack(list(a)), *dynamic), static)


def _is_stack(node: Any) -> bool:
    return isinstance(node, Stack)


def _stacks(tree: Any) -> list[Stack]:
    return [n for n in jax.tree.leaves(tree, is_leaf=_is_stack) if _is_stack(n)]


def _bit_keepers(tree: Any) -> list[Any]:
    """The layers of `tree` with a `keep_bits` field, but those of the stacks within it
    (each sets its own)."""
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, Stack):
            return
        if isinstance(node, eqx.Module) and hasattr(node, "keep_bits"):
            found.append(node)
        children = jax.tree.leaves(node, is_leaf=lambda child: child is not node)
        if children != [node]:
            for child in children:
                visit(child)

    visit(tree)
    return found


def _keeping_bits(blocks: Block, enabled: bool) -> Block:
    """`blocks` with the `keep_bits` field of their layers set to `enabled`."""
    layers = _bit_keepers(blocks)
    if not layers:
        return blocks
    return eqx.tree_at(
        lambda t: [layer.keep_bits for layer in _bit_keepers(t)],
        blocks,
        [enabled] * len(layers),
        is_leaf=lambda x: x is None,  # the field's `None` (not set yet) is no leaf
    )


def remat(model: Any, policy: str = "inputs") -> Any:
    """`model` with another recomputation (gradient-checkpointing) policy in every stack
    of blocks.

    A [`Stack`][eqx_vision.layers.Stack] runs its blocks with `lax.scan`; for the backward
    pass, what a block computes in the forward pass is either kept (in a buffer with one
    slot per layer) or recomputed from what is kept. `policy` chooses:

    - `"linear"` (the default of every stack): keep the outputs of the linear layers and
      convolutions, recompute the rest (normalisation, activation functions, the attention
      softmax and its products). Costs no extra matrix products and keeps about a third of
      the activations; on a CPU it is also the fastest, since writing and reading the
      per-layer buffers costs more than the elementwise work it saves. In bfloat16 the
      kept values are stored as their 16-bit patterns (XLA's CPU backend would convert
      bfloat16 buffers to float32 and back), so a bfloat16 stack is differentiable once:
      a second derivative raises an error, and works under `"inputs"` and `"all"`.
    - `"inputs"`: keep only each block's input and recompute the whole block: the least
      memory (one block's intermediates at a time), for about one more forward pass.
    - `"all"`: keep everything (plain reverse-mode differentiation of the scan): the most
      memory.

    Outputs and gradients are the same under every policy. The parameters are shared with
    `model`, not copied. The policy is an ordinary field of each stack holding a string, so
    it is not part of the trees of arrays derived from the model: an optimizer state
    initialised before or after is the same, and trees whose stacks hold no policy (such
    as an optimizer state) are returned unchanged. `python benchmarks/throughput.py
    --memory` measures the working memory of a training step under each policy.

    **Arguments:**

    - `model`: any model of `eqx_vision` (or a PyTree holding models).
    - `policy`: one of `"linear"`, `"inputs"`, `"all"` (the keys of `REMAT`).

    **Returns:** the model with the new policy.
    """
    if policy not in REMAT:
        raise ValueError(f"remat must be one of {sorted(REMAT)}; got {policy!r}.")

    found = _stacks(model)
    chosen = [i for i, s in enumerate(found) if isinstance(s.remat, str)]
    if not chosen:
        return model

    def stacks(tree: Any) -> list[Stack]:
        return [_stacks(tree)[i] for i in chosen]

    return eqx.tree_at(stacks, model, [found[i].with_options(remat=policy) for i in chosen])


_remat = remat  # for `checkpoint_blocks`, whose argument has the function's name


def checkpoint_blocks(model: Any, remat: str = "inputs") -> Any:
    """Deprecated: the former name of [`remat`][eqx_vision.remat], kept for one release.

    **Arguments:** as `remat(model, remat)`.

    **Returns:** `remat(model, remat)`.
    """
    warnings.warn(
        "eqx_vision.checkpoint_blocks is deprecated and will be removed in the next "
        "release; use eqx_vision.remat(model, policy) instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return _remat(model, remat)
