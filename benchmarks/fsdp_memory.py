"""Per-device memory of ViT-B/16's training step, replicated and sharded (FSDP).

The training step `eqx-vision train` runs (AdamW, clipping, donated arguments) for ViT-B/16
at 224 px (86.5 M parameters, 1000 classes) with `--batch` images on each device,
compiled for one device and, for each N of `--devices`, for N devices with the
parameters and optimizer state replicated (`DataParallel.create(N)`) and sharded over
them (`DataParallel.create(N, fsdp=True)`: each array of at least 1 MiB split along its
largest axis that N divides). Each row is one compilation, read through XLA's memory
analysis of the compiled program, which is that of one device's program:

- `params+opt`: the bytes of the parameters and AdamW's two moments on one device;
- `arguments`, `outputs`, `aliased`, `temporaries`, `code`: XLA's memory analysis
  (the outputs are written over the donated arguments: `aliased`; `code` is 0 on CPU);
- `total`: `arguments + outputs - aliased + temporaries`, the step's peak;
- the ratios of `params+opt` and `total` to those of the replicated run over as many
  devices.

Nothing is allocated: the model is built abstractly and the step compiled for abstract
inputs over an abstract mesh (`jax.sharding.AbstractMesh`), so N need not be the number
of devices of the machine (each row takes seconds on a CPU; see `eqx_vision.plan`).

    python benchmarks/fsdp_memory.py                      # batch 8 a device, N = 2, 4, 8
    python benchmarks/fsdp_memory.py --batch 32 --devices 2 4 8 16
    python benchmarks/fsdp_memory.py --precision bfloat16 --remat inputs
    python benchmarks/fsdp_memory.py --json out.json
"""

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import jax

from eqx_vision.layers import REMAT
from eqx_vision.plan import _abstract_parallel, _plan
from eqx_vision.precision import COMPUTE_DTYPES
from eqx_vision.presets import ModelConfig


VIT_B16 = ModelConfig(
    "ViT",
    dict(
        image_size=224,
        patch_size=16,
        num_classes=1000,
        dim=768,
        depth=12,
        heads=12,
        dim_head=64,
        mlp_dim=3072,
    ),  # fmt: skip
    image_size=(224, 224),
    channels=3,
)

MIB = 2**20


def measure(
    config: ModelConfig, batch: int, devices: int, fsdp: bool, precision: str, remat: str
) -> dict[str, Any]:
    """One row: the step over `devices` devices (one: no mesh), `batch` images each."""
    parallel = None if devices == 1 else _abstract_parallel(devices, fsdp=fsdp)
    start = time.perf_counter()
    plan = _plan(config, batch, (precision,), (remat,), parallel)
    seconds = time.perf_counter() - start
    [m] = plan.memory
    return {
        "setup": "one device" if devices == 1 else ("fsdp" if fsdp else "replicated"),
        "devices": devices,
        "params": plan.params,
        "param_bytes": plan.param_bytes,
        "arguments": m.arguments,
        "outputs": m.outputs,
        "aliased": m.aliased,
        "temporaries": m.temporaries,
        "generated_code": m.generated_code,
        "total": m.total,
        "compile_seconds": round(seconds, 2),
    }


COLUMNS = [
    ("setup", "{:<10}", "setup"),
    ("devices", "{:>7}", "devices"),
    ("param_bytes", "{:>10.1f}", "params+opt MiB"),
    ("arguments", "{:>9.1f}", "arguments MiB"),
    ("outputs", "{:>9.1f}", "outputs MiB"),
    ("aliased", "{:>9.1f}", "aliased MiB"),
    ("temporaries", "{:>9.1f}", "temporaries MiB"),
    ("generated_code", "{:>6.1f}", "code MiB"),
    ("total", "{:>9.1f}", "total MiB"),
    ("param_ratio", "{:>6.3f}", "params+opt / replicated"),
    ("total_ratio", "{:>6.3f}", "total / replicated"),
]
_BYTES = {"param_bytes", "arguments", "outputs", "aliased", "temporaries", "generated_code",
          "total"}  # fmt: skip


def header() -> str:
    titles = [title for _, _, title in COLUMNS]
    return "| " + " | ".join(titles) + " |\n|" + "---|" * len(titles)


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key, fmt, _ in COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append("")
            continue
        cells.append(fmt.format(value / MIB if key in _BYTES else value))
    return "| " + " | ".join(cells) + " |"


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write `result` to `path` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per device (default: 8)")
    parser.add_argument(
        "--devices", type=int, nargs="+", default=[2, 4, 8], help="N (default: 2 4 8)"
    )
    parser.add_argument("--precision", choices=COMPUTE_DTYPES, default="float32")
    parser.add_argument(
        "--remat",
        choices=tuple(REMAT),
        default="linear",
        help="the blocks' checkpointing policy (default: linear, as train)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.batch < 1 or any(n < 2 for n in args.devices):
        parser.error("--batch must be at least 1 and every --devices at least 2")
    result: dict[str, Any] = {
        "model": "ViT-B/16",
        "config": VIT_B16.to_json(),
        "batch_per_device": args.batch,
        "precision": args.precision,
        "remat": args.remat,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "rows": [],
    }
    print(
        f"ViT-B/16 at 224 px, training step (AdamW), batch {args.batch} a device, "
        f"{args.precision}, remat {args.remat}; memory per device"
    )
    print(header())
    rows = [measure(VIT_B16, args.batch, 1, False, args.precision, args.remat)]
    print(format_row(rows[0]), flush=True)
    for n in args.devices:
        replicated = measure(VIT_B16, args.batch, n, False, args.precision, args.remat)
        sharded = measure(VIT_B16, args.batch, n, True, args.precision, args.remat)
        for row in (replicated, sharded):
            row["param_ratio"] = row["param_bytes"] / replicated["param_bytes"]
            row["total_ratio"] = row["total"] / replicated["total"]
            rows.append(row)
            print(format_row(row), flush=True)
        result["rows"] = rows
        if args.json:  # after every N: an interrupted run keeps what it measured
            write_json(args.json, result)
    result["rows"] = rows
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
