"""The training loop: `fit`, with its run folder, checkpoints, metrics and resume."""

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..data import TrainingData
from ..finetune import (
    frozen_mask,
    layer_decay_scales,
    weight_decay_mask,
)
from ..layers import remat
from ..precision import Precision
from ._config import Callback, FitInfo, FitResult, StepInfo, TrainConfig, _EpochFunction
from ._orbax import CHECKPOINTS, TrainingCheckpoints, abstract_like, key_data
from ._parallel import DataParallel
from ._recipe import ema_model
from ._steps import (
    Normalization,
    count_params,
    evaluate_details,
    init_optimizer,
    learning_rate_schedule,
    make_optimizer,
    train_step,
)


CONFIG = "config.json"
CHECKPOINT = "last.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
# The batch size of the evaluation after each epoch (or the training batch, if larger).
_EVAL_BATCH_SIZE = 256


def _fit_step(model, state, opt_state, images, labels, key, *, optimizer, parallel, precision,
              normalization=None, label_smoothing=0.0, mixup=None):  # fmt: skip
    """`train_step`, and whether its update was made of finite numbers: the gradients'
    (checked by `optax.apply_if_finite`, whose skipped steps also keep the old model state)
    or, without it, the loss's."""
    new_model, new_state, opt_state, loss = train_step(
        model, state, opt_state, images, labels, key,
        optimizer=optimizer, parallel=parallel, precision=precision,
        normalization=normalization, label_smoothing=label_smoothing, mixup=mixup,
    )  # fmt: skip
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        finite = opt_state.last_finite
        # The step's BatchNorm statistics are those of the non-finite batch: keep the old.
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    else:
        finite = jnp.isfinite(loss)
    return new_model, new_state, opt_state, loss, finite


# A step function that donates the model, its state and the optimizer state: the loop of
# `fit` rebinds them at every step and passes a fresh batch and key, so XLA writes the new
# parameters and optimizer state over the old ones instead of into fresh memory. Created
# once, so that every `fit` in a process shares its compiled programs.
_donating_fit_step = eqx.filter_jit(_fit_step, donate="all")


@eqx.filter_jit
def _finite_leaves(tree: PyTree) -> Array:
    """Whether each inexact array leaf of `tree` is all finite, as one bool vector."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _first_non_finite(model: PyTree, state: eqx.nn.State, opt_state: PyTree) -> str | None:
    """The name of the first array of the model, its state or the optimizer state that
    holds a NaN or an infinity, or None."""
    tree = {"model": model, "state": state, "opt_state": opt_state}
    finite = np.asarray(_finite_leaves(tree))
    if finite.all():
        return None
    paths = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_inexact_array))[0]
    path = paths[int(np.argmin(finite))][0]
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _atomic_text(path: str, text: str) -> None:
    from ..checkpoint import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_metrics(path: str, last_epoch: int, last_step: int) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl` up to the checkpoint of `last_step`, at the end of
    epoch `last_epoch` or within the epoch after it (a killed run may have written records
    past its last checkpoint): the epoch records and, with `log_every`, the step records;
    lines that are neither are left out."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if not (
                        isinstance(record, dict)
                        and _is_count(record.get("epoch"))
                        and _is_count(record.get("step"))
                        and record["step"] <= last_step
                        and _is_number(record.get("train_loss"))
                    ):
                        continue
                    if _is_epoch_record(record):
                        if 1 <= record["epoch"] <= last_epoch and all(
                            _is_number(record.get(k)) for k in _PLOTTED
                        ):
                            records.append(record)
                    elif record["epoch"] <= last_epoch + 1:
                        records.append(record)
    return records


def _is_epoch_record(record: Mapping[str, Any]) -> bool:
    """An epoch's record (with the test metrics), not a step record of `log_every`."""
    return "test_accuracy" in record


# The entries of a metrics record that `fit` reads back (for its result and the curves).
_PLOTTED = ("train_loss", "test_loss", "test_accuracy")


def _plot_curves(path: str, records: list[dict[str, Any]]) -> None:
    """Loss and accuracy per epoch as a PNG (nothing without matplotlib)."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the installation
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in records], marker="o", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["test_accuracy"] for r in records], marker="o", color="C1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="test accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


@dataclasses.dataclass
class _Run:
    """The mutable bookkeeping of one `fit` call (the arrays are passed around apart)."""

    config: TrainConfig
    data: TrainingData
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    parallel: DataParallel | None
    callback: Callback
    out: str | None
    checkpoint_meta: dict[str, Any]
    model_config: dict[str, Any]
    train_key: PRNGKeyArray
    steps_per_epoch: int
    normalization: Normalization | None = None
    writer: bool = True  # this process writes the run's files (process 0 of several)
    step: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stop: bool = False
    compile_seconds: float | None = None
    train_seconds: float = 0.0
    images_seen: int = 0
    consecutive_skipped: int = 0  # steps skipped in a row, up to the last one read
    skipped: int = 0  # steps skipped in the whole run
    epoch_skipped: int = 0  # steps skipped in the current epoch
    lines: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics.jsonl
    checkpoints: TrainingCheckpoints | None = None
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints
    log_every: int | None = None  # steps between step records of the metrics
    position: int = 0  # the steps of the current epoch done at the start
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # restored with it
    window: list[float] = dataclasses.field(default_factory=list)  # losses since the last log
    window_start: float = 0.0
    tensorboard: Any = None


# The temporary files `checkpoint.atomic_write` leaves beside a run's files when the
# process is killed while writing one: `.{name}.{random}.tmp`.
_OWN_TEMPORARY = re.compile(
    r"\.(?:" + "|".join(map(re.escape, (CONFIG, CHECKPOINT, METRICS, CURVES))) + r")\.\w+\.tmp"
)
_MISSING = object()


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """Where two JSON values differ, as `"path: saved, not now"` strings."""
    if isinstance(saved, dict) and isinstance(now, dict):
        found = []
        for k in [*saved, *(k for k in now if k not in saved)]:
            found += _differences(saved.get(k, _MISSING), now.get(k, _MISSING), f"{where}{k}.")
        return found
    if saved == now and isinstance(saved, bool) == isinstance(now, bool):
        return []
    shown = ["none" if v is _MISSING else repr(v) for v in (saved, now)]
    return [f"{where[:-1]}: {shown[0]}, not {shown[1]}"]


def _read_run_json(path: str) -> dict[str, Any] | None:
    """A run's `config.json`, or None if it cannot be read as a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _check_out(out: str, resume: bool, run_json: dict[str, Any], config: TrainConfig) -> bool:
    """Check the folder `out` before anything is written into it. Returns whether the run
    continues from the checkpoint in `out`; otherwise it starts from the beginning: in a
    new folder, or in the folder of a run that stopped before its first checkpoint (only
    its `config.json` and metrics), which `resume` starts again, as does a call that would
    write the same `config.json`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} exists and is not a folder")
    config_path = os.path.join(out, CONFIG)
    has_checkpoint = os.path.isfile(os.path.join(out, CHECKPOINT)) or bool(checkpoint_steps(out))
    has_config = os.path.isfile(config_path)
    saved = _read_run_json(config_path) if has_config else None
    if resume:
        if not has_checkpoint and not has_config:
            raise FileNotFoundError(f"nothing to resume in {out}: no {CHECKPOINT}")
        if has_config and saved is None:
            raise ValueError(f"{config_path} does not hold a JSON object: resume needs it whole")
        saved_config = (saved or {}).get("train_config")
        if isinstance(saved_config, dict):
            changed = config.changes_from(saved_config)
            if changed:
                shown = ", ".join(changed)
                raise ValueError(f"{out} was trained with {shown}; resume with its settings.")
        return has_checkpoint
    if has_checkpoint or (os.path.exists(os.path.join(out, METRICS)) and not has_config):
        raise FileExistsError(f"{out} already holds a run: resume it, or choose another folder")
    if has_config:
        expected = json.loads(json.dumps(run_json))
        if saved is not None and isinstance(saved.get("train_config"), dict):
            saved = {**saved, "train_config": {**saved["train_config"], "remat": config.remat}}
        differences = (
            ["config.json cannot be read"] if saved is None else _differences(saved, expected)
        )
        if differences:
            shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
            raise FileExistsError(
                f"{out} holds a run that stopped before its first checkpoint, with other "
                f"settings ({shown}): start it again with the same settings, resume it, or "
                "choose another folder"
            )
    return False


def _lock(out: str) -> int | None:
    """Lock the folder `out` for this process: an advisory `flock` on the folder itself,
    released when the process ends (even killed), so that two runs never write into one
    folder. Returns the descriptor to close, or None where there are no such locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(
            errno.EAGAIN,
            f"{out} is in use by another training run: wait for it to end, or choose another "
            "folder",
        ) from None
    except OSError:  # pragma: no cover - a file system without locks
        pass
    return fd


def _open_out(run: _Run, resumed: bool, run_json: dict[str, Any]) -> None:
    """Write the run's first files: clear the temporary files of a run killed while writing
    one (only those: `.{name}.{random}.tmp` of the run's own files), then write
    `config.json` and an empty `metrics.jsonl` for a run that starts, or cut
    `metrics.jsonl` to the checkpoint's epochs for one that resumes."""
    assert run.out is not None
    for name in os.listdir(run.out):
        if _OWN_TEMPORARY.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(run.out, name))
    metrics = "".join(json.dumps(r) + "\n" for r in run.lines)
    if not resumed:
        _atomic_text(os.path.join(run.out, CONFIG), json.dumps(run_json, indent=2) + "\n")
    _atomic_text(os.path.join(run.out, METRICS), metrics)


def _checkpoint_count(training: dict[str, Any], key: str, path: str) -> int:
    from ..checkpoint import CheckpointFormatError

    value = training.get(key, 0)
    if not _is_count(value):
        raise CheckpointFormatError(
            f"{path}: the training metadata's {key!r} must be a non-negative integer; got {value!r}"
        )
    return value


def checkpoint_steps(out: str | os.PathLike) -> list[int]:
    """The steps of the complete training checkpoints of the run folder `out`, in order
    (a step's folder gets its number only once it is whole)."""
    folder = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _place(run: _Run, model: PyTree, state: eqx.nn.State, opt_state: PyTree):
    """The arrays placed as the run trains them: one device, or the mesh's shardings."""
    if run.parallel is None:
        return model, state, opt_state
    model, opt_state = run.parallel.shard_params((model, opt_state))
    return model, run.parallel.replicate(state), opt_state


def _placed_like(run: _Run, tree: PyTree) -> PyTree:
    """`tree` abstract, each array with the sharding `_place` gives it (read off the
    compiled placement, so any rule of the mesh is followed)."""
    params, static = eqx.partition(tree, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    if run.parallel is None:
        model, state, opt_state = abstract_like(tree)
        return (model, state), opt_state

    def place(params):
        model, state, opt_state = eqx.combine(params, static)
        return eqx.filter(_place(run, model, state, opt_state), eqx.is_array)

    shardings = jax.jit(place).lower(params).compile().output_shardings
    model, state, opt_state = abstract_like(tree, shardings)
    return (model, state), opt_state


def _restore_orbax(run: _Run, like: PyTree, step: int):
    """The arrays and the loop's position from the training checkpoint of `step`."""
    assert run.checkpoints is not None and run.out is not None
    (like_model, like_state), like_opt_state = _placed_like(run, like)
    restored = run.checkpoints.restore(step, (like_model, like_state), like_opt_state)
    meta, where = restored.meta, f"{run.checkpoints.directory}/{step}"
    for key in ("step", "epoch", "position", "skipped", "consecutive_skipped", "epoch_skipped"):
        if not _is_count(meta.get(key)):
            from ..checkpoint import CheckpointFormatError

            raise CheckpointFormatError(
                f"{where}: the metadata's {key!r} must be a non-negative integer; "
                f"got {meta.get(key)!r}"
            )
    run.step, run.position = meta["step"], meta["position"]
    run.skipped, run.consecutive_skipped = meta["skipped"], meta["consecutive_skipped"]
    run.epoch_skipped = meta["epoch_skipped"]
    run.epoch_losses = [float(x) for x in meta.get("epoch_losses", [])]
    run.window = [float(x) for x in meta.get("log_window", [])]
    run.train_key = jr.wrap_key_data(jnp.asarray(meta["rng"], dtype=jnp.uint32))
    return restored.tree, meta["epoch"]


def _start(run: _Run, model: PyTree, state: eqx.nn.State, resume: bool):
    """The model, state and optimizer state to start from: the given ones, or those of
    the newest checkpoint in `run.out` (a training checkpoint of `checkpoints/`, or
    `last.safetensors` of a run saved before them), whose metrics are then kept up to its
    step. Reads, never writes."""
    from .. import checkpoint

    start_epoch = 0
    if resume:
        assert run.out is not None
        path = os.path.join(run.out, CHECKPOINT)
        if run.config.remat is not None:
            model = remat(model, run.config.remat)
        like_model, like_state = eqx.filter_eval_shape(lambda m, s: (m, s), model, state)
        like_opt_state = init_optimizer(run.optimizer, like_model)
        steps = checkpoint_steps(run.out)
        if steps:
            tree, start_epoch = _restore_orbax(run, (like_model, like_state, like_opt_state),
                                               steps[-1])  # fmt: skip
            (model, state), opt_state = tree
        else:
            ckpt = checkpoint.load(
                path,
                like_model,
                like_state,
                like_opt_state=like_opt_state,
                model_name=run.model_config.get("model"),
            )
            assert ckpt.state is not None and ckpt.opt_state is not None
            model, state, opt_state = ckpt.model, ckpt.state, ckpt.opt_state
            start_epoch = _checkpoint_count(ckpt.training, "epoch", path)
            run.step = _checkpoint_count(ckpt.training, "step", path)
            if ckpt.rng is not None:
                run.train_key = jr.wrap_key_data(ckpt.rng)
            if isinstance(opt_state, optax.ApplyIfFiniteState):
                run.consecutive_skipped = int(opt_state.notfinite_count)
                run.skipped = int(opt_state.total_notfinite)
        run.lines = _read_metrics(os.path.join(run.out, METRICS), start_epoch, run.step)
        run.records = [r for r in run.lines if _is_epoch_record(r)]
    else:
        opt_state = init_optimizer(run.optimizer, model)
    if run.config.remat is not None:
        # An ordinary field of the stacks: the optimizer state does not depend on it.
        model = remat(model, run.config.remat)
    model, state, opt_state = _place(run, model, state, opt_state)
    return model, state, opt_state, start_epoch


def _stopped(run: _Run, epoch: int) -> str:
    """What is left of a run that stops during `epoch`."""
    if run.out is None:
        return "training stopped"
    if epoch > 1:
        kept = os.path.join(run.out, CHECKPOINT)
        return f"training stopped; {kept} keeps epoch {epoch - 1}"
    return "training stopped before its first checkpoint"


def _read_step(run: _Run, pending: tuple[Array, Array], step: int, epoch: int,
               losses: list[float]) -> None:  # fmt: skip
    """Read one step's loss and whether its update was finite (one step behind the one
    in flight): count a skipped step, or stop the run."""
    loss, finite = float(pending[0]), bool(pending[1])
    allowed = run.config.skip_non_finite
    if allowed and not finite:
        run.consecutive_skipped += 1
        run.skipped += 1
        run.epoch_skipped += 1
        if run.consecutive_skipped > allowed:
            raise FloatingPointError(
                f"the gradients are NaN or infinite at {run.consecutive_skipped} steps in a "
                f"row, the last step {step} (epoch {epoch}), more than the "
                f"{allowed} skip_non_finite allows: {_stopped(run, epoch)} (try a lower "
                "learning rate)"
            )
        return
    run.consecutive_skipped = 0
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {step} (epoch {epoch}): "
            f"{_stopped(run, epoch)} (try a lower learning rate)"
        )
    losses.append(loss)
    run.window.append(loss)
    if run.log_every and step % run.log_every == 0:
        now = time.perf_counter()
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(run.window)),
            "learning_rate": float(np.asarray(run.schedule(step - run.skipped))),
            "images_per_second": round(
                len(run.window) * run.config.batch_size / max(now - run.window_start, 1e-9), 1
            ),
        }
        run.window, run.window_start = [], now
        _append_line(run, record)


def _append_line(run: _Run, record: dict[str, Any]) -> None:
    """Append a record to the run's metrics (`metrics.jsonl`, and TensorBoard if asked):
    an epoch's, or a step's with `log_every`."""
    run.lines.append(record)
    if run.out is None or not run.writer:
        return
    with open(os.path.join(run.out, METRICS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if run.tensorboard is not None:
        scope = "epoch" if _is_epoch_record(record) else "step"
        for name, value in record.items():
            if name not in ("epoch", "step") and _is_number(value):
                run.tensorboard.add_scalar(f"{scope}/{name}", value, record["step"])
        run.tensorboard.flush()


def _save_training(run: _Run, model, state, opt_state, *, epoch: int, position: int,
                   losses: list[float], accuracy: float | None = None) -> None:  # fmt: skip
    """Start saving the training checkpoint of the current step: `epoch` epochs done and
    `position` steps of the next (every process calls it; each writes its arrays)."""
    if run.checkpoints is None:
        return
    meta = {
        "step": run.step,
        "epoch": epoch,
        "position": position,
        "epoch_losses": list(losses),
        "log_window": list(run.window),
        "skipped": run.skipped,
        "consecutive_skipped": run.consecutive_skipped,
        "epoch_skipped": run.epoch_skipped,
        "rng": key_data(run.train_key),
        "model_config": run.model_config,
        "training": run.checkpoint_meta,
    }
    if accuracy is not None:
        meta["test_accuracy"] = accuracy
    run.checkpoints.save(run.step, (model, state), opt_state, meta, accuracy=accuracy)


def _train_epoch(run: _Run, epoch: int, model, state, opt_state):
    """One epoch's steps; returns the arrays, the epoch's losses (of the steps not skipped)
    and its seconds (the compilation of the first step left out), or `losses=None` if a
    callback stopped."""
    ds, batch_size, parallel = run.data, run.config.batch_size, run.parallel
    epoch_start = run.window_start = time.perf_counter()
    # A run resumed within this epoch carries on from its checkpoint's position.
    position, run.position = run.position, 0
    losses: list[float] = run.epoch_losses if position else []
    run.epoch_losses = []
    if not position:
        run.epoch_skipped = 0
    pending = None
    for batch in ds.train_batches(epoch, batch_size, seed=run.config.seed, start=position):
        if run.stop:
            return model, state, opt_state, None, 0.0
        step_start = time.perf_counter()
        x, y = jax.tree.map(jnp.asarray, batch) if parallel is None else parallel.shard_batch(batch)
        model, state, opt_state, loss, finite = _donating_fit_step(
            model, state, opt_state, x, y, jr.fold_in(run.train_key, run.step),
            optimizer=run.optimizer, parallel=parallel, precision=run.config.precision,
            normalization=run.normalization, label_smoothing=run.config.label_smoothing,
            mixup=run.config.mixing(),
        )  # fmt: skip
        run.step += 1
        compiled = None
        if run.compile_seconds is None:  # the first step compiles: time it apart
            jax.block_until_ready(loss)
            run.compile_seconds = compiled = time.perf_counter() - step_start
            epoch_start += compiled
        if pending is not None:  # read the previous step: keeps one step in flight
            _read_step(run, pending, run.step - 1, epoch, losses)
        pending = (loss, finite)
        done = run.step - (epoch - 1) * run.steps_per_epoch
        every = run.checkpoint_every
        if every and run.step % every == 0 and done < run.steps_per_epoch:
            _read_step(run, pending, run.step, epoch, losses)  # the checkpoint's losses
            pending = None
            _check_finite(run, epoch, model, state, opt_state)
            _save_training(run, model, state, opt_state, epoch=epoch - 1, position=done,
                           losses=losses)  # fmt: skip
        elapsed = max(time.perf_counter() - epoch_start, 1e-9)
        info = StepInfo(epoch, run.step, losses[-1] if losses else None,
                        len(losses) * batch_size / elapsed, compiled)  # fmt: skip
        run.stop = bool(run.callback.on_step(info)) or run.stop
    if pending is not None:
        _read_step(run, pending, run.step, epoch, losses)
    jax.block_until_ready(model)
    return model, state, opt_state, losses, time.perf_counter() - epoch_start


def _check_finite(run: _Run, epoch: int, model, state, opt_state) -> None:
    """Raise if an array of the model, its state or the optimizer state is not finite
    (e.g. after a last step whose loss was finite but its update was not), before it is
    saved."""
    bad = _first_non_finite(model, state, opt_state)
    if bad is not None:
        raise FloatingPointError(
            f"{bad} holds a NaN or an infinity after step {run.step} (epoch {epoch}): "
            f"{_stopped(run, epoch)} (try a lower learning rate)"
        )


def _end_epoch(run: _Run, epoch: int, model, state, opt_state, losses, seconds) -> None:
    """Check that every array is finite, evaluate, then append the epoch's metrics and
    save the checkpoint and curves."""
    from .. import checkpoint

    config = run.config
    _check_finite(run, epoch, model, state, opt_state)
    tested = _evaluate_run(run, model, state, opt_state)
    test_loss, test_acc = tested["test_loss"], tested["test_accuracy"]
    images = len(losses) * config.batch_size
    run.train_seconds += seconds
    run.images_seen += images
    record = {
        "epoch": epoch,
        "step": run.step,
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        **tested,  # test_loss, test_accuracy, test_top5 (and which weights, with an EMA)
        # The optimizer's own count (and its schedule) skips the skipped steps.
        "learning_rate": float(np.asarray(run.schedule(run.step - run.skipped))),
        "epoch_seconds": round(seconds, 3),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "skipped_steps": run.epoch_skipped,
    }
    run.records.append(record)
    # The metrics line first: a run killed before the checkpoints below are written
    # resumes from an earlier step and drops this line.
    _append_line(run, record)
    _save_training(run, model, state, opt_state, epoch=epoch, position=0, losses=[],
                   accuracy=test_acc)  # fmt: skip
    if run.out is not None:
        # Arrays sharded over several processes' devices (FSDP) are gathered by all of
        # them first, for process 0 to write the export whole.
        model, state, opt_state = _addressable(model, state, opt_state)
    if run.out is not None and run.writer:
        meta = {"step": run.step, "epoch": epoch, **run.checkpoint_meta,
                "test_accuracy": test_acc, "test_loss": test_loss}  # fmt: skip
        checkpoint.save(
            os.path.join(run.out, CHECKPOINT), model, state, opt_state=opt_state,
            rng=run.train_key, model_config=run.model_config, training=meta,
        )  # fmt: skip
        _plot_curves(os.path.join(run.out, CURVES), run.records)
    run.stop = bool(run.callback.on_epoch_end(dict(record))) or run.stop


def _addressable(*trees: PyTree) -> tuple[PyTree, ...]:
    """`trees` unchanged when this process holds every array whole (one process, or
    replicated arrays), else their arrays gathered whole into every process (a collective
    every process calls)."""
    leaves = jax.tree.leaves(eqx.filter(trees, eqx.is_array))
    if all(getattr(x, "is_fully_addressable", True) or x.is_fully_replicated for x in leaves):
        return trees
    from jax.experimental import multihost_utils

    arrays, static = eqx.partition(trees, eqx.is_array)
    return eqx.combine(multihost_utils.process_allgather(arrays, tiled=True), static)


def _evaluate_run(run: _Run, model: PyTree, state: eqx.nn.State,
                  opt_state: PyTree = None) -> dict[str, Any]:  # fmt: skip
    """The metrics on the test split of the run's data: `test_loss`, `test_accuracy` and
    `test_top5`. With `ema_decay`, `eval_weights` says whose: with `eval_ema` the moving
    average's in `opt_state` (`"ema"`), the trained weights' then as `raw_test_*`."""
    num_devices = 1 if run.parallel is None else run.parallel.num_devices
    batch_size = max(run.config.batch_size, _EVAL_BATCH_SIZE)
    batch_size = max(num_devices, batch_size - batch_size % num_devices)

    def test(weights: PyTree) -> dict[str, Any]:
        result = evaluate_details(
            weights, state, run.data.test_batches(batch_size), parallel=run.parallel,
            precision=run.config.precision, normalization=run.normalization, confusion=False,
        )  # fmt: skip
        return {"test_loss": result.loss, "test_accuracy": result.accuracy,
                "test_top5": result.top_k_accuracy}  # fmt: skip

    tested = test(model)
    if run.config.ema_decay is None:
        return tested
    if not run.config.eval_ema or opt_state is None:
        return {**tested, "eval_weights": "model"}
    raw = {f"raw_{name}": value for name, value in tested.items()}
    return {**test(ema_model(model, opt_state)), "eval_weights": "ema", **raw}


def _is_abstract(tree: PyTree) -> bool:
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def fit(
    model: PyTree,
    state: eqx.nn.State | None,
    data: TrainingData,
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    parallel: DataParallel | None = None,
    callback: Callback | Callable[[dict[str, Any]], bool | None] | None = None,
    model_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    log_every: int | None = None,
    tensorboard: bool = False,
) -> FitResult:
    """Train a model: epochs of [`train_step`][eqx_vision.training.train_step], each
    followed by an evaluation on the test split, with checkpoints, metrics and resume.

    The optimizer is [`make_optimizer`][eqx_vision.training.make_optimizer] (AdamW, warm-up
    and cosine decay over the whole run, counted in optimizer updates, one per
    `config.accumulate` steps; the recipe of `config`: see
    [`TrainConfig`][eqx_vision.training.TrainConfig]); each epoch's batches come from
    [`batches`][eqx_vision.training.batches] (shuffled by the seed and the epoch) and each
    step's dropout key from the seed and the step number, so a resumed run ends exactly as
    an uninterrupted one. The step is compiled once with `eqx.filter_jit(train_step,
    donate="all")`: the arrays of `model`, `state` (and those of the previous step) are
    donated and must not be used after the call; use those of the result.

    **Arguments:**

    - `model`: the model to train. When resuming from a checkpoint, only its structure is
      used: it may be abstract (e.g. from `eqx.filter_eval_shape` or
      `ModelConfig.build_like()`).
    - `state`: its `eqx.nn.State`, from `eqx.nn.make_with_state`; `None` for a stateless
      model.
    - `data`: an [`eqx_vision.data.Dataset`][eqx_vision.data.Dataset] (model-ready train
      and test images in memory, float32, channels first, and integer labels) or an
      [`eqx_vision.data.StreamingData`][eqx_vision.data.StreamingData] (batches of uint8
      images decoded and augmented by data workers, normalised on the device by its
      `normalization`): any [`TrainingData`][eqx_vision.data.TrainingData].
    - `config`: a [`TrainConfig`][eqx_vision.training.TrainConfig]; its defaults when
      `None`.
    - `out`: a folder to write the run into (none by default): `config.json` (the
      settings, `model_config` and `metadata`), `last.safetensors` (model, state,
      optimizer state, step and key, written atomically after every epoch; see
      [`eqx_vision.checkpoint`][eqx_vision.checkpoint]), `metrics.jsonl` (one line per
      epoch) and `curves.png` (if matplotlib is installed), and the training checkpoints
      `checkpoints/<step>/` (see
      [`TrainingCheckpoints`][eqx_vision.training.TrainingCheckpoints]: orbax, written in
      the background by every process for its arrays, at every epoch's end and every
      `checkpoint_every` steps). Everything is checked before
      anything is written, and the folder is locked while the run lasts (a second run in
      it is an error). A folder that already holds a run is an error unless `resume`, but
      for one that stopped before its first checkpoint (a `config.json` and no
      `last.safetensors`): the same call (the same `config.json`) starts it again from the
      beginning.
    - `resume`: continue the run in `out` from its newest checkpoint (a training
      checkpoint, within an epoch if it was saved there, or the `last.safetensors` of a
      run written before them), with the same `config` (`remat` and `parallel` may
      differ; the arrays are read into the shardings of `parallel`); a run that stopped
      before its first checkpoint starts again from the beginning (then `model` must be a
      real one).
    - `parallel`: a [`DataParallel`][eqx_vision.training.DataParallel] to train over
      several devices; one device when `None`. Across several processes (after
      `jax.distributed.initialize`) it is required, each process reads its rows of every
      global batch from `data`, and only process 0 writes into `out` (every process reads
      it to resume: a folder they all see).
    - `callback`: a [`Callback`][eqx_vision.training.Callback], or a function called after
      each epoch with its metrics (a `dict`); either may return `True` to stop.
    - `model_config`: the model's description as JSON (e.g. `ModelConfig.to_json()`),
      saved in the checkpoint so that `eqx-vision evaluate` and `predict` can rebuild it.
    - `metadata`: more JSON-serialisable facts about the run, saved in `config.json` and in
      each checkpoint's `training` metadata beside the `train_config` and the `data`
      (the data's source and class names, which `eqx-vision evaluate` and `predict`
      read; a `"data"` entry here replaces it).
    - `checkpoint_every`: also save the training state every this many steps within an
      epoch (a killed run then loses at most these steps); at epochs' ends only when
      `None`.
    - `keep_checkpoints`: how many of the newest training checkpoints to keep, besides the
      one of the best epoch.
    - `log_every`: also append a record to `metrics.jsonl` every this many steps (`epoch`,
      `step`, the mean `train_loss` since the last one, `learning_rate`,
      `images_per_second`); epochs' records only when `None`.
    - `tensorboard`: also write every record as TensorBoard scalars into
      `<out>/tensorboard` (needs the tensorboardX package).

    **Returns:** a [`FitResult`][eqx_vision.training.FitResult]: the trained model, state
    and optimizer state, the metrics of every epoch and the best test accuracy.

    Raises `FloatingPointError` if the training loss becomes NaN or infinite, or an array
    of the model, its state or the optimizer state at the end of an epoch (that epoch is
    not saved: the checkpoint of the one before stays), unless `config.skip_non_finite`
    lets it skip the step; `FileExistsError` if `out` holds a run and `resume` is false;
    `ValueError` if `resume` is given other settings than the run's.
    """
    config = TrainConfig() if config is None else config
    state = eqx.nn.State(model) if state is None else state
    num_train, num_test = data.num_train, data.num_test
    num_devices = 1 if parallel is None else parallel.num_devices
    if config.batch_size % num_devices or config.batch_size > num_train:
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of the {num_devices} "
            f"device(s) and at most the {num_train} training images."
        )
    if resume and out is None:
        raise ValueError("resume needs `out`, the folder of the run to continue.")
    for name, value, low in (("checkpoint_every", checkpoint_every, 1),
                             ("keep_checkpoints", keep_checkpoints, 1),
                             ("log_every", log_every, 1)):  # fmt: skip
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if not isinstance(tensorboard, bool):
        raise ValueError(f"tensorboard must be a bool; got {tensorboard!r}.")
    if jax.process_count() > 1 and parallel is None:
        raise ValueError(
            f"this is one of {jax.process_count()} processes: give `parallel` "
            "(DataParallel.create(), a mesh of every process's devices), else each process "
            "would train its own copy of the model."
        )
    steps_per_epoch = num_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    # The schedule counts optimizer updates: one per `accumulate` steps (batches).
    accumulate = config.accumulate
    total_updates = total_steps // accumulate
    if total_updates < 1:
        raise ValueError(
            f"accumulate {accumulate} is more than the run's {total_steps} steps "
            f"({config.epochs} epoch(s) of {steps_per_epoch}): no optimizer update would be made."
        )
    # A warm-up longer than the run is the whole run (and never an overflow).
    warmup_steps = min(
        round(min(config.warmup_epochs, config.epochs) * steps_per_epoch / accumulate),
        total_updates,
    )
    schedule_args = dict(warmup_steps=warmup_steps, total_steps=total_updates)
    schedule = learning_rate_schedule(config.learning_rate, **schedule_args)
    out = None if out is None else os.fspath(out)
    data_info = {"source": data.source, "class_names": list(data.class_names),
                 "num_train": num_train, "num_test": num_test}  # fmt: skip
    meta = {"data": data_info, **(metadata or {}), "train_config": config.to_json()}
    if callback is None:
        hooks = Callback()
    elif isinstance(callback, Callback):
        hooks = callback
    else:
        hooks = _EpochFunction(callback)
    run = _Run(
        config=config,
        data=data,
        optimizer=make_optimizer(
            config.learning_rate,
            weight_decay=config.weight_decay,
            skip_non_finite=config.skip_non_finite,
            clip_norm=config.clip_norm,
            accumulate=accumulate,
            ema_decay=config.ema_decay,
            **_finetune_options(config, model),
            **schedule_args,
        ),  # fmt: skip
        # Of the steps done (less the skipped ones), as the optimizer counts its updates.
        schedule=schedule
        if accumulate == 1
        else lambda step: schedule(jnp.asarray(step) // accumulate),
        parallel=parallel,
        callback=hooks,
        out=out,
        checkpoint_meta=meta,
        model_config=dict(model_config or {}),
        train_key=jr.fold_in(jr.key(config.seed), 1),  # the model's key is the caller's
        steps_per_epoch=steps_per_epoch,
        normalization=getattr(data, "normalization", None),
        writer=jax.process_index() == 0,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
    )
    run_json = {"model_config": run.model_config, **meta}
    lock = None
    try:
        resumed = False
        if out is not None:
            # Nothing is written before every check has passed and the start is loaded.
            if os.path.isdir(out) and run.writer:
                lock = _lock(out)
            resumed = _check_out(out, resume, run_json, config)
            if not resumed and _is_abstract((model, state)):
                raise ValueError(
                    f"{out} has no checkpoint to resume from: give a built model (not an "
                    "abstract one) to start the run from the beginning."
                )
        if resumed and out is not None and checkpoint_steps(out):
            run.checkpoints = TrainingCheckpoints(out, keep=keep_checkpoints)
        model, state, opt_state, start_epoch = _start(run, model, state, resumed)
        if out is not None and run.writer:
            os.makedirs(out, exist_ok=True)
            if lock is None:
                lock = _lock(out)
            _open_out(run, resumed, run_json)
            if tensorboard:
                run.tensorboard = _tensorboard_writer(out, run.step)
        if out is not None and run.checkpoints is None:
            run.checkpoints = TrainingCheckpoints(out, keep=keep_checkpoints)
        run.callback.on_fit_start(FitInfo(
            config.epochs, steps_per_epoch, start_epoch, run.step, config.batch_size,
            num_train, num_test, count_params(model), num_devices,
            Precision.of(config.precision).compute_dtype, out, resumed,
        ))  # fmt: skip
        epoch, stopped = start_epoch, False
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if run.stop:
                stopped, epoch = True, epoch - 1
                break
            run.callback.on_epoch_start(epoch)
            model, state, opt_state, losses, seconds = _train_epoch(
                run, epoch, model, state, opt_state
            )
            if losses is None:
                stopped, epoch = True, epoch - 1
                break
            _end_epoch(run, epoch, model, state, opt_state, losses, seconds)
        if run.checkpoints is not None:
            run.checkpoints.wait()
        return _result(run, model, state, opt_state, epoch, stopped)
    finally:
        if run.checkpoints is not None:
            run.checkpoints.close()  # the started saves finish first
        if run.tensorboard is not None:
            run.tensorboard.close()
        if lock is not None:
            os.close(lock)


def _tensorboard_writer(out: str, step: int) -> Any:
    """A TensorBoard writer into `<out>/tensorboard`, whose events after `step` (those of
    a killed run past its checkpoint) are dropped."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError(
            "tensorboard=True needs the tensorboardX package: pip install "
            "'eqx_vision[tensorboard]' (or tensorboardX)"
        ) from None
    return SummaryWriter(os.path.join(out, TENSORBOARD), purge_step=step + 1 if step else None)


def _finetune_options(config: TrainConfig, model: PyTree) -> dict[str, Any]:
    """The fine-tuning arguments of `make_optimizer` for `config`, as functions of the
    parameters (whatever tree optax is given); a `freeze` beyond the model's blocks is a
    `ValueError` here."""
    options: dict[str, Any] = {}
    if config.selective_decay:
        options["weight_decay_mask"] = weight_decay_mask
    if config.layer_decay is not None:
        decay = float(config.layer_decay)
        options["layer_scales"] = lambda params: layer_decay_scales(params, decay)
    if config.freeze:
        frozen_mask(model, config.freeze)  # checks the range
        options["frozen"] = lambda params: frozen_mask(params, config.freeze)
    return options


def _result(run: _Run, model, state, opt_state, epoch: int, stopped: bool) -> FitResult:
    if run.records:
        last = run.records[-1]
        test_loss, test_acc = last["test_loss"], last["test_accuracy"]
        best = max(run.records, key=lambda r: r["test_accuracy"])
        best_acc, best_epoch = best["test_accuracy"], best["epoch"]
    elif stopped:
        test_loss = test_acc = best_acc = math.nan
        best_epoch = 0
    else:  # a resumed run that had already finished, without its metrics
        tested = _evaluate_run(run, model, state, opt_state)
        test_loss, test_acc = tested["test_loss"], tested["test_accuracy"]
        best_acc, best_epoch = test_acc, epoch
    return FitResult(
        model, state, opt_state, list(run.records), epoch, run.step, test_loss, test_acc,
        best_acc, best_epoch, stopped, run.compile_seconds or 0.0, run.train_seconds,
        run.images_seen, run.skipped,
    )  # fmt: skip
