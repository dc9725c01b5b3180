"""Compile time of a training step (forward, backward, AdamW update) as depth grows.

Uniform stacks of blocks are stored stacked and run with `jax.lax.scan`, so the compiled
program holds one block whatever the depth: compile time should stay flat. Each row
traces, lowers and compiles a fresh `eqx.filter_jit` train step, and also times one call.

    python benchmarks/compile_time.py                  # ViT at depths 4, 8, 16, 32
    python benchmarks/compile_time.py --snippets       # every reference README snippet
    python benchmarks/compile_time.py --snippets cvt-reference levit-reference
    python benchmarks/compile_time.py --json out.json

With `--snippets`, each full-size configuration of the reference README (the `*-reference`
presets) is built and the compile time of its training step (batch 2, stateful models
through their BatchNorm state) is reported; this takes minutes per model on 2 CPU cores.
"""

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_vision as ev


def vit(depth: int, key: jax.Array) -> eqx.Module:
    return ev.ViT(
        image_size=64, patch_size=8, num_classes=10, dim=192, depth=depth, heads=3,
        mlp_dim=384, dropout=0.1, emb_dropout=0.1, key=key,
    )  # fmt: skip


def train_step_cost(
    make: Callable[[jax.Array], Any], image_shape: tuple[int, ...], batch: int = 8
) -> dict[str, float]:
    model = make(jax.random.key(0))
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    images = jnp.zeros((batch, *image_shape))
    labels = jnp.zeros((batch,), jnp.int32)

    @eqx.filter_jit
    def step(model, opt_state, images, labels, key):
        def loss_fn(model):
            keys = jax.random.split(key, images.shape[0])
            logits = jax.vmap(lambda x, k: model(x, key=k))(images, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(model, opt_state, images, labels, key).compile()  # pyright: ignore[reportFunctionMemberAccess]
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = compiled(model, opt_state, images, labels, key)
    jax.block_until_ready(out)
    run_s = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    return {"compile_s": compile_s, "step_s": run_s, "params": params}


def snippet_cost(preset: str, batch: int = 2) -> dict[str, float]:
    from eqx_vision import presets, training

    config = presets.resolve_model(preset, num_classes=1000, data_channels=3)
    model, state = config.build(jax.random.key(0))
    optimizer = optax.adamw(1e-3)
    opt_state = training.init_optimizer(optimizer, model)
    images = jnp.zeros((batch, config.channels, *config.image_size))
    labels = jnp.zeros((batch,), jnp.int32)
    args = (model, state, opt_state, images, labels, jax.random.key(1))
    start = time.perf_counter()
    compiled = training.train_step.lower(*args, optimizer=optimizer).compile()  # pyright: ignore[reportFunctionMemberAccess]
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args, optimizer=optimizer))
    step_s = time.perf_counter() - start
    return {"compile_s": compile_s, "step_s": step_s, "params": training.count_params(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--snippets", nargs="*", help="reference snippet presets to time (none: all of them)"
    )
    args = parser.parse_args()

    rows = []
    print(f"{'model':<24}{'params':>12}{'compile (s)':>14}{'first step (s)':>16}")
    if args.snippets is not None:
        from eqx_vision import presets

        names = args.snippets or [
            p.name for p in presets.list_presets() if p.name.endswith("-reference")
        ]
        for name in names:
            r = snippet_cost(name)
            rows.append({"model": name, **r})
            print(f"{name:<24}{r['params']:>12,}{r['compile_s']:>14.2f}{r['step_s']:>16.2f}")
        args.depths = []
    for depth in args.depths:
        r = train_step_cost(lambda k, d=depth: vit(d, k), (3, 64, 64))
        rows.append({"model": f"ViT depth {depth}", **r})
        print(
            f"{rows[-1]['model']:<24}{r['params']:>12,}{r['compile_s']:>14.2f}{r['step_s']:>16.2f}"
        )
    if len(args.depths) > 1:
        base = rows[0]["compile_s"]
        ratio = rows[-1]["compile_s"] / base
        print(f"compile time, depth {args.depths[-1]} / depth {args.depths[0]}: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
