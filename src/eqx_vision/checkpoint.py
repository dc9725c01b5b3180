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

Files are written atomically ([`atomic_write`][eqx_vision.checkpoint.atomic_write]): to
a temporary file `.{name}.{random}.tmp` beside the target `{name}` (e.g.
`.last.safetensors.3f9a1c2e.tmp`), flushed and `fsync`ed, then moved over the target with
`os.replace`, so a crash or a kill at any moment leaves either the previous checkpoint or
the new one, never a broken file. A process killed between the two leaves its temporary
file behind: anything matching `.{name}.*.tmp` beside a file is such a leftover and may be
deleted (the training loop deletes those of its own files when it starts). The new file
gets the permissions a plain `open(path, "w")` would give it: those of the file it
replaces, or `0o666` less the umask.

A checkpoint never holds a NaN or an infinity: `save` checks every floating-point tensor
(model, state and optimizer state) before writing anything, and raises
`FloatingPointError` naming the first non-finite one, leaving the previous file as it was.

Loading checks the header, the architecture, and the presence, shape, dtype and
finiteness of every leaf, and names the tensor in its error: a malformed or foreign file
is a `CheckpointFormatError`, never another exception.

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
import secrets
import signal
import stat
import time
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
# The largest header read (as the safetensors library's own limit): a size field beyond it
# is a corrupt file, not a request for gigabytes of memory.
MAX_HEADER_BYTES = 100_000_000


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be loaded into the given model: not a checkpoint (a
    malformed header or file), a different architecture, missing or extra tensors, or
    tensors of the wrong shape or dtype, or with NaNs or infinities."""


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


def _non_finite(value: np.ndarray) -> int:
    """How many values of a floating-point (or complex) array are NaN or infinite; 0 for
    other dtypes."""
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return 0
    if value.dtype.kind not in "fc":  # bfloat16 and the other ml_dtypes floats
        value = value.astype(np.float32)
    return int(value.size - np.count_nonzero(np.isfinite(value)))


def _rng_problem(value: np.ndarray) -> str | None:
    """What is wrong with `value` as the key data of a `jax.random.key` (of the default
    implementation: uint32 of shape (2,) for threefry), or None."""
    expected = jax.eval_shape(lambda: jr.key_data(jr.key(0)))
    if value.shape == expected.shape and value.dtype == expected.dtype:
        return None
    return (
        f"has shape {tuple(value.shape)} and dtype {value.dtype}; expected the key data of a "
        f"jax.random.key: shape {tuple(expected.shape)}, dtype {expected.dtype}"
    )


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


_TMP_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _create_temporary(path: str) -> tuple[int, str]:
    """Create `.{name}.{random}.tmp` beside `path`, with the mode of the file it will
    replace, or the one `open(path, "w")` gives a new file (`0o666` less the umask, which
    the kernel applies to `os.open`'s mode)."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o666)
        except FileExistsError:
            continue
        if mode is not None and hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, mode)
            except OSError:
                pass  # e.g. a file system without permissions: keep the default mode
        return fd, tmp
    raise FileExistsError(f"cannot create a temporary file for {path}")  # pragma: no cover


# Fault injection, for the tests of what a killed process leaves behind (never set in
# normal use): `EQX_VISION_FAULT_PAUSE=<seconds>` sleeps between writing a temporary file
# and moving it over its target, widening the window a kill may hit;
# `EQX_VISION_FAULT_KILL=<file name>:<n>` kills the process (SIGKILL) there, at the n-th
# write of a file of that name in this process.
_FAULT_WRITES: dict[str, int] = {}


def _fault_point(path: str) -> None:
    pause = os.environ.get("EQX_VISION_FAULT_PAUSE")
    if pause:
        time.sleep(float(pause))
    kill = os.environ.get("EQX_VISION_FAULT_KILL")
    if kill:
        name, _, n = kill.rpartition(":")
        if name == os.path.basename(path):
            _FAULT_WRITES[name] = count = _FAULT_WRITES.get(name, 0) + 1
            if count == int(n):
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; on success, flush, `fsync` and move it over
    `path` (`os.replace`, atomic on POSIX and Windows); on failure, remove it and leave
    `path` untouched.

    The temporary file is `.{name}.{random}.tmp` in the folder of `path` (`name` its file
    name). The file written has the permissions of the file it replaces, or, for a new
    file, those of `open(path, "w")`: `0o666` less the umask. Text modes write UTF-8.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(path)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _fault_point(path)
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
    allow_non_finite: bool = False,
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
    - `allow_non_finite`: write NaNs and infinities too. By default a floating-point
      tensor with any raises `FloatingPointError` naming it, before anything is written.
    """
    st = _safetensors_numpy()
    tensors = _flatten(model, state, opt_state, rng)
    problem = None if rng is None else _rng_problem(tensors["rng"])
    if problem:
        raise ValueError(f"not saving {os.fspath(path)}: rng {problem}")
    if not allow_non_finite:
        for name, value in tensors.items():
            count = _non_finite(value)
            if count:
                raise FloatingPointError(
                    f"not saving {os.fspath(path)}: tensor {name!r} has {count} non-finite "
                    f"value(s) of {value.size}; expected only finite values "
                    "(allow_non_finite=True saves them anyway)"
                )
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(dict(model_config or {})),
        "training": json.dumps(dict(training or {})),
    }
    data = st.save(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_object(text: Any, what: str, path: str) -> dict[str, Any]:
    """`text`, a JSON string of the header's metadata, decoded; it must be an object."""
    if not isinstance(text, str):
        raise CheckpointFormatError(
            f"{path} has a corrupt header: {what} must be a JSON string; got {type(text).__name__}"
        )
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointFormatError(f"{path} has a corrupt header: {what} is not JSON") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(
            f"{path} has a corrupt header: {what} must be a JSON object; got {type(value).__name__}"
        )
    return value


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint, decoded: `{"format", "model_config", "training"}`
    (the last two are `dict`s; `training`'s `step` and `epoch`, when present, are
    non-negative integers).

    Reads only the JSON header of the file, not the tensors. Raises
    `CheckpointFormatError` for a file that is not a checkpoint of this format.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise CheckpointFormatError(f"{path} is not a safetensors file (too short)")
        size = int.from_bytes(size_bytes, "little")
        available = os.fstat(f.fileno()).st_size - 8
        if size > min(available, MAX_HEADER_BYTES):
            raise CheckpointFormatError(
                f"{path} is not a safetensors file: its header size is {size} bytes; "
                f"expected at most {min(available, MAX_HEADER_BYTES)}"
            )
        raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        raise CheckpointFormatError(
            f"{path} is not a safetensors file: its header is not UTF-8 JSON"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, "
            "expected an object"
        )
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        shown = "no format" if found is None else f"format {_short(found)}"
        raise CheckpointFormatError(
            f"{path} is not an eqx_vision checkpoint: expected format {FORMAT!r}; got {shown}"
        )
    model_config = _json_object(meta.get("model_config", "{}"), "model_config", path)
    training = _json_object(meta.get("training", "{}"), "training", path)
    for key in ("step", "epoch"):
        value = training.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointFormatError(
                f"{path} has a corrupt header: training {key} must be a non-negative "
                f"integer; got {_short(value)}"
            )
    return {"format": FORMAT, "model_config": model_config, "training": training}


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
    allow_non_finite: bool,
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
        count = 0 if allow_non_finite else _non_finite(value)
        if count:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has {count} non-finite value(s) of {value.size}; "
                "expected only finite values"
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
    allow_non_finite: bool = False,
) -> Checkpoint:
    """Read a checkpoint into the structure of a given model.

    **Arguments:**

    - `path`: the `.safetensors` file.
    - `like_model`, `like_state`: a model and state of the right structure, e.g. from
      `eqx.filter_eval_shape(eqx.nn.make_with_state(cls), ..., key=...)` (no memory
      needed) or from `ModelConfig.build_like()`.
    - `like_opt_state`: the optimizer state's structure, to load it too.
    - `model_name`: the expected architecture; a checkpoint of another one is an error.
    - `allow_non_finite`: accept NaNs and infinities in the tensors loaded (model, state,
      optimizer state); by default they are an error.

    **Returns:** a [`Checkpoint`][eqx_vision.checkpoint.Checkpoint]. Raises
    `CheckpointFormatError` for a file that is not a checkpoint, and naming the tensor for
    a missing, extra, mis-shaped or non-finite leaf or a malformed `rng`.
    """
    path = os.fspath(path)
    header = read_header(path)
    found = header["model_config"].get("model")
    if model_name is not None and found != model_name:
        shown = found if isinstance(found, str) else _short(found)
        raise CheckpointFormatError(
            f"{path} holds a {shown} checkpoint; expected a {model_name} checkpoint"
        )
    st = _safetensors_numpy()
    try:
        tensors = st.load_file(path)
    except Exception as e:
        raise CheckpointFormatError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    used: set[str] = set()
    names = [n for n, _ in _named_leaves(like_model, "model")]
    model = _fill(like_model, names, tensors, used, path, allow_non_finite)
    state = None
    if like_state is not None:
        names = _state_names(like_model, like_state)
        state = _fill(like_state, names, tensors, used, path, allow_non_finite)
    opt_state = None
    if like_opt_state is not None:
        names = [n for n, _ in _named_leaves(like_opt_state, "opt_state")]
        opt_state = _fill(like_opt_state, names, tensors, used, path, allow_non_finite)
    rng = None
    if "rng" in tensors:
        problem = _rng_problem(tensors["rng"])
        if problem:
            raise CheckpointFormatError(f"{path}: tensor 'rng' {problem}")
        rng = jnp.asarray(tensors["rng"])
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
