"""Checkpoints in safetensors: model, state, optimizer state, step and RNG key.

A checkpoint is one `.safetensors` file (never pickle). Its tensors are named by key path
(`jax.tree_util.keystr(path, simple=True, separator=".")`) under four prefixes:

- `model.<path>`: every array leaf of the model, e.g. `model.transformer.blocks.attn.to_qkv.weight`
  (stacked blocks keep their leading depth axis);
- `state.<path>`: the `eqx.nn.State` leaves, named through the model's `StateIndex` paths,
  e.g. `state.stages.0.blocks.blocks.attn.to_q.depthwise.bn.state_index.0`;
- `opt_state.<path>`: the optimizer state, e.g. `opt_state.1.0.mu.mlp_head.weight`;
- `rng`: the raw key data (`jax.random.key_data`) of the training key.

The header's metadata holds, as JSON strings, `model_config` (architecture and constructor
arguments, see `eqx_vision.presets.ModelConfig`), `training` (step, epoch and any other
training metadata) and `format` (`"eqx_vision.checkpoint/1"`).

Files are written atomically: to a temporary file in the same folder, flushed and
`fsync`ed, then moved over the target with `os.replace`, so a crash or a kill at any
moment leaves either the previous checkpoint or the new one, never a broken file.

Loading checks the architecture, and the presence, shape and dtype of every leaf, and
names the tensor in its error.

```python
from eqx_vision import checkpoint
checkpoint.save("run/last.safetensors", model, state, opt_state=opt_state,
                model_config=config.to_json(), training={"step": 100, "epoch": 3})
ckpt = checkpoint.load("run/last.safetensors", like_model, like_state,
                       like_opt_state=like_opt_state)
model, state, opt_state = ckpt.model, ckpt.state, ckpt.opt_state
```
"""

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from .layers import is_state_index


__all__ = [
    "Checkpoint",
    "CheckpointFormatError",
    "FORMAT",
    "load",
    "read_header",
    "save",
]

FORMAT = "eqx_vision.checkpoint/1"


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be loaded into the given model: a different architecture,
    missing or extra tensors, or tensors of the wrong shape or dtype."""


def _safetensors_numpy():
    try:
        import safetensors.numpy as st
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError('checkpoints need safetensors: pip install "eqx_vision[train]"') from e
    return st


def _is_array_like(x: Any) -> bool:
    """An array, or the `jax.ShapeDtypeStruct` standing for one in an abstract model."""
    return isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x)


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _named_leaves(tree: PyTree, prefix: str) -> list[tuple[str, Any]]:
    """(name, leaf) for every array leaf of `tree`, in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_array_like))[0]
    return [(f"{prefix}.{_name(p)}" if p else prefix, leaf) for p, leaf in leaves]


def _state_names(model: PyTree, state: eqx.nn.State) -> list[str]:
    """The names of the leaves of `state`, in its flattening order, taken from the paths of
    the model's `StateIndex`es (the state itself flattens to positional names only)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    positions = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    names: list[str | None] = [None] * len(leaves)
    for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_state_index)[0]:
        if not is_state_index(node):
            continue
        try:
            sub = positions.get(node)
        except KeyError:
            raise CheckpointFormatError(
                f"the state has no entry for the model's state index {_name(path)}"
            ) from None
        for subpath, position in jax.tree_util.tree_flatten_with_path(sub)[0]:
            names[position] = "state." + _name(path) + (f".{_name(subpath)}" if subpath else "")
    missing = [i for i, n in enumerate(names) if n is None]
    if missing:
        raise CheckpointFormatError(
            f"{len(missing)} state entries belong to no StateIndex of the model"
        )
    return names  # pyright: ignore[reportReturnType]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jr.key_data(x)
    return np.asarray(x, order="C")  # (np.ascontiguousarray would make scalars 1-d)


def _flatten(
    model: PyTree,
    state: eqx.nn.State | None,
    opt_state: PyTree | None,
    rng: jax.Array | None,
) -> dict[str, np.ndarray]:
    items = _named_leaves(model, "model")
    if state is not None:
        names = _state_names(model, state)
        items += list(zip(names, jax.tree_util.tree_leaves(state), strict=True))
    if opt_state is not None:
        items += _named_leaves(opt_state, "opt_state")
    if rng is not None:
        items.append(("rng", rng))
    tensors: dict[str, np.ndarray] = {}
    for name, leaf in items:
        if name in tensors:
            raise ValueError(f"two leaves share the tensor name {name!r}")
        tensors[name] = _to_numpy(leaf)
    return tensors


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; on success, flush, `fsync` and move it over
    `path` (`os.replace`, atomic on POSIX and Windows); on failure, remove it and leave
    `path` untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(
    path: str | os.PathLike,
    model: PyTree,
    state: eqx.nn.State | None = None,
    *,
    opt_state: PyTree | None = None,
    rng: jax.Array | None = None,
    model_config: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically.

    **Arguments:**

    - `path`: the `.safetensors` file to write (replaced if it exists).
    - `model`: the model; its array leaves are saved.
    - `state`: its `eqx.nn.State`, named through the model's `StateIndex` paths.
    - `opt_state`: the optimizer state.
    - `rng`: a `jax.random.key` (or raw key data) to store.
    - `model_config`: JSON-serialisable model description (e.g. `ModelConfig.to_json()`),
      whose `"model"` entry names the architecture checked at load.
    - `training`: JSON-serialisable training metadata (step, epoch, options, ...).
    """
    st = _safetensors_numpy()
    tensors = _flatten(model, state, opt_state, rng)
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(dict(model_config or {})),
        "training": json.dumps(dict(training or {})),
    }
    data = st.save(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint, decoded: `{"format", "model_config", "training"}`.

    Reads only the JSON header of the file, not the tensors.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise CheckpointFormatError(f"{path} is not a safetensors file (too short)")
            size = int.from_bytes(size_bytes, "little")
            if size > os.path.getsize(path) - 8:
                raise CheckpointFormatError(f"{path} is not a safetensors file (bad header size)")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointFormatError(f"{path} is not a safetensors file") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path} is not an eqx_vision checkpoint")
    try:
        return {
            "format": meta["format"],
            "model_config": json.loads(meta.get("model_config", "{}")),
            "training": json.loads(meta.get("training", "{}")),
        }
    except json.JSONDecodeError:
        raise CheckpointFormatError(f"{path} has a corrupt header") from None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    model: PyTree
    state: eqx.nn.State | None
    opt_state: PyTree | None
    rng: jax.Array | None
    model_config: dict[str, Any]
    training: dict[str, Any]


def _fill(
    like: PyTree,
    names: list[str],
    tensors: Mapping[str, np.ndarray],
    used: set[str],
    path: str,
    is_leaf=None,
) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=is_leaf)
    array_positions = [i for i, leaf in enumerate(leaves) if _is_array_like(leaf)]
    if len(array_positions) != len(names):
        raise AssertionError("leaf/name mismatch")  # pragma: no cover
    for i, name in zip(array_positions, names, strict=True):
        expected = leaves[i]
        if name not in tensors:
            raise CheckpointFormatError(f"{path} has no tensor {name!r}")
        value = tensors[name]
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has shape {tuple(value.shape)}; the model expects "
                f"{tuple(expected.shape)}"
            )
        if value.dtype != expected.dtype:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {value.dtype}; the model expects "
                f"{expected.dtype}"
            )
        leaves[i] = jnp.asarray(value)
        used.add(name)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load(
    path: str | os.PathLike,
    like_model: PyTree,
    like_state: eqx.nn.State | None = None,
    *,
    like_opt_state: PyTree | None = None,
    model_name: str | None = None,
) -> Checkpoint:
    """Read a checkpoint into the structure of a given model.

    **Arguments:**

    - `path`: the `.safetensors` file.
    - `like_model`, `like_state`: a model and state of the right structure, e.g. from
      `eqx.filter_eval_shape(eqx.nn.make_with_state(cls), ..., key=...)` (no memory
      needed) or from `ModelConfig.build_like()`.
    - `like_opt_state`: the optimizer state's structure, to load it too.
    - `model_name`: the expected architecture; a checkpoint of another one is an error.

    **Returns:** a [`Checkpoint`][eqx_vision.checkpoint.Checkpoint]. Raises
    `CheckpointFormatError` naming the tensor for a missing, extra or mis-shaped leaf.
    """
    path = os.fspath(path)
    header = read_header(path)
    found = header["model_config"].get("model")
    if model_name is not None and found != model_name:
        raise CheckpointFormatError(
            f"{path} holds a {found} checkpoint; expected a {model_name} checkpoint"
        )
    st = _safetensors_numpy()
    try:
        tensors = st.load_file(path)
    except Exception as e:
        raise CheckpointFormatError(f"cannot read {path}: {e}") from None
    used: set[str] = set()
    names = [n for n, _ in _named_leaves(like_model, "model")]
    model = _fill(like_model, names, tensors, used, path)
    state = None
    if like_state is not None:
        state = _fill(like_state, _state_names(like_model, like_state), tensors, used, path)
    opt_state = None
    if like_opt_state is not None:
        names = [n for n, _ in _named_leaves(like_opt_state, "opt_state")]
        opt_state = _fill(like_opt_state, names, tensors, used, path)
    rng = jnp.asarray(tensors["rng"]) if "rng" in tensors else None
    used.add("rng")
    extra = sorted(
        n
        for n in set(tensors) - used
        if n.startswith("model.")
        or n.startswith("state.")
        or (like_opt_state is not None and n.startswith("opt_state."))
    )
    if extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        raise CheckpointFormatError(
            f"{path} has {len(extra)} tensor(s) the model does not have: {shown}"
        )
    return Checkpoint(model, state, opt_state, rng, header["model_config"], header["training"])
