"""Fine-tuning: which parameters get weight decay, layer-wise learning-rate decay and
frozen blocks, for every model of `eqx_vision`, as optax transformations.

The functions read the role of each parameter from the model itself: the module that holds
it (its type), the field it is stored in, its rank, and the scanned
[`Stack`][eqx_vision.layers.Stack]s around it. They take a model or its trainable part
(`eqx.filter(model, eqx.is_inexact_array)`, the tree optax sees), built or abstract
(`jax.ShapeDtypeStruct` leaves), and return a tree of the same structure with one value per
array leaf.

```python
import optax
from eqx_vision import training

mask = training.weight_decay_mask(model)              # True: weight decay applies
scales = training.layer_decay_scales(model, 0.75)      # one scale per block, also in stacks
frozen = training.frozen_mask(model, 2)                # embeddings and blocks 0, 1
optimizer = training.make_optimizer(
    1e-3, total_steps=1000, weight_decay_mask=mask, layer_scales=scales, frozen=frozen
)
```

**Weight decay.** [`param_labels`][eqx_vision.training.param_labels] names the role of
each parameter; only `"weight"` gets weight decay
([`weight_decay_mask`][eqx_vision.training.weight_decay_mask], for `optax.adamw(mask=...)`,
or the labels themselves for `optax.multi_transform`). In this order:

- `"norm"`: every parameter of a normalisation layer (`LayerNorm`, `ChannelLayerNorm`,
  `BatchNorm`, Equinox's norms, any module whose type name ends in `Norm`);
- `"token"`: class, distillation and register tokens (`cls_token`, `dist_token`,
  `reg_tokens`);
- `"position"`: position embeddings and learned position biases (`pos_embedding`,
  `pos_bias`, `rel_pos_bias`, `attention_biases`);
- `"layer_scale"`: LayerScale's per-channel scales (`attn_scale`, `ff_scale`);
- `"bias"`: a field named `bias` or ending in `_bias` (the additive terms of linear
  layers, convolutions and head mixing);
- `"other"`: any other parameter whose rank, without the stacked axes, is 0 or 1 (a
  learned temperature, for instance);
- `"weight"`: the rest: the matrices and kernels of linear layers, convolutions, head
  mixing and learned queries.

**Layer ids.** [`layer_ids`][eqx_vision.training.layer_ids] numbers the model's blocks as
timm does for BEiT's layer-wise decay, generically: the blocks are those of the outermost
scanned `Stack`s, and the modules outside any stack whose type name ends in `Block`
(ScalableViT's first block of each stage), numbered `1, 2, ..., N` in the order they appear
in the model (the order of its fields) and, within a stack, in block order; a stack nested
in the blocks of another (CrossViT's encoders within its multi-scale blocks) belongs to the
outer block. A parameter outside every stack takes the id of the
block it precedes: `0` before the first block (patch embedding, tokens, position
embeddings), the id of the next stage's first block between stacks (a downsampling or
patch merging layer, a stage's embedding), and `N + 1` after the last block (final norm and
head). A parameter in a stack has one id per block: an array along its leading (stacked)
axis.

**Layer-wise learning-rate decay.** Block `i` learns at `decay ** (N + 1 - i)` times the
learning rate ([`layer_decay_scales`][eqx_vision.training.layer_decay_scales],
[`scale_updates`][eqx_vision.training.scale_updates]): the head at the full rate, the
embeddings at `decay ** (N + 1)`.

**Freezing.** `freeze=k` ([`frozen_mask`][eqx_vision.training.frozen_mask],
[`freeze_updates`][eqx_vision.training.freeze_updates]) zeroes the updates of every
parameter whose layer id is at most `k`: the embeddings and blocks `0 .. k-1` (0-based),
row by row along a stacked axis. The parameters keep their values exactly, whatever the
momentum or the weight decay, when the zeroing comes last in the chain, as in
[`make_optimizer`][eqx_vision.training.make_optimizer].
"""

from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PyTree

from .layers import BatchNorm, ChannelLayerNorm, LayerNorm, Stack


__all__ = [
    "DECAY_LABELS",
    "LABELS",
    "as_function",
    "freeze_updates",
    "frozen_mask",
    "layer_decay_scales",
    "layer_ids",
    "num_blocks",
    "param_labels",
    "scale_updates",
    "weight_decay_mask",
]


LABELS = ("norm", "token", "position", "layer_scale", "bias", "other", "weight")
"""The labels of [`param_labels`][eqx_vision.training.param_labels]."""
DECAY_LABELS = frozenset({"weight"})
"""The labels whose parameters get weight decay."""

_NORMS = (LayerNorm, ChannelLayerNorm, BatchNorm, eqx.nn.LayerNorm, eqx.nn.GroupNorm,
          eqx.nn.RMSNorm, eqx.nn.BatchNorm)  # fmt: skip
_TOKEN_FIELDS = frozenset({"cls_token", "dist_token", "reg_tokens"})
_POSITION_FIELDS = frozenset({"pos_embedding", "pos_bias", "rel_pos_bias", "attention_biases"})
_LAYER_SCALE_FIELDS = frozenset({"attn_scale", "ff_scale"})


def _is_param(x: Any) -> bool:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


class _Leaf:
    """Where one parameter sits: its path, the module that holds it, the field name, the
    number of stacked axes in front of it, and the block it belongs to: `(path, depth,
    stacked)` of the outermost stack or unstacked block around it, or None."""

    def __init__(self, path: tuple, owner: Any, field: str | None, axes: int, unit: Any, ndim: int):
        self.path = path
        self.owner = owner
        self.field = field
        self.axes = axes
        self.unit = unit
        self.ndim = ndim


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    raise TypeError(f"cannot follow the tree key {key!r}")  # pragma: no cover


def _describe(tree: PyTree) -> tuple[list[_Leaf], Any]:
    """One `_Leaf` per parameter of `tree`, in tree order, and the tree's structure (of
    its parameters, every other leaf `None`)."""
    params = eqx.filter(tree, _is_param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, value in flat:
        node, owner, field, axes, unit = params, None, None, 0, None
        for i, key in enumerate(path):
            if isinstance(node, eqx.Module):
                owner = node
                if isinstance(node, Stack) and key == jax.tree_util.GetAttrKey("blocks"):
                    axes += 1
                    if unit is None:
                        unit = (path[:i], node.depth, True)
                elif unit is None and i and type(node).__name__.endswith("Block"):
                    unit = (path[:i], 1, False)
            if isinstance(key, jax.tree_util.GetAttrKey):
                field = key.name
            node = _child(node, key)
        leaves.append(_Leaf(path, owner, field, axes, unit, len(value.shape)))
    return leaves, treedef


def _label(leaf: _Leaf) -> str:
    owner, field = leaf.owner, leaf.field or ""
    if isinstance(owner, _NORMS) or type(owner).__name__.endswith("Norm"):
        return "norm"
    if field in _TOKEN_FIELDS:
        return "token"
    if field in _POSITION_FIELDS:
        return "position"
    if field in _LAYER_SCALE_FIELDS:
        return "layer_scale"
    if field == "bias" or field.endswith("_bias"):
        return "bias"
    if leaf.ndim - leaf.axes <= 1:
        return "other"
    return "weight"


def param_labels(model: PyTree) -> PyTree[str]:
    """The role of each parameter of `model`, for `optax.multi_transform`.

    **Arguments:**

    - `model`: a model of `eqx_vision` (built or abstract), or its trainable part.

    **Returns:** a tree of the structure of `eqx.filter(model, eqx.is_inexact_array)` with
    one of [`LABELS`][eqx_vision.training.LABELS] at each array leaf (the rules are in the
    [fine-tuning guide](../finetuning.md#weight-decay)) and `None` elsewhere.
    """
    leaves, treedef = _describe(model)
    return jax.tree_util.tree_unflatten(treedef, [_label(leaf) for leaf in leaves])


def weight_decay_mask(model: PyTree) -> PyTree[bool]:
    """Which parameters of `model` get weight decay: `True` for the `"weight"`s of
    [`param_labels`][eqx_vision.training.param_labels] (matrices and kernels), `False` for
    biases, norms, position embeddings and biases, class, distillation and register tokens,
    LayerScale and other parameters of rank 0 or 1. The `mask` of `optax.adamw`."""
    leaves, treedef = _describe(model)
    return jax.tree_util.tree_unflatten(treedef, [_label(leaf) in DECAY_LABELS for leaf in leaves])


def _ids(leaves: list[_Leaf]) -> tuple[list[np.ndarray], int]:
    """The layer id of each leaf (an int array: `()` outside stacks, `(depth,)` in one) and
    the number of blocks."""
    base: dict[tuple, int] = {}  # block or outermost stack path -> id of its first block
    count = 0
    for leaf in leaves:
        if leaf.unit is not None:
            path, depth, _ = leaf.unit
            if path not in base:
                base[path] = count + 1
                count += depth
    ids: list[Any] = [None] * len(leaves)
    upcoming = count + 1  # the id of the next block, scanning backwards
    for i in reversed(range(len(leaves))):
        leaf = leaves[i]
        if leaf.unit is not None:
            path, depth, stacked = leaf.unit
            ids[i] = base[path] + np.arange(depth) if stacked else base[path]
            upcoming = base[path]
        else:
            ids[i] = upcoming
    for i, leaf in enumerate(leaves):
        if leaf.unit is not None:
            break
        ids[i] = 0 if count else 1
    return [np.asarray(x, np.int32) for x in ids], count


def num_blocks(model: PyTree) -> int:
    """The number `N` of blocks of `model`: the blocks of its outermost scanned stacks
    (see [`layer_ids`][eqx_vision.training.layer_ids])."""
    return _ids(_describe(model)[0])[1]


def layer_ids(model: PyTree) -> PyTree[np.ndarray]:
    """The layer id of each parameter of `model`, from `0` (embeddings) to `N + 1` (final
    norm and head), `N` = [`num_blocks`][eqx_vision.training.num_blocks].

    **Returns:** a tree of the structure of `eqx.filter(model, eqx.is_inexact_array)`: at
    each array leaf an int32 array, of shape `()` outside the stacks and `(depth,)` (one id
    per block, along the leading stacked axis) inside a stack. The rule is in the
    [fine-tuning guide](../finetuning.md#layer-ids).
    """
    leaves, treedef = _describe(model)
    return jax.tree_util.tree_unflatten(treedef, _ids(leaves)[0])


def layer_decay_scales(model: PyTree, decay: float) -> PyTree[np.ndarray]:
    """Layer-wise learning-rate decay (BEiT, timm's `layer_decay`): the factor
    `decay ** (N + 1 - id)` of each parameter's learning rate, for
    [`scale_updates`][eqx_vision.training.scale_updates].

    **Arguments:**

    - `model`: a model of `eqx_vision`, or its trainable part.
    - `decay`: in `(0, 1]`; `1` leaves every rate as it is.

    **Returns:** a tree like [`layer_ids`][eqx_vision.training.layer_ids]'s with float32
    scales: `()` outside the stacks, `(depth,)` along a stacked axis.
    """
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
        raise ValueError(f"layer decay must be a number in (0, 1]; got {decay!r}.")
    leaves, treedef = _describe(model)
    ids, count = _ids(leaves)
    scales = [np.asarray(float(decay) ** (count + 1 - i), np.float32) for i in ids]
    return jax.tree_util.tree_unflatten(treedef, scales)


def frozen_mask(model: PyTree, freeze: int) -> PyTree[np.ndarray]:
    """Which parameters `freeze` leaves fixed: those of layer id `<= freeze`, i.e. the
    embeddings and blocks `0 .. freeze - 1` (0-based, in the order of
    [`layer_ids`][eqx_vision.training.layer_ids]), and whatever lies between them.

    **Arguments:**

    - `model`: a model of `eqx_vision`, or its trainable part.
    - `freeze`: from `0` (nothing frozen) to `N` = [`num_blocks`][eqx_vision.training.num_blocks]
      (every block frozen; the final norm and the head still learn).

    **Returns:** a tree like [`layer_ids`][eqx_vision.training.layer_ids]'s with bool
    arrays, `True` where frozen, for
    [`freeze_updates`][eqx_vision.training.freeze_updates].
    """
    leaves, treedef = _describe(model)
    ids, count = _ids(leaves)
    if isinstance(freeze, bool) or not isinstance(freeze, int | np.integer):
        raise TypeError(f"freeze must be an int; got {freeze!r}.")
    if not 0 <= freeze <= count:
        raise ValueError(
            f"freeze must be in [0, {count}] for {type(model).__name__}, which has {count} "
            f"blocks (0: nothing frozen; {count}: every block); got {freeze}."
        )
    frozen = [np.asarray(i <= freeze if freeze else i < 0) for i in ids]
    return jax.tree_util.tree_unflatten(treedef, frozen)


def _broadcast(factor: Any, update: Array) -> Array:
    """`factor`, whose shape leads `update`'s, reshaped to broadcast against it."""
    factor = jnp.asarray(factor)
    return factor.reshape(factor.shape + (1,) * (update.ndim - factor.ndim))


def _is_function(tree: Any) -> bool:
    """Whether `tree` is a function of the parameters rather than a tree (a tree of the
    structure of an Equinox model is a module, and modules are callable)."""
    return callable(tree) and not isinstance(tree, eqx.Module)


def as_function(tree: PyTree | Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
    """`tree` as a function of the parameters (a tree gives a constant function), the form
    optax's `mask` arguments take unambiguously."""
    return tree if _is_function(tree) else (lambda params: tree)


def _tree_or_call(tree: PyTree | Callable[[PyTree], PyTree], updates: PyTree) -> PyTree:
    return as_function(tree)(updates)


def scale_updates(
    scales: PyTree | Callable[[PyTree], PyTree],
) -> optax.GradientTransformation:
    """An optax transformation multiplying each update by its own array, broadcast over
    the trailing axes: a scalar scales the whole leaf, a `(depth,)` array each row of a
    stacked leaf.

    **Arguments:**

    - `scales`: a tree of the structure of the parameters (e.g. from
      [`layer_decay_scales`][eqx_vision.training.layer_decay_scales]), or a function from
      the updates to one.

    Placed after `optax.adamw`, it scales each parameter's learning rate (and its decoupled
    weight decay with it), as timm's per-group `lr_scale` does.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        factors = _tree_or_call(scales, updates)
        updates = jax.tree.map(lambda u, s: u * _broadcast(s, u).astype(u.dtype), updates, factors)
        return updates, state

    return optax.GradientTransformation(init, update)


def freeze_updates(
    frozen: PyTree | Callable[[PyTree], PyTree],
) -> optax.GradientTransformation:
    """An optax transformation setting the updates of frozen parameters to zero (not
    multiplied: a NaN there becomes zero too), row by row along a stacked axis.

    **Arguments:**

    - `frozen`: a tree of bools of the structure of the parameters (`True`: frozen;
      scalars or `(depth,)` arrays, e.g. from
      [`frozen_mask`][eqx_vision.training.frozen_mask]), or a function from the updates to
      one.

    Put it last in the chain (after the weight decay and the momentum) for the frozen
    parameters to keep their values exactly; put it first as well for the gradient clipping
    to see only the trainable ones.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        mask = _tree_or_call(frozen, updates)
        updates = jax.tree.map(
            lambda u, f: jnp.where(_broadcast(f, u), jnp.zeros((), u.dtype), u), updates, mask
        )
        return updates, state

    return optax.GradientTransformation(init, update)


def _iter_labels(model: PyTree) -> Iterator[tuple[str, str, Any]]:
    """`(path, label, layer id)` of each parameter (for tables and tests)."""
    leaves, _ = _describe(model)
    ids, _ = _ids(leaves)
    for leaf, i in zip(leaves, ids, strict=True):
        yield jax.tree_util.keystr(leaf.path, simple=True, separator="."), _label(leaf), i
