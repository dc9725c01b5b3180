"""The settings of `fit`, its callbacks and its result."""

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import numpy as np
import optax
from jaxtyping import PyTree

from ..layers import REMAT
from ..precision import COMPUTE_DTYPES
from ._recipe import Mixup


# The largest seed: `jax.random.key` keeps the low 32 bits of a seed (without x64).
MAX_SEED = 2**32 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of [`fit`][eqx_vision.training.fit].

    **Arguments:**

    - `epochs`: passes over the training split.
    - `batch_size`: the global batch size (a multiple of the devices of `parallel`); a
      final incomplete batch of each epoch is left out.
    - `learning_rate`: the peak learning rate of AdamW.
    - `weight_decay`: AdamW's decoupled weight decay.
    - `warmup_epochs`: the linear warm-up from 0 before the cosine decay to 0, in epochs
      (see [`make_optimizer`][eqx_vision.training.make_optimizer]; gradients are clipped
      to norm `clip_norm`, 1 by default).
    - `seed`: the seed of the data order (from the seed and the epoch) and of the dropout
      keys (from the seed and the step). The model's initial weights are the caller's:
      `eqx-vision train` builds them from `jr.fold_in(jr.key(seed), 0)`.
    - `precision`: the compute dtype, `"float32"` or `"bfloat16"` (parameters, gradients
      and optimizer state stay float32; see the [mixed precision guide](../precision.md)).
    - `remat`: what the backward pass keeps of each block of the model, one of
      `"linear"`, `"inputs"`, `"all"` (see
      [`remat`][eqx_vision.remat]); `None` keeps the model's
      own. Results are the same whatever the choice, so it may change when resuming.
    - `skip_non_finite`: how many consecutive steps with NaN or infinite gradients to
      skip (parameters, state and optimizer state kept as they were) before the run
      stops; `0`, the default, stops at the first (see
      [`make_optimizer`][eqx_vision.training.make_optimizer], whose optimizer state
      changes structure when it is positive). The skipped steps are counted in the
      metrics (`skipped_steps`).
    - `selective_decay`: weight decay only on the weights (matrices and kernels), none on
      biases, norms, position embeddings, tokens and LayerScale (see
      [`weight_decay_mask`][eqx_vision.training.weight_decay_mask]); `False`, the default,
      decays every parameter.
    - `layer_decay`: layer-wise learning-rate decay in `(0, 1]` (see
      [`layer_decay_scales`][eqx_vision.training.layer_decay_scales]); `None` for none.
    - `freeze`: keep the embeddings and the first `freeze` blocks fixed (see
      [`frozen_mask`][eqx_vision.training.frozen_mask]); `0`, the default, trains every
      parameter. At most the model's number of blocks, checked by `fit`.

    The training recipe of DeiT and big_vision (see
    [`loss_fn`][eqx_vision.training.loss_fn] and
    [`make_optimizer`][eqx_vision.training.make_optimizer]), all off by default:

    - `label_smoothing`: smooth the targets as timm does, in `[0, 1)` (DeiT: 0.1).
    - `mixup`, `cutmix`: the `alpha` of mixup's and cutmix's `Beta(alpha, alpha)`; `0`
      for none (DeiT: 0.8 and 1.0). See [`Mixup`][eqx_vision.training.Mixup].
    - `mix_prob`: the probability that a batch is mixed at all (timm's default 1.0).
    - `switch_prob`: with both mixup and cutmix on, the probability of cutmix for a batch
      (timm's default 0.5).
    - `accumulate`: average the gradients of this many batches into one optimizer
      update (`optax.MultiSteps`): the effective batch is `accumulate * batch_size`, the
      learning-rate schedule counts updates (`steps // accumulate`), and `warmup_epochs`
      stay epochs. BatchNorm's statistics are still those of each batch.
    - `clip_norm`: clip the gradients to this global norm; `None` or `0` for none
      (default 1.0).
    - `ema_decay`: keep an exponential moving average of the weights with this decay in
      the optimizer state (saved and resumed with it; see
      [`ema_model`][eqx_vision.training.ema_model]); `None` for none.
    - `eval_ema`: evaluate the moving average after each epoch instead of the trained
      weights (needs `ema_decay`): `test_loss`, `test_accuracy` and `test_top5` are then
      the average's, and `raw_test_*` the trained weights'.

    A warm-up longer than the run is a warm-up over the whole run. Every number is checked
    at construction: `seed` must be in `0 .. 2**32 - 1` (what `jax.random.key` keeps of a
    seed), the learning rate and weight decay at most float32's largest value.
    """

    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    seed: int = 0
    precision: str = "float32"
    remat: str | None = None
    skip_non_finite: int = 0
    selective_decay: bool = False
    layer_decay: float | None = None
    freeze: int = 0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    accumulate: int = 1
    clip_norm: float | None = 1.0
    ema_decay: float | None = None
    eval_ema: bool = False

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("skip_non_finite", 0),
                          ("freeze", 0), ("accumulate", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be in 0 .. {MAX_SEED}; got {self.seed}.")
        for name in ("learning_rate", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number; got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number; got {value!r}.")
            if name != "warmup_epochs" and float(value) > _FLOAT32_MAX:
                raise ValueError(
                    f"{name} must be at most {_FLOAT32_MAX:.4g} (float32's largest value); "
                    f"got {value!r}."
                )
        if self.precision not in COMPUTE_DTYPES:
            raise ValueError(
                f"precision must be {' or '.join(COMPUTE_DTYPES)}; got {self.precision!r}."
            )
        if self.remat is not None and self.remat not in REMAT:
            raise ValueError(f"remat must be {' or '.join(REMAT)}; got {self.remat!r}.")
        if not isinstance(self.selective_decay, bool):
            raise ValueError(f"selective_decay must be a bool; got {self.selective_decay!r}.")
        decay = self.layer_decay
        if decay is not None and (
            isinstance(decay, bool)
            or not isinstance(decay, numbers.Real)
            or not 0 < decay <= 1  # NaN fails too
        ):
            raise ValueError(f"layer_decay must be None or a number in (0, 1]; got {decay!r}.")
        self._check_recipe()

    def _check_recipe(self) -> None:
        def number(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, numbers.Real)

        for name, low, high, closed in (("label_smoothing", 0, 1, False), ("mix_prob", 0, 1, True),
                                        ("switch_prob", 0, 1, True)):  # fmt: skip
            value = getattr(self, name)
            if not number(value) or not (low <= value <= high if closed else low <= value < high):
                interval = f"[{low}, {high}]" if closed else f"[{low}, {high})"
                raise ValueError(f"{name} must be a number in {interval}; got {value!r}.")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{name} must be a non-negative number (Beta's alpha; 0 for none); got "
                    f"{value!r}."
                )
        clip = self.clip_norm
        if clip is not None and (not number(clip) or not math.isfinite(clip) or clip < 0):
            raise ValueError(f"clip_norm must be None or a non-negative number; got {clip!r}.")
        decay = self.ema_decay
        if decay is not None and (not number(decay) or not 0 <= decay < 1):
            raise ValueError(f"ema_decay must be None or a number in [0, 1); got {decay!r}.")
        if not isinstance(self.eval_ema, bool):
            raise ValueError(f"eval_ema must be a bool; got {self.eval_ema!r}.")
        if self.eval_ema and decay is None:
            raise ValueError("eval_ema evaluates the moving average of the weights: set ema_decay.")

    def mixing(self) -> Mixup | None:
        """The [`Mixup`][eqx_vision.training.Mixup] of these settings, or `None` if they
        mix nothing."""
        mixup = Mixup(float(self.mixup), float(self.cutmix), float(self.mix_prob),
                      float(self.switch_prob))  # fmt: skip
        return mixup if mixup.enabled else None

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON object (as saved in `config.json`)."""
        return dataclasses.asdict(self)

    def changes_from(self, saved: Mapping[str, Any]) -> list[str]:
        """How these settings differ from saved ones (a `to_json()`, e.g. the
        `train_config` of a run's `config.json`), as `"name=saved, not now"` strings; a
        setting the saved ones lack counts as its default, and `remat`, which does not
        change the results, is left out."""
        changed = []
        for field in dataclasses.fields(self):
            if field.name == "remat":
                continue
            now, before = getattr(self, field.name), saved.get(field.name, field.default)
            if before != now or isinstance(before, bool) != isinstance(now, bool):
                changed.append(f"{field.name}={before!r}, not {now!r}")
        return changed


@dataclasses.dataclass(frozen=True)
class FitInfo:
    """What [`fit`][eqx_vision.training.fit] is about to do, passed to
    [`Callback.on_fit_start`][eqx_vision.training.Callback.on_fit_start]."""

    epochs: int
    steps_per_epoch: int
    start_epoch: int  # epochs already done: 0, or the checkpoint's epoch when resuming
    step: int  # steps already done
    batch_size: int
    num_train: int
    num_test: int
    num_params: int
    num_devices: int
    compute_dtype: str
    out: str | None
    resumed: bool


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One training step of [`fit`][eqx_vision.training.fit], passed to
    [`Callback.on_step`][eqx_vision.training.Callback.on_step]."""

    epoch: int
    step: int  # steps done, this one included
    loss: float | None  # the latest loss read: the previous step's (None at first)
    images_per_second: float  # in this epoch so far
    compile_seconds: float | None  # set for the step that compiled (the first)


class Callback:
    """Hooks that [`fit`][eqx_vision.training.fit] calls as it runs: subclass it and
    override the ones you need (each does nothing by default). `eqx-vision train` draws
    its progress bar and prints its per-epoch lines with one.

    `on_step` and `on_epoch_end` may return `True` to stop the run: `fit` then stops
    before the next training step (an epoch that has just ended is still evaluated and
    saved) and returns with `stopped=True`, as if the process had been killed there.
    """

    def on_fit_start(self, info: FitInfo) -> None:
        """Called once, after the model is ready (built or resumed), before any step."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of each epoch (numbered from 1)."""

    def on_step(self, info: StepInfo) -> bool | None:
        """Called after each training step (the step is dispatched, not necessarily
        finished: the losses are read one step behind)."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> bool | None:
        """Called after each epoch's evaluation and checkpoint, with its metrics (the
        line written to `metrics.jsonl`)."""


class _EpochFunction(Callback):
    def __init__(self, fn: Callable[[dict[str, Any]], bool | None]):
        self.fn = fn

    def on_epoch_end(self, metrics: dict[str, Any]) -> bool | None:
        return self.fn(metrics)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What [`fit`][eqx_vision.training.fit] returns.

    - `model`, `state`, `opt_state`: after the last step.
    - `metrics`: one dict per epoch of the whole run (the earlier ones of a resumed run
      included): `epoch`, `step`, `train_loss`, `test_loss`, `test_accuracy`,
      `test_top5`, `learning_rate`, `epoch_seconds`, `images_per_second`,
      `skipped_steps`; with `TrainConfig.ema_decay`, `eval_weights` (`"ema"` or
      `"model"`: which weights the test metrics are of) and, with `eval_ema`,
      `raw_test_loss`, `raw_test_accuracy`, `raw_test_top5` (the trained weights').
    - `epoch`, `step`: the epochs and steps done.
    - `test_loss`, `test_accuracy`: after the last epoch (`nan` if a stopped run has
      finished none).
    - `best_accuracy`, `best_epoch`: the best test accuracy of any epoch, and its epoch.
    - `stopped`: whether a callback stopped the run before its last epoch.
    - `compile_seconds`, `train_seconds`, `images_seen`: timing of this call: the first
      step (which compiles), the other steps, and the images they trained on.
    - `skipped_steps`: the steps of the whole run skipped for non-finite gradients (with
      `TrainConfig.skip_non_finite`).
    """

    model: PyTree
    state: eqx.nn.State
    opt_state: optax.OptState
    metrics: list[dict[str, Any]]
    epoch: int
    step: int
    test_loss: float
    test_accuracy: float
    best_accuracy: float
    best_epoch: int
    stopped: bool
    compile_seconds: float
    train_seconds: float
    images_seen: int
    skipped_steps: int = 0
