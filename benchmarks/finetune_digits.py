"""Fine-tuning against training from scratch, on the embedded digits.

The CLI's default ViT (4 blocks of dim 64, patch 4) is trained on the digits 0-4 at 16x16
pixels. It is then fine-tuned on the digits 5-9 at 24x24 (a new head for their five
classes with `eqx_vision.reset_head`, the position embeddings resampled with
`eqx_vision.set_image_size`, weight decay only on the weights, layer-wise learning-rate
decay), and the same architecture is trained on 5-9 at 24x24 from a random initialisation
with the same optimizer, learning rate, batches and steps. Both are evaluated on the test
images of 5-9 every few steps; the table gives the first step at which each reaches the
target accuracy.

    python benchmarks/finetune_digits.py                        # the table
    python benchmarks/finetune_digits.py --json out.json --figure docs/images/finetune_digits.png
"""

import argparse
import dataclasses
import json
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import eqx_vision as ev
from eqx_vision import data, presets, training


@dataclasses.dataclass(frozen=True)
class Setup:
    """The settings of the comparison (the defaults are those of the docs' figure)."""

    pretrain_steps: int = 400
    steps: int = 150
    eval_every: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    layer_decay: float | None = None
    freeze: int = 0
    target: float = 0.9
    seed: int = 0
    model: str = "default"


def split_digits(classes: range, image_size: int) -> data.Dataset:
    """The embedded digits of `classes`, labelled `0 .. len(classes) - 1`, at `image_size`."""
    raw = data.load_digits()
    keep_train = np.isin(raw.train_labels, list(classes))
    keep_test = np.isin(raw.test_labels, list(classes))
    subset = data.RawDataset(
        np.asarray(raw.train_images)[keep_train],
        raw.train_labels[keep_train] - classes.start,
        np.asarray(raw.test_images)[keep_test],
        raw.test_labels[keep_test] - classes.start,
        tuple(raw.class_names[c] for c in classes),
        1,
        f"digits {classes.start}-{classes.stop - 1}",
    )
    return data.prepare(subset, channels=1, image_size=(image_size, image_size))


def train_curve(model: Any, ds: data.Dataset, setup: Setup, *, steps: int,
                finetune: bool, seed: int) -> tuple[Any, list[tuple[int, float]]]:  # fmt: skip
    """Train `model` for `steps` steps of `train_step`, evaluating on the test split
    every `setup.eval_every` steps (and before the first). With `finetune`, the optimizer
    decays only the weights and applies `setup.layer_decay` and `setup.freeze`.

    **Returns:** the trained model and the curve `[(step, test accuracy), ...]`.
    """
    options: dict[str, Any] = {}
    if finetune:
        options["weight_decay_mask"] = training.weight_decay_mask
        if setup.layer_decay is not None:
            decay = setup.layer_decay
            options["layer_scales"] = lambda p: training.layer_decay_scales(p, decay)
        if setup.freeze:
            options["frozen"] = lambda p: training.frozen_mask(p, setup.freeze)
    optimizer = training.make_optimizer(
        setup.learning_rate, weight_decay=setup.weight_decay,
        warmup_steps=min(setup.warmup_steps, steps), total_steps=steps, **options,
    )  # fmt: skip
    step_fn = eqx.filter_jit(training.train_step, donate="all")
    state = eqx.nn.State(model)
    opt_state = training.init_optimizer(optimizer, model)
    model = jax_copy(model)

    def accuracy() -> float:
        return training.evaluate(model, state, ds.test_images, ds.test_labels)[1]

    curve = [(0, accuracy())]
    key = jr.fold_in(jr.key(seed), 1)
    epoch = 0
    order: list[np.ndarray] = []
    for step in range(1, steps + 1):
        if not order:
            epoch += 1
            order = list(training.batches(len(ds.train_labels), setup.batch_size, seed=seed,
                                          epoch=epoch))  # fmt: skip
        idx = order.pop(0)
        model, state, opt_state, _ = step_fn(
            model, state, opt_state, jnp.asarray(ds.train_images[idx]),
            jnp.asarray(ds.train_labels[idx]),
            jr.fold_in(key, step), optimizer=optimizer,
        )  # fmt: skip
        if step % setup.eval_every == 0 or step == steps:
            curve.append((step, accuracy()))
    return model, curve


def jax_copy(tree: Any) -> Any:
    """A copy of the arrays of `tree` (the step donates its inputs)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy is at least `target` (None if none)."""
    return next((step for step, acc in curve if acc >= target), None)


def compare(setup: Setup) -> dict[str, Any]:
    """Pre-train on 0-4 at 16 px, then fine-tune and train from scratch on 5-9 at 24 px."""
    start = time.perf_counter()
    first, second = split_digits(range(0, 5), 16), split_digits(range(5, 10), 24)
    config = presets.resolve_model(setup.model, num_classes=5, data_channels=1, image_size=16)
    key = jr.key(setup.seed)
    model, _ = config.build(jr.fold_in(key, 0))
    pretrained, pre_curve = train_curve(
        model, first, setup, steps=setup.pretrain_steps, finetune=False, seed=setup.seed
    )
    head_key = jr.fold_in(key, 2)
    tuned = ev.set_image_size(ev.reset_head(pretrained, 5, key=head_key), 24)
    _, ft_curve = train_curve(tuned, second, setup, steps=setup.steps, finetune=True,
                              seed=setup.seed + 1)  # fmt: skip
    scratch_config = presets.resolve_model(setup.model, num_classes=5, data_channels=1,
                                           image_size=24)  # fmt: skip
    scratch, _ = scratch_config.build(jr.fold_in(key, 3))
    _, sc_curve = train_curve(scratch, second, setup, steps=setup.steps, finetune=False,
                              seed=setup.seed + 1)  # fmt: skip
    return {
        "setup": dataclasses.asdict(setup),
        "pretrain": {"curve": pre_curve, "final_accuracy": pre_curve[-1][1]},
        "finetune": {"curve": ft_curve, "steps_to_target": steps_to(ft_curve, setup.target)},
        "scratch": {"curve": sc_curve, "steps_to_target": steps_to(sc_curve, setup.target)},
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(result: dict[str, Any]) -> str:
    target = result["setup"]["target"]
    lines = [
        f"pre-trained on 0-4 at 16 px: test accuracy {result['pretrain']['final_accuracy']:.3f} "
        f"after {result['setup']['pretrain_steps']} steps",
        f"{'digits 5-9 at 24 px':<22} {'step 0':>7} {'final':>7} {f'steps to {target:g}':>14}",
    ]
    for name in ("finetune", "scratch"):
        run = result[name]
        reached = run["steps_to_target"]
        shown = "-" if reached is None else str(reached)
        label = "fine-tuned" if name == "finetune" else "from scratch"
        lines.append(
            f"{label:<22} {run['curve'][0][1]:>7.3f} {run['curve'][-1][1]:>7.3f} {shown:>14}"
        )
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, label in (("finetune", "fine-tuned from 0-4 at 16 px"), ("scratch", "from scratch")):
        steps, acc = zip(*result[name]["curve"], strict=True)
        ax.plot(steps, acc, marker="o", markersize=3, label=label)
    ax.axhline(result["setup"]["target"], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="training step (batch 32)", ylabel="test accuracy",
           title="ViT on the digits 5-9 at 24x24", ylim=(0, 1.02))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    defaults = Setup()
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--layer-decay", type=float, default=defaults.layer_decay)
    parser.add_argument("--freeze", type=int, default=defaults.freeze)
    parser.add_argument("--target", type=float, default=defaults.target)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--figure", metavar="PATH", help="write the curves as a PNG")
    args = parser.parse_args()
    setup = Setup(
        pretrain_steps=args.pretrain_steps, steps=args.steps, eval_every=args.eval_every,
        layer_decay=args.layer_decay, freeze=args.freeze, target=args.target, seed=args.seed,
    )  # fmt: skip
    result = compare(setup)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.figure:
        figure(result, args.figure)


if __name__ == "__main__":
    main()
