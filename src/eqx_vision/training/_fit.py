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
from ._parallel import DataParallel
from ._steps import (
    Normalization,
    count_params,
    evaluate_batches,
    init_optimizer,
    learning_rate_schedule,
    make_optimizer,
    train_step,
)


CONFIG = "config.json"
CHECKPOINT = "last.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
# The batch size of the evaluation after each epoch (or the training batch, if larger).
_EVAL_BATCH_SIZE = 256


def _fit_step(model, state, opt_state, images, labels, key, *, optimizer, parallel, precision,
              normalization=None):  # fmt: skip
    """`train_step`, and whether its update was made of finite numbers: the gradients'
    (checked by `optax.apply_if_finite`, whose skipped steps also keep the old model state)
    or, without it, the loss's."""
    new_model, new_state, opt_state, loss = train_step(
        model, state, opt_state, images, labels, key,
        optimizer=optimizer, parallel=parallel, precision=precision,
        normalization=normalization,
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


def _read_metrics(path: str, last_epoch: int) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl` up to `last_epoch` (a killed run may have written
    one more than its checkpoint holds); lines that are not such a record are left out."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if (
                        isinstance(record, dict)
                        and _is_count(record.get("epoch"))
                        and 1 <= record["epoch"] <= last_epoch
                        and all(_is_number(record.get(k)) for k in _PLOTTED)
                    ):
                        records.append(record)
    return records


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
    has_checkpoint = os.path.isfile(os.path.join(out, CHECKPOINT))
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
    metrics = "".join(json.dumps(r) + "\n" for r in run.records)
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


def _start(run: _Run, model: PyTree, state: eqx.nn.State, resume: bool):
    """The model, state and optimizer state to start from: the given ones, or those of
    the checkpoint in `run.out`, whose metrics are then kept up to its epoch. Reads, never
    writes."""
    from .. import checkpoint

    start_epoch = 0
    if resume:
        assert run.out is not None
        path = os.path.join(run.out, CHECKPOINT)
        like_model, like_state = eqx.filter_eval_shape(lambda m, s: (m, s), model, state)
        ckpt = checkpoint.load(
            path,
            like_model,
            like_state,
            like_opt_state=init_optimizer(run.optimizer, like_model),
            model_name=run.model_config.get("model"),
        )
        assert ckpt.state is not None and ckpt.opt_state is not None
        model, state, opt_state = ckpt.model, ckpt.state, ckpt.opt_state
        start_epoch = _checkpoint_count(ckpt.training, "epoch", path)
        run.step = _checkpoint_count(ckpt.training, "step", path)
        if ckpt.rng is not None:
            run.train_key = jr.wrap_key_data(ckpt.rng)
        run.records = _read_metrics(os.path.join(run.out, METRICS), start_epoch)
    else:
        opt_state = init_optimizer(run.optimizer, model)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        run.consecutive_skipped = int(opt_state.notfinite_count)
        run.skipped = int(opt_state.total_notfinite)
    if run.config.remat is not None:
        # An ordinary field of the stacks: the optimizer state does not depend on it.
        model = remat(model, run.config.remat)
    if run.parallel is not None:
        model, state, opt_state = run.parallel.replicate((model, state, opt_state))
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


def _train_epoch(run: _Run, epoch: int, model, state, opt_state):
    """One epoch's steps; returns the arrays, the epoch's losses (of the steps not skipped)
    and its seconds (the compilation of the first step left out), or `losses=None` if a
    callback stopped."""
    ds, batch_size, parallel = run.data, run.config.batch_size, run.parallel
    epoch_start = time.perf_counter()
    losses: list[float] = []
    run.epoch_skipped = 0
    pending = None
    for batch in ds.train_batches(epoch, batch_size, seed=run.config.seed):
        if run.stop:
            return model, state, opt_state, None, 0.0
        step_start = time.perf_counter()
        x, y = jax.tree.map(jnp.asarray, batch) if parallel is None else parallel.shard_batch(batch)
        model, state, opt_state, loss, finite = _donating_fit_step(
            model, state, opt_state, x, y, jr.fold_in(run.train_key, run.step),
            optimizer=run.optimizer, parallel=parallel, precision=run.config.precision,
            normalization=run.normalization,
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
        elapsed = max(time.perf_counter() - epoch_start, 1e-9)
        info = StepInfo(epoch, run.step, losses[-1] if losses else None,
                        len(losses) * batch_size / elapsed, compiled)  # fmt: skip
        run.stop = bool(run.callback.on_step(info)) or run.stop
    if pending is not None:
        _read_step(run, pending, run.step, epoch, losses)
    jax.block_until_ready(model)
    return model, state, opt_state, losses, time.perf_counter() - epoch_start


def _end_epoch(run: _Run, epoch: int, model, state, opt_state, losses, seconds) -> None:
    """Check that every array is finite, evaluate, then append the epoch's metrics and
    save the checkpoint and curves."""
    from .. import checkpoint

    config = run.config
    bad = _first_non_finite(model, state, opt_state)
    if bad is not None:  # e.g. a last step whose loss was finite but its update was not
        raise FloatingPointError(
            f"{bad} holds a NaN or an infinity after step {run.step} (epoch {epoch}): "
            f"{_stopped(run, epoch)} (try a lower learning rate)"
        )
    test_loss, test_acc = _evaluate_run(run, model, state)
    images = len(losses) * config.batch_size
    run.train_seconds += seconds
    run.images_seen += images
    record = {
        "epoch": epoch,
        "step": run.step,
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        # The optimizer's own count (and its schedule) skips the skipped steps.
        "learning_rate": float(np.asarray(run.schedule(run.step - run.skipped))),
        "epoch_seconds": round(seconds, 3),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "skipped_steps": run.epoch_skipped,
    }
    run.records.append(record)
    if run.out is not None and run.writer:
        # The metrics line first: a run killed before the checkpoint below is replaced
        # resumes from the previous epoch and drops this line.
        with open(os.path.join(run.out, METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        meta = {"step": run.step, "epoch": epoch, **run.checkpoint_meta,
                "test_accuracy": test_acc, "test_loss": test_loss}  # fmt: skip
        checkpoint.save(
            os.path.join(run.out, CHECKPOINT), model, state, opt_state=opt_state,
            rng=run.train_key, model_config=run.model_config, training=meta,
        )  # fmt: skip
        _plot_curves(os.path.join(run.out, CURVES), run.records)
    run.stop = bool(run.callback.on_epoch_end(dict(record))) or run.stop


def _evaluate_run(run: _Run, model: PyTree, state: eqx.nn.State) -> tuple[float, float]:
    """The loss and accuracy on the test split of the run's data."""
    num_devices = 1 if run.parallel is None else run.parallel.num_devices
    batch_size = max(run.config.batch_size, _EVAL_BATCH_SIZE)
    batch_size = max(num_devices, batch_size - batch_size % num_devices)
    return evaluate_batches(
        model, state, run.data.test_batches(batch_size), parallel=run.parallel,
        precision=run.config.precision, normalization=run.normalization,
    )  # fmt: skip


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
) -> FitResult:
    """Train a model: epochs of [`train_step`][eqx_vision.training.train_step], each
    followed by an evaluation on the test split, with checkpoints, metrics and resume.

    The optimizer is [`make_optimizer`][eqx_vision.training.make_optimizer] (AdamW, warm-up
    and cosine decay over the whole run); each epoch's batches come from
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
      epoch) and `curves.png` (if matplotlib is installed). Everything is checked before
      anything is written, and the folder is locked while the run lasts (a second run in
      it is an error). A folder that already holds a run is an error unless `resume`, but
      for one that stopped before its first checkpoint (a `config.json` and no
      `last.safetensors`): the same call (the same `config.json`) starts it again from the
      beginning.
    - `resume`: continue the run in `out` from its checkpoint (with the same `config`;
      `remat` and `parallel` may differ); a run that stopped before its first checkpoint
      starts again from the beginning (then `model` must be a real one).
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
    if jax.process_count() > 1 and parallel is None:
        raise ValueError(
            f"this is one of {jax.process_count()} processes: give `parallel` "
            "(DataParallel.create(), a mesh of every process's devices), else each process "
            "would train its own copy of the model."
        )
    steps_per_epoch = num_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    # A warm-up longer than the run is the whole run (and never an overflow).
    warmup_steps = min(round(min(config.warmup_epochs, config.epochs) * steps_per_epoch),
                       total_steps)  # fmt: skip
    schedule_args = dict(warmup_steps=warmup_steps, total_steps=total_steps)
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
            **_finetune_options(config, model),
            **schedule_args,
        ),  # fmt: skip
        schedule=learning_rate_schedule(config.learning_rate, **schedule_args),
        parallel=parallel,
        callback=hooks,
        out=out,
        checkpoint_meta=meta,
        model_config=dict(model_config or {}),
        train_key=jr.fold_in(jr.key(config.seed), 1),  # the model's key is the caller's
        steps_per_epoch=steps_per_epoch,
        normalization=getattr(data, "normalization", None),
        writer=jax.process_index() == 0,
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
        model, state, opt_state, start_epoch = _start(run, model, state, resumed)
        if out is not None and run.writer:
            os.makedirs(out, exist_ok=True)
            if lock is None:
                lock = _lock(out)
            _open_out(run, resumed, run_json)
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
        return _result(run, model, state, opt_state, epoch, stopped)
    finally:
        if lock is not None:
            os.close(lock)


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
        test_loss, test_acc = _evaluate_run(run, model, state)
        best_acc, best_epoch = test_acc, epoch
    return FitResult(
        model, state, opt_state, list(run.records), epoch, run.step, test_loss, test_acc,
        best_acc, best_epoch, stopped, run.compile_seconds or 0.0, run.train_seconds,
        run.images_seen, run.skipped,
    )  # fmt: skip
