"""Homogeneous stacks of blocks, stored with a leading depth axis and run with `lax.scan`."""

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, PRNGKeyArray

from . import _init as init
from ._bits import _to_bits_p, keeping_bits
from ._checks import checked_arguments
from ._linear import _bf16_linear_p


Block = TypeVar("Block", bound=eqx.Module)


def _linear_outputs(prim: Any, *_: Any, **params: Any) -> bool:
    """Save the outputs of weight products: matrix products without batch dimensions
    (token-wise linear layers, also under `vmap`) and convolutions. A bfloat16 linear
    layer's output is saved as its `uint16` bit pattern (`saved_as_bits`)."""
    if prim is _bf16_linear_p or prim is _to_bits_p:
        return True
    if prim is jax.lax.dot_general_p:
        (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        return not lhs_batch and not rhs_batch
    return prim is jax.lax.conv_general_dilated_p


REMAT: dict[str, Callable[..., bool] | None] = {
    "linear": _linear_outputs,
    "inputs": jax.checkpoint_policies.nothing_saveable,
    "all": None,
}


def _keeping_bits(step: Callable, enabled: bool) -> Callable:
    """`step`, traced with bfloat16 linear outputs routed through their bit patterns (which
    the `"linear"` policy keeps, see `_bits`) or, in a stack under another policy nested in
    one that keeps them, not."""

    def wrapped(*args: Any) -> Any:
        with keeping_bits(enabled):
            return step(*args)

    return wrapped


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
    """

    blocks: Block
    layer_drop: LayerDrop
    depth: int = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    unroll: int = eqx.field(static=True)

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
        # code in the loop body: CrossViT's float32 training step 1.07x faster.
        inner = _stacks(blocks)
        if inner:
            blocks = eqx.tree_at(_stacks, blocks, [s.with_options(unroll=s.depth) for s in inner])
        self.blocks = blocks
        self.layer_drop = LayerDrop(layer_dropout)
        self.depth = depth
        self.remat = "linear"
        self.unroll = 1

    def with_options(
        self, *, remat: str | None = None, unroll: int | None = None
    ) -> "Stack[Block]":
        """This stack with other execution options (the parameters are shared, not copied).
        Outputs and gradients are the same whatever the options.

        - `remat`: what the backward pass keeps of each block's forward pass, one of
          `REMAT` (see [`checkpoint_blocks`][eqx_vision.checkpoint_blocks]).
        - `unroll`: blocks per iteration of the compiled loop (`lax.scan`'s `unroll`).
        """
        if remat is not None and remat not in REMAT:
            raise ValueError(f"remat must be one of {sorted(REMAT)}; got {remat!r}.")
        if unroll is not None and unroll < 1:
            raise ValueError(f"unroll must be at least 1; got {unroll}.")
        new = object.__new__(type(self))
        for field in dataclasses.fields(self):
            object.__setattr__(new, field.name, getattr(self, field.name))
        if remat is not None:
            object.__setattr__(new, "remat", remat)
        if unroll is not None:
            object.__setattr__(new, "unroll", unroll)
        return new

    def _scan(self, step: Callable, init: Any, xs: Any) -> Any:
        step = _keeping_bits(step, self.remat == "linear")
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

    def __call__(self, x: Any, *args: Any, key: PRNGKeyArray | None = None) -> Any:
        """Apply the blocks in order: `x = block_i(x, *args, key=key_i)`."""
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        keys = drop = None
        if key is not None:
            block_key, drop_key = jr.split(key)
            keys = jr.split(block_key, self.depth)
            if self.layer_drop.active():
                drop = self.layer_drop(self.depth, key=drop_key)

        def step(carry, layer):
            params, block_key, skip = layer
            out = eqx.combine(params, static)(carry, *args, key=block_key)
            if skip is not None:
                out = jax.tree.map(lambda new, old: jnp.where(skip, old, new), out, carry)
            return out, None

        x, _ = self._scan(step, x, (dynamic, keys, drop))
        return x

    def call_with_state(
        self, x: Any, state: eqx.nn.State, *args: Any, key: PRNGKeyArray | None = None
    ) -> tuple[Any, eqx.nn.State]:
        """Apply stateful blocks in order: `x, s_i = block_i(x, s_i, *args, key=key_i)`.

        Each block's slice of `state` (e.g. its BatchNorm statistics) is scanned along with
        its parameters, and the updated slices are written back.
        """
        if self.layer_drop.active():
            raise NotImplementedError("layer dropout is not supported for stateful blocks.")
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        substate = state.substate(self.blocks)
        keys = None if key is None else jr.split(key, self.depth)

        def step(carry, layer):
            params, block_state, block_key = layer
            out, block_state = eqx.combine(params, static)(carry, block_state, *args, key=block_key)
            return out, block_state

        x, substate = self._scan(step, x, (dynamic, substate, keys))
        if not _updates_state(self.blocks):
            # Inference: nothing changed; returning the caller's state keeps it usable in
            # eager code (`State.update` retires the object it is called on).
            return x, state
        return x, state.update(substate)


def _is_stateful_layer(node: Any) -> bool:
    return hasattr(node, "state_index") and hasattr(node, "inference")


def _updates_state(module: Any) -> bool:
    """Whether a stateful layer (e.g. BatchNorm) of `module` is in training mode."""
    nodes = jax.tree.leaves(module, is_leaf=_is_stateful_layer)
    return any(_is_stateful_layer(n) and not n.inference for n in nodes)


def _is_state_index(node: Any) -> bool:
    return isinstance(node, eqx.nn.StateIndex)


def _share_state_indices(module: Block, like: Block) -> Block:
    """`module` with the `StateIndex` markers of `like`, position by position.

    Blocks built one by one each get their own markers (static fields), while a stack of
    them has one state entry per index, holding the stacked initial values.
    """
    markers = [
        i.marker for i in jax.tree.leaves(like, is_leaf=_is_state_index) if _is_state_index(i)
    ]
    if not markers:
        return module
    leaves, treedef = jax.tree.flatten(module, is_leaf=_is_state_index)
    shared = iter(markers)
    new_leaves = []
    for leaf in leaves:
        if _is_state_index(leaf):
            index = eqx.nn.StateIndex(leaf.init)
            object.__setattr__(index, "marker", next(shared))
            leaf = index
        new_leaves.append(leaf)
    return jax.tree.unflatten(treedef, new_leaves)


def stack_modules(modules: list[Block]) -> Block:
    """Stack modules of one structure into one whose array leaves gain a leading axis."""
    modules = [modules[0]] + [_share_state_indices(m, modules[0]) for m in modules[1:]]
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


def checkpoint_blocks(model: Any, remat: str = "inputs") -> Any:
    """`model` with another gradient-checkpointing policy in every stack of blocks.

    A [`Stack`][eqx_vision.layers.Stack] runs its blocks with `lax.scan`; for the backward
    pass, what a block computes in the forward pass is either kept (in a buffer with one
    slot per layer) or recomputed from what is kept. `remat` chooses:

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
    `model`, not copied. The policy is part of the model's PyTree structure (a static
    field), and so of every PyTree shaped like it: set it before initialising an optimizer
    state, or pass both: `model, opt_state = checkpoint_blocks((model, opt_state), "inputs")`.
    `python benchmarks/throughput.py --memory` measures the working memory of a training
    step under each policy.

    **Arguments:**

    - `model`: any model of `eqx_vision` (or a PyTree holding models, or trees shaped
      like them such as an optimizer state).
    - `remat`: one of `"linear"`, `"inputs"`, `"all"`.

    **Returns:** the model with the new policy.
    """
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {sorted(REMAT)}; got {remat!r}.")
    stacks = _stacks(model)
    if not stacks:
        return model
    return eqx.tree_at(_stacks, model, [s.with_options(remat=remat) for s in stacks])
