"""The training loop, and training and evaluation steps, for the models of `eqx_vision`.

[`fit`][eqx_vision.training.fit] trains a model on a
[`Dataset`][eqx_vision.data.Dataset]: epochs of jit-compiled steps, an evaluation after
each, and, given an output folder, checkpoints, metrics and resume. `eqx-vision train` is
a thin layer over it:

```python
import jax.random as jr
from eqx_vision import data, presets, training

config = presets.resolve_model("default", num_classes=10, data_channels=1)
ds = data.prepare(data.load_digits(), channels=1, image_size=config.image_size)
model, state = config.build(jr.key(0))
result = training.fit(model, state, ds, training.TrainConfig(epochs=15), out="runs/digits",
                      model_config=config.to_json(), callback=print)
print(result.test_accuracy, result.best_accuracy)
```

[`evaluate`][eqx_vision.training.evaluate] gives the loss and accuracy over a whole split.
The pieces of the loop, for loops of your own, are written once for every architecture,
stateless or not:

- [`apply_model`][eqx_vision.training.apply_model] runs a model over a batch. Stateless
  models are called as `model(x, key=k)`; models with BatchNorm (CvT, LeViT) as
  `model(x, state, key=k) -> (logits, state)` under
  `jax.vmap(..., axis_name="batch", in_axes=(0, None), out_axes=(0, None))`.
- [`loss_fn`][eqx_vision.training.loss_fn] is the mean softmax cross-entropy of a batch.
- [`train_step`][eqx_vision.training.train_step] does one forward and backward pass and
  one optimizer update, with a fresh dropout key per example.
- [`eval_step`][eqx_vision.training.eval_step] gives loss, accuracy and logits in
  inference mode.
- [`make_optimizer`][eqx_vision.training.make_optimizer] is AdamW with a linear warm-up
  and a cosine decay (optax).
- [`DataParallel`][eqx_vision.training.DataParallel] shards each batch over a "data" axis
  of a `jax.sharding.Mesh` and replicates the model, its state and the optimizer state.

`apply_model`, `loss_fn`, `train_step` and `eval_step` take a keyword `precision`, a
[`Precision`][eqx_vision.precision.Precision] or its compute dtype's name (`"float32"`, the
default, or `"bfloat16"`): the images are cast to the compute dtype before the model and
the logits to float32 after it, while the parameters, gradients and optimizer state stay
float32 (see the [mixed precision guide](../precision.md)).

Build every model with `eqx.nn.make_with_state`, which returns an empty state for
stateless models, so that one loop serves all of them:

```python
import equinox as eqx, jax, jax.random as jr
import eqx_vision as ev
from eqx_vision import training

model, state = eqx.nn.make_with_state(ev.ViT)(image_size=32, patch_size=4, num_classes=10,
                                              dim=64, depth=4, heads=4, mlp_dim=128,
                                              key=jr.key(0))
optimizer = training.make_optimizer(1e-3, weight_decay=0.05, warmup_steps=100,
                                    total_steps=1000)
opt_state = training.init_optimizer(optimizer, model)
parallel = training.DataParallel.create()        # all local devices
model, state, opt_state = parallel.replicate((model, state, opt_state))
for step, (images, labels) in enumerate(batches):
    images, labels = parallel.shard_batch((images, labels))
    model, state, opt_state, loss = training.train_step(
        model, state, opt_state, images, labels, jr.fold_in(jr.key(1), step),
        optimizer=optimizer, parallel=parallel)
loss, accuracy, logits = training.eval_step(model, state, test_images, test_labels)
```

`train_step` and `eval_step` are already wrapped in `eqx.filter_jit`, and can also be
called from inside a user's own `eqx.filter_jit` function.

A loop like the one above, which rebinds the model, its state and the optimizer state at
every step and passes a fresh batch and key, can donate them all, so that XLA writes the
new parameters and optimizer state over the old ones instead of into fresh memory:
`step = eqx.filter_jit(training.train_step, donate="all")`, called as `train_step`; `fit`
does this. The arrays passed in are invalid after the call (reading one raises an error).
On a CPU this made the bfloat16 ViT-S/16 step 1.03-1.09x faster and the float32 step no
faster, and AdamW's update alone of 21.6M parameters 1.4x faster (see the
[performance notes](../performance.md#the-bfloat16-step-on-the-xeon)).
"""

import contextlib
import dataclasses
import errno
import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped, UInt8

from .data import TrainingData, epoch_order, padded_batches
from .finetune import (
    DECAY_LABELS as DECAY_LABELS,
    LABELS as LABELS,
    as_function,
    freeze_updates as freeze_updates,
    frozen_mask as frozen_mask,
    layer_decay_scales as layer_decay_scales,
    layer_ids as layer_ids,
    num_blocks as num_blocks,
    param_labels as param_labels,
    scale_updates as scale_updates,
    weight_decay_mask as weight_decay_mask,
)
from .layers import REMAT, is_stateful, remat
from .precision import COMPUTE_DTYPES, Precision


__all__ = [
    "DECAY_LABELS",
    "LABELS",
    "Callback",
    "DataParallel",
    "FitInfo",
    "FitResult",
    "StepInfo",
    "TrainConfig",
    "apply_model",
    "batches",
    "count_params",
    "eval_step",
    "evaluate",
    "fit",
    "freeze_updates",
    "frozen_mask",
    "init_optimizer",
    "is_stateful",
    "layer_decay_scales",
    "layer_ids",
    "learning_rate_schedule",
    "loss_fn",
    "make_optimizer",
    "num_blocks",
    "param_labels",
    "scale_updates",
    "train_step",
    "weight_decay_mask",
]


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
) -> tuple[Float[Array, ""], eqx.nn.State]:
    """Mean softmax cross-entropy of a batch, for stateless and stateful models alike.

    **Arguments:** as [`apply_model`][eqx_vision.training.apply_model], plus the integer
    class `labels`. The cross-entropy is computed in float32 whatever the `precision`.

    **Returns:** the mean loss (a float32 scalar) and the updated state, in the form
    `eqx.filter_value_and_grad(loss_fn, has_aux=True)` expects.
    """
    logits, state = apply_model(model, state, images, key=key, precision=precision)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state


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
) -> optax.GradientTransformation:
    """AdamW with a linear warm-up from 0 and a cosine decay (optax).

    **Arguments:**

    - `learning_rate`: the peak learning rate, reached after `warmup_steps`.
    - `weight_decay`: the decoupled weight decay of AdamW.
    - `warmup_steps`: steps of linear warm-up.
    - `total_steps`: the length of the whole schedule (warm-up included); the rate
      decays to `end_learning_rate` along a half cosine in the remaining steps.
    - `end_learning_rate`: the final rate.
    - `b1`, `b2`: Adam's moment decay rates.
    - `clip_norm`: clip the gradients to this global norm first; `None` for no clipping.
    - `skip_non_finite`: if positive, the whole optimizer is wrapped in
      `optax.apply_if_finite(..., max_consecutive_errors=skip_non_finite)`: an update whose
      gradients hold a NaN or an infinity is skipped (parameters and optimizer state kept),
      up to this many in a row. Its state is then an `optax.ApplyIfFiniteState` around the
      state of the default, `0` (no wrapping).

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
    `freeze_updates(frozen)`, each only when given.

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
    # A mask tree of a model's structure is an Equinox module, which optax would call.
    mask = None if weight_decay_mask is None else as_function(weight_decay_mask)
    optimizer = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
    if clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    if layer_scales is not None:
        optimizer = optax.chain(optimizer, scale_updates(layer_scales))
    if frozen is not None:
        optimizer = optax.chain(freeze_updates(frozen), optimizer, freeze_updates(frozen))
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


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data-parallel training over the local devices with `jax.sharding`.

    A one-axis `Mesh` named `"data"`; each batch is split along its first axis over the
    devices (`NamedSharding(mesh, P("data"))`), and the model, its state and the optimizer
    state are replicated (`NamedSharding(mesh, P())`). BatchNorm statistics, computed over
    the vmapped axis `"batch"`, are then taken over the whole global batch, as on one device.

    Across several processes (after `jax.distributed.initialize`), the mesh covers the
    devices of every process: each process passes its own rows of each global batch to
    [`shard_batch`][eqx_vision.training.DataParallel.shard_batch], which assembles the
    global batch with `jax.make_array_from_process_local_data`. A mesh that leaves out a
    process's devices is an error (the processes' parameters would drift apart).

    Create it with [`DataParallel.create`][eqx_vision.training.DataParallel.create].
    """

    mesh: jax.sharding.Mesh

    def __post_init__(self):
        processes = jax.process_count()
        if processes > 1:
            covered = {d.process_index for d in self.mesh.devices.flat}
            if covered != set(range(processes)):
                raise ValueError(
                    f"the mesh covers the devices of processes {sorted(covered)} of "
                    f"{processes}: a run over several processes needs a mesh of every "
                    "process's devices (DataParallel.create() builds one), else each "
                    "process would train its own copy of the model"
                )

    @classmethod
    def create(cls, num_devices: int | None = None) -> "DataParallel":
        """**Arguments:**

        - `num_devices`: how many of `jax.local_devices()` to use; all of them by default.
          Across several processes the mesh covers all devices of all processes
          (`jax.devices()`), and `num_devices` must be `None` or their number.

        **Returns:** a `DataParallel` over the first `num_devices` local devices, or over
        every device of every process.
        """
        if jax.process_count() > 1:
            devices = jax.devices()
            if num_devices is not None and num_devices != len(devices):
                raise ValueError(
                    f"across {jax.process_count()} processes the mesh covers all "
                    f"{len(devices)} devices; got num_devices={num_devices}."
                )
            return cls(jax.sharding.Mesh(np.array(devices), ("data",)))
        devices = jax.local_devices()
        n = len(devices) if num_devices is None else num_devices
        if not 1 <= n <= len(devices):
            raise ValueError(
                f"num_devices must be between 1 and {len(devices)} (the number of local "
                f"devices); got {n}."
            )
        return cls(jax.sharding.Mesh(np.array(devices[:n]), ("data",)))

    @property
    def num_devices(self) -> int:
        """The number of devices of the mesh."""
        return self.mesh.devices.size

    @property
    def data_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding of a batch: split along axis 0 over the `"data"` axis."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        """The sharding of parameters and states: a full copy on every device."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def shard_batch(self, batch: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `batch` split along
        its first axis, whose size must be a multiple of `num_devices`. Across several
        processes, outside jit, `batch` is this process's rows of the global batch (of
        the same size in every process; NumPy arrays), from which the global batch is
        assembled."""
        leaves = jax.tree.leaves(batch)
        processes = jax.process_count()
        local = processes > 1 and all(isinstance(x, np.ndarray | np.generic) for x in leaves)
        for leaf in leaves:
            size = leaf.shape[0] * (processes if local else 1) if hasattr(leaf, "shape") else 0
            if hasattr(leaf, "shape") and leaf.shape and size % self.num_devices:
                raise ValueError(
                    f"the batch size ({size}) must be a multiple of the number of "
                    f"devices ({self.num_devices})."
                )
        if local:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
                batch,
            )
        return eqx.filter_shard(batch, self.data_sharding)

    def replicate(self, tree: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `tree` on all
        devices."""
        return eqx.filter_shard(tree, self.replicated)


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

    **Returns:** the updated `(model, state, opt_state)` and the batch's mean loss.
    """
    if parallel is not None:
        model, state, opt_state = parallel.replicate((model, state, opt_state))
        images, labels = parallel.shard_batch((images, labels))
    images = normalize_images(images, normalization)
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
    (loss, state), grads = grad_fn(model, state, images, labels, key, precision=precision)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    if parallel is not None:
        model, state, opt_state = parallel.replicate((model, state, opt_state))
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
        model, state = parallel.replicate((model, state))
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
    """
    total_loss = total_correct = 0.0
    n = 0
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
        loss, accuracy, _ = eval_step(
            model, state, x, y, mask, parallel=parallel, precision=precision,
            normalization=normalization,
        )  # fmt: skip
        total_loss += float(np.asarray(loss)) * count
        total_correct += float(np.asarray(accuracy)) * count
        n += count
    return total_loss / max(n, 1), total_correct / max(n, 1)


CONFIG = "config.json"
CHECKPOINT = "last.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
# The batch size of the evaluation after each epoch (or the training batch, if larger).
_EVAL_BATCH_SIZE = 256
# The largest seed: `jax.random.key` keeps the low 32 bits of a seed (without x64).
MAX_SEED = 2**32 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
      to norm 1).
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

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("skip_non_finite", 0),
                          ("freeze", 0)):  # fmt: skip
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
      `learning_rate`, `epoch_seconds`, `images_per_second`, `skipped_steps`.
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


def _atomic_text(path: str, text: str) -> None:
    from .checkpoint import atomic_write

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
    from .checkpoint import CheckpointFormatError

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
    from . import checkpoint

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
    from . import checkpoint

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
