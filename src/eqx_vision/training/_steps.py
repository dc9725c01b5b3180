"""The training and evaluation steps, the optimizer, and evaluation over a split."""

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped, UInt8

from ..data import epoch_order, padded_batches
from ..finetune import (
    as_function,
    freeze_updates,
    scale_updates,
)
from ..layers import is_stateful
from ..precision import Precision
from ._parallel import DataParallel
from ._recipe import (
    Mixup,
    confusion_matrix,
    ema_params,
    mix_targets,
    per_class_accuracy,
    smooth_labels,
    soft_cross_entropy,
    top_k_correct,
)


def _first(out: Any) -> Array:
    # LeViT with a distillation head returns `(logits, distill_logits)`.
    return out[0] if isinstance(out, tuple) else out


def apply_model(
    model: PyTree,
    state: eqx.nn.State,
    images: Float[Array, "batch channels height width"],
    *,
    key: PRNGKeyArray | None = None,
    precision: Precision | str = "float32",
) -> tuple[Float[Array, "batch num_classes"], eqx.nn.State]:
    """Run a model over a batch of images.

    **Arguments:**

    - `model`: a model of `eqx_vision` (any module that maps one image to logits).
    - `state`: its `eqx.nn.State` (empty for stateless models).
    - `images`: a batch, channels first.
    - `key`: a `jax.random.key` for dropout in training mode; split into one key per
      example. `None` in inference mode.
    - `precision`: a [`Precision`][eqx_vision.precision.Precision], or `"float32"` or
      `"bfloat16"`: the images are cast to its compute dtype before the model.

    **Returns:** the float32 logits `(batch, num_classes)` (the first output of a model
    with a distillation head) and the updated state (unchanged for stateless models and in
    inference mode).
    """
    policy = Precision.of(precision)
    images = policy.cast_input(images)
    keys = None if key is None else jr.split(key, images.shape[0])
    if is_stateful(model):

        def stateful(x, s, k):
            out, s = model(x, s, key=k)
            return _first(out), s

        logits, state = jax.vmap(
            stateful, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None)
        )(images, state, keys)
    else:
        logits = jax.vmap(lambda x, k: _first(model(x, key=k)))(images, keys)
    return policy.cast_output(logits), state


def loss_fn(
    model: PyTree,
    state: eqx.nn.State,
    images: Float[Array, "batch channels height width"],
    labels: Int[Array, " batch"],
    key: PRNGKeyArray | None = None,
    *,
    precision: Precision | str = "float32",
    label_smoothing: float = 0.0,
    mixup: Mixup | None = None,
) -> tuple[Float[Array, ""], eqx.nn.State]:
    """Mean softmax cross-entropy of a batch, for stateless and stateful models alike.

    **Arguments:** as [`apply_model`][eqx_vision.training.apply_model], plus the integer
    class `labels`. The cross-entropy is computed in float32 whatever the `precision`.

    - `label_smoothing`: smooth the targets as timm does (see
      [`smooth_labels`][eqx_vision.training.smooth_labels]), a Python float in `[0, 1)`.
    - `mixup`: a [`Mixup`][eqx_vision.training.Mixup] to mix the batch's images and
      targets with; it needs `key`, split into the mixing key and the dropout key.

    With both off (the defaults) the loss is the integer-label cross-entropy, exactly as
    without these options; otherwise the
    [`soft_cross_entropy`][eqx_vision.training.soft_cross_entropy] of the smoothed, mixed
    targets.

    **Returns:** the mean loss (a float32 scalar) and the updated state, in the form
    `eqx.filter_value_and_grad(loss_fn, has_aux=True)` expects.
    """
    lam = None
    if mixup is not None and mixup.enabled:
        if key is None:
            raise ValueError("mixup needs a key: pass loss_fn(..., key) (jax.random.key).")
        key, mix_key = jr.split(key)
        images, lam = mixup.mix_images(mix_key, images)
    logits, state = apply_model(model, state, images, key=key, precision=precision)
    logits = logits.astype(jnp.float32)
    if lam is None and not label_smoothing:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, state
    targets = smooth_labels(labels, logits.shape[-1], label_smoothing)
    if lam is not None:
        targets = mix_targets(targets, lam)
    return soft_cross_entropy(logits, targets).mean(), state


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    total_steps: int,
    end_learning_rate: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    clip_norm: float | None = 1.0,
    skip_non_finite: int = 0,
    weight_decay_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    layer_scales: PyTree | Callable[[PyTree], PyTree] | None = None,
    frozen: PyTree | Callable[[PyTree], PyTree] | None = None,
    accumulate: int = 1,
    ema_decay: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with a linear warm-up from 0 and a cosine decay (optax).

    **Arguments:**

    - `learning_rate`: the peak learning rate, reached after `warmup_steps`.
    - `weight_decay`: the decoupled weight decay of AdamW.
    - `warmup_steps`: steps of linear warm-up.
    - `total_steps`: the length of the whole schedule (warm-up included); the rate
      decays to `end_learning_rate` along a half cosine in the remaining steps. With
      `accumulate`, both count optimizer updates (one per `accumulate` batches).
    - `end_learning_rate`: the final rate.
    - `b1`, `b2`: Adam's moment decay rates.
    - `clip_norm`: clip the gradients to this global norm first; `None` or `0` for no
      clipping.
    - `skip_non_finite`: if positive, the whole optimizer is wrapped in
      `optax.apply_if_finite(..., max_consecutive_errors=skip_non_finite)`: an update whose
      gradients hold a NaN or an infinity is skipped (parameters and optimizer state kept),
      up to this many in a row. Its state is then an `optax.ApplyIfFiniteState` around the
      state of the default, `0` (no wrapping). With `accumulate`, it wraps the
      accumulation: a batch of non-finite gradients is left out of the sum, which then
      waits for `accumulate` finite ones.
    - `accumulate`: gradient accumulation, an int >= 1: the whole optimizer is wrapped in
      `optax.MultiSteps(..., every_k_schedule=accumulate)`, which averages the gradients
      of `accumulate` calls and updates once (the other calls give zero updates), so
      `accumulate` batches of `B` images make one update on `accumulate * B` images (but
      for BatchNorm's batch statistics, taken over each batch of `B`). `1`, the default,
      wraps nothing.
    - `ema_decay`: keep an exponential moving average of the parameters in the optimizer
      state, updated after each optimizer update
      ([`ema_params`][eqx_vision.training.ema_params]; read it with
      [`ema_model`][eqx_vision.training.ema_model]); `None`, the default, keeps none.

    For fine-tuning (see the [fine-tuning guide](../finetuning.md)), each a tree of the
    structure of the parameters or a function from the parameters to one:

    - `weight_decay_mask`: which parameters get weight decay (e.g.
      [`weight_decay_mask`][eqx_vision.training.weight_decay_mask]); all by default.
    - `layer_scales`: a factor of each parameter's learning rate, applied to AdamW's
      update and weight decay (e.g.
      [`layer_decay_scales`][eqx_vision.training.layer_decay_scales]; a `(depth,)` array
      along a stacked axis).
    - `frozen`: the parameters whose updates are zero, before the clipping and after
      everything else, so that they keep their values exactly (e.g.
      [`frozen_mask`][eqx_vision.training.frozen_mask]).

    The chain is `freeze_updates(frozen)`, `clip_by_global_norm`,
    `adamw(mask=weight_decay_mask)`, `scale_updates(layer_scales)`,
    `freeze_updates(frozen)`, `ema_params(ema_decay)`, each only when given, inside
    `optax.MultiSteps` (with `accumulate`) inside `optax.apply_if_finite` (with
    `skip_non_finite`).

    **Returns:** an `optax.GradientTransformation`.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}]; got {warmup_steps}."
        )
    schedule = learning_rate_schedule(
        learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_learning_rate=end_learning_rate,
    )
    if isinstance(skip_non_finite, bool) or not isinstance(skip_non_finite, numbers.Integral):
        raise ValueError(f"skip_non_finite must be an int; got {skip_non_finite!r}.")
    if skip_non_finite < 0:
        raise ValueError(f"skip_non_finite must be >= 0; got {skip_non_finite}.")
    if (
        isinstance(accumulate, bool)
        or not isinstance(accumulate, numbers.Integral)
        or accumulate < 1
    ):
        raise ValueError(f"accumulate must be an int >= 1; got {accumulate!r}.")
    if clip_norm is not None and (
        isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) or not clip_norm >= 0
    ):
        raise ValueError(f"clip_norm must be None or a non-negative number; got {clip_norm!r}.")
    # A mask tree of a model's structure is an Equinox module, which optax would call.
    mask = None if weight_decay_mask is None else as_function(weight_decay_mask)
    optimizer = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
    if clip_norm:  # None or 0: no clipping
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    if layer_scales is not None:
        optimizer = optax.chain(optimizer, scale_updates(layer_scales))
    if frozen is not None:
        optimizer = optax.chain(freeze_updates(frozen), optimizer, freeze_updates(frozen))
    if ema_decay is not None:
        optimizer = optax.chain(optimizer, ema_params(ema_decay))
    if accumulate > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=int(accumulate))
        optimizer = optimizer.gradient_transformation()
    if skip_non_finite:
        optimizer = optax.apply_if_finite(optimizer, skip_non_finite)
    return optimizer


def learning_rate_schedule(
    learning_rate: float,
    *,
    warmup_steps: int,
    total_steps: int,
    end_learning_rate: float = 0.0,
) -> optax.Schedule:
    """The schedule of [`make_optimizer`][eqx_vision.training.make_optimizer]: linear warm-up
    from 0 to `learning_rate` over `warmup_steps`, then a cosine decay to
    `end_learning_rate` at `total_steps`."""
    if warmup_steps >= total_steps:  # all warm-up: no room for the decay
        return optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_learning_rate,
    )


def _is_trainable(x: Any) -> bool:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def init_optimizer(optimizer: optax.GradientTransformation, model: PyTree) -> optax.OptState:
    """The optimizer state for the trainable (floating-point array) leaves of `model`.

    For an abstract model (`jax.ShapeDtypeStruct` leaves, e.g. from
    `eqx.filter_eval_shape`), the abstract optimizer state, as `checkpoint.load` needs.
    """
    params = eqx.filter(model, _is_trainable)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        return jax.eval_shape(optimizer.init, params)
    return optimizer.init(params)


Batch = Float[Array, "batch channels height width"] | UInt8[Array, "batch channels height width"]
"""A batch of model-ready float images, or of uint8 pixels normalised inside the step."""

Normalization = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel `(mean, std)` of the 0..1 pixels (one value, or one per channel)."""

DEFAULT_NORMALIZATION: Normalization = ((0.5,), (0.5,))
"""To -1..1, as the in-memory data is prepared (`eqx_vision.data.prepare`)."""


def normalize_images(
    images: Shaped[Array, "batch channels height width"],
    normalization: Normalization | None = None,
) -> Float[Array, "batch channels height width"]:
    """Integer images (uint8, 0..255) to float32 model input: `(x / 255 - mean) / std`
    per channel. Floating-point images, already model input (the in-memory data), are
    returned unchanged.

    **Arguments:**

    - `images`: a batch, channels first.
    - `normalization`: `(mean, std)`; `DEFAULT_NORMALIZATION` (to -1..1) when `None`.
    """
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    mean, std = DEFAULT_NORMALIZATION if normalization is None else normalization
    x = images.astype(jnp.float32) / 255.0
    mean_ = jnp.asarray(mean, jnp.float32).reshape(-1, 1, 1)
    std_ = jnp.asarray(std, jnp.float32).reshape(-1, 1, 1)
    return (x - mean_) / std_


@eqx.filter_jit
def train_step(
    model: PyTree,
    state: eqx.nn.State,
    opt_state: optax.OptState,
    images: Batch,
    labels: Int[Array, " batch"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
    normalization: Normalization | None = None,
    label_smoothing: float = 0.0,
    mixup: Mixup | None = None,
) -> tuple[PyTree, eqx.nn.State, optax.OptState, Float[Array, ""]]:
    """One training step: forward, backward and optimizer update.

    **Arguments:**

    - `model`, `state`: the model and its `eqx.nn.State` (empty for stateless models).
    - `opt_state`: from [`init_optimizer`][eqx_vision.training.init_optimizer].
    - `images`, `labels`: one batch (channels first; integer labels). uint8 images
      (from a streaming pipeline) are normalised here, by `normalization` (see
      [`normalize_images`][eqx_vision.training.normalize_images]).
    - `key`: a `jax.random.key` for this step; each example gets its own dropout key.
      Derive it from the step number (`jr.fold_in(key, step)`) to make a run reproducible.
    - `optimizer`: the `optax.GradientTransformation` (e.g. from
      [`make_optimizer`][eqx_vision.training.make_optimizer]).
    - `parallel`: a [`DataParallel`][eqx_vision.training.DataParallel] to shard the batch
      over; `None` on one device.
    - `precision`: a [`Precision`][eqx_vision.precision.Precision], or `"float32"` (the
      default) or `"bfloat16"`: the dtype of the forward and backward pass. Parameters,
      gradients and optimizer state are float32 in both.
    - `label_smoothing`, `mixup`: the training recipe, as in
      [`loss_fn`][eqx_vision.training.loss_fn]: mixup and cutmix (a
      [`Mixup`][eqx_vision.training.Mixup]) draw from a key split off `key`, after the
      normalisation. Both off by default (the loss is then exactly as without them).

    **Returns:** the updated `(model, state, opt_state)` and the batch's mean loss (for
    mixed or smoothed targets, the loss against them).
    """
    if parallel is not None:
        model, opt_state = parallel.shard_params((model, opt_state))
        state = parallel.replicate(state)
        images, labels = parallel.shard_batch((images, labels))
    images = normalize_images(images, normalization)
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
    (loss, state), grads = grad_fn(
        model, state, images, labels, key, precision=precision,
        label_smoothing=label_smoothing, mixup=mixup,
    )  # fmt: skip
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    if parallel is not None:
        model, opt_state = parallel.shard_params((model, opt_state))
        state = parallel.replicate(state)
    return model, state, opt_state, loss


@eqx.filter_jit
def eval_step(
    model: PyTree,
    state: eqx.nn.State,
    images: Batch,
    labels: Int[Array, " batch"],
    mask: Bool[Array, " batch"] | None = None,
    *,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
    normalization: Normalization | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, "batch num_classes"]]:
    """Evaluate a batch in inference mode (no dropout, BatchNorm running statistics).

    **Arguments:**

    - `model`, `state`: the model and its state; `eqx.nn.inference_mode` is applied here.
    - `images`, `labels`: one batch (uint8 images normalised by `normalization`, as in
      [`train_step`][eqx_vision.training.train_step]).
    - `mask`: which examples count (`False` for padding, e.g. to fill the last batch up
      to a fixed size); all by default.
    - `parallel`: a [`DataParallel`][eqx_vision.training.DataParallel] to shard the batch
      over; `None` on one device.
    - `precision`: a [`Precision`][eqx_vision.precision.Precision], or `"float32"` (the
      default) or `"bfloat16"`: the dtype the model runs in.

    **Returns:** the mean cross-entropy and the accuracy over the counted examples, and the
    float32 logits of the whole batch.
    """
    if parallel is not None:
        model, state = parallel.shard_params(model), parallel.replicate(state)
        images, labels = parallel.shard_batch((images, labels))
        if mask is not None:
            mask = parallel.shard_batch(mask)
    model = eqx.nn.inference_mode(model)
    images = normalize_images(images, normalization)
    logits, _ = apply_model(model, state, images, precision=precision)
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    weights = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / count, (correct * weights).sum() / count, logits


def count_params(model: PyTree) -> int:
    """The number of trainable (floating-point array) values of `model`."""
    return sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )


def batches(
    num_examples: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
) -> Sequence[np.ndarray]:
    """The example indices of each batch of one epoch, shuffled by `(seed, epoch)` alone.

    The order depends on nothing else, so a resumed run sees the same batches as an
    uninterrupted one. With `drop_last`, a final incomplete batch is left out.
    """
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


# --------------------------------------------------------------------------------------
# Evaluation over a whole split, and the training loop


def evaluate(
    model: PyTree,
    state: eqx.nn.State,
    images: Float[np.ndarray | Array, "num channels height width"],
    labels: Int[np.ndarray | Array, " num"],
    *,
    batch_size: int = 256,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in inference mode.

    The split runs in batches of one fixed size, the last one padded and masked (see
    [`eval_step`][eqx_vision.training.eval_step]), so one compiled program serves every
    batch.

    **Arguments:**

    - `model`, `state`: the model and its `eqx.nn.State` (empty for stateless models).
    - `images`, `labels`: the whole split, channels first; numpy or JAX arrays.
    - `batch_size`: examples per batch; rounded down to a multiple of the devices of
      `parallel` (and at least one per device).
    - `parallel`: a [`DataParallel`][eqx_vision.training.DataParallel] to shard each batch
      over; `None` on one device.
    - `precision`: the compute dtype, as in [`eval_step`][eqx_vision.training.eval_step].

    **Returns:** the mean cross-entropy and the accuracy over all examples, as Python
    floats.
    """
    num_devices = 1 if parallel is None else parallel.num_devices
    batch_size = max(num_devices, batch_size - batch_size % num_devices)
    return evaluate_batches(
        model, state, padded_batches(images, labels, batch_size), parallel=parallel,
        precision=precision,
    )  # fmt: skip


def evaluate_batches(
    model: PyTree,
    state: eqx.nn.State,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
    normalization: Normalization | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy over batches `(images, labels, mask)` of one size (the last
    padded, `mask` marking the real rows), as a data set's `test_batches` gives them, in
    inference mode. Arguments as [`evaluate`][eqx_vision.training.evaluate];
    `normalization` for uint8 images as in [`eval_step`][eqx_vision.training.eval_step].
    [`evaluate_details`][eqx_vision.training.evaluate_details] gives the same loss and
    accuracy, with the top-k accuracy and the confusion matrix.
    """
    result = evaluate_details(
        model, state, batches, parallel=parallel, precision=precision,
        normalization=normalization, top_k=None, confusion=False,
    )  # fmt: skip
    return result.loss, result.accuracy


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What [`evaluate_details`][eqx_vision.training.evaluate_details] returns.

    - `loss`, `accuracy`: the mean cross-entropy and the (top-1) accuracy, as
      [`evaluate_batches`][eqx_vision.training.evaluate_batches] gives them.
    - `top_k`, `top_k_accuracy`: `k` and the fraction of examples whose label is among
      their `k` largest logits (`nan` when not computed).
    - `count`: the examples counted.
    - `confusion`: the `(num_classes, num_classes)` counts of (true class, predicted
      class) ([`confusion_matrix`][eqx_vision.training.confusion_matrix]), or `None`.
    """

    loss: float
    accuracy: float
    top_k: int | None
    top_k_accuracy: float
    count: int
    confusion: np.ndarray | None = None

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """The accuracy of each class from `confusion` (NaN for a class without examples;
        see [`per_class_accuracy`][eqx_vision.training.per_class_accuracy])."""
        if self.confusion is None:
            raise ValueError("no confusion matrix: evaluate with confusion=True.")
        return per_class_accuracy(self.confusion)


@eqx.filter_jit
def _batch_counts(
    logits: Float[Array, "batch num_classes"],
    labels: Int[Array, " batch"],
    mask: Bool[Array, " batch"],
    *,
    top_k: int | None,
    confusion: bool,
    parallel: DataParallel | None,
) -> tuple[Int[Array, ""] | None, Int[Array, "num_classes num_classes"] | None]:
    """A batch's count of top-k hits and its confusion matrix (each if asked for)."""
    mask = mask.astype(bool)
    hits = None
    if top_k is not None:
        hits = jnp.sum(top_k_correct(logits, labels, top_k) & mask, dtype=jnp.int32)
    matrix = None
    if confusion:
        predictions = jnp.argmax(logits, axis=-1)
        matrix = confusion_matrix(predictions, labels, logits.shape[-1], mask)
    if parallel is not None:
        hits, matrix = parallel.replicate((hits, matrix))
    return hits, matrix


def evaluate_details(
    model: PyTree,
    state: eqx.nn.State,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
    normalization: Normalization | None = None,
    top_k: int | None = 5,
    confusion: bool = True,
) -> Evaluation:
    """The loss, accuracy, top-k accuracy and confusion matrix over batches
    `(images, labels, mask)`, in inference mode.

    **Arguments:** as [`evaluate_batches`][eqx_vision.training.evaluate_batches], and

    - `top_k`: the `k` of the top-k accuracy (`5` by default; all classes when there are
      fewer); `None` to leave it out.
    - `confusion`: whether to count the confusion matrix (`num_classes ** 2` integers).

    **Returns:** an [`Evaluation`][eqx_vision.training.Evaluation].
    """
    total_loss = total_correct = 0.0
    n = hits = 0
    matrix = None
    processes = jax.process_count()
    for x, y, mask in batches:
        if parallel is None:
            x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
        else:
            x, y, mask = parallel.shard_batch((x, y, mask))
        # Across processes `mask` is this process's rows until it is the global array.
        count = int(jnp.sum(mask)) if processes > 1 else int(np.sum(mask))
        if not count:
            continue
        loss, accuracy, logits = eval_step(
            model, state, x, y, mask, parallel=parallel, precision=precision,
            normalization=normalization,
        )  # fmt: skip
        total_loss += float(np.asarray(loss)) * count
        total_correct += float(np.asarray(accuracy)) * count
        n += count
        if top_k is not None or confusion:
            batch_hits, batch_matrix = _batch_counts(
                logits, y, mask, top_k=top_k, confusion=confusion, parallel=parallel
            )
            if batch_hits is not None:
                hits += int(np.asarray(batch_hits))
            if batch_matrix is not None:
                batch_matrix = np.asarray(batch_matrix, np.int64)
                matrix = batch_matrix if matrix is None else matrix + batch_matrix
    return Evaluation(
        loss=total_loss / max(n, 1),
        accuracy=total_correct / max(n, 1),
        top_k=top_k,
        top_k_accuracy=hits / max(n, 1) if top_k is not None else math.nan,
        count=n,
        confusion=matrix,
    )
