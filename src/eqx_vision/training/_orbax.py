"""Training checkpoints with orbax: the whole training state (model, state, optimizer
state) of any sharding, with the loop's position, saved asynchronously and kept by a
policy (the last few and the best)."""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


CHECKPOINTS = "checkpoints"
"""The folder of a run's training checkpoints, one sub-folder per step."""


def _names(tree: PyTree) -> list[str]:
    """A name for each array leaf of `tree`: its position, then its path (readable on
    disk; the position keeps the names unique)."""
    paths = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_array))[0]
    return [
        f"{i:05d}." + jax.tree_util.keystr(path, simple=True, separator=".")
        for i, (path, _) in enumerate(paths)
    ]


def _arrays(tree: PyTree) -> dict[str, Any]:
    return dict(zip(_names(tree), jax.tree.leaves(eqx.filter(tree, _is_array)), strict=True))


@dataclasses.dataclass
class Restored:
    """A training checkpoint read back: the tree (of the structure and shardings asked
    for) and the loop's metadata (a JSON object)."""

    tree: PyTree
    meta: dict[str, Any]
    step: int


class TrainingCheckpoints:
    """The training checkpoints of a run folder, `<out>/checkpoints/<step>/`, written with
    orbax: each array by the processes that hold it (any sharding, over one or several
    processes), asynchronously (the save returns once the arrays are copied off the
    devices; the files are written in the background), each step's folder moved into
    place only when whole, so a process killed at any moment leaves the earlier
    checkpoints intact. It keeps the last `keep` and, given accuracies, the best one.

    Every process of a run creates it and calls `save` and `restore` alike.
    """

    def __init__(self, out: str, *, keep: int = 2, read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        # orbax reports each save at INFO level through absl: keep the console quiet.
        logging.getLogger("absl").setLevel(logging.WARNING)
        self._ocp = ocp
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(keep),
            pp.BestN(
                get_metric_fn=lambda metrics: metrics["test_accuracy"],
                reverse=False,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])  # fmt: skip
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = os.path.abspath(os.path.join(out, CHECKPOINTS))
        self._options = options
        self._opened: Any = None

    @property
    def _manager(self) -> Any:
        # Opened at the first use, so that the folder appears with the first checkpoint.
        if self._opened is None:
            self._opened = self._ocp.CheckpointManager(
                self.directory,
                options=self._options,
                item_handlers={
                    "model": self._ocp.StandardCheckpointHandler(),
                    "optimizer": self._ocp.StandardCheckpointHandler(),
                    "meta": self._ocp.JsonCheckpointHandler(),
                },
            )
        return self._opened

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, in order."""
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        model: PyTree,
        opt_state: PyTree,
        meta: Mapping[str, Any],
        *,
        accuracy: float | None = None,
    ) -> None:
        """Start saving the array leaves of `model` (the model and its state), those of
        `opt_state` and the JSON object `meta` as the checkpoint of `step`; `accuracy`
        (the test accuracy after an epoch) makes it a candidate for the best one kept."""
        ocp = self._ocp
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(_arrays(model)),
            optimizer=ocp.args.StandardSave(_arrays(opt_state)),
            meta=ocp.args.JsonSave(dict(meta)),
        )
        metrics = None if accuracy is None else {"test_accuracy": float(accuracy)}
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, model: PyTree, opt_state: PyTree | None = None) -> Restored:
        """The checkpoint of `step` read into the structure of `model` (and of
        `opt_state`, unless `None`: then the model alone), whose array leaves (arrays, or
        `jax.ShapeDtypeStruct`s with a `sharding`) give each array's shape, dtype and
        sharding; their other leaves are kept. `Restored.tree` is the model, or
        `(model, opt_state)`."""
        ocp = self._ocp
        items = {"model": model} if opt_state is None else {"model": model, "optimizer": opt_state}
        parts = {name: eqx.partition(tree, _is_array) for name, tree in items.items()}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        targets = {
            name: {
                key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device)
                for key, x in _arrays(params).items()
            }
            for name, (params, _) in parts.items()
        }
        self._check(step, targets)
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())
            )
        except (OSError, ValueError) as e:  # damaged files
            from ..checkpoint import CheckpointFormatError

            raise CheckpointFormatError(
                f"{self.directory}/{step}: cannot be read ({str(e).splitlines()[0]})"
            ) from None
        trees = []
        for name, (params, static) in parts.items():
            arrays, target = restored[name], targets[name]
            missing = sorted(set(target) - set(arrays))
            if missing:
                raise ValueError(
                    f"the checkpoint of step {step} in {self.directory} lacks {len(missing)} "
                    f"arrays of the {name}, e.g. {missing[0]}"
                )
            leaves = [arrays[key] for key in target]
            trees.append(
                eqx.combine(jax.tree.unflatten(jax.tree.structure(params), leaves), static)
            )
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"the checkpoint of step {step} has no metadata object")
        return Restored(trees[0] if opt_state is None else tuple(trees), meta, step)

    def _check(self, step: int, targets: dict[str, dict[str, jax.ShapeDtypeStruct]]) -> None:
        """Raise `CheckpointFormatError` unless the checkpoint of `step` holds exactly the
        arrays of `targets`, of their shapes and dtypes (before reading any)."""
        from ..checkpoint import CheckpointFormatError

        where = f"{self.directory}/{step}"
        try:
            saved = self._manager.item_metadata(step)
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{where}: cannot read its metadata ({e})") from None
        for name, target in targets.items():
            arrays = saved[name] if name in saved.keys() else None
            if arrays is None:
                raise CheckpointFormatError(f"{where} holds no {name} arrays")
            missing = [k for k in target if k not in arrays]
            extra = [k for k in arrays if k not in target]
            if missing or extra:
                shown = missing[:1] and f"lacks {missing[0]}" or f"has {extra[0]} besides"
                raise CheckpointFormatError(
                    f"{where}: its {name} is not of this model's structure ({len(arrays)} "
                    f"arrays saved, {len(target)} expected; it {shown})"
                )
            for key, want in target.items():
                got = arrays[key]
                if tuple(got.shape) != tuple(want.shape) or jax.numpy.dtype(
                    got.dtype
                ) != jax.numpy.dtype(want.dtype):
                    raise CheckpointFormatError(
                        f"{where}: {key} is {got.dtype}{list(got.shape)}; the model's is "
                        f"{want.dtype}{list(want.shape)} (a checkpoint of another "
                        "configuration)"
                    )

    def metadata(self, step: int) -> dict[str, Any]:
        """The loop's metadata of the checkpoint of `step` (no arrays are read)."""
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"] if isinstance(meta["meta"], dict) else {}

    def wait(self) -> None:
        """Wait until every started save is on disk."""
        if self._opened is not None:
            self._opened.wait_until_finished()

    def close(self) -> None:
        """Finish the started saves and release the manager."""
        if self._opened is not None:
            self._opened.close()
            self._opened = None


def abstract_like(tree: PyTree, sharding: Any = None) -> PyTree:
    """`tree` with each array leaf (or `jax.ShapeDtypeStruct`) replaced by a
    `jax.ShapeDtypeStruct` of its shape and dtype and the sharding of the placed array, or
    `sharding` (one `jax.sharding.Sharding`, or a tree of them for the array leaves)."""

    def one(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    params, static = eqx.partition(tree, _is_array)
    if sharding is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or device, params)
    elif isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, params)
    else:
        shardings = sharding
    return eqx.combine(jax.tree.map(one, params, shardings), static)


def _is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def key_data(key: Any) -> list[int]:
    """A `jax.random` key as JSON numbers."""
    return np.asarray(jax.random.key_data(key)).astype(np.int64).ravel().tolist()
