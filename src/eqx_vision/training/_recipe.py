"""The training recipe of DeiT and big_vision, inside the jitted step: label smoothing,
mixup and cutmix, the soft-target cross-entropy, a moving average of the weights kept in
the optimizer state, and the metrics of an evaluation (top-k accuracy, confusion matrix,
per-class accuracy).

Label smoothing and mixing follow timm (`timm.data.Mixup` in its `"batch"` mode): one
mixing for the whole batch, each image paired with the batch flipped along its first axis,
the targets smoothed first and mixed with the same weight as the images.
"""

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree


def _check_fraction(name: str, value: Any, *, closed: bool = True) -> None:
    """`value` must be a number in [0, 1] (or [0, 1) unless `closed`)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        number = float(value)
        ok = 0 <= number <= 1 if closed else 0 <= number < 1  # NaN fails too
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}.")


def smooth_labels(
    labels: Int[Array, " batch"], num_classes: int, smoothing: float = 0.0
) -> Float[Array, "batch num_classes"]:
    """Soft targets from integer labels, smoothed as timm does: `smoothing / num_classes`
    for every class, `1 - smoothing + smoothing / num_classes` for the labelled one (each
    row sums to 1).

    **Arguments:**

    - `labels`: the integer class of each example.
    - `num_classes`: the number of classes.
    - `smoothing`: the label smoothing, in `[0, 1)`; `0` gives one-hot targets.

    **Returns:** the float32 targets `(batch, num_classes)`.
    """
    _check_fraction("smoothing", smoothing, closed=False)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hot = labels[:, None] == jnp.arange(num_classes)
    return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def soft_cross_entropy(
    logits: Float[Array, "batch num_classes"], targets: Float[Array, "batch num_classes"]
) -> Float[Array, " batch"]:
    """The cross-entropy of each example against soft targets,
    `-sum(targets * log_softmax(logits))`, in float32.

    **Arguments:**

    - `logits`: a batch of logits.
    - `targets`: a distribution over the classes for each example (e.g. from
      [`smooth_labels`][eqx_vision.training.smooth_labels], mixed by
      [`Mixup`][eqx_vision.training.Mixup]).

    **Returns:** the loss of each example.
    """
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def mix_targets(
    targets: Float[Array, "batch num_classes"], lam: Float[Array, ""] | float
) -> Float[Array, "batch num_classes"]:
    """`lam * targets + (1 - lam) * targets[::-1]`: the targets of a batch mixed with the
    batch flipped along its first axis, as [`Mixup`][eqx_vision.training.Mixup] mixes its
    images."""
    lam = jnp.asarray(lam, targets.dtype)
    return targets * lam + jnp.flip(targets, 0) * (1 - lam)


def cutmix_box(
    key: PRNGKeyArray, lam: Float[Array, ""] | float, height: int, width: int
) -> tuple[Int[Array, "4"], Float[Array, ""]]:
    """timm's cutmix box (`rand_bbox`): sides `int(height * sqrt(1 - lam))` and
    `int(width * sqrt(1 - lam))`, centred on a uniformly drawn pixel, clipped to the image.

    **Arguments:**

    - `key`: a `jax.random.key` for the centre.
    - `lam`: the mixing weight of the original image (`1` gives an empty box).
    - `height`, `width`: the image size.

    **Returns:** the box `(top, bottom, left, right)` (rows `top:bottom`, columns
    `left:right`) and the weight of the original image corrected to the area pasted,
    `1 - box area / (height * width)`.
    """
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jr.split(key)
    cy = jr.randint(key_y, (), 0, height)
    cx = jr.randint(key_x, (), 0, width)
    top = jnp.clip(cy - cut_h // 2, 0, height)
    bottom = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(cx - cut_w // 2, 0, width)
    right = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    area = (bottom - top) * (right - left)
    corrected = 1.0 - area.astype(jnp.float32) / (height * width)
    return jnp.stack([top, bottom, left, right]), corrected


def box_mask(box: Int[Array, "4"], height: int, width: int) -> Bool[Array, "height width"]:
    """The pixels of a box `(top, bottom, left, right)` (from
    [`cutmix_box`][eqx_vision.training.cutmix_box]) as a mask of the image: a fixed shape
    whatever the box, so it can be used inside `jax.jit`."""
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows >= box[0]) & (rows < box[1])
    in_cols = (cols >= box[2]) & (cols < box[3])
    return in_rows[:, None] & in_cols[None, :]


class MixSample(NamedTuple):
    """One draw of [`Mixup.sample`][eqx_vision.training.Mixup.sample]."""

    lam: Float[Array, ""]  # the weight of the original images and targets
    cutmix: Bool[Array, ""]  # cutmix (True) or mixup (False)
    box: Int[Array, "4"]  # cutmix's box (top, bottom, left, right); empty if not pasted


@dataclasses.dataclass(frozen=True)
class Mixup:
    """Mixup and cutmix of a whole batch, as timm's `Mixup` in its `"batch"` mode, inside
    a jitted step and drawn from a `jax.random.key`.

    Each batch draws one weight `lam` from `Beta(alpha, alpha)` and pairs image `i` with
    image `batch - 1 - i` (the batch flipped along its first axis). Mixup blends the pairs,
    `lam * x + (1 - lam) * x_flipped`; cutmix pastes a box of the paired image (of area
    about `1 - lam`, clipped to the image; see
    [`cutmix_box`][eqx_vision.training.cutmix_box]) and corrects `lam` to the area actually
    pasted. The targets are mixed with the same weight
    ([`mix_targets`][eqx_vision.training.mix_targets]).

    **Arguments:**

    - `mixup_alpha`: mixup's `Beta(alpha, alpha)`; `0` for no mixup.
    - `cutmix_alpha`: cutmix's; `0` for no cutmix.
    - `prob`: the probability that a batch is mixed at all (timm's default `1.0`).
    - `switch_prob`: with both on, the probability that a batch gets cutmix rather than
      mixup (timm's default `0.5`).

    DeiT trains with `Mixup(0.8, 1.0)` and a label smoothing of 0.1. Images are float
    model input `(batch, channels, height, width)` (after normalisation); shapes are
    static: the box is a mask.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative number; got {value!r}.")
        _check_fraction("prob", self.prob)
        _check_fraction("switch_prob", self.switch_prob)

    @property
    def enabled(self) -> bool:
        """Whether any batch can be mixed (an alpha above 0 and `prob` above 0)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def sample(self, key: PRNGKeyArray, height: int, width: int) -> MixSample:
        """Draw one batch's mixing: whether it is mixed (`prob`), cutmix or mixup
        (`switch_prob` when both are on), `lam` and cutmix's box; `lam` is 1 (and the box
        empty) for a batch left as it is."""
        k_apply, k_switch, k_mixup, k_cutmix, k_box = jr.split(key, 5)
        apply = jr.uniform(k_apply) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = jr.uniform(k_switch) < self.switch_prob
        else:
            cutmix = jnp.asarray(self.cutmix_alpha > 0)
        one = jnp.float32(1.0)
        lam_mixup = (
            jr.beta(k_mixup, self.mixup_alpha, self.mixup_alpha) if self.mixup_alpha > 0 else one
        )
        lam_cutmix = (
            jr.beta(k_cutmix, self.cutmix_alpha, self.cutmix_alpha)
            if self.cutmix_alpha > 0
            else one
        )
        lam = jnp.where(apply, jnp.where(cutmix, lam_cutmix, lam_mixup), one)
        box, corrected = cutmix_box(k_box, lam, height, width)
        box = jnp.where(cutmix, box, jnp.zeros_like(box))
        return MixSample(jnp.where(cutmix, corrected, lam).astype(jnp.float32), cutmix, box)

    def mix_images(
        self, key: PRNGKeyArray, images: Float[Array, "batch channels height width"]
    ) -> tuple[Float[Array, "batch channels height width"], Float[Array, ""]]:
        """Mix a batch of images.

        **Returns:** the mixed images and `lam`, the weight of the original ones, for
        [`mix_targets`][eqx_vision.training.mix_targets].
        """
        height, width = images.shape[-2:]
        lam, cutmix, box = self.sample(key, height, width)
        flipped = jnp.flip(images, 0)
        pasted = jnp.where(box_mask(box, height, width), flipped, images)
        weight = lam.astype(images.dtype)
        blended = images * weight + flipped * (1 - weight)
        mixed = jnp.where(cutmix, pasted, blended)
        # A batch left as it is stays exactly so (and a NaN never crosses to its pair).
        return jnp.where(lam < 1, mixed, images), lam

    def __call__(
        self,
        key: PRNGKeyArray,
        images: Float[Array, "batch channels height width"],
        targets: Float[Array, "batch num_classes"],
    ) -> tuple[Float[Array, "batch channels height width"], Float[Array, "batch num_classes"]]:
        """Mix a batch of images and their soft targets (e.g. from
        [`smooth_labels`][eqx_vision.training.smooth_labels]) with one draw of `key`."""
        images, lam = self.mix_images(key, images)
        return images, mix_targets(targets, lam)


# --------------------------------------------------------------------------------------
# Evaluation metrics


def top_k_correct(
    logits: Float[Array, "batch num_classes"], labels: Int[Array, " batch"], k: int = 5
) -> Bool[Array, " batch"]:
    """Whether each example's label is among its `k` largest logits (all classes when `k`
    exceeds their number). Ties rank the lower class first, as `jnp.argmax` does, so the
    top-1 of `k=1` is the argmax."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}.")
    _, top = jax.lax.top_k(logits, min(int(k), logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1)


def top_k_accuracy(
    logits: Float[Array, "batch num_classes"],
    labels: Int[Array, " batch"],
    k: int = 5,
    mask: Bool[Array, " batch"] | None = None,
) -> Float[Array, ""]:
    """The fraction of the counted examples (`mask`; all by default) whose label is among
    their `k` largest logits (see [`top_k_correct`][eqx_vision.training.top_k_correct]);
    `0` if none is counted."""
    correct = top_k_correct(logits, labels, k).astype(jnp.float32)
    weights = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
    return (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def confusion_matrix(
    predictions: Int[Array, " batch"],
    labels: Int[Array, " batch"],
    num_classes: int,
    mask: Bool[Array, " batch"] | None = None,
) -> Int[Array, "num_classes num_classes"]:
    """Counts of (true class, predicted class): row `i`, column `j` counts the examples of
    class `i` predicted as class `j`; the rows `mask` excludes (padding) are not counted.

    **Arguments:**

    - `predictions`: the predicted class of each example (e.g. `logits.argmax(-1)`).
    - `labels`: the true class of each example.
    - `num_classes`: the number of classes.
    - `mask`: which examples count; all by default.

    **Returns:** an int32 `(num_classes, num_classes)` matrix; sum over several batches.
    """
    weights = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
    counts = jnp.zeros((num_classes, num_classes), jnp.int32)
    return counts.at[labels, predictions].add(weights, mode="drop")


def per_class_accuracy(
    confusion: Int[Array | np.ndarray, "num_classes num_classes"],
) -> Float[np.ndarray, " num_classes"]:
    """The accuracy of each class (its row's diagonal count over its row's sum) from a
    [`confusion_matrix`][eqx_vision.training.confusion_matrix]; NaN for a class without
    examples."""
    counts = np.asarray(confusion, np.float64)
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.diag(counts) / total, np.nan)


# --------------------------------------------------------------------------------------
# The moving average of the weights


class EmaState(NamedTuple):
    """The state of [`ema_params`][eqx_vision.training.ema_params]: the moving average of
    the parameters, a tree of their structure."""

    ema: PyTree


def ema_params(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimizer state (so it
    is saved, resumed and sharded with it): after each update it sets
    `ema = decay * ema + (1 - decay) * (params + updates)`, starting from the initial
    parameters, and passes the updates on unchanged. Put it last in the chain (as
    [`make_optimizer`][eqx_vision.training.make_optimizer]'s `ema_decay` does); read the
    averaged model with [`ema_model`][eqx_vision.training.ema_model].

    **Arguments:**

    - `decay`: the weight of the old average, in `[0, 1]` (e.g. `0.9999`; `0` follows the
      parameters, `1` keeps the initial ones). The average spans about `1 / (1 - decay)`
      updates.
    """
    _check_fraction("decay", decay)
    decay = float(decay)

    def init(params):
        return EmaState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "ema_params needs the parameters: call update(updates, state, params)."
            )
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new)
        return updates, EmaState(ema)

    return optax.GradientTransformation(init, update)


def _is_ema(node: Any) -> bool:
    return isinstance(node, EmaState)


def has_ema(opt_state: optax.OptState) -> bool:
    """Whether an optimizer state holds a moving average of the weights
    ([`ema_params`][eqx_vision.training.ema_params])."""
    return any(_is_ema(node) for node in jax.tree.leaves(opt_state, is_leaf=_is_ema))


def ema_model(model: PyTree, opt_state: optax.OptState) -> PyTree:
    """The model with its trainable parameters replaced by their moving average.

    **Arguments:**

    - `model`: the model being trained (its non-trainable parts are kept).
    - `opt_state`: its optimizer state, from an optimizer with
      [`ema_params`][eqx_vision.training.ema_params] (e.g.
      [`make_optimizer`][eqx_vision.training.make_optimizer] with `ema_decay`).

    **Returns:** a model of the same structure, with the averaged weights. Raises
    `ValueError` if `opt_state` holds no moving average, or one of another structure.
    """
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(node)]
    if len(found) != 1:
        held = "no moving average" if not found else f"{len(found)} moving averages"
        raise ValueError(
            f"the optimizer state holds {held} of the weights; expected one: build the "
            "optimizer with make_optimizer(..., ema_decay=...) (TrainConfig.ema_decay)."
        )
    ema = found[0].ema
    params = eqx.filter(model, eqx.is_inexact_array)
    if jax.tree.structure(params) != jax.tree.structure(ema):
        raise ValueError(
            "the moving average in the optimizer state has another structure than the "
            "model's trainable parameters: it belongs to another model."
        )
    return eqx.combine(ema, model)
