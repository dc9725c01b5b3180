"""Throughput of every architecture, side by side with vit-pytorch on the same machine.

For each of the 17 systems at a benchmark configuration (ViT-S/16-sized for the ViT family,
the reference README's configuration at 128 px for the others; see `CONFIGS`), one process
builds the vit-pytorch module, loads its weights into the eqx_vision model with
`ev.from_vit_pytorch`, and measures on the same batch of 16 images:

- inference: logits of the batch (`torch.inference_mode` / `eqx.filter_jit` of the model
  in inference mode);
- training step: forward, cross-entropy, backward and an AdamW update (torch eager with
  `torch.optim.AdamW`; `eqx_vision.training.train_step` with `optax.adamw`).

After a warm-up, repetitions of the two frameworks alternate, so that both see the same
machine load; each repetition runs enough iterations to last about `--min-time` seconds,
and the reported time is the median over `--reps` repetitions. Compile time (trace, lower,
compile) is reported separately. The CPU (model, cores, and the ISA extensions that decide
which kernels run) and the float32 matrix-multiply rate of each framework (2048 x 2048) are
printed first, for scale: the ratios depend on the CPU. "ratio" is torch time / eqx_vision
time: above 1, eqx_vision is faster.

    python benchmarks/throughput.py                       # all 17 systems
    python benchmarks/throughput.py --models vit cvt      # some of them
    python benchmarks/throughput.py --json results.json   # also write the numbers
    python benchmarks/throughput.py --remat inputs        # another checkpointing policy
    python benchmarks/throughput.py --memory              # memory of a training step only
    python benchmarks/throughput.py --donate              # the training step as a loop runs it
    python benchmarks/throughput.py --table a.json b.json # one table of saved runs

`--remat` sets the gradient-checkpointing policy of the eqx_vision block stacks
(`ev.remat`: "linear", the default, keeps the outputs of the linear layers;
"inputs" only each block's input; "all" every intermediate). `--memory` compiles each
training step under the three policies and reports the working memory XLA allocates for
one step (its temporary buffers, from the compiled program's memory analysis:
deterministic, no timing). `--donate` donates the model, its state and the optimizer state
to the eqx_vision training step, as a loop that rebinds them can (the loop of
`eqx-vision train` does): XLA then writes the new parameters and optimizer state over the
old ones, as torch's optimizer updates its tensors in place. Without it (the default) the
step allocates them afresh each time.

Needs the test extra and vit-pytorch (`pip install -e ".[test]"` and
`pip install --no-deps vit-pytorch==1.26.11`). Dropout, layer dropout and stochastic
depth are 0 in every configuration, so that both frameworks do the same work.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import eqx_vision as ev  # noqa: E402
from eqx_vision import training  # noqa: E402
from eqx_vision.layers._random import active_rates  # noqa: E402
from eqx_vision.presets import PRESETS  # noqa: E402
from reference import reference  # noqa: E402  (vit_pytorch modules, without torchvision)


torch.set_num_threads(2)

BATCH = 16
VIT_S = dict(
    image_size=128, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536,
    dim_head=64,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration: the vit-pytorch module and class, and the arguments."""

    name: str
    module: str
    cls: str
    kwargs: dict[str, Any]
    image_size: tuple[int, int] = (128, 128)
    description: str = ""


def readme(preset: str, **changes: Any) -> dict[str, Any]:
    """The reference README's configuration of an architecture (the preset `preset` of
    `eqx_vision.presets`) with 1000 classes, every dropout rate 0, and `changes`: the
    128 px image and the sizes that scale with it."""
    kwargs: dict[str, Any] = {**PRESETS[preset].kwargs, "num_classes": 1000}
    kwargs.update({name: 0.0 for name in kwargs if name.endswith("dropout")})
    return {**kwargs, **changes}


CONFIGS = [
    Config("ViT", "vit", "ViT", VIT_S, description="ViT-S/16"),
    Config("SimpleViT", "simple_vit", "SimpleViT", VIT_S, description="ViT-S/16"),
    Config("DeepViT", "deepvit", "DeepViT", VIT_S, description="ViT-S/16"),
    Config(
        "CaiT", "cait", "CaiT", {**VIT_S, "cls_depth": 2}, description="ViT-S/16 + 2 class blocks"
    ),
    Config(
        "ParallelViT",
        "parallel_vit",
        "ViT",
        {**VIT_S, "depth": 6, "num_parallel_branches": 2},
        description="ViT-S/16 as 6 blocks of 2 branches",
    ),
    Config(
        "ViTWithPatchMerger",
        "vit_with_patch_merger",
        "ViT",
        {**VIT_S, "patch_merge_layer": 6, "patch_merge_num_tokens": 8},
        description="ViT-S/16, 64 -> 8 tokens after block 6",
    ),
    Config(
        "SmallDatasetViT", "vit_for_small_dataset", "ViT", VIT_S, description="ViT-S/16, SPT+LSA"
    ),
    Config(
        "CrossViT",
        "cross_vit",
        "CrossViT",
        readme("cross-vit-reference", image_size=128, lg_patch_size=32),
        description="README config, patches 16 and 32",
    ),
    Config(
        "T2TViT",
        "t2t",
        "T2TViT",
        readme("t2t-vit-reference", image_size=128),
        description="README config",
    ),
    Config(
        "PiT",
        "pit",
        "PiT",
        readme("pit-reference", image_size=128, patch_size=16),
        description="README config, patch 16",
    ),
    Config("CvT", "cvt", "CvT", readme("cvt-reference"), description="README config"),
    Config(
        "LeViT",
        "levit",
        "LeViT",
        readme("levit-reference", image_size=128),
        description="README config",
    ),
    Config(
        "NesT",
        "nest",
        "NesT",
        readme("nest-reference", image_size=128),
        description="README config",
    ),
    Config(
        "CrossFormer",
        "crossformer",
        "CrossFormer",
        readme("crossformer-reference", local_window_size=4),
        description="README config, local windows 4",
    ),
    Config(
        "RegionViT",
        "regionvit",
        "RegionViT",
        readme("regionvit-reference", window_size=8),
        description="README config, windows 8",
    ),
    Config(
        "ScalableViT",
        "scalable_vit",
        "ScalableViT",
        readme("scalable-vit-reference", window_size=(32, 16, None, None)),
        description="README config, windows 32 and 16",
    ),
    Config(
        "TwinsSVT",
        "twins_svt",
        "TwinsSVT",
        readme(
            "twins-svt-reference",
            s1_local_patch_size=8,
            s1_global_k=8,
            s2_local_patch_size=8,
            s2_global_k=4,
            s3_local_patch_size=8,
            s3_global_k=2,
            s4_local_patch_size=4,
            s4_global_k=1,
        ),
        description="README config, local windows 8 (4 last)",
    ),
]


# ---------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of `fn` over `iters` calls (`fn` blocks until its result is ready),
    after one untimed call: the other framework's worker threads may still be spinning
    when it hands over, and the first call pays for that."""
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def calibrate(fn: Callable[[], Any], min_time: float) -> int:
    """Iterations of `fn` (already warm) that last about `min_time` seconds."""
    return max(1, round(min_time / max(timed(fn, 1), 1e-6)))


def alternate(fns: dict[str, Callable[[], Any]], reps: int, min_time: float) -> dict[str, float]:
    """Median seconds per call of each function, repetitions interleaved."""
    iters = {name: calibrate(fn, min_time) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, iters[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_rates(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an `n x n` float32 matrix product in each framework."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    ja = jnp.asarray(a)
    jdot = jax.jit(jnp.dot)
    jdot(ja, ja).block_until_ready()
    torch.mm(ta, ta)
    secs = alternate(
        {"torch": lambda: torch.mm(ta, ta), "jax": lambda: jdot(ja, ja).block_until_ready()},
        reps,
        0.3,
    )
    return {name: 2 * n**3 / s / 1e9 for name, s in secs.items()}


# Instruction-set extensions that decide which kernels the frameworks run (AVX-512 float32
# GEMMs; bfloat16 dot products; AMX bfloat16 tiles).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> dict[str, Any]:
    """The CPU the numbers were measured on: its model, logical cores and the ISA flags
    above that it has (from `/proc/cpuinfo` on Linux)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


def describe(saved: dict[str, Any]) -> str:
    """One line: the CPU and the matrix-product rates of a run (as saved by `--json`)."""
    cpu = saved.get("cpu") or {"model": saved.get("machine", "unknown CPU"), "cores": "?"}
    isa = ", ".join(cpu.get("isa", [])) or "no ISA flags recorded"
    rates = saved.get("matmul_gflops", {})
    rate = ", ".join(f"{name} {value:.0f}" for name, value in rates.items())
    return (
        f"{cpu['model']}, {cpu['cores']} cores ({isa}); float32 2048x2048 matmul GFLOP/s: "
        f"{rate}; batch {saved.get('batch', BATCH)}, images/s, median of {saved.get('reps', '?')}"
        + ("; eqx_vision training step donated" if saved.get("donate") else "")
    )


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write `result` to `path` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def merge_saved(paths: list[str]) -> tuple[str, list[str], list[dict[str, Any]]]:
    """The precision, the description lines and the rows of runs saved by `--json`.

    Raises `ValueError` if a file is not such a run or the runs mix precisions."""
    precisions, lines, rows = set(), [], []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read results from {path}: {e}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("rows"), list):
            raise ValueError(
                f"{path} holds no results of this benchmark (expected the JSON written by "
                "--json, with a 'rows' list)."
            )
        precisions.add(saved.get("precision", "float32"))
        lines.append(describe(saved))
        rows += saved["rows"]
    if len(precisions) > 1:
        raise ValueError(f"the runs mix precisions {sorted(precisions)}; give runs of one.")
    return precisions.pop(), lines, rows


# ---------------------------------------------------------------------------- models


def build(config: Config, seed: int = 0) -> tuple[torch.nn.Module, Any, eqx.nn.State]:
    """The vit-pytorch module and the eqx_vision model with the same weights."""
    torch.manual_seed(seed)
    torch_model = getattr(reference(config.module), config.cls)(**config.kwargs)
    cls = getattr(ev, config.name)
    model, state = eqx.nn.make_with_state(cls)(**config.kwargs, key=jax.random.key(seed))
    if rates := active_rates(model):
        raise ValueError(f"{config.name}: dropout must be 0 in a benchmark; got rates {rates}.")
    if training.is_stateful(model):
        model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    else:
        model = ev.from_vit_pytorch(model, torch_model.state_dict())
    return torch_model, model, state


REMAT = list(ev.layers.REMAT)


def with_checkpointing(model: Any, remat: str) -> Any:
    """`model` with gradient-checkpointing policy `remat` in every stack of blocks."""
    return ev.remat(model, remat)


def train_step_memory(config: Config, modes: list[str]) -> dict[str, Any]:
    """Temporary memory (MiB) of the compiled training step in each checkpointing mode."""
    cls = getattr(ev, config.name)
    model, state = eqx.nn.make_with_state(cls)(**config.kwargs, key=jax.random.key(0))
    optimizer = optax.adamw(1e-4, weight_decay=0.05)
    images = jnp.zeros((BATCH, 3, *config.image_size))
    labels = jnp.zeros((BATCH,), jnp.int32)
    row: dict[str, Any] = {"system": config.name, "params": training.count_params(model)}
    for mode in modes:
        m = with_checkpointing(model, mode)
        opt_state = training.init_optimizer(optimizer, m)  # its structure holds the policy
        compiled = training.train_step.lower(  # pyright: ignore[reportFunctionMemberAccess]
            m, state, opt_state, images, labels, jax.random.key(1), optimizer=optimizer
        ).compile()
        row[f"temp_mib_{mode}"] = compiled.compiled.memory_analysis().temp_size_in_bytes / 2**20
    return row


def first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def bench_config(
    config: Config,
    reps: int,
    min_time: float,
    remat: str,
    precision: str,
    donate: bool = False,
) -> dict[str, Any]:
    """One row of the table: inference and training-step throughput of both frameworks.

    With `precision="bfloat16"`, eqx_vision runs in bfloat16 (`ev.Precision`) and torch
    both in float32 and under `torch.autocast("cpu", dtype=torch.bfloat16)`. With `donate`,
    the eqx_vision training step consumes the model, its state and the optimizer state it
    is given (the batch and the key, used again at every call, are kept).
    """
    torch_model, model, state = build(config)
    model = with_checkpointing(model, remat)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 3, *config.image_size), dtype=np.float32)
    labels = rng.integers(0, config.kwargs.get("num_classes", 1000), BATCH)
    t_images, t_labels = torch.from_numpy(images), torch.from_numpy(labels)
    j_images, j_labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    row: dict[str, Any] = {
        "system": config.name,
        "config": config.description,
        "params": training.count_params(model),
        "precision": precision,
    }
    torch_modes: dict[str, Callable[[], Any]] = {"torch": contextlib.nullcontext}
    if precision == "bfloat16":
        torch_modes["torch_bf16"] = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

    # Inference.
    infer_model = eqx.nn.inference_mode(model)
    infer = eqx.filter_jit(lambda m, s, x: training.apply_model(m, s, x, precision=precision)[0])
    start = time.perf_counter()
    infer_compiled = infer.lower(infer_model, state, j_images).compile()  # pyright: ignore[reportFunctionMemberAccess]
    row["compile_infer_s"] = time.perf_counter() - start
    torch_model.eval()
    with torch.inference_mode():
        expected = first(torch_model(t_images)).numpy()
    actual = np.asarray(infer_compiled(infer_model, state, j_images))
    row["rel_err"] = float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))

    def torch_infer(mode):
        def run():
            with torch.inference_mode(), mode():
                return torch_model(t_images)

        return run

    def eqx_infer():
        return infer_compiled(infer_model, state, j_images).block_until_ready()

    fns = {name: torch_infer(mode) for name, mode in torch_modes.items()}
    secs = alternate({**fns, "eqx": eqx_infer}, reps, min_time)
    for name, sec in secs.items():
        row[f"infer_{name}"] = BATCH / sec

    # Training step.
    torch_model.train()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, weight_decay=0.05)

    def torch_step(mode):
        def run():
            with mode():
                loss = F.cross_entropy(first(torch_model(t_images)).float(), t_labels)
            torch_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch_opt.step()
            return loss

        return run

    optimizer = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = training.init_optimizer(optimizer, model)
    key = jax.random.key(1)

    def loop_step(kept, model, state, opt_state):
        """`train_step` with what is used again (batch and key) first, out of the donation."""
        images, labels, key = kept
        return training.train_step(
            model, state, opt_state, images, labels, key, optimizer=optimizer, precision=precision
        )

    jitted = eqx.filter_jit(loop_step, donate="all-except-first" if donate else "none")
    kept = (j_images, j_labels, key)
    if donate:  # the donated arrays are consumed: give the step copies of its own
        fresh = (model, state, opt_state)
        model, state, opt_state = jax.tree.map(
            lambda x: jnp.copy(x) if eqx.is_array(x) else x, fresh
        )
    start = time.perf_counter()
    step = jitted.lower(kept, model, state, opt_state).compile()  # pyright: ignore[reportFunctionMemberAccess]
    row["compile_train_s"] = time.perf_counter() - start
    row["train_temp_mib"] = step.compiled.memory_analysis().temp_size_in_bytes / 2**20
    row["donated"] = donate
    carry = [model, state, opt_state]

    def eqx_step():
        carry[0], carry[1], carry[2], loss = step(kept, *carry)
        return loss.block_until_ready()

    fns = {name: torch_step(mode) for name, mode in torch_modes.items()}
    secs = alternate({**fns, "eqx": eqx_step}, reps, min_time)
    for name, sec in secs.items():
        row[f"train_{name}"] = BATCH / sec
    for task in ("infer", "train"):
        for name in torch_modes:
            suffix = name.removeprefix("torch")
            row[f"{task}_ratio{suffix}"] = row[f"{task}_eqx"] / row[f"{task}_{name}"]
    return row


# ---------------------------------------------------------------------------- report


def columns(precision: str) -> list[tuple[str, str, str]]:
    """(key, format, title) of each column of the table."""
    cols = [("system", "{:<19}", "system"), ("params", "{:>6.1f}M", "params")]
    for task in ("infer", "train"):
        cols += [(f"{task}_eqx", "{:>7.1f}", f"{task} eqx"), (f"{task}_torch", "{:>7.1f}", "torch")]
        if precision == "bfloat16":
            cols.append((f"{task}_torch_bf16", "{:>7.1f}", "torch bf16"))
        cols.append((f"{task}_ratio", "{:>5.2f}", "ratio"))
        if precision == "bfloat16":
            cols.append((f"{task}_ratio_bf16", "{:>5.2f}", "ratio bf16"))
    cols += [
        ("compile_infer_s", "{:>5.1f}", "compile infer (s)"),
        ("compile_train_s", "{:>5.1f}", "compile train (s)"),
        ("train_temp_mib", "{:>6.0f}", "train MiB"),
        ("rel_err", "{:>7.1e}", "rel. err."),
    ]
    return cols


def format_row(row: dict[str, Any], precision: str) -> str:
    cells = []
    for key, fmt, _ in columns(precision):
        value = row.get(key, float("nan"))
        cells.append(fmt.format(value / 1e6 if key == "params" else value))
    return "| " + " | ".join(cells) + " |"


def header(precision: str) -> str:
    titles = [title for _, _, title in columns(precision)]
    return "| " + " | ".join(titles) + " |\n|" + "---|" * len(titles)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [c.name for c in CONFIGS]
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help=f"systems to run (default: all): {names}"
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    parser.add_argument(
        "--min-time", type=float, default=0.5, help="seconds per repetition (at least one call)"
    )
    parser.add_argument(
        "--remat",
        choices=REMAT,
        default="linear",
        help="gradient-checkpointing policy of the eqx_vision block stacks (default: linear)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only report the training step's working memory under each checkpointing policy",
    )
    parser.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype of eqx_vision (default: float32); with bfloat16, torch runs both "
        "in float32 and under bfloat16 autocast",
    )
    parser.add_argument(
        "--donate",
        action="store_true",
        help="donate the model, its state and the optimizer state to the eqx_vision training "
        "step, as a training loop that rebinds them can (default: allocate them afresh)",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print one table of earlier results (files written by --json, one precision) and exit",
    )
    args = parser.parse_args()
    if args.table:
        try:
            precision, lines, rows = merge_saved(args.table)
        except ValueError as e:
            parser.error(str(e))
        print("\n".join(lines))
        print(header(precision))
        for row in rows:
            print(format_row(row, precision))
        return
    by_name = {c.name.lower(): c for c in CONFIGS}
    selected = CONFIGS
    if args.models:
        unknown = [m for m in args.models if m.lower() not in by_name]
        if unknown:
            parser.error(f"unknown system(s) {unknown}; expected some of {names}")
        selected = [by_name[m.lower()] for m in args.models]
    if args.reps < 1:
        parser.error(f"--reps must be at least 1; got {args.reps}")

    if args.memory:
        modes = REMAT
        print(f"training step working memory (MiB), batch {BATCH}, per remat policy")
        titles = " | ".join(f"{m:>8}" for m in modes)
        print(f"{'system':<19} | {titles} | all/linear | all/inputs")
        rows = []
        for config in selected:
            row = train_step_memory(config, modes)
            rows.append(row)
            values = [row[f"temp_mib_{m}"] for m in modes]
            cells = " | ".join(f"{v:>8.0f}" for v in values)
            saved = f"{values[0] / values[1]:>9.2f}x | {values[0] / values[2]:>9.2f}x"
            print(f"{config.name:<19} | {cells} | {saved}", flush=True)
        if args.json:
            write_json(args.json, {"batch": BATCH, "cpu": cpu_description(), "rows": rows})
        return

    result: dict[str, Any] = {
        "cpu": cpu_description(),
        "versions": {
            "jax": jax.__version__,
            "equinox": eqx.__version__,
            "torch": torch.__version__,
        },
        "batch": BATCH,
        "reps": args.reps,
        "remat": args.remat,
        "donate": args.donate,
        "precision": args.precision,
        "matmul_gflops": matmul_rates(),
        "rows": [],
    }
    print(describe(result))
    print(header(args.precision))
    for config in selected:
        row = bench_config(
            config, args.reps, args.min_time, args.remat, args.precision, args.donate
        )
        result["rows"].append(row)
        print(format_row(row, args.precision), flush=True)
        if args.json:  # after every row: an interrupted run keeps what it measured
            write_json(args.json, result)


if __name__ == "__main__":
    main()
