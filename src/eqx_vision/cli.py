"""The `eqx-vision` command line: train, evaluate and predict with any of the 17 models.

```
eqx-vision train                                  # the default ViT on the embedded digits
eqx-vision train --model cvt-small --data photos/ --image-size 32 --epochs 30 --out runs/cvt
eqx-vision train --out runs/cvt --resume          # continue an interrupted run
eqx-vision train --precision bfloat16             # bfloat16 compute, float32 parameters
eqx-vision evaluate --checkpoint runs/cvt
eqx-vision predict --checkpoint runs/cvt cat.jpg dog.png
eqx-vision presets                                # the model presets
```

`train` writes into `--out`: `config.json` (the model and training settings),
`last.safetensors` (model, state, optimizer state and step, written atomically after
every epoch), `metrics.jsonl` (one JSON object per epoch) and `curves.png` (loss and
accuracy per epoch). The last line it prints is `test accuracy: <value>`.

Every random choice derives from `--seed`: the initial weights, each step's dropout keys
(from the seed and the step number) and each epoch's data order (from the seed and the
epoch number), so a run resumed with `--resume` ends exactly as an uninterrupted one.

Bad input (an unknown model, missing or empty data, an unreadable image, an image size
the model does not take, a checkpoint of another architecture, ...) is reported in one
line on stderr with exit code 2, before anything is written.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


PROG = "eqx-vision"
CHECKPOINT = "last.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
INSTALL = 'pip install "eqx_vision[train]"'

# Defaults of `train`; the embedded digits reach ~0.98 test accuracy with them.
DEFAULTS: dict[str, Any] = {
    "model": "default",
    "data": "digits",
    "image_size": None,
    "epochs": 15,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 2.0,
    "seed": 0,
    "precision": "float32",
}
SETTINGS = tuple(DEFAULTS)
# Gradient-checkpointing policies of `--remat` (`eqx_vision.checkpoint_blocks`).
REMAT = ("linear", "inputs", "all")
# Settings a run saved by an earlier version may lack, with the value it was trained with.
LATER_SETTINGS: dict[str, Any] = {"precision": "float32"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def _require(command: str, modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = {"PIL": "pillow"}
        shown = ", ".join(names.get(m, m) for m in missing)
        raise UsageError(f"{PROG} {command} needs {shown}, which is not installed: {INSTALL}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number; got {text!r}")
    return value


def _image_size(text: str) -> list[int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW; got {text!r}") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes; got {text!r}")
    return values * (3 - len(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, evaluate and run the vision transformers of eqx_vision.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model (the default ViT on the embedded digits without options)",
        description="Train a model; ends with the line 'test accuracy: <value>'.",
    )
    train.add_argument(
        "--model",
        help="a preset (default, vit-tiny, cvt-small, ...; see `eqx-vision presets`), an "
        "architecture name (its -small preset), or a .json/.yaml model config "
        "(default: default)",
    )
    train.add_argument(
        "--data",
        help="'digits' (embedded handwritten digits), a folder of class sub-folders of "
        "images, or an .npz with images and labels (default: digits)",
    )
    train.add_argument(
        "--image-size", type=_image_size, metavar="N|HxW", help="input size (default: the preset's)"
    )
    train.add_argument("--epochs", type=_positive_int, help="default: 15")
    train.add_argument("--batch-size", type=_positive_int, help="global batch size (default: 64)")
    train.add_argument("--lr", type=_non_negative_float, help="peak learning rate (default: 1e-3)")
    train.add_argument(
        "--weight-decay", type=_non_negative_float, help="AdamW weight decay (default: 0.05)"
    )
    train.add_argument(
        "--warmup-epochs",
        type=_non_negative_float,
        help="linear warm-up before the cosine decay, in epochs (default: 2)",
    )
    train.add_argument("--seed", type=int, help="seed of every random choice (default: 0)")
    train.add_argument(
        "--precision",
        metavar="{float32,bfloat16}",
        help="compute dtype of the forward and backward pass; parameters, gradients and "
        "optimizer state stay float32 (default: float32)",
    )
    train.add_argument(
        "--remat",
        metavar="{linear,inputs,all}",
        help="what the backward pass keeps of each block's forward pass: the linear layers' "
        "outputs (default), only each block's input (least memory), or everything; the "
        "results are the same, so it may change on --resume",
    )
    train.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/<model>-<date>-<time>)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings",
    )
    train.add_argument(
        "--devices",
        type=_positive_int,
        metavar="N",
        help="data-parallel over N local devices (default: all)",
    )
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar per epoch (default: when stderr is a terminal)",
    )
    # Stops after this many steps in total, as if the process were killed (for tests).
    train.add_argument("--stop-after-steps", type=_positive_int, help=argparse.SUPPRESS)

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on its test data",
        description="Evaluate a checkpoint; ends with the line 'test accuracy: <value>'.",
    )
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a train --out folder or a .safetensors file",
    )
    evaluate.add_argument("--data", help="data to evaluate on (default: the training data)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.add_argument("--devices", type=_positive_int, metavar="N")

    predict = sub.add_parser(
        "predict",
        help="classify image files with a checkpoint",
        description="Print the top-k classes and their probabilities for each image.",
    )
    predict.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a train --out folder or a .safetensors file",
    )
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K")
    predict.add_argument("images", nargs="+", metavar="IMAGE")

    sub.add_parser("presets", help="list the model presets", description="List the model presets.")
    return parser


# --------------------------------------------------------------------------------------
# Helpers shared by the commands


def _echo(*args: Any) -> None:
    print(*args, flush=True)


def _checkpoint_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    return path


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return obj


def _write_text(path: str, text: str) -> None:
    from .checkpoint import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def _load_checkpoint(path: str, config, with_optimizer=None):
    """Load `path` into `config`'s model (and an optimizer's state)."""
    from . import checkpoint, training

    like_model, like_state = config.build_like()
    like_opt = None
    if with_optimizer is not None:
        like_opt = training.init_optimizer(with_optimizer, like_model)
    try:
        return checkpoint.load(
            path, like_model, like_state, like_opt_state=like_opt, model_name=config.model
        )
    except checkpoint.CheckpointFormatError as e:
        raise UsageError(str(e)) from None


def _read_checkpoint_header(path: str) -> dict[str, Any]:
    from . import checkpoint

    try:
        return checkpoint.read_header(path)
    except (checkpoint.CheckpointFormatError, OSError) as e:
        raise UsageError(str(e)) from None


def _model_config(obj: Any, where: str):
    from .presets import ConfigError, ModelConfig

    try:
        config = ModelConfig.from_json(obj)
        config.cls  # noqa: B018 - raises for an unknown or unavailable architecture
    except ConfigError as e:
        raise UsageError(f"{where}: {e}") from None
    return config


def _parallel(devices: int | None):
    from .training import DataParallel

    try:
        return DataParallel.create(devices)
    except ValueError as e:
        raise UsageError(f"--devices: {e}") from None


def _precision(name: Any, where: str = "--precision"):
    from .precision import COMPUTE_DTYPES, Precision

    if name not in COMPUTE_DTYPES:
        raise UsageError(f"{where} must be {' or '.join(COMPUTE_DTYPES)}; got {name!r}")
    return Precision(name)


def _evaluate(
    model, state, images, labels, batch_size: int, parallel, precision: Any = "float32"
) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in fixed-size padded batches."""
    import numpy as np

    from .training import eval_step

    n = len(labels)
    total_loss = total_correct = 0.0
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        count = len(y)
        mask = np.zeros(batch_size, bool)
        mask[:count] = True
        if count < batch_size:
            pad = batch_size - count
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        x, y, mask = parallel.shard_batch((x, y, mask))
        loss, accuracy, _ = eval_step(
            model, state, x, y, mask, parallel=parallel, precision=precision
        )
        total_loss += float(np.asarray(loss)) * count
        total_correct += float(np.asarray(accuracy)) * count
    return total_loss / max(n, 1), total_correct / max(n, 1)


def _eval_batch_size(batch_size: int, num_devices: int) -> int:
    return max(num_devices, batch_size - batch_size % num_devices)


# --------------------------------------------------------------------------------------
# train


def _resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's settings (explicit options over defaults, or the saved ones with
    `--resume`) and, with `--resume`, the saved config.json."""
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    if not args.resume:
        return {**DEFAULTS, **given}, None
    if not args.out:
        raise UsageError("--resume needs --out DIR, the folder of the run to continue")
    config_path = os.path.join(args.out, CONFIG)
    if not os.path.isfile(config_path):
        raise UsageError(f"nothing to resume in {args.out}: no {CONFIG}")
    saved_json = _read_json(config_path)
    saved = saved_json.get("settings")
    if isinstance(saved, dict):
        saved = {**LATER_SETTINGS, **saved}
    if not isinstance(saved, dict) or set(saved) != set(SETTINGS):
        raise UsageError(f"{config_path} has no valid 'settings'")
    for k, v in given.items():
        if k == "model" and v != saved[k]:
            from .presets import ConfigError, _lookup

            try:
                arch = _lookup(v)[0]
            except ConfigError:
                arch = v
            saved_arch = saved_json.get("model_config", {}).get("model")
            raise UsageError(
                f"{args.out} holds a run of {saved_arch} ({saved[k]}), not {arch} ({v}): a "
                "checkpoint of another architecture cannot be resumed"
            )
        if v != saved[k]:
            flag = "--" + k.replace("_", "-")
            raise UsageError(
                f"{args.out} was trained with {flag} {saved[k]}, not {v}; --resume continues "
                "with the saved settings (leave the option out or use another --out)"
            )
    return dict(saved), saved_json


def _default_out(model: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = os.path.splitext(os.path.basename(model))[0]
    out = os.path.join("runs", f"{name}-{stamp}")
    suffix = 2
    while os.path.exists(out):
        out = os.path.join("runs", f"{name}-{stamp}-{suffix}")
        suffix += 1
    return out


def _plot_curves(path: str, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

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


def _read_metrics(path: str, last_epoch: int) -> list[dict[str, Any]]:
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("epoch", 0) <= last_epoch:
                        records.append(record)
    return records


def cmd_train(args: argparse.Namespace) -> int:
    _require("train", ["optax", "safetensors", "tqdm", "matplotlib"])
    if args.precision is not None:
        _precision(args.precision)
    if args.remat is not None and args.remat not in REMAT:
        raise UsageError(f"--remat must be {' or '.join(REMAT)}; got {args.remat!r}")
    settings, saved_json = _resolve_settings(args)
    if settings["data"] != "digits":
        _require("train", ["PIL"])

    from . import data as data_mod, presets

    # ---- validate everything before writing anything ------------------------------------
    try:
        raw = data_mod.load_dataset(settings["data"])
    except data_mod.DataError as e:
        raise UsageError(str(e)) from None
    if saved_json is not None:
        config = _model_config(saved_json.get("model_config"), os.path.join(args.out, CONFIG))
    else:
        try:
            config = presets.resolve_model(
                settings["model"],
                num_classes=raw.num_classes,
                data_channels=raw.channels,
                image_size=None
                if settings["image_size"] is None
                else tuple(settings["image_size"]),
            )
        except presets.ConfigError as e:
            raise UsageError(str(e)) from None
    if config.num_classes != raw.num_classes:
        raise UsageError(
            f"the model has {config.num_classes} classes; the data {settings['data']} has "
            f"{raw.num_classes}"
        )
    try:
        presets.check_input_size(config)
    except presets.ConfigError as e:
        raise UsageError(str(e)) from None
    parallel = _parallel(args.devices)
    batch_size = settings["batch_size"]
    if batch_size % parallel.num_devices:
        raise UsageError(
            f"--batch-size {batch_size} is not a multiple of the {parallel.num_devices} devices"
        )
    num_train = len(raw.train_labels)
    if batch_size > num_train:
        raise UsageError(
            f"--batch-size {batch_size} is larger than the {num_train} training images"
        )
    out = args.out or _default_out(settings["model"])
    ckpt_path = os.path.join(out, CHECKPOINT)
    if saved_json is not None:
        if not os.path.isfile(ckpt_path):
            raise UsageError(f"nothing to resume in {out}: no {CHECKPOINT}")
        header = _read_checkpoint_header(ckpt_path)
        found = header["model_config"].get("model")
        if found != config.model:
            raise UsageError(
                f"{ckpt_path} holds a {found} checkpoint, but the run in {out} trains "
                f"{config.model}: a checkpoint of another architecture"
            )
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    elif os.path.isdir(out) and any(
        os.path.exists(os.path.join(out, f)) for f in (CONFIG, CHECKPOINT, METRICS)
    ):
        raise UsageError(
            f"{out} already holds a run: continue it with --resume, or choose another --out"
        )
    return _train(args, settings, config, raw, parallel, out, saved_json is not None)


def _train(args, settings, config, raw, parallel, out: str, resume: bool) -> int:
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np
    from tqdm.auto import tqdm

    from . import checkpoint, data as data_mod, training
    from .layers import checkpoint_blocks

    # The loop rebinds the model, its state and the optimizer state at every step and passes
    # a fresh batch and key, so all of them are donated: XLA writes the new parameters and
    # optimizer state over the old ones instead of into fresh memory.
    train_step = eqx.filter_jit(training.train_step, donate="all")

    precision = _precision(settings["precision"])
    ds = data_mod.prepare(raw, channels=config.channels, image_size=config.image_size)
    num_train, num_test = len(ds.train_labels), len(ds.test_labels)
    batch_size = settings["batch_size"]
    epochs = settings["epochs"]
    steps_per_epoch = num_train // batch_size
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(round(settings["warmup_epochs"] * steps_per_epoch), total_steps)
    optimizer = training.make_optimizer(
        settings["lr"],
        weight_decay=settings["weight_decay"],
        warmup_steps=warmup_steps,
        total_steps=total_steps,
    )
    schedule = training.learning_rate_schedule(
        settings["lr"], warmup_steps=warmup_steps, total_steps=total_steps
    )
    base_key = jr.key(settings["seed"])
    init_key, train_key = jr.fold_in(base_key, 0), jr.fold_in(base_key, 1)
    ckpt_path = os.path.join(out, CHECKPOINT)
    metrics_path = os.path.join(out, METRICS)

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # temporary files of a run killed while writing
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
    run_info = {
        "settings": settings,
        "model_config": config.to_json(),
        "data": {
            "source": raw.source,
            "class_names": list(raw.class_names),
            "channels": raw.channels,
            "num_train": num_train,
            "num_test": num_test,
        },
    }
    if resume:
        ckpt = _load_checkpoint(ckpt_path, config, optimizer)
        model, state, opt_state = ckpt.model, ckpt.state, ckpt.opt_state
        start_epoch = int(ckpt.training.get("epoch", 0))
        step = int(ckpt.training.get("step", 0))
        if ckpt.rng is not None:
            train_key = jr.wrap_key_data(ckpt.rng)
        records = _read_metrics(metrics_path, start_epoch)
        _write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    else:
        _write_text(os.path.join(out, CONFIG), json.dumps(run_info, indent=2) + "\n")
        model, state = config.build(init_key)
        opt_state = training.init_optimizer(optimizer, model)
        start_epoch, step, records = 0, 0, []
        _write_text(metrics_path, "")
    # The policy is static structure: the optimizer state mirrors the model's, so both change.
    model, opt_state = checkpoint_blocks((model, opt_state), args.remat or "linear")
    model, state, opt_state = parallel.replicate((model, state, opt_state))

    num_params = training.count_params(model)
    name = config.preset or config.model
    shape = "x".join(map(str, (config.channels, *config.image_size)))
    _echo(f"model    {name} ({config.model}, {num_params:,} parameters)")
    _echo(
        f"data     {settings['data']}: {num_train} train / {num_test} test images, "
        f"{raw.num_classes} classes, input {shape}"
    )
    _echo(
        f"training {epochs} epochs x {steps_per_epoch} steps, batch {batch_size}, "
        f"{parallel.num_devices} device(s), {precision.compute_dtype}, out {out}"
    )
    if resume:
        _echo(f"resuming after epoch {start_epoch} (step {step})")

    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    eval_batch = _eval_batch_size(max(batch_size, 256), parallel.num_devices)
    stop_after = args.stop_after_steps
    run_start = time.perf_counter()
    train_seconds = 0.0
    images_seen = 0
    compile_seconds: float | None = None
    epoch_times: list[float] = []
    for epoch in range(start_epoch + 1, epochs + 1):
        order = training.batches(num_train, batch_size, seed=settings["seed"], epoch=epoch)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{epochs}",
            unit="step",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        epoch_start = time.perf_counter()
        losses = []
        pending = None
        for idx in order:
            if stop_after is not None and step >= stop_after:
                bar.close()
                _echo(f"stopped after step {step}")
                return 0
            step_start = time.perf_counter()
            if compile_seconds is None:
                bar.set_description_str(f"epoch {epoch}/{epochs} (compiling)")
            x, y = parallel.shard_batch((ds.train_images[idx], ds.train_labels[idx]))
            model, state, opt_state, loss = train_step(
                model,
                state,
                opt_state,
                x,
                y,
                jr.fold_in(train_key, step),
                optimizer=optimizer,
                parallel=parallel,
                precision=precision,
            )
            step += 1
            if compile_seconds is None:  # the first step compiles: time it apart
                jax.block_until_ready(loss)
                compile_seconds = time.perf_counter() - step_start
                epoch_start += compile_seconds
                bar.set_description_str(f"epoch {epoch}/{epochs}")
            if pending is not None:  # read the previous loss: keeps one step in flight
                losses.append(float(pending))
            pending = loss
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(
                loss=f"{losses[-1] if losses else float('nan'):.4f}",
                img_s=f"{len(losses) * batch_size / max(elapsed, 1e-9):.0f}",
                refresh=False,
            )
            bar.update()
        if pending is not None:
            losses.append(float(pending))
        jax.block_until_ready(model)
        epoch_seconds = time.perf_counter() - epoch_start
        bar.close()
        train_seconds += epoch_seconds
        images_seen += len(losses) * batch_size
        test_loss, test_acc = _evaluate(
            model, state, ds.test_images, ds.test_labels, eval_batch, parallel, precision
        )
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)),
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "learning_rate": float(np.asarray(schedule(step))),
            "epoch_seconds": round(epoch_seconds, 3),
            "images_per_second": round(len(losses) * batch_size / max(epoch_seconds, 1e-9), 1),
        }
        records.append(record)
        # The metrics line first: a run killed before the checkpoint below is replaced
        # resumes from the previous epoch and drops this line.
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        checkpoint.save(
            ckpt_path,
            model,
            state,
            opt_state=opt_state,
            rng=train_key,
            model_config=config.to_json(),
            training={
                "step": step,
                "epoch": epoch,
                "settings": settings,
                "data": run_info["data"],
                "test_accuracy": test_acc,
                "test_loss": test_loss,
            },
        )
        _plot_curves(os.path.join(out, CURVES), records)
        epoch_times.append(time.perf_counter() - epoch_start)  # training + evaluation
        remaining = (epochs - epoch) * sum(epoch_times) / len(epoch_times)
        _echo(
            f"epoch {epoch:>{len(str(epochs))}}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test loss {test_loss:.4f}  test acc {test_acc:.4f}  "
            f"{record['images_per_second']:.0f} img/s  {epoch_seconds:.1f}s  "
            f"eta {remaining:.0f}s"
        )

    if records:
        test_loss, test_acc = records[-1]["test_loss"], records[-1]["test_accuracy"]
        best = max(records, key=lambda r: r["test_accuracy"])
    else:  # pragma: no cover - only a resumed run that had already finished
        test_loss, test_acc = _evaluate(
            model, state, ds.test_images, ds.test_labels, eval_batch, parallel, precision
        )
        best = {"epoch": epochs, "test_accuracy": test_acc}
    wall = time.perf_counter() - run_start
    _echo("")
    _echo("summary")
    _echo(f"  model          {name} ({config.model}, {num_params:,} parameters)")
    _echo(f"  epochs         {epochs} ({step} steps of {batch_size} images)")
    if images_seen:
        _echo(
            f"  time           {wall:.1f}s ({compile_seconds or 0:.1f}s compiling, "
            f"{train_seconds:.1f}s training at {images_seen / max(train_seconds, 1e-9):.0f} "
            "images/s)"
        )
    _echo(f"  best test acc  {best['test_accuracy']:.4f} (epoch {best['epoch']})")
    _echo(f"  test loss      {test_loss:.4f}")
    _echo(f"  output         {out} ({CONFIG}, {CHECKPOINT}, {METRICS}, {CURVES})")
    _echo(f"test accuracy: {test_acc:.2f}")
    return 0


# --------------------------------------------------------------------------------------
# evaluate / predict


def _open_checkpoint(path: str):
    """(path, header, model config) of a checkpoint folder or file."""
    ckpt_path = _checkpoint_path(path)
    header = _read_checkpoint_header(ckpt_path)
    config = _model_config(header["model_config"], ckpt_path)
    return ckpt_path, header, config


def _saved_precision(training_meta: dict[str, Any], ckpt_path: str):
    """The precision a checkpoint was trained with (float32 if it does not say)."""
    settings = training_meta.get("settings")
    name = settings.get("precision") if isinstance(settings, dict) else None
    return _precision(name or LATER_SETTINGS["precision"], f"{ckpt_path}: the precision")


def cmd_evaluate(args: argparse.Namespace) -> int:
    _require("evaluate", ["optax", "safetensors"])
    from . import data as data_mod, presets

    ckpt_path, header, config = _open_checkpoint(args.checkpoint)
    training_meta = header["training"]
    precision = _saved_precision(training_meta, ckpt_path)
    spec = args.data or training_meta.get("data", {}).get("source")
    if not spec:
        raise UsageError(f"{ckpt_path} does not record its data: give --data")
    if spec != "digits":
        _require("evaluate", ["PIL"])
    try:
        raw = data_mod.load_dataset(spec)
    except data_mod.DataError as e:
        raise UsageError(str(e)) from None
    if raw.num_classes != config.num_classes:
        raise UsageError(
            f"{spec} has {raw.num_classes} classes; the checkpoint's model has {config.num_classes}"
        )
    try:
        presets.check_input_size(config)
    except presets.ConfigError as e:
        raise UsageError(str(e)) from None
    parallel = _parallel(args.devices)
    ckpt = _load_checkpoint(ckpt_path, config)
    ds = data_mod.prepare(raw, channels=config.channels, image_size=config.image_size)
    model, state = parallel.replicate((ckpt.model, ckpt.state))
    loss, accuracy = _evaluate(
        model,
        state,
        ds.test_images,
        ds.test_labels,
        _eval_batch_size(args.batch_size, parallel.num_devices),
        parallel,
        precision,
    )
    _echo(
        f"checkpoint {ckpt_path}: {config.preset or config.model} ({config.model}), "
        f"epoch {training_meta.get('epoch', '?')}, step {training_meta.get('step', '?')}"
    )
    _echo(
        f"data       {spec}: {len(ds.test_labels)} test images, {raw.num_classes} classes, "
        f"{precision.compute_dtype}"
    )
    _echo(f"test loss: {loss:.4f}")
    _echo(f"test accuracy: {accuracy:.2f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    _require("predict", ["optax", "safetensors", "PIL"])
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import data as data_mod

    ckpt_path, header, config = _open_checkpoint(args.checkpoint)
    precision = _saved_precision(header["training"], ckpt_path)
    data_meta = header["training"].get("data", {})
    class_names = data_meta.get("class_names") or [str(i) for i in range(config.num_classes)]
    if len(class_names) != config.num_classes:
        raise UsageError(f"{ckpt_path}: class names do not match the model's classes")
    images = []
    for path in args.images:
        try:
            images.append(
                data_mod.load_image(path, channels=config.channels, image_size=config.image_size)
            )
        except data_mod.DataError as e:
            raise UsageError(str(e)) from None
    ckpt = _load_checkpoint(ckpt_path, config)
    from .training import eval_step

    x = jnp.asarray(np.stack(images))
    state = ckpt.state if ckpt.state is not None else eqx.nn.State(ckpt.model)
    _, _, logits = eval_step(
        ckpt.model, state, x, jnp.zeros(len(x), jnp.int32), precision=precision
    )
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    k = min(args.top_k, config.num_classes)
    width = max(len(c) for c in class_names)
    for path, p in zip(args.images, probs, strict=True):
        _echo(path)
        for i in np.argsort(-p, kind="stable")[:k]:
            _echo(f"  {class_names[i]:<{width}}  {p[i]:.4f}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS, available_architectures

    have = set(available_architectures())
    width = max(len(n) for n in PRESETS)
    for p in PRESETS.values():
        note = "" if p.model in have else "  (not available in this version)"
        _echo(f"{p.name:<{width}}  {p.model:<18} {p.image_size:>3}px  {p.description}{note}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "presets": cmd_presets,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `eqx-vision` with `argv` (default: `sys.argv[1:]`); returns the exit code.

    Bad input is reported as one line on stderr, with exit code 2.
    """
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # e.g. an --out folder that cannot be written
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
