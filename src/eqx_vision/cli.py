"""The `eqx-vision` command line: train, evaluate and predict with any of the 17 models.

```
eqx-vision train                                  # the default ViT on the embedded digits
eqx-vision train --model cvt-small --data photos/ --image-size 32 --epochs 30 --out runs/cvt
eqx-vision train --out runs/cvt --resume          # continue an interrupted run
eqx-vision train --precision bfloat16             # bfloat16 compute, float32 parameters
eqx-vision train --init runs/cvt --data other/ --image-size 48 --layer-decay 0.75  # fine-tune
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

Bad input (an unknown option or a value out of range, an unknown model, missing or empty
data, an unreadable image, an image size the model does not take, a checkpoint of another
architecture, a malformed config.json or checkpoint header, data changed since the run was
saved, ...) is reported in one line on stderr with exit code 2, before anything is
written. A training loss (or, at the end of an epoch, a parameter) that becomes NaN or
infinite stops the run with one line on stderr and exit code 1; the checkpoint of the last
good epoch is kept (`--skip-non-finite N` skips up to N such steps in a row instead). A
run stopped before its first checkpoint starts again from the beginning with the same
command, or with `--resume`.
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
from typing import Any, NoReturn

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
    "skip_non_finite": 0,
    "init": None,
    "layer_decay": None,
    "freeze": 0,
    "loader": "auto",
}
SETTINGS = tuple(DEFAULTS)
# Settings a run saved by an earlier version may lack, with the value it was trained with.
LATER_SETTINGS: dict[str, Any] = {
    "precision": "float32",
    "skip_non_finite": 0,
    "init": None,
    "layer_decay": None,
    "freeze": 0,
    "loader": "memory",
}
LOADERS = ("auto", "memory", "stream")
# The prefix of `--init` for a pretrained timm model.
TIMM_PREFIX = "timm/"
# The seeds `jax.random.key` tells apart (it keeps a seed's low 32 bits), as
# `eqx_vision.training.MAX_SEED`.
MAX_SEED = 2**32 - 1
# The largest learning rate or weight decay: float32's largest value.
MAX_RATE = 3.4028234663852886e38


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are `UsageError`s: one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _require(command: str, modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = {"PIL": "pillow"}
        shown = ", ".join(names.get(m, m) for m in missing)
        raise UsageError(f"{PROG} {command} needs {shown}, which is not installed: {INSTALL}")


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, None, "a non-negative integer")


def _seed(text: str) -> int:
    return _integer(text, 0, MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number; got {text!r}")
    return value


def _layer_decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]; got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]; got {text!r}")
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
    parser = _Parser(
        prog=PROG,
        description="Train, evaluate and run the vision transformers of eqx_vision.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    sub.add_parser("presets", help="list the model presets", description="List the model presets.")
    _add_plan_parser(sub)
    return parser


def _add_plan_parser(sub: Any) -> None:
    plan = sub.add_parser(
        "plan",
        help="parameters, FLOPs and the training step's memory, before training",
        description="Print a model's parameters, its FLOPs per image and the memory per "
        "device of its compiled training step (AdamW) for each checkpointing policy and "
        "precision, without allocating the model: to choose the largest batch that fits.",
    )
    plan.add_argument("--model", required=True, help="a preset, an architecture or a config file")
    plan.add_argument("--batch-size", type=_positive_int, required=True, help="images per step")
    plan.add_argument(
        "--image-size", type=_image_size, metavar="N|HxW", help="default: the preset's"
    )
    plan.add_argument("--num-classes", type=_positive_int, default=1000, help="default: 1000")
    plan.add_argument("--channels", type=int, choices=(1, 3), default=3, help="default: 3")
    plan.add_argument(
        "--precision", nargs="+", choices=COMPUTE_DTYPES, help="default: float32 and bfloat16"
    )
    plan.add_argument("--remat", nargs="+", choices=tuple(REMAT), help="default: all three")
    plan.add_argument("--json", metavar="FILE", help="also write the plan to this file")


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
        help="'digits' (embedded handwritten digits), a folder of images (class sub-folders, "
        "or train/ and val/ of class sub-folders, or train/ and a flat val/ with "
        "val_labels.txt), or an .npz with images and labels (default: digits)",
    )
    train.add_argument(
        "--loader",
        choices=LOADERS,
        help="how the data is read: 'memory' decodes every image before the first step "
        "(squashed to size, no augmentation); 'stream' lists the files and decodes, crops "
        "and flips each batch in worker processes; 'auto' streams folders and reads .npz "
        "files and the digits into memory (default: auto)",
    )
    train.add_argument(
        "--workers",
        type=_non_negative_int,
        metavar="N",
        help="data worker processes of a streamed folder (0: decode in this process; "
        "default: the CPU count, at most 8)",
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
    train.add_argument(
        "--seed",
        type=_seed,
        help=f"seed of every random choice, 0 to {MAX_SEED} (default: 0)",
    )
    train.add_argument(
        "--skip-non-finite",
        type=_non_negative_int,
        metavar="N",
        help="skip a step whose gradients hold a NaN or an infinity (the model and optimizer "
        "state kept), up to N in a row; the run stops at the next (default: 0, stop at the "
        "first)",
    )
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
        "--init",
        metavar="timm/NAME|CHECKPOINT",
        help="fine-tune: start from a pretrained timm model (timm/<name>, needs the pretrained "
        "extra) or from a checkpoint of eqx-vision train (a --out folder or a .safetensors "
        "file), with a new head for the data's classes, resized to --image-size (default: the "
        "initial model's size); weight decay then spares biases, norms, position embeddings "
        "and tokens",
    )
    train.add_argument(
        "--layer-decay",
        type=_layer_decay,
        metavar="FLOAT",
        help="layer-wise learning-rate decay in (0, 1]: block i of N learns at "
        "FLOAT**(N+1-i) times --lr, the head at --lr (default: none)",
    )
    train.add_argument(
        "--freeze",
        type=_non_negative_int,
        metavar="N",
        help="keep the embeddings and the first N blocks fixed (default: 0, train everything)",
    )
    train.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/<model>-<date>-<time>)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings "
        "(a run stopped before its first checkpoint starts again from the beginning)",
    )
    _add_keep_empty_classes(train)
    train.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="with --resume, continue even if the data changed since the run was saved "
        "(other images, class names or channels)",
    )
    train.add_argument(
        "--devices",
        type=_positive_int,
        metavar="N",
        help="data-parallel over N local devices (default: all; over several processes, "
        "every device of every process)",
    )
    _add_distributed(train)
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar per epoch (default: when stderr is a terminal)",
    )
    # Stops after this many steps in total, as if the process were killed (for tests).
    train.add_argument("--stop-after-steps", type=_positive_int, help=argparse.SUPPRESS)


def _add_keep_empty_classes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-empty-classes",
        action="store_true",
        help="keep classes that have no training image (a class folder without images, a "
        "class index or name no label uses), with a warning naming them; by default they "
        "are an error",
    )


def _add_evaluate_parser(sub: Any) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on its test data",
        description="Evaluate a checkpoint; ends with the line 'test accuracy: <value>'.",
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="a train --out folder or a .safetensors file"
    )
    source.add_argument(
        "--pretrained",
        metavar="timm/NAME",
        help="a pretrained timm model (e.g. timm/vit_small_patch16_224.augreg_in21k_ft_in1k); "
        "--data is then a folder of ImageNet class folders named by synset id (n01440764, ...)",
    )
    evaluate.add_argument("--data", help="data to evaluate on (default: the training data)")
    _add_keep_empty_classes(evaluate)
    evaluate.add_argument(
        "--loader",
        choices=LOADERS,
        help="how the data is read (see train --loader; default: as the checkpoint was "
        "trained; a streamed folder is evaluated by resizing the shorter side and cropping "
        "the centre)",
    )
    evaluate.add_argument(
        "--workers",
        type=_non_negative_int,
        metavar="N",
        help="as for train (default: the CPU count, at most 8)",
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.add_argument("--devices", type=_positive_int, metavar="N")
    _add_distributed(evaluate)


def _add_predict_parser(sub: Any) -> None:
    predict = sub.add_parser(
        "predict",
        help="classify image files with a checkpoint",
        description="Print the top-k classes and their probabilities for each image.",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="a train --out folder or a .safetensors file"
    )
    source.add_argument(
        "--pretrained",
        metavar="timm/NAME",
        help="a pretrained timm model (e.g. timm/vit_small_patch16_224.augreg_in21k_ft_in1k), "
        "downloaded from the Hugging Face Hub or read from its cache",
    )
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K")
    predict.add_argument("images", nargs="+", metavar="IMAGE")


# --------------------------------------------------------------------------------------
# Helpers shared by the commands


def _is_main_process() -> bool:
    """Process 0 of a run over several processes (or the only one): the one that prints."""
    import jax

    return jax.process_index() == 0


def _echo(*args: Any) -> None:
    if _is_main_process():
        print(*args, flush=True)


def _add_distributed(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (hosts)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="start jax.distributed, finding the cluster as JAX does (SLURM, Open MPI, "
        "...): every process of the run gives this command; only process 0 prints and "
        "writes",
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="jax.distributed's coordinator address"
    )
    group.add_argument("--num-processes", type=_positive_int, metavar="N")
    group.add_argument("--process-id", type=_non_negative_int, metavar="I")


def _start_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` as the flags ask (before any JAX device is used)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if any(v is None for v in explicit) and any(v is not None for v in explicit):
        raise UsageError("--coordinator, --num-processes and --process-id go together")
    if args.process_id is not None and args.process_id >= args.num_processes:
        raise UsageError(
            f"--process-id must be below --num-processes ({args.num_processes}); "
            f"got {args.process_id}"
        )
    import jax

    try:
        if args.coordinator is not None:
            jax.distributed.initialize(
                args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        else:
            jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"cannot start jax.distributed: {_printable(str(e))}") from None


def _printable(text: str) -> str:
    """`text` with every non-printable character (a newline, a tab, an escape code, ...)
    written as its Python escape, so that it stays on one line and shows as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, limit: int = 60) -> str:
    text = _printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON or UTF-8
        raise UsageError(f"cannot read {path}: {_printable(str(e))}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return obj


def _entry(meta: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """`meta[key]`, a JSON object ({} if absent); anything else is a UsageError."""
    value = meta.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key!r} must be a JSON object; got {_short(value)}")
    return value


def _load_checkpoint(path: str, config: Any) -> Any:
    """Load `path` into `config`'s model."""
    from . import checkpoint

    like_model, like_state = config.build_like()
    try:
        return checkpoint.load(path, like_model, like_state, model_name=config.model)
    except checkpoint.CheckpointFormatError as e:
        raise UsageError(str(e)) from None


def _read_checkpoint_header(path: str) -> dict[str, Any]:
    """A checkpoint's header, whose `model_config` and `training` are JSON objects."""
    from . import checkpoint

    try:
        header = checkpoint.read_header(path)
    except (checkpoint.CheckpointFormatError, OSError) as e:
        raise UsageError(str(e)) from None
    for key in ("model_config", "training"):
        _entry(header, key, f"{path}: the header")
    return header


def _model_config(obj: Any, where: str):
    """The `ModelConfig` saved in `where`, checked by building its model abstractly (no
    arrays computed) and running one image through it."""
    from .presets import ConfigError, ModelConfig, check_input_size

    if not isinstance(obj, dict):
        raise UsageError(f"{where}: the model config must be a JSON object; got {_short(obj)}")
    try:
        config = _timm_model_config(obj) if "timm" in obj else ModelConfig.from_json(obj)
        config.cls  # noqa: B018 - raises for an unknown or unavailable architecture
        config.num_classes  # noqa: B018 - raises for a missing or malformed one
        check_input_size(config)
    except ConfigError as e:
        raise UsageError(f"{where}: {_printable(str(e))}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise UsageError(
            f"{where}: invalid model config ({type(e).__name__}: {_printable(str(e))})"
        ) from None
    return config


def _streams(spec: str, loader: str) -> bool:
    """Whether the data `spec` is streamed: always with `stream`, folders with `auto`."""
    return loader == "stream" or (loader == "auto" and os.path.isdir(spec))


def _load_data(spec: str, keep_empty_classes: bool = False, loader: str = "memory") -> Any:
    """The data set `spec`: in memory (a `RawDataset`), or, when `_streams`, the file lists
    of a folder (an `ImageFolder`); with `keep_empty_classes`, classes without training
    images are kept and named in one warning line on stderr."""
    import warnings

    from . import data as data_mod

    if _streams(spec, loader) and not os.path.isdir(spec):
        raise UsageError(f"--loader stream reads a folder of images; {_printable(spec)} is not one")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            if _streams(spec, loader):
                raw = data_mod.scan_folder(spec, keep_empty_classes=keep_empty_classes)
            else:
                raw = data_mod.load_dataset(spec, keep_empty_classes=keep_empty_classes)
    except ValueError as e:  # a DataError, or a path the operating system refuses
        message = str(e).replace("keep_empty_classes=True", "--keep-empty-classes")
        raise UsageError(_printable(message)) from None
    for w in caught:
        print(f"{PROG}: warning: {_printable(str(w.message))}", file=sys.stderr, flush=True)
    return raw


# What a run records of its data, compared on --resume (and by evaluate).
DATA_FACTS = ("source", "class_names", "channels", "num_train", "num_test")


def _data_facts(raw: Any) -> dict[str, Any]:
    return {
        "source": raw.source,
        "class_names": list(raw.class_names),
        "channels": raw.channels,
        "num_train": len(raw.train_labels),
        "num_test": len(raw.test_labels),
    }


def _workers(args: argparse.Namespace) -> int:
    workers = getattr(args, "workers", None)
    return min(8, os.cpu_count() or 1) if workers is None else workers


def _model_data(raw: Any, config: Any, workers: int) -> Any:
    """What `fit` and `evaluate` read: the in-memory data prepared for the model, or a
    stream of the folder's files (decoded in `workers` processes), whose first batch is
    decoded here, so that a folder of unreadable images is refused before anything is
    written."""
    import dataclasses

    from . import data as data_mod

    if not isinstance(raw, data_mod.ImageFolder):
        return data_mod.prepare(raw, channels=config.channels, image_size=config.image_size)
    stream = data_mod.StreamingData(
        raw, image_size=tuple(config.image_size), channels=config.channels, workers=workers
    )
    try:
        check = dataclasses.replace(stream, workers=0)
        next(iter(check.train_batches(0, min(8, raw.num_train), seed=0)))
    except data_mod.DataError as e:
        raise UsageError(_printable(str(e))) from None
    return stream


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with a value of a `train` setting (as the flags take it), or None."""
    if name in ("model", "data"):
        ok = isinstance(value, str) and value != ""
        return None if ok else "must be a non-empty string"
    if name == "image_size":
        ok = value is None or (
            isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)
        )
        return None if ok else "must be null or two positive integers [height, width]"
    if name in ("epochs", "batch_size"):
        return None if _is_int(value) and value > 0 else "must be a positive integer"
    if name == "skip_non_finite":
        return None if _is_int(value) and value >= 0 else "must be a non-negative integer"
    if name == "seed":
        ok = _is_int(value) and 0 <= value <= MAX_SEED
        return None if ok else f"must be an integer from 0 to {MAX_SEED}"
    if name in ("lr", "weight_decay", "warmup_epochs"):
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            return "must be a non-negative number"
        if name != "warmup_epochs" and value > MAX_RATE:
            return f"must be at most {MAX_RATE:.4g} (float32's largest value)"
        return None
    if name == "precision":
        ok = isinstance(value, str) and value in COMPUTE_DTYPES
        return None if ok else f"must be {' or '.join(COMPUTE_DTYPES)}"
    if name == "init":
        ok = value is None or (isinstance(value, str) and value not in ("", TIMM_PREFIX))
        return None if ok else "must be null, timm/<name> or a checkpoint path"
    if name == "layer_decay":
        ok = value is None or (_is_number(value) and 0 < value <= 1)
        return None if ok else "must be null or a number in (0, 1]"
    if name == "freeze":
        return None if _is_int(value) and value >= 0 else "must be a non-negative integer"
    if name == "loader":
        return None if value in LOADERS else f"must be {', '.join(LOADERS)}"
    raise AssertionError(name)  # pragma: no cover


def _check_settings(settings: dict[str, Any], where: Any) -> None:
    """Check every setting with the rules of the flags; `where(name)` names it."""
    for name in SETTINGS:
        problem = _setting_problem(name, settings[name])
        if problem:
            raise UsageError(f"{where(name)} {problem}; got {_short(settings[name])}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's settings (explicit options over defaults, or the saved ones with
    `--resume`), checked, and, with `--resume`, the saved config.json."""
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    if not args.resume:
        settings = {**DEFAULTS, **given}
        _check_settings(settings, _flag)
        return settings, None
    if not args.out:
        raise UsageError("--resume needs --out DIR, the folder of the run to continue")
    config_path = os.path.join(args.out, CONFIG)
    if not os.path.isfile(config_path):
        raise UsageError(f"nothing to resume in {args.out}: no {CONFIG}")
    saved_json = _read_json(config_path)
    saved = saved_json.get("settings")
    if not isinstance(saved, dict):
        raise UsageError(f"{config_path} has no valid 'settings': expected a JSON object")
    saved = {**LATER_SETTINGS, **saved}
    if set(saved) != set(SETTINGS):
        missing, extra = sorted(set(SETTINGS) - set(saved)), sorted(set(saved) - set(SETTINGS))
        shown = "; ".join(
            f"{what} {', '.join(map(_short, names))}"
            for what, names in (("missing", missing), ("unknown", extra))
            if names
        )
        raise UsageError(f"{config_path} has no valid 'settings' ({shown})")
    _check_settings(saved, lambda name: f"{config_path}: settings.{name}")
    for k, v in given.items():
        if k == "model" and v != saved[k]:
            from .presets import ConfigError, _lookup

            try:
                arch = _lookup(v)[0]
            except ConfigError:
                arch = v
            saved_config = saved_json.get("model_config")
            saved_arch = saved_config.get("model") if isinstance(saved_config, dict) else None
            raise UsageError(
                f"{args.out} holds a run of {_short(saved_arch)} ({saved[k]}), not {arch} "
                f"({v}): a checkpoint of another architecture cannot be resumed"
            )
        if v != saved[k]:
            raise UsageError(
                f"{args.out} was trained with {_flag(k)} {saved[k]}, not {v}; --resume "
                "continues with the saved settings (leave the option out or use another --out)"
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


def _check_same_data(saved: dict[str, Any], now: dict[str, Any], where: str, allow: bool) -> None:
    """Refuse to resume on data that differs from the data a run was saved with."""
    changed = []
    for key in DATA_FACTS:
        if key in saved and saved[key] != now[key]:
            if key == "class_names" and isinstance(saved[key], list):
                gone = [c for c in saved[key] if c not in now[key]]
                new = [c for c in now[key] if c not in saved[key]]
                detail = "in another order"
                if gone or new:
                    detail = f"removed {_short(gone)}, added {_short(new)}"
                changed.append(f"class names {detail}")
            else:
                changed.append(f"{key} {_short(saved[key])} -> {_short(now[key])}")
    if changed and not allow:
        raise UsageError(
            f"the data changed since {where} was saved ({'; '.join(changed)}): pass "
            "--allow-changed-data to continue with the data as it is now"
        )


def cmd_train(args: argparse.Namespace) -> int:
    _require("train", ["optax", "safetensors", "tqdm", "matplotlib"])
    if args.precision is not None:
        _precision(args.precision)
    if args.remat is not None and args.remat not in REMAT:
        raise UsageError(f"--remat must be {' or '.join(REMAT)}; got {args.remat!r}")
    if args.allow_changed_data and not args.resume:
        raise UsageError("--allow-changed-data goes with --resume")
    _start_distributed(args)
    settings, saved_json = _resolve_settings(args)
    initial = None
    if settings["data"] != "digits":
        _require("train", ["PIL"])

    from . import presets, training

    # ---- check everything before writing anything ---------------------------------------
    raw = _load_data(settings["data"], args.keep_empty_classes, settings["loader"])
    data_info = _data_facts(raw)
    out = args.out or _default_out(settings["model"])
    config_path, ckpt_path = os.path.join(out, CONFIG), os.path.join(out, CHECKPOINT)
    # --resume continues from the checkpoint, or, for a run stopped before its first one,
    # starts again from the beginning.
    from_checkpoint = saved_json is not None and os.path.isfile(ckpt_path)
    header = _read_checkpoint_header(ckpt_path) if from_checkpoint else None
    if saved_json is not None:
        config = _model_config(saved_json.get("model_config"), config_path)
        # The data the run last trained on: the checkpoint's, else config.json's.
        if header is not None and "data" in header["training"]:
            saved_data, where = _entry(header["training"], "data", ckpt_path), ckpt_path
        else:
            saved_data, where = _entry(saved_json, "data", config_path), config_path
        _check_same_data(saved_data, data_info, where, args.allow_changed_data)
        if header is None and settings["init"] is not None:
            # a fine-tuning run stopped before its first checkpoint starts again from --init
            config, initial = _initial_model(settings, raw)
    elif settings["init"] is not None:
        if args.model is not None:
            raise UsageError(
                "--init and --model do not go together: the architecture is the initial model's"
            )
        config, initial = _initial_model(settings, raw)
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
            presets.check_input_size(config)
        except presets.ConfigError as e:
            raise UsageError(str(e)) from None
    if config.num_classes != raw.num_classes:
        raise UsageError(
            f"the model has {config.num_classes} classes; the data {settings['data']} has "
            f"{raw.num_classes}"
        )
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
    try:
        train_config = training.TrainConfig(
            epochs=settings["epochs"],
            batch_size=batch_size,
            learning_rate=float(settings["lr"]),
            weight_decay=float(settings["weight_decay"]),
            warmup_epochs=float(settings["warmup_epochs"]),
            seed=settings["seed"],
            precision=settings["precision"],
            remat=args.remat or "linear",
            skip_non_finite=settings["skip_non_finite"],
            selective_decay=settings["init"] is not None,
            layer_decay=settings["layer_decay"],
            freeze=settings["freeze"],
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if settings["freeze"]:
        blocks = training.num_blocks(config.build_like()[0])
        if settings["freeze"] > blocks:
            raise UsageError(
                f"--freeze {settings['freeze']} is more than the {blocks} blocks of the "
                f"{config.model} (0 to {blocks}: the embeddings and the first N blocks stay fixed)"
            )
    if saved_json is not None and "train_config" in saved_json:  # (not in 0.1.0's runs)
        saved_train = _entry(saved_json, "train_config", config_path)
        changed = train_config.changes_from(saved_train)
        if changed:
            raise UsageError(
                f"{config_path}: its train_config disagrees with its settings "
                f"({_printable(', '.join(changed))})"
            )
    if header is not None:
        found = header["model_config"].get("model")
        if found != config.model:
            raise UsageError(
                f"{ckpt_path} holds a {_short(found)} checkpoint, but the run in {out} trains "
                f"{config.model}: a checkpoint of another architecture"
            )
    elif saved_json is None:
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"--out {out} exists and is not a folder")
        if os.path.isfile(ckpt_path) or (
            os.path.exists(os.path.join(out, METRICS)) and not os.path.exists(config_path)
        ):
            raise UsageError(
                f"{out} already holds a run: continue it with --resume, or choose another --out"
            )
        # A config.json without a checkpoint: a run stopped before its first checkpoint,
        # which `fit` starts again if its config.json is the one this command writes.
    return _train(
        args, settings, train_config, config, raw, data_info, parallel, out,
        resume=saved_json is not None, from_checkpoint=from_checkpoint, initial=initial,
    )  # fmt: skip


def _train(
    args: argparse.Namespace,
    settings: dict[str, Any],
    train_config: Any,
    config: Any,
    raw: Any,
    data_info: dict[str, Any],
    parallel: Any,
    out: str,
    *,
    resume: bool,
    from_checkpoint: bool,
    initial: tuple[Any, Any] | None = None,
) -> int:
    """Run `training.fit` with the checked settings (from the `initial` model and state
    when given), reporting its progress, then print the summary."""
    import jax.random as jr

    from . import checkpoint, data as data_mod, training

    ds = _model_data(raw, config, _workers(args))
    if from_checkpoint:  # the structure only: the checkpoint fills it
        model, state = config.build_like()
    elif initial is not None:
        model, state = initial
    else:
        model, state = config.build(jr.fold_in(jr.key(settings["seed"]), 0))
    name = config.preset or config.model
    shape = "x".join(map(str, (config.channels, *config.image_size)))
    data_line = (
        f"data     {_printable(settings['data'])}: {ds.num_train} train / "
        f"{ds.num_test} test images, {raw.num_classes} classes, input {shape}"
        + (", streamed" if isinstance(ds, data_mod.StreamingData) else "")
    )
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = progress and _is_main_process()
    report = _reporter(f"{name} ({config.model}", data_line, progress, args.stop_after_steps)
    if resume and not from_checkpoint:
        _echo(f"{out} stopped before its first checkpoint: starting it again from the beginning")
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
    except data_mod.DataError as e:  # an unreadable image met while streaming
        raise UsageError(f"{_printable(str(e))}; the run stopped at its last checkpoint") from None
    finally:
        report.close()
    if result.stopped:
        _echo(f"stopped after step {result.step}")
        return 0
    _summary(result, report.model_line, train_config.batch_size, out, time.perf_counter() - start)
    return 0


# --------------------------------------------------------------------------------------
# train --init: fine-tuning a pretrained model or a checkpoint


def _timm_config_class() -> Any:
    """`ModelConfig` for a timm model fine-tuned by `train --init timm/<name>`: built with
    `interop.timm.build` (the architecture of timm's name, with `num_classes` outputs) at
    its `image_size`; saved in the checkpoint as a model config with a `"timm"` entry, which
    `evaluate` and `predict` read back."""
    import dataclasses

    from .presets import ModelConfig

    @dataclasses.dataclass(frozen=True)
    class TimmModelConfig(ModelConfig):
        timm: str = ""

        @property
        def cls(self) -> Any:
            import eqx_vision

            return getattr(eqx_vision, self.model)

        def build(self, key: Any) -> tuple[Any, Any]:
            import equinox as eqx

            from .interop.timm import build
            from .models import set_image_size

            built = build(self.timm, num_classes=self.num_classes, key=key)
            model, state = built if isinstance(built, tuple) else (built, eqx.nn.State(built))
            return set_image_size(model, self.image_size), state

        def to_json(self) -> dict[str, Any]:
            return {**super().to_json(), "timm": self.timm}

    return TimmModelConfig


def _timm_model_config(obj: dict[str, Any]) -> Any:
    """The `TimmModelConfig` of a saved model config with a `"timm"` entry."""
    from .presets import ConfigError

    name = obj.get("timm")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"the timm model name must be a non-empty string; got {_short(name)}")
    base = _timm_config_class().from_json(obj)
    return _timm_config_class()(
        base.model, base.kwargs, base.image_size, base.channels, base.preset, timm=name
    )


def _same_structure(a: Any, b: Any) -> bool:
    """Whether two models (or states) have one structure and the same array shapes."""
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        getattr(x, "shape", None) == getattr(y, "shape", None) for x, y in zip(la, lb, strict=True)
    )


def _initial_model(settings: dict[str, Any], raw: Any) -> tuple[Any, tuple[Any, Any]]:
    """`(config, (model, state))` of `--init`: a pretrained timm model or a checkpoint's,
    with a new head for the data's classes (drawn from the seed), resized to
    `--image-size`; every failure is a `UsageError` naming `--init`."""
    import inspect

    import jax.random as jr

    from .models import reset_head, set_image_size

    spec = settings["init"]
    shown = _printable(spec)
    source = None
    if spec.startswith(TIMM_PREFIX):
        model, state, data_config = _open_init_pretrained(spec)
        source_size = tuple(data_config.input_size[1:])
        arch = type(model).__name__
        channels = int(data_config.input_size[0])
    else:
        path = _checkpoint_path(spec)
        header = _read_checkpoint_header(path)
        source = _model_config(header["model_config"], path)
        loaded = _load_checkpoint(path, source)
        model, state = loaded.model, loaded.state
        source_size, arch, channels = source.image_size, source.model, source.channels
    size = source_size if settings["image_size"] is None else tuple(settings["image_size"])
    key = jr.fold_in(jr.key(settings["seed"]), 0)
    try:
        method = getattr(model, "reset_head", None)
        if method is None:
            raise TypeError(f"{arch} has no reset_head")
        if "state" in inspect.signature(method).parameters and state is not None:
            model, state = reset_head(model, raw.num_classes, key=key, state=state)
        else:
            model = reset_head(model, raw.num_classes, key=key)
        model = set_image_size(model, size)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--init {shown}: {_printable(str(e))}") from None
    if source is None:
        kwargs = {"num_classes": raw.num_classes}
        config = _timm_config_class()(arch, kwargs, size, channels, None, timm=spec)
    else:
        import dataclasses

        kwargs = {**source.kwargs, "num_classes": raw.num_classes}
        if "image_size" in kwargs:
            kwargs["image_size"] = size[0] if size[0] == size[1] else size
        config = dataclasses.replace(source, kwargs=kwargs, image_size=size)
    if state is None:
        import equinox as eqx

        state = eqx.nn.State(model)
    like = config.build_like()
    if not _same_structure(like[0], model) or not _same_structure(like[1], state):
        raise UsageError(
            f"--init {shown}: the {arch} with a new head at {size[0]}x{size[1]} differs from "
            "the one its configuration builds, so its checkpoints could not be read back"
        )
    return config, (model, state)


def _open_init_pretrained(spec: str) -> tuple[Any, Any, Any]:
    """`(model, state or None, data_config)` of `--init timm/<name>`, in training mode."""
    missing = [m for m in ("huggingface_hub", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"--init {_printable(spec)} needs {', '.join(missing)}, which is not installed: "
            "pip install 'eqx_vision[train,pretrained]'"
        )
    from .interop import CheckpointError, TimmConfigError, pretrained

    try:
        loaded, data_config = pretrained(spec)
    except (TimmConfigError, CheckpointError, ConnectionError) as e:
        raise UsageError(f"--init: {_printable(str(e))}") from None
    model, state = loaded if isinstance(loaded, tuple) else (loaded, None)
    return model, state, data_config


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
            skipped = metrics.get("skipped_steps", 0)
            _echo(
                f"epoch {epoch:>{len(str(self.epochs))}}/{self.epochs}  train loss "
                f"{metrics['train_loss']:.4f}  test loss {metrics['test_loss']:.4f}  test acc "
                f"{metrics['test_accuracy']:.4f}  {metrics['images_per_second']:.0f} img/s  "
                f"{metrics['epoch_seconds']:.1f}s  eta {remaining:.0f}s"
                + (f"  skipped {skipped} non-finite step(s)" if skipped else "")
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
    if result.skipped_steps:
        _echo(f"  skipped        {result.skipped_steps} steps with non-finite gradients")
    _echo(f"  output         {out} ({CONFIG}, {CHECKPOINT}, {METRICS}, {CURVES})")
    _echo(f"test accuracy: {result.test_accuracy:.2f}")


# --------------------------------------------------------------------------------------
# evaluate / predict


def _open_checkpoint(path: str):
    """(path, header, model config, the header's data entry) of a checkpoint folder or
    file, all checked."""
    ckpt_path = _checkpoint_path(path)
    header = _read_checkpoint_header(ckpt_path)
    config = _model_config(header["model_config"], ckpt_path)
    data_meta = _entry(header["training"], "data", f"{ckpt_path}: training")
    return ckpt_path, header, config, data_meta


def _saved_precision(training_meta: dict[str, Any], ckpt_path: str):
    """The precision a checkpoint was trained with (float32 if it does not say)."""
    name = None
    for key in ("train_config", "settings"):  # written by `training.fit`, by the CLI
        settings = _entry(training_meta, key, f"{ckpt_path}: training")
        if settings.get("precision"):
            name = settings["precision"]
    return _precision(name or LATER_SETTINGS["precision"], f"{ckpt_path}: the precision")


def _class_names(data_meta: dict[str, Any], ckpt_path: str, num_classes: int) -> list[str]:
    """The class names a checkpoint records (numbers if it records none)."""
    names = data_meta.get("class_names")
    if names is None or names == []:
        return [str(i) for i in range(num_classes)]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{ckpt_path}: the class names must be a list of strings")
    if len(names) != num_classes:
        raise UsageError(
            f"{ckpt_path}: {len(names)} class names for the model's {num_classes} classes"
        )
    return names


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.pretrained:
        return _evaluate_pretrained(args)
    _require("evaluate", ["optax", "safetensors"])
    _start_distributed(args)
    from . import training

    ckpt_path, header, config, data_meta = _open_checkpoint(args.checkpoint)
    training_meta = header["training"]
    precision = _saved_precision(training_meta, ckpt_path)
    class_names = _class_names(data_meta, ckpt_path, config.num_classes)
    spec = args.data or data_meta.get("source")
    if not spec or not isinstance(spec, str):
        raise UsageError(f"{ckpt_path} does not record its data: give --data")
    if spec != "digits":
        _require("evaluate", ["PIL"])
    saved_settings = training_meta.get("settings")
    saved_loader = saved_settings.get("loader") if isinstance(saved_settings, dict) else None
    loader = args.loader or (saved_loader if saved_loader in LOADERS else "memory")
    raw = _load_data(spec, args.keep_empty_classes, loader)
    shown = _printable(spec)
    if raw.num_classes != config.num_classes:
        raise UsageError(
            f"{shown} has {raw.num_classes} classes; the checkpoint's model has "
            f"{config.num_classes}"
        )
    if "class_names" in data_meta and list(raw.class_names) != class_names:
        differ = next(i for i, c in enumerate(class_names) if c != raw.class_names[i])
        raise UsageError(
            f"{shown} has other classes than {ckpt_path} was trained on: class {differ} is "
            f"{_short(raw.class_names[differ])} in the data, {_short(class_names[differ])} in "
            "the checkpoint"
        )
    channels = data_meta.get("channels")
    if _is_int(channels) and channels != raw.channels:
        raise UsageError(
            f"{shown} has {raw.channels}-channel images; {ckpt_path} was trained on "
            f"{channels}-channel images"
        )
    parallel = _parallel(args.devices)
    ckpt = _load_checkpoint(ckpt_path, config)
    ds = _model_data(raw, config, _workers(args))
    model, state = parallel.replicate((ckpt.model, ckpt.state))
    batch_size = max(parallel.num_devices, args.batch_size - args.batch_size % parallel.num_devices)
    loss, accuracy = training.evaluate_batches(
        model,
        state,
        ds.test_batches(batch_size),
        parallel=parallel,
        precision=precision,
        normalization=getattr(ds, "normalization", None),
    )
    _echo(
        f"checkpoint {ckpt_path}: {config.preset or config.model} ({config.model}), "
        f"epoch {training_meta.get('epoch', '?')}, step {training_meta.get('step', '?')}"
    )
    _echo(
        f"data       {shown}: {ds.num_test} test images, {raw.num_classes} classes, "
        f"{precision.compute_dtype}"
    )
    _echo(f"test loss: {loss:.4f}")
    _echo(f"test accuracy: {accuracy:.2f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.pretrained:
        return _predict_pretrained(args)
    _require("predict", ["optax", "safetensors", "PIL"])
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import data as data_mod

    ckpt_path, header, config, data_meta = _open_checkpoint(args.checkpoint)
    precision = _saved_precision(header["training"], ckpt_path)
    # Names written by an older release may hold a newline or an escape code: shown escaped.
    class_names = [_printable(c) for c in _class_names(data_meta, ckpt_path, config.num_classes)]
    images = []
    for path in args.images:
        try:
            images.append(
                data_mod.load_image(path, channels=config.channels, image_size=config.image_size)
            )
        except data_mod.DataError as e:
            raise UsageError(_printable(str(e))) from None
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
        _echo(_printable(path))
        for i in np.argsort(-p, kind="stable")[:k]:
            _echo(f"  {class_names[i]:<{width}}  {p[i]:.4f}")
    return 0


# --------------------------------------------------------------------------------------
# Pretrained timm models


def _open_pretrained(name: str) -> tuple[Any, Any, Any, list[str]]:
    """`(model, state, data_config, class_names)` of a pretrained timm model, in inference
    mode; a failure to find, download or load it is a `UsageError`."""
    missing = [m for m in ("huggingface_hub", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"--pretrained needs {', '.join(missing)}, which is not installed: "
            "pip install 'eqx_vision[train,pretrained]'"
        )
    _require("--pretrained", ["PIL"])
    import equinox as eqx

    from .data import imagenet_classes
    from .interop import CheckpointError, TimmConfigError, pretrained

    try:
        loaded, data_config = pretrained(name)
    except (TimmConfigError, CheckpointError, ConnectionError) as e:
        raise UsageError(_printable(str(e))) from None
    model, state = loaded if isinstance(loaded, tuple) else (loaded, None)
    if data_config.label_set == "imagenet-1k":
        names = [lemmas for _, lemmas in imagenet_classes()]
    else:
        names = [f"class {i}" for i in range(data_config.num_classes)]
    return eqx.nn.inference_mode(model), state, data_config, names


def _pretrained_logits(model: Any, state: Any) -> Any:
    """A jitted function from a batch of prepared images to the logits."""
    import equinox as eqx
    import jax

    if state is None:
        stateless = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
        return lambda x: stateless(model, x)
    stateful = eqx.filter_jit(lambda m, s, x: jax.vmap(lambda x: m(x, s)[0], axis_name="batch")(x))
    return lambda x: stateful(model, state, x)


def _predict_pretrained(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import data as data_mod

    model, state, data_config, class_names = _open_pretrained(args.pretrained)
    images = []
    for path in args.images:
        try:
            images.append(data_mod.load_pretrained_image(path, data_config))
        except data_mod.DataError as e:
            raise UsageError(_printable(str(e))) from None
    logits = _pretrained_logits(model, state)(jnp.asarray(np.stack(images)))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(args.top_k, probs.shape[-1])
    for path, p in zip(args.images, probs, strict=True):
        _echo(_printable(path))
        for i in np.argsort(-p, kind="stable")[:k]:
            _echo(f"  {p[i]:.4f}  {class_names[i]}")
    return 0


def _evaluate_pretrained(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np

    from . import data as data_mod

    if not args.data:
        raise UsageError("--pretrained needs --data: a folder of ImageNet class folders")
    model, state, data_config, _ = _open_pretrained(args.pretrained)
    if data_config.label_set != "imagenet-1k":
        raise UsageError(f"{args.pretrained} does not classify the ImageNet-1k classes")
    index = {synset: i for i, (synset, _) in enumerate(data_mod.imagenet_classes())}
    try:
        files = data_mod.imagenet_folder_files(args.data, index)
    except data_mod.DataError as e:
        raise UsageError(_printable(str(e))) from None
    logits_of = _pretrained_logits(model, state)
    top1 = top5 = 0
    for start in range(0, len(files), args.batch_size):
        batch = files[start : start + args.batch_size]
        try:
            x = np.stack([data_mod.load_pretrained_image(p, data_config) for p, _ in batch])
        except data_mod.DataError as e:
            raise UsageError(_printable(str(e))) from None
        logits = np.asarray(logits_of(jnp.asarray(x)))
        labels = np.asarray([label for _, label in batch])
        ranked = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
        top1 += int(np.sum(ranked[:, 0] == labels))
        top5 += int(np.sum(np.any(ranked == labels[:, None], axis=-1)))
    _echo(f"model      {args.pretrained}")
    _echo(f"data       {_printable(args.data)}: {len(files)} images")
    _echo(f"top-5 accuracy: {top5 / len(files):.4f}")
    _echo(f"test accuracy: {top1 / len(files):.4f}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from . import checkpoint, presets
    from .plan import format_plan, plan_training

    try:
        config = presets.resolve_model(
            args.model,
            num_classes=args.num_classes,
            data_channels=args.channels,
            image_size=None if args.image_size is None else tuple(args.image_size),
        )
        presets.check_input_size(config)
    except presets.ConfigError as e:
        raise UsageError(str(e)) from None
    result = plan_training(
        config,
        args.batch_size,
        precisions=args.precision or tuple(COMPUTE_DTYPES),
        remats=args.remat or tuple(REMAT),
    )
    _echo(format_plan(result))
    if args.json:
        record = dataclasses.asdict(result)
        record["train_flops"] = result.train_flops
        for row, m in zip(record["memory"], result.memory, strict=True):
            row["total"] = m.total
        with checkpoint.atomic_write(args.json, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
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
    "plan": cmd_plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `eqx-vision` with `argv` (default: `sys.argv[1:]`); returns the exit code.

    Bad input is reported as one line on stderr, with exit code 2; a training loss that
    becomes NaN or infinite, with exit code 1.
    """
    try:
        args = build_parser().parse_args(argv)
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
