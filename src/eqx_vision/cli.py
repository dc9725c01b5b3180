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
    "label_smoothing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mix_prob": 1.0,
    "switch_prob": 0.5,
    "accumulate": 1,
    "clip_norm": 1.0,
    "ema": None,
    "eval_ema": False,
    "loader": "auto",
    "randaugment": "none",
    # None: the --init model's data configuration's, else INPUT_DEFAULTS'
    "mean": None,
    "std": None,
    "crop_pct": None,
    "interpolation": None,
}
SETTINGS = tuple(DEFAULTS)
# Settings a run saved by an earlier version may lack, with the value it was trained with:
# their defaults, but for the loader (earlier runs read their data into memory).
_LATER = (
    "precision",
    "skip_non_finite",
    "init",
    "layer_decay",
    "freeze",
    "label_smoothing",
    "mixup",
    "cutmix",
    "mix_prob",
    "switch_prob",
    "accumulate",
    "clip_norm",
    "ema",
    "eval_ema",
    "randaugment",
    "mean",
    "std",
    "crop_pct",
    "interpolation",
)
LATER_SETTINGS: dict[str, Any] = {**{k: DEFAULTS[k] for k in _LATER}, "loader": "memory"}
LOADERS = ("auto", "memory", "stream")
# How the images of a run are prepared, recorded in its data facts ("data" in config.json
# and the checkpoint; crop_pct and interpolation for streamed folders only), with the values
# of a run that records none.
INPUT_DEFAULTS: dict[str, Any] = {
    "mean": [0.5],
    "std": [0.5],
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
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
        names = {"PIL": "pillow", "orbax": "orbax-checkpoint"}
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]; got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]; got {text!r}")
    return value


_layer_decay = _crop_pct = _fraction


def _unit_number(text: str, closed: bool) -> float:
    interval = "[0, 1]" if closed else "[0, 1)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}; got {text!r}") from None
    if not (0 <= value <= 1 if closed else 0 <= value < 1):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in {interval}; got {text!r}")
    return value


def _probability(text: str) -> float:
    return _unit_number(text, closed=True)


def _below_one(text: str) -> float:
    return _unit_number(text, closed=False)


def _image_size(text: str) -> list[int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW; got {text!r}") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes; got {text!r}")
    return values * (3 - len(values))


def _channel_values(text: str, positive: bool) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one number, or three comma-separated (R,G,B); got {text!r}"
        ) from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected one number, or three comma-separated (R,G,B); got {text!r}"
        )
    if positive and min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers; got {text!r}")
    return values


def _mean(text: str) -> list[float]:
    return _channel_values(text, positive=False)


def _std(text: str) -> list[float]:
    return _channel_values(text, positive=True)


def _randaugment(text: str) -> str:
    """A RandAugment spec as `data.RandAugment.from_spec` reads it, written out in full
    (`rand-m9-n2-mstd0.5-inc1`), or `none`."""
    if text.strip().lower() == "none":
        return "none"
    from .data import RandAugment

    try:
        return RandAugment.from_spec(text).spec
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    plan.add_argument(
        "--fsdp",
        type=_positive_int,
        metavar="N",
        help="plan N devices of --batch-size images each, the parameters and optimizer state "
        "sharded over them (the devices need not exist; default: one device)",
    )
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
        "--randaugment",
        type=_randaugment,
        metavar="SPEC|none",
        help="RandAugment on the streamed training images after the crop and flip, as "
        "timm's configuration string: m<magnitude>, n<ops per image>, mstd<magnitude "
        "deviation>, p<probability of each op>, inc<0|1> joined by '-'; a section left out "
        "takes DeiT's value (m9-n2-mstd0.5 is DeiT's rand-m9-mstd0.5-inc1); saved with the "
        "run (default: none)",
    )
    train.add_argument(
        "--mean",
        type=_mean,
        metavar="R,G,B|V",
        help="the per-channel mean that the 0..1 pixels are normalised by (one value for "
        "every channel); saved with the run (default: the --init model's, else 0.5)",
    )
    train.add_argument(
        "--std",
        type=_std,
        metavar="R,G,B|V",
        help="the per-channel standard deviation, as --mean (default: the --init model's, "
        "else 0.5)",
    )
    train.add_argument(
        "--crop-pct",
        type=_crop_pct,
        metavar="F",
        help="evaluation of a streamed folder: resize the shorter side to size / F, then "
        "crop the centre (default: the --init model's, else 0.875)",
    )
    train.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        help="how a streamed folder's images are resized (training crops and evaluation) "
        "(default: the --init model's, else bilinear)",
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
    _add_recipe(train)
    train.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/<model>-<date>-<time>)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings "
        "(a run stopped before its first checkpoint starts again from the beginning)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="STEPS",
        help="also save the training state every STEPS steps within an epoch (into "
        "--out/checkpoints, in the background; besides the one at every epoch's end), so "
        "a killed run loses at most STEPS steps",
    )
    train.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=2,
        metavar="K",
        help="keep the last K training checkpoints, and the best epoch's (default: 2)",
    )
    train.add_argument(
        "--log-every",
        type=_positive_int,
        metavar="STEPS",
        help="also record the training loss, learning rate and images/s every STEPS steps "
        "in metrics.jsonl (besides each epoch's record)",
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as a TensorBoard log into --out/tensorboard (needs "
        "the tensorboardX package)",
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
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the parameters and optimizer state over the devices instead of "
        "replicating them (fully sharded data parallelism)",
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


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    """The training recipe's flags of `train` (DeiT's: --mixup 0.8 --cutmix 1.0
    --label-smoothing 0.1), each saved with the run."""
    group = parser.add_argument_group("training recipe (saved with the run)")
    group.add_argument(
        "--label-smoothing",
        type=_below_one,
        metavar="S",
        help="smooth the targets as timm does: S/classes for every class, 1-S more for the "
        "labelled one; S in [0, 1) (default: 0)",
    )
    group.add_argument(
        "--mixup",
        type=_non_negative_float,
        metavar="ALPHA",
        help="mixup: blend each batch with itself flipped, with a weight drawn from "
        "Beta(ALPHA, ALPHA) per batch (default: 0, none)",
    )
    group.add_argument(
        "--cutmix",
        type=_non_negative_float,
        metavar="ALPHA",
        help="cutmix: paste a box of the flipped batch, its area drawn from Beta(ALPHA, "
        "ALPHA) per batch (default: 0, none)",
    )
    group.add_argument(
        "--mix-prob",
        type=_probability,
        metavar="P",
        help="the probability that a batch is mixed at all (default: 1)",
    )
    group.add_argument(
        "--switch-prob",
        type=_probability,
        metavar="P",
        help="with both --mixup and --cutmix, the probability of cutmix for a batch (default: 0.5)",
    )
    group.add_argument(
        "--accumulate",
        type=_positive_int,
        metavar="K",
        help="average the gradients of K batches into one optimizer update (an effective "
        "batch of K x --batch-size; the schedule counts updates) (default: 1)",
    )
    group.add_argument(
        "--clip-norm",
        type=_non_negative_float,
        metavar="NORM",
        help="clip the gradients to this global norm; 0 for no clipping (default: 1)",
    )
    group.add_argument(
        "--ema",
        type=_below_one,
        metavar="DECAY",
        help="keep a moving average of the weights, ema = DECAY * ema + (1 - DECAY) * "
        "weights after each update, in the optimizer state (e.g. 0.9999; default: none)",
    )
    group.add_argument(
        "--eval-ema",
        action="store_true",
        default=None,
        help="evaluate the moving average of --ema after each epoch (the trained weights' "
        "metrics are recorded too)",
    )


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
    evaluate.add_argument(
        "--crop-pct",
        type=_crop_pct,
        metavar="F",
        help="a streamed folder: resize the shorter side to size / F, then crop the centre "
        "(default: as the checkpoint was trained, else 0.875)",
    )
    evaluate.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        help="how a streamed folder's images are resized (default: as the checkpoint was "
        "trained, else bilinear)",
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.add_argument("--devices", type=_positive_int, metavar="N")
    evaluate.add_argument(
        "--confusion",
        metavar="PATH.png",
        help="write the confusion matrix as a picture (rows: true class, columns: predicted "
        "class) and its counts beside it, as PATH.csv and PATH.json",
    )
    evaluate.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the moving average of the weights that a run trained with --ema keeps "
        "in its checkpoint, or (--no-ema) the trained weights (default: as the run evaluated "
        "them: the average with --eval-ema)",
    )
    _add_distributed(evaluate)


def _add_predict_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="write a training checkpoint as a safetensors file",
        description="Write the model (and its state) of one of a run's training checkpoints "
        "(--out/checkpoints) as a .safetensors file, which `evaluate` and `predict` read "
        "with --checkpoint FILE.",
    )
    export.add_argument("--checkpoint", required=True, metavar="DIR", help="a run's --out folder")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--step", type=_positive_int, help="the checkpoint of this step")
    which.add_argument(
        "--best", action="store_true", help="the epoch checkpoint of the best test accuracy"
    )
    export.add_argument("output", metavar="FILE", help="the .safetensors file to write")

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


def _model_data(
    raw: Any,
    config: Any,
    workers: int,
    inputs: dict[str, Any] | None = None,
    randaugment: str = "none",
) -> Any:
    """What `fit` and `evaluate` read: the in-memory data prepared for the model, or a
    stream of the folder's files (decoded in `workers` processes), whose first batch is
    decoded here, so that a folder of unreadable images is refused before anything is
    written. `inputs` (`_input_facts`) gives the normalisation (both) and the evaluation's
    crop fraction and interpolation (streamed); `randaugment` a spec or `none` (streamed)."""
    import dataclasses

    from . import data as data_mod

    inputs = {**INPUT_DEFAULTS, **(inputs or {})}
    if not isinstance(raw, data_mod.ImageFolder):
        prepared = data_mod.prepare(raw, channels=config.channels, image_size=config.image_size)
        return dataclasses.replace(
            prepared,
            train_images=_renormalized(prepared.train_images, inputs["mean"], inputs["std"]),
            test_images=_renormalized(prepared.test_images, inputs["mean"], inputs["std"]),
        )
    augment = data_mod.Augment(
        interpolation=inputs["interpolation"],
        randaugment=None if randaugment == "none" else data_mod.RandAugment.from_spec(randaugment),
    )
    stream = data_mod.StreamingData(
        raw, image_size=tuple(config.image_size), channels=config.channels, workers=workers,
        augment=augment, crop_pct=inputs["crop_pct"], eval_interpolation=inputs["interpolation"],
        mean=tuple(inputs["mean"]), std=tuple(inputs["std"]),
    )  # fmt: skip
    try:
        check = dataclasses.replace(stream, workers=0)
        next(iter(check.train_batches(0, min(8, raw.num_train), seed=0)))
    except data_mod.DataError as e:
        raise UsageError(_printable(str(e))) from None
    return stream


def _renormalized(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Images normalised to -1..1 (as the in-memory data and `data.load_image` are),
    normalised by `mean` and `std` instead."""
    import numpy as np

    if all(v == 0.5 for v in (*mean, *std)):
        return images
    mean_ = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std_ = np.asarray(std, np.float32).reshape(-1, 1, 1)
    return (((images * np.float32(0.5) + np.float32(0.5)) - mean_) / std_).astype(np.float32)


def _input_facts(
    sources: Sequence[tuple[dict[str, Any] | None, Any]], channels: int, streamed: bool = True
) -> dict[str, Any]:
    """How the images are prepared: each entry of `INPUT_DEFAULTS` from the first of
    `sources` (pairs `(values, where)`: the flags, the --init model's, a saved run's) whose
    values have it (not None), else its default; checked, a bad one named by
    `where(name)`. `crop_pct` and `interpolation` only for a `streamed` folder."""
    facts = {}
    for name, default in INPUT_DEFAULTS.items():
        if not streamed and name in ("crop_pct", "interpolation"):
            continue
        value, where = default, name
        for values, describe in sources:
            if values and values.get(name) is not None:
                value, where = values[name], describe(name)
                break
        if isinstance(value, tuple):
            value = list(value)
        problem = _setting_problem(name, value)
        if problem:
            raise UsageError(f"{where} {problem}; got {_short(value)}")
        if name in ("mean", "std") and len(value) not in (1, channels):
            raise UsageError(
                f"{where} has {len(value)} values for the model's {channels}-channel input: "
                f"give one value or {channels}"
            )
        facts[name] = value
    return facts


def _parallel(devices: int | None, fsdp: bool = False):
    from .training import DataParallel

    try:
        return DataParallel.create(devices, fsdp=fsdp)
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
    if name == "label_smoothing":
        ok = _is_number(value) and 0 <= value < 1
        return None if ok else "must be a number in [0, 1)"
    if name == "ema":
        ok = value is None or (_is_number(value) and 0 <= value < 1)
        return None if ok else "must be null or a number in [0, 1)"
    if name in ("mixup", "cutmix", "clip_norm"):
        ok = _is_number(value) and math.isfinite(value) and value >= 0
        return None if ok else "must be a non-negative number"
    if name in ("mix_prob", "switch_prob"):
        return None if _is_number(value) and 0 <= value <= 1 else "must be a number in [0, 1]"
    if name == "accumulate":
        return None if _is_int(value) and value >= 1 else "must be a positive integer"
    if name == "eval_ema":
        return None if isinstance(value, bool) else "must be true or false"
    if name == "loader":
        return None if value in LOADERS else f"must be {', '.join(LOADERS)}"
    if name == "randaugment":
        try:
            ok = isinstance(value, str) and _randaugment(value) is not None
        except argparse.ArgumentTypeError:
            ok = False
        return None if ok else "must be none or a RandAugment spec such as m9-n2-mstd0.5"
    if name in ("mean", "std"):
        ok = value is None or (
            isinstance(value, list)
            and len(value) in (1, 3)
            and all(_is_number(v) and math.isfinite(v) and (name == "mean" or v > 0)
                    for v in value)
        )  # fmt: skip
        what = "numbers" if name == "mean" else "positive numbers"
        return None if ok else f"must be null or a list of one or three {what}"
    if name == "crop_pct":
        ok = value is None or (_is_number(value) and 0 < value <= 1)
        return None if ok else "must be null or a number in (0, 1]"
    if name == "interpolation":
        ok = value is None or value in INTERPOLATIONS
        return None if ok else f"must be null or one of {', '.join(INTERPOLATIONS)}"
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


def _train_inputs(
    settings: dict[str, Any],
    raw: Any,
    config: Any,
    init_inputs: dict[str, Any] | None,
    saved_data: dict[str, Any] | None,
    where: str,
) -> dict[str, Any]:
    """How a run's images are prepared (`_input_facts`): its flags, else the --init model's,
    else (resuming) the saved run's, else the defaults; the streamed-only settings refused
    for data read into memory."""
    from . import data as data_mod

    streamed = isinstance(raw, data_mod.ImageFolder)
    if not streamed:
        shown = _printable(settings["data"])
        if settings["randaugment"] != "none":
            raise UsageError(
                f"--randaugment augments streamed folders (--loader stream); {shown} is read "
                "into memory, without augmentation"
            )
        for name in ("crop_pct", "interpolation"):
            if settings[name] is not None:
                raise UsageError(
                    f"{_flag(name)} applies to streamed folders (--loader stream); {shown} is "
                    "read into memory, squashed to size"
                )
    init = _printable(str(settings["init"]))
    sources = [
        (settings, _flag),
        (init_inputs, lambda name: f"--init {init}: its {name}"),
        (saved_data, lambda name: f"{where}: data.{name}"),
    ]
    return _input_facts(sources, config.channels, streamed=streamed)


def _recipe_config(settings: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The `TrainConfig` arguments of the training recipe's settings, checked together."""
    if settings["eval_ema"] and settings["ema"] is None:
        raise UsageError("--eval-ema evaluates the moving average of --ema: give --ema DECAY")
    steps = settings["epochs"] * steps_per_epoch
    if settings["accumulate"] > steps:
        raise UsageError(
            f"--accumulate {settings['accumulate']} is more than the run's {steps} steps "
            f"({settings['epochs']} epoch(s) of {steps_per_epoch}): no update would be made"
        )
    return {
        "label_smoothing": float(settings["label_smoothing"]),
        "mixup": float(settings["mixup"]),
        "cutmix": float(settings["cutmix"]),
        "mix_prob": float(settings["mix_prob"]),
        "switch_prob": float(settings["switch_prob"]),
        "accumulate": settings["accumulate"],
        "clip_norm": float(settings["clip_norm"]),
        "ema_decay": None if settings["ema"] is None else float(settings["ema"]),
        "eval_ema": settings["eval_ema"],
    }


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
    # How --init's images were prepared, and the data facts of the run resumed (and where).
    init_inputs = saved_data = None
    where = ""
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
    saved_steps = training.checkpoint_steps(out) if os.path.isdir(out) else []
    from_checkpoint = saved_json is not None and (os.path.isfile(ckpt_path) or bool(saved_steps))
    has_export = from_checkpoint and os.path.isfile(ckpt_path)
    header = _read_checkpoint_header(ckpt_path) if has_export else None
    if saved_json is not None:
        config = _model_config(saved_json.get("model_config"), config_path)
        # The data the run last trained on: the checkpoint's, else config.json's.
        if header is not None and "data" in header["training"]:
            saved_data, where = _entry(header["training"], "data", ckpt_path), ckpt_path
        else:
            saved_data, where = _entry(saved_json, "data", config_path), config_path
        _check_same_data(saved_data, data_info, where, args.allow_changed_data)
        if not from_checkpoint and settings["init"] is not None:
            # a fine-tuning run stopped before its first checkpoint starts again from --init
            config, initial, init_inputs = _initial_model(settings, raw)
    elif settings["init"] is not None:
        if args.model is not None:
            raise UsageError(
                "--init and --model do not go together: the architecture is the initial model's"
            )
        config, initial, init_inputs = _initial_model(settings, raw)
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
    data_info.update(_train_inputs(settings, raw, config, init_inputs, saved_data, where))
    parallel = _parallel(args.devices, args.fsdp)
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
            **_recipe_config(settings, num_train // batch_size),
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
        if (
            os.path.isfile(ckpt_path)
            or saved_steps
            or (os.path.exists(os.path.join(out, METRICS)) and not os.path.exists(config_path))
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

    ds = _model_data(raw, config, _workers(args), data_info, settings["randaugment"])
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
        + ("" if settings["randaugment"] == "none" else f", {settings['randaugment']}")
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
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            log_every=args.log_every,
            tensorboard=args.tensorboard,
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


def _initial_model(
    settings: dict[str, Any], raw: Any
) -> tuple[Any, tuple[Any, Any], dict[str, Any]]:
    """`(config, (model, state), inputs)` of `--init`: a pretrained timm model or a
    checkpoint's, with a new head for the data's classes (drawn from the seed), resized to
    `--image-size`, and how its images were prepared (the timm data configuration's or the
    checkpoint's mean, std, crop_pct and interpolation, those it records); every failure is
    a `UsageError` naming `--init`."""
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
        inputs = {name: getattr(data_config, name) for name in INPUT_DEFAULTS}
    else:
        path = _checkpoint_path(spec)
        header = _read_checkpoint_header(path)
        source = _model_config(header["model_config"], path)
        loaded = _load_checkpoint(path, source)
        model, state = loaded.model, loaded.state
        source_size, arch, channels = source.image_size, source.model, source.channels
        inputs = _entry(header["training"], "data", f"{path}: training")
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
    return config, (model, state), {name: inputs.get(name) for name in INPUT_DEFAULTS}


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
            self.position = 0
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
            # A run resumed from a checkpoint within an epoch starts at its position.
            self.position = info.step - info.start_epoch * info.steps_per_epoch
            if info.resumed and self.position:
                _echo(
                    f"resuming at step {info.step} (step {self.position} of epoch "
                    f"{info.start_epoch + 1})"
                )
            elif info.resumed:
                _echo(f"resuming after epoch {info.start_epoch} (step {info.step})")

        def on_epoch_start(self, epoch: int) -> None:
            self.epoch_start = time.perf_counter()
            compiling = "" if self.compiled else " (compiling)"
            position, self.position = self.position, 0
            self.bar = tqdm(
                total=self.steps,
                initial=position,
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


def _evaluation_inputs(
    args: argparse.Namespace, raw: Any, config: Any, data_meta: dict[str, Any], ckpt_path: str
) -> dict[str, Any]:
    """How `evaluate` prepares the images: as the checkpoint's data facts record (the
    defaults for a checkpoint that records none), the crop fraction and interpolation of a
    streamed folder as the flags say."""
    from . import data as data_mod

    streamed = isinstance(raw, data_mod.ImageFolder)
    flags = {"crop_pct": args.crop_pct, "interpolation": args.interpolation}
    for name, value in flags.items():
        if value is not None and not streamed:
            raise UsageError(
                f"{_flag(name)} applies to streamed folders (--loader stream); "
                f"{_printable(raw.source)} is read into memory, squashed to size"
            )
    sources = [(flags, _flag), (data_meta, lambda name: f"{ckpt_path}: data.{name}")]
    return _input_facts(sources, config.channels, streamed=streamed)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.confusion is not None:
        if args.pretrained:
            raise UsageError("--confusion goes with --checkpoint, not --pretrained")
        if not args.confusion.lower().endswith(".png") or args.confusion.lower() == ".png":
            raise UsageError(f"--confusion expects a .png path; got {_short(args.confusion)}")
        if os.path.isdir(args.confusion):
            raise UsageError(f"--confusion {args.confusion} is a folder; expected a .png path")
        _require("evaluate --confusion", ["matplotlib"])
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
    inputs = _evaluation_inputs(args, raw, config, data_meta, ckpt_path)
    parallel = _parallel(args.devices)
    ckpt = _load_checkpoint(ckpt_path, config)
    use_ema = args.ema
    if use_ema is None:
        use_ema = isinstance(saved_settings, dict) and saved_settings.get("eval_ema") is True
    weights = _ema_weights(ckpt_path, ckpt.model) if use_ema else ckpt.model
    ds = _model_data(raw, config, _workers(args), inputs)
    model, state = parallel.replicate((weights, ckpt.state))
    batch_size = max(parallel.num_devices, args.batch_size - args.batch_size % parallel.num_devices)
    result = training.evaluate_details(
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
    if use_ema:
        _echo("weights    the moving average of the weights (--ema)")
    written = None
    if args.confusion is not None and result.confusion is not None and _is_main_process():
        written = _write_confusion(args.confusion, result, class_names)
    _print_per_class(result, class_names, written)
    _echo(f"top-5 accuracy: {result.top_k_accuracy:.4f}")
    _echo(f"test loss: {result.loss:.4f}")
    _echo(f"test accuracy: {result.accuracy:.2f}")
    return 0


def _ema_weights(ckpt_path: str, model: Any) -> Any:
    """`model` with the moving average of its weights that the optimizer state in the
    checkpoint holds (`training.ema_params`: its tensors are named
    `opt_state.<...>.ema.<the model's name of the weight>`)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import safetensors.numpy as st

    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in leaves]
    tensors = st.load_file(ckpt_path)
    ending = ".ema." + names[0]
    prefixes = {
        n[: -len(names[0])] for n in tensors if n.startswith("opt_state.") and n.endswith(ending)
    }
    if len(prefixes) != 1:
        raise UsageError(
            f"{ckpt_path} holds no moving average of the weights (a run trained with --ema "
            "keeps one): evaluate its weights with --no-ema"
        )
    prefix = prefixes.pop()
    values = []
    for name, (_, leaf) in zip(names, leaves, strict=True):
        value = tensors.get(prefix + name)
        if value is None or value.shape != leaf.shape or value.dtype != leaf.dtype:
            found = "none" if value is None else f"{value.dtype}{list(value.shape)}"
            raise UsageError(
                f"{ckpt_path}: the moving average of {name} is {found}; expected "
                f"{leaf.dtype}{list(leaf.shape)}"
            )
        values.append(jnp.asarray(value))
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), static)


# The per-class accuracy `evaluate` prints: every class up to this many, else the worst.
_ALL_CLASSES_UP_TO = 20
_WORST_CLASSES = 10


def _print_per_class(result: Any, class_names: list[str], written: list[str] | None) -> None:
    """Print each class's accuracy (correct / test images): all of them for a few
    classes, else the worst ones."""
    import numpy as np

    if result.confusion is None:
        return
    matrix = result.confusion
    accuracy = result.per_class_accuracy
    order = list(range(len(class_names)))
    title = "per-class accuracy"
    if len(order) > _ALL_CLASSES_UP_TO:
        # The lowest first; classes without test images last.
        ranked = sorted(order, key=lambda i: (np.isnan(accuracy[i]), accuracy[i], i))
        order = ranked[:_WORST_CLASSES]
        where = f"; all in {written[0]}" if written else "; all with --confusion PATH.png"
        title += f" (the {len(order)} lowest of {len(class_names)} classes{where})"
    _echo(f"{title}:")
    names = [_clip(_printable(class_names[i]), 30) for i in order]
    width = max(map(len, names))
    for name, i in zip(names, order, strict=True):
        total = int(matrix[i].sum())
        shown = "     -" if total == 0 else f"{accuracy[i]:.4f}"
        _echo(f"  {name:<{width}}  {shown}  {int(matrix[i, i])}/{total}")
    if written:
        _echo(f"confusion matrix: {', '.join(written)}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_confusion(path: str, result: Any, class_names: list[str]) -> list[str]:
    """Write the confusion matrix of `result` as a picture (`path`, a .png) and as
    numbers beside it (.csv: a header row of the predicted classes, then a row per true
    class; .json: the class names, the matrix and the per-class accuracy). Returns the
    paths written."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .checkpoint import atomic_write

    matrix = np.asarray(result.confusion)
    n = len(class_names)
    stem = path[: -len(".png")]
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    rows = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, matrix / np.maximum(rows, 1), 0.0)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 50:
        labels = [_clip(_printable(c), 20) for c in class_names]
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color,
                            fontsize=8)  # fmt: skip
    ax.set(
        xlabel="predicted class",
        ylabel="true class",
        title=f"confusion matrix ({result.count} images, accuracy {result.accuracy:.4f})",
    )
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    with atomic_write(stem + ".csv", "w") as f:
        f.write(text.getvalue())
    accuracy = [None if np.isnan(a) else float(a) for a in result.per_class_accuracy]
    numbers = {
        "class_names": list(class_names),
        "confusion": matrix.tolist(),
        "rows": "true class",
        "columns": "predicted class",
        "per_class_accuracy": accuracy,
        "count": result.count,
        "accuracy": result.accuracy,
        "top5_accuracy": result.top_k_accuracy,
    }
    with atomic_write(stem + ".json", "w") as f:
        f.write(json.dumps(numbers, indent=1) + "\n")
    return [path, stem + ".csv", stem + ".json"]


def _eval_pixels(path: str, config: Any, inputs: dict[str, Any]) -> Any:
    """One image file as the evaluation of a streamed folder reads it: uint8
    `(channels, height, width)`, resized and centre-cropped as `inputs` say."""
    from . import data as data_mod

    if os.path.isdir(path):
        raise data_mod.DataError(f"expected an image file; {path} is a folder")
    if not os.path.isfile(path):
        raise data_mod.DataError(f"image not found: {path}")
    transform = data_mod.EvalTransform(
        tuple(config.image_size), config.channels, inputs["crop_pct"], inputs["interpolation"]
    )
    return transform((0, 0, path, 0))[0]


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
    # As the checkpoint's evaluation prepared its test images: the centre crop of a
    # streamed folder (whose data facts record the crop fraction), else squashed to size;
    # normalised by the recorded mean and std.
    streamed = "crop_pct" in data_meta
    inputs = _input_facts(
        [(data_meta, lambda name: f"{ckpt_path}: data.{name}")], config.channels, streamed
    )
    images = []
    for path in args.images:
        try:
            if streamed:
                images.append(_eval_pixels(path, config, inputs))
            else:
                image = data_mod.load_image(
                    path, channels=config.channels, image_size=config.image_size
                )
                images.append(_renormalized(image, inputs["mean"], inputs["std"]))
        except data_mod.DataError as e:
            raise UsageError(_printable(str(e))) from None
    ckpt = _load_checkpoint(ckpt_path, config)
    from .training import eval_step

    x = jnp.asarray(np.stack(images))
    state = ckpt.state if ckpt.state is not None else eqx.nn.State(ckpt.model)
    _, _, logits = eval_step(
        ckpt.model, state, x, jnp.zeros(len(x), jnp.int32), precision=precision,
        normalization=(tuple(inputs["mean"]), tuple(inputs["std"])),
    )  # fmt: skip
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
        fsdp=args.fsdp,
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


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model of a run's training checkpoint as a safetensors checkpoint."""
    _require("export", ["safetensors", "orbax"])
    from . import checkpoint, training

    out = args.checkpoint
    config_path = os.path.join(out, CONFIG)
    if not os.path.isfile(config_path):
        raise UsageError(f"{out} is not a run folder: no {CONFIG}")
    config = _model_config(_read_json(config_path).get("model_config"), config_path)
    steps = training.checkpoint_steps(out)
    if not steps:
        raise UsageError(f"{out} holds no training checkpoint ({training.CHECKPOINTS}/)")
    saved = training.TrainingCheckpoints(out, read_only=True)
    try:
        if args.step is not None and args.step not in steps:
            raise UsageError(
                f"{out} holds no checkpoint of step {args.step}; it holds steps "
                f"{', '.join(map(str, steps))}"
            )
        step = args.step or steps[-1]
        if args.best:
            accuracies = {s: saved.metadata(s).get("test_accuracy") for s in steps}
            scored = {s: a for s, a in accuracies.items() if _is_number(a)}
            if not scored:
                raise UsageError(f"{out} holds no checkpoint of an epoch's end")
            step = max(scored, key=lambda s: (scored[s], s))
        restored = saved.restore(step, config.build_like())
    finally:
        saved.close()
    model, state = restored.tree
    meta = restored.meta
    training_meta = {**_entry(meta, "training", f"{out}: step {step}"),
                     "step": step, "epoch": meta.get("epoch")}  # fmt: skip
    if "test_accuracy" in meta:
        training_meta["test_accuracy"] = meta["test_accuracy"]
    try:
        checkpoint.save(args.output, model, state, model_config=config.to_json(),
                        training=training_meta)  # fmt: skip
    except FloatingPointError as e:
        raise UsageError(str(e)) from None
    _echo(f"step {step} (epoch {meta.get('epoch')}) of {out} written to {args.output}")
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
    "export": cmd_export,
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
