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

The commands parse their arguments, check them, call the library and report: `train` runs
`eqx_vision.training.fit`, `evaluate` runs `eqx_vision.training.evaluate`.

`train` writes into `--out`: `config.json` (the model and training settings),
`last.safetensors` (model, state, optimizer state and step, written atomically after
every epoch), `metrics.jsonl` (one JSON object per epoch) and `curves.png` (loss and
accuracy per epoch). The last line it prints is `test accuracy: <value>`.

Every random choice derives from `--seed`: the initial weights, each step's dropout keys
(from the seed and the step number) and each epoch's data order (from the seed and the
epoch number), so a run resumed with `--resume` ends exactly as an uninterrupted one.

Bad input (an unknown model, missing or empty data, an unreadable image, an image size
the model does not take, a checkpoint of another architecture, ...) is reported in one
line on stderr with exit code 2, before anything is written. A training loss that becomes
NaN or infinite stops the run with one line on stderr and exit code 1; the checkpoint of
the last good epoch is kept.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

# Recomputation policies of `--remat` (`eqx_vision.remat`), and compute dtypes of
# `--precision`; neither needs the training extra.
from .layers import REMAT
from .precision import COMPUTE_DTYPES


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
    """The parser of `eqx-vision` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, evaluate and run the vision transformers of eqx_vision.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    sub.add_parser("presets", help="list the model presets", description="List the model presets.")
    return parser


def _add_train_parser(sub: Any) -> None:
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
        metavar="{" + ",".join(COMPUTE_DTYPES) + "}",
        help="compute dtype of the forward and backward pass; parameters, gradients and "
        "optimizer state stay float32 (default: float32)",
    )
    train.add_argument(
        "--remat",
        metavar="{" + ",".join(REMAT) + "}",
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


def _add_evaluate_parser(sub: Any) -> None:
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


def _add_predict_parser(sub: Any) -> None:
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


def _load_checkpoint(path: str, config: Any) -> Any:
    """Load `path` into `config`'s model."""
    from . import checkpoint

    like_model, like_state = config.build_like()
    try:
        return checkpoint.load(path, like_model, like_state, model_name=config.model)
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
    from .precision import Precision

    if name not in COMPUTE_DTYPES:
        raise UsageError(f"{where} must be {' or '.join(COMPUTE_DTYPES)}; got {name!r}")
    return Precision(name)


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


def _train(
    args: argparse.Namespace,
    settings: dict[str, Any],
    config: Any,
    raw: Any,
    parallel: Any,
    out: str,
    resume: bool,
) -> int:
    """Run `training.fit` with the checked settings, reporting its progress, then print
    the summary."""
    import jax.random as jr

    from . import checkpoint, data as data_mod, training

    ds = data_mod.prepare(raw, channels=config.channels, image_size=config.image_size)
    train_config = training.TrainConfig(
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        learning_rate=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        warmup_epochs=float(settings["warmup_epochs"]),
        seed=settings["seed"],
        precision=settings["precision"],
        remat=args.remat or "linear",
    )
    if resume:  # the structure only: the checkpoint fills it
        model, state = config.build_like()
    else:
        model, state = config.build(jr.fold_in(jr.key(settings["seed"]), 0))
    data_info = {
        "source": raw.source,
        "class_names": list(raw.class_names),
        "channels": raw.channels,
        "num_train": len(ds.train_labels),
        "num_test": len(ds.test_labels),
    }
    name = config.preset or config.model
    shape = "x".join(map(str, (config.channels, *config.image_size)))
    data_line = (
        f"data     {settings['data']}: {len(ds.train_labels)} train / {len(ds.test_labels)} "
        f"test images, {raw.num_classes} classes, input {shape}"
    )
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    report = _reporter(f"{name} ({config.model}", data_line, progress, args.stop_after_steps)
    start = time.perf_counter()
    try:
        result = training.fit(
            model,
            state,
            ds,
            train_config,
            out=out,
            resume=resume,
            parallel=parallel,
            callback=report,
            model_config=config.to_json(),
            metadata={"settings": settings, "data": data_info},
        )
    except checkpoint.CheckpointFormatError as e:
        raise UsageError(str(e)) from None
    finally:
        report.close()
    if result.stopped:
        _echo(f"stopped after step {result.step}")
        return 0
    _summary(result, report.model_line, train_config.batch_size, out, time.perf_counter() - start)
    return 0


def _reporter(model: str, data_line: str, progress: bool, stop_after: int | None) -> Any:
    """A `training.Callback` that prints the run's header, a progress bar per epoch (with
    `progress`) and a line per epoch, and stops after `stop_after` steps."""
    from tqdm.auto import tqdm

    from .training import Callback, FitInfo, StepInfo

    class Reporter(Callback):
        def __init__(self):
            self.bar: Any = None
            self.epochs = 0
            self.compiled = False
            self.epoch_start = 0.0
            self.epoch_times: list[float] = []
            self.model_line = ""

        def on_fit_start(self, info: FitInfo) -> None:
            self.epochs = info.epochs
            self.steps = info.steps_per_epoch
            self.model_line = f"{model}, {info.num_params:,} parameters)"
            _echo(f"model    {self.model_line}")
            _echo(data_line)
            _echo(
                f"training {info.epochs} epochs x {info.steps_per_epoch} steps, batch "
                f"{info.batch_size}, {info.num_devices} device(s), {info.compute_dtype}, "
                f"out {info.out}"
            )
            if info.resumed:
                _echo(f"resuming after epoch {info.start_epoch} (step {info.step})")

        def on_epoch_start(self, epoch: int) -> None:
            self.epoch_start = time.perf_counter()
            compiling = "" if self.compiled else " (compiling)"
            self.bar = tqdm(
                total=self.steps,
                desc=f"epoch {epoch}/{self.epochs}{compiling}",
                unit="step",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )

        def on_step(self, info: StepInfo) -> bool:
            if info.compile_seconds is not None:  # timed apart from the epoch
                self.compiled = True
                self.epoch_start += info.compile_seconds
                self.bar.set_description_str(f"epoch {info.epoch}/{self.epochs}")
            loss = float("nan") if info.loss is None else info.loss
            self.bar.set_postfix(
                loss=f"{loss:.4f}", img_s=f"{info.images_per_second:.0f}", refresh=False
            )
            self.bar.update()
            return stop_after is not None and info.step >= stop_after

        def on_epoch_end(self, metrics: dict[str, Any]) -> None:
            self.close()
            epoch = metrics["epoch"]
            self.epoch_times.append(time.perf_counter() - self.epoch_start)  # with evaluation
            remaining = (self.epochs - epoch) * sum(self.epoch_times) / len(self.epoch_times)
            _echo(
                f"epoch {epoch:>{len(str(self.epochs))}}/{self.epochs}  train loss "
                f"{metrics['train_loss']:.4f}  test loss {metrics['test_loss']:.4f}  test acc "
                f"{metrics['test_accuracy']:.4f}  {metrics['images_per_second']:.0f} img/s  "
                f"{metrics['epoch_seconds']:.1f}s  eta {remaining:.0f}s"
            )

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Reporter()


def _summary(result: Any, model_line: str, batch_size: int, out: str, wall: float) -> None:
    _echo("")
    _echo("summary")
    _echo(f"  model          {model_line}")
    _echo(f"  epochs         {result.epoch} ({result.step} steps of {batch_size} images)")
    if result.images_seen:
        rate = result.images_seen / max(result.train_seconds, 1e-9)
        _echo(
            f"  time           {wall:.1f}s ({result.compile_seconds:.1f}s compiling, "
            f"{result.train_seconds:.1f}s training at {rate:.0f} images/s)"
        )
    _echo(f"  best test acc  {result.best_accuracy:.4f} (epoch {result.best_epoch})")
    _echo(f"  test loss      {result.test_loss:.4f}")
    _echo(f"  output         {out} ({CONFIG}, {CHECKPOINT}, {METRICS}, {CURVES})")
    _echo(f"test accuracy: {result.test_accuracy:.2f}")


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
    name = None
    for key in ("train_config", "settings"):  # written by `training.fit`, by the CLI
        settings = training_meta.get(key)
        if isinstance(settings, dict) and settings.get("precision"):
            name = settings["precision"]
    return _precision(name or LATER_SETTINGS["precision"], f"{ckpt_path}: the precision")


def cmd_evaluate(args: argparse.Namespace) -> int:
    _require("evaluate", ["optax", "safetensors"])
    from . import data as data_mod, presets, training

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
    loss, accuracy = training.evaluate(
        model,
        state,
        ds.test_images,
        ds.test_labels,
        batch_size=args.batch_size,
        parallel=parallel,
        precision=precision,
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

    Bad input is reported as one line on stderr, with exit code 2; a training loss that
    becomes NaN or infinite, with exit code 1.
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
    except FloatingPointError as e:  # a training loss that became NaN or infinite
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
