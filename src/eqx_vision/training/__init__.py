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
  and a cosine decay (optax), with gradient accumulation and a moving average of the
  weights ([`ema_model`][eqx_vision.training.ema_model]) as options.
- [`Mixup`][eqx_vision.training.Mixup] and `label_smoothing`, options of `loss_fn` and
  `train_step`, are the rest of DeiT's recipe;
  [`evaluate_details`][eqx_vision.training.evaluate_details] adds the top-5 accuracy and
  the confusion matrix to an evaluation.
- [`DataParallel`][eqx_vision.training.DataParallel] shards each batch over a "data" axis
  of a `jax.sharding.Mesh` and replicates the model, its state and the optimizer state
  (or, with `fsdp=True`, shards the parameters and optimizer state over the same axis).

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

from ..finetune import (
    DECAY_LABELS as DECAY_LABELS,
    LABELS as LABELS,
    freeze_updates as freeze_updates,
    frozen_mask as frozen_mask,
    layer_decay_scales as layer_decay_scales,
    layer_ids as layer_ids,
    num_blocks as num_blocks,
    param_labels as param_labels,
    scale_updates as scale_updates,
    weight_decay_mask as weight_decay_mask,
)
from ..layers import is_stateful as is_stateful
from ._config import (
    MAX_SEED as MAX_SEED,
    Callback as Callback,
    FitInfo as FitInfo,
    FitResult as FitResult,
    StepInfo as StepInfo,
    TrainConfig as TrainConfig,
)
from ._fit import (
    CHECKPOINT as CHECKPOINT,
    CONFIG as CONFIG,
    CURVES as CURVES,
    METRICS as METRICS,
    TENSORBOARD as TENSORBOARD,
    checkpoint_steps as checkpoint_steps,
    fit as fit,
)
from ._orbax import CHECKPOINTS as CHECKPOINTS, TrainingCheckpoints as TrainingCheckpoints
from ._parallel import DataParallel as DataParallel
from ._recipe import (
    EmaState as EmaState,
    MixSample as MixSample,
    Mixup as Mixup,
    box_mask as box_mask,
    confusion_matrix as confusion_matrix,
    cutmix_box as cutmix_box,
    ema_model as ema_model,
    ema_params as ema_params,
    has_ema as has_ema,
    mix_targets as mix_targets,
    per_class_accuracy as per_class_accuracy,
    smooth_labels as smooth_labels,
    soft_cross_entropy as soft_cross_entropy,
    top_k_accuracy as top_k_accuracy,
    top_k_correct as top_k_correct,
)
from ._steps import (
    DEFAULT_NORMALIZATION as DEFAULT_NORMALIZATION,
    Batch as Batch,
    Evaluation as Evaluation,
    Normalization as Normalization,
    apply_model as apply_model,
    batches as batches,
    count_params as count_params,
    eval_step as eval_step,
    evaluate as evaluate,
    evaluate_batches as evaluate_batches,
    evaluate_details as evaluate_details,
    init_optimizer as init_optimizer,
    learning_rate_schedule as learning_rate_schedule,
    loss_fn as loss_fn,
    make_optimizer as make_optimizer,
    normalize_images as normalize_images,
    train_step as train_step,
)


__all__ = [
    "DECAY_LABELS",
    "LABELS",
    "Callback",
    "DataParallel",
    "EmaState",
    "Evaluation",
    "FitInfo",
    "FitResult",
    "Mixup",
    "StepInfo",
    "TrainConfig",
    "TrainingCheckpoints",
    "apply_model",
    "batches",
    "checkpoint_steps",
    "confusion_matrix",
    "count_params",
    "ema_model",
    "ema_params",
    "eval_step",
    "evaluate",
    "evaluate_details",
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
    "per_class_accuracy",
    "scale_updates",
    "smooth_labels",
    "soft_cross_entropy",
    "top_k_accuracy",
    "train_step",
    "weight_decay_mask",
]
