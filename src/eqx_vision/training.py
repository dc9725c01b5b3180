"""Training and evaluation steps for the models of `eqx_vision`.

The pieces a training loop needs, written once for every architecture, stateless or not:

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
`step = eqx.filter_jit(training.train_step, donate="all")`, called as `train_step`; the
loop of `eqx-vision train` does this. The arrays passed in are invalid after the call
(reading one raises an error). On a CPU this made the bfloat16 ViT-S/16 step 1.03-1.09x
faster and the float32 step no faster, and AdamW's update alone of 21.6M parameters 1.4x
faster (see the [performance notes](../performance.md#the-bfloat16-step-on-the-xeon)).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .precision import Precision


__all__ = [
    "DataParallel",
    "apply_model",
    "batches",
    "count_params",
    "eval_step",
    "init_optimizer",
    "is_stateful",
    "learning_rate_schedule",
    "loss_fn",
    "make_optimizer",
    "train_step",
]


def _is_state_index(node: object) -> bool:
    return isinstance(node, eqx.nn.StateIndex)


def is_stateful(model: PyTree) -> bool:
    """Whether `model` carries Equinox state (holds an `eqx.nn.StateIndex`, e.g. BatchNorm).

    Stateful models are called as `model(x, state, key=...) -> (output, state)`, stateless
    ones as `model(x, key=...) -> output`.
    """
    return any(_is_state_index(leaf) for leaf in jax.tree.leaves(model, is_leaf=_is_state_index))


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
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


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

    Create it with [`DataParallel.create`][eqx_vision.training.DataParallel.create].
    """

    mesh: jax.sharding.Mesh

    @classmethod
    def create(cls, num_devices: int | None = None) -> "DataParallel":
        """**Arguments:**

        - `num_devices`: how many of `jax.local_devices()` to use; all of them by default.

        **Returns:** a `DataParallel` over the first `num_devices` local devices.
        """
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
        its first axis, whose size must be a multiple of `num_devices`."""
        for leaf in jax.tree.leaves(batch):
            if hasattr(leaf, "shape") and leaf.shape and leaf.shape[0] % self.num_devices:
                raise ValueError(
                    f"the batch size ({leaf.shape[0]}) must be a multiple of the number of "
                    f"devices ({self.num_devices})."
                )
        return eqx.filter_shard(batch, self.data_sharding)

    def replicate(self, tree: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `tree` on all
        devices."""
        return eqx.filter_shard(tree, self.replicated)


@eqx.filter_jit
def train_step(
    model: PyTree,
    state: eqx.nn.State,
    opt_state: optax.OptState,
    images: Float[Array, "batch channels height width"],
    labels: Int[Array, " batch"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
) -> tuple[PyTree, eqx.nn.State, optax.OptState, Float[Array, ""]]:
    """One training step: forward, backward and optimizer update.

    **Arguments:**

    - `model`, `state`: the model and its `eqx.nn.State` (empty for stateless models).
    - `opt_state`: from [`init_optimizer`][eqx_vision.training.init_optimizer].
    - `images`, `labels`: one batch (channels first; integer labels).
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
    images: Float[Array, "batch channels height width"],
    labels: Int[Array, " batch"],
    mask: Bool[Array, " batch"] | None = None,
    *,
    parallel: DataParallel | None = None,
    precision: Precision | str = "float32",
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, "batch num_classes"]]:
    """Evaluate a batch in inference mode (no dropout, BatchNorm running statistics).

    **Arguments:**

    - `model`, `state`: the model and its state; `eqx.nn.inference_mode` is applied here.
    - `images`, `labels`: one batch.
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
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]
