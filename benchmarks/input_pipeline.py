"""Images per second of the streaming input pipeline against a torch `DataLoader`.

Both decode JPEGs with Pillow, take a random resized crop to 224x224 and flip at random
(the same `eqx_vision.data.TrainTransform`, so the same Pillow operations on the same
files), and stack batches of uint8 images; eqx_vision through grain (`StreamingData`,
worker processes with `mp_prefetch`, one read thread per worker), torch through
`torch.utils.data.DataLoader` (the same number of worker processes, started as torch
starts them by default). They run side by
side in one process, alternating, `--repeats` times each, each run `--epochs` epochs of a
new pipeline (its start included; torch's workers persistent across the epochs, as grain's
are); the table gives the median images/s of each and the ratio, at each number of
workers, and for grain each number of read threads per worker (torch's workers have one).

`--randaugment SPEC ...` adds RandAugment (`eqx_vision.data.RandAugment.from_spec`, e.g.
`m9-n2-mstd0.5`; `none` for none) after the crop and flip, one set of rows per spec, to
measure its cost (also given as CPU milliseconds per image of the transform in one process,
which a machine loaded by other work changes less than images/s); `--no-torch` times grain
alone.

The images: a generated folder of `--images` JPEGs of 500x375 (random smooth colours,
quality 90) in 10 class folders, created under `--folder` if it is not there.

    python benchmarks/input_pipeline.py                       # 2,000 images, 1 and 2 workers
    python benchmarks/input_pipeline.py --json out.json
    python benchmarks/input_pipeline.py --workers 2 --threads 2 --randaugment none m9-n2-mstd0.5
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

from eqx_vision import data


def make_jpeg_folder(root: str, images: int, classes: int = 10, seed: int = 0) -> str:
    """`root/train/<class>/<i>.jpg` and `root/val/<class>/<i>.jpg` (a tenth as many) of
    500x375 JPEGs; kept if `root` already holds them."""
    from PIL import Image

    marker = os.path.join(root, f".complete-{images}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % classes:02d}")
            os.makedirs(folder, exist_ok=True)
            # Smooth random colours (a small image upsampled), so JPEG sizes are realistic.
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 13, (375, 500, 3))
            pixels = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    open(marker, "w").close()
    return root


def augment_of(spec: str) -> data.Augment:
    """Crop and flip, and RandAugment as `spec` says (`none`: none)."""
    return data.Augment(randaugment=None if spec == "none" else data.RandAugment.from_spec(spec))


def grain_rate(
    folder: data.ImageFolder, workers: int, threads: int, batch: int, epochs: int,
    augment: data.Augment | None = None,
) -> dict[str, float]:  # fmt: skip
    """The timings (`_timed`) of `epochs` epochs of a new pipeline."""
    ds = data.StreamingData(
        folder, image_size=(224, 224), workers=workers, threads=threads,
        process_index=0, process_count=1, augment=augment or data.Augment(),
    )  # fmt: skip
    return _timed(ds.train_batches(epoch, batch, seed=0) for epoch in range(epochs))


def transform_cost(folder: data.ImageFolder, augment: data.Augment, images: int) -> float:
    """CPU milliseconds per image of the training transform (decode, crop, flip and any
    RandAugment) in this process, over the first `images` files: the work each image
    costs a worker, which a loaded machine changes less than it changes images/s."""
    transform = data.TrainTransform((224, 224), 3, augment, 0)
    paths = folder.train_paths[:images]
    start = time.process_time()
    for i, path in enumerate(paths):
        transform((0, i, path, 0))
    return (time.process_time() - start) / len(paths) * 1e3


def _timed(epochs: Any) -> dict[str, float]:
    """Seconds to the first batch, images/s after it and images/s over the whole run."""
    start = time.perf_counter()
    first = None
    n = n0 = 0
    for batches in epochs:
        for images, _ in batches:
            n += len(images)
            if first is None:
                first, n0 = time.perf_counter(), n
    end = time.perf_counter()
    assert first is not None
    return {"first": first - start, "steady": (n - n0) / (end - first), "whole": n / (end - start)}


class _TorchFiles:
    # A map-style torch data set by its protocol (`__len__`, `__getitem__`).
    """A torch map-style data set over the same files and transform."""

    def __init__(self, folder: data.ImageFolder, augment: data.Augment):
        self.folder = folder
        self.transform = data.TrainTransform((224, 224), 3, augment, 0)

    def __len__(self) -> int:
        return len(self.folder.train_paths)

    def __getitem__(self, i: int) -> Any:
        image, label = self.transform((0, i, self.folder.train_paths[i], 0))
        return image, label


def torch_rate(
    folder: data.ImageFolder, workers: int, batch: int, epochs: int,
    augment: data.Augment | None = None,
) -> dict[str, float]:  # fmt: skip
    """The timings (`_timed`) of `epochs` epochs of a new `DataLoader`."""
    import torch

    loader = torch.utils.data.DataLoader(
        _TorchFiles(folder, augment or data.Augment()),  # pyright: ignore[reportArgumentType]
        batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip
    return _timed(loader for _ in range(epochs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/eqx_vision_jpegs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2],
        help="read threads per grain worker: one row each",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--randaugment", nargs="+", default=["none"], metavar="SPEC",
        help="RandAugment after the crop and flip (e.g. m9-n2-mstd0.5; none): rows for each",
    )  # fmt: skip
    parser.add_argument(
        "--torch", action=argparse.BooleanOptionalAction, default=True,
        help="also time a torch DataLoader (default: yes)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    root = make_jpeg_folder(os.path.join(args.folder, str(args.images)), args.images)
    folder = data.scan_folder(root)
    augments = {spec: augment_of(spec) for spec in args.randaugment}
    costs: dict[str, list[float]] = {spec: [] for spec in augments}
    for _ in range(args.repeats):
        for spec, augment in augments.items():
            costs[spec].append(transform_cost(folder, augment, min(300, len(folder.train_paths))))
    print("training transform, CPU ms per 224x224 image in one process (median of "
          f"{args.repeats}, alternating):")  # fmt: skip
    for spec in augments:
        print(f"{spec:>24} {statistics.median(costs[spec]):7.2f}")
    nan = {"first": math.nan, "steady": math.nan, "whole": math.nan}
    # Timings by (randaugment, workers, "grain-<threads>" or "torch"); every setting is run
    # once per repeat, in turn, so that a change in the machine's load affects them alike.
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for spec, augment in augments.items():
            for workers in args.workers:
                for threads in args.threads:
                    timing = grain_rate(
                        folder, workers, threads, args.batch_size, args.epochs, augment
                    )
                    runs.setdefault((spec, workers, f"grain-{threads}"), []).append(timing)
                runs.setdefault((spec, workers, "torch"), []).append(
                    torch_rate(folder, workers, args.batch_size, args.epochs, augment)
                    if args.torch
                    else nan
                )
    rows = []
    for spec in augments:
        for workers in args.workers:
            torch_runs = runs[spec, workers, "torch"]
            for threads in args.threads:
                grain_runs = runs[spec, workers, f"grain-{threads}"]
                row: dict[str, Any] = {
                    "randaugment": spec,
                    "workers": workers,
                    "threads": threads,
                    "runs": {"grain": grain_runs, "torch": torch_runs},
                }
                for figure in ("first", "steady", "whole"):
                    row[f"grain_{figure}"] = round(
                        statistics.median(r[figure] for r in grain_runs), 3
                    )
                    row[f"torch_{figure}"] = round(
                        statistics.median(r[figure] for r in torch_runs), 3
                    )
                rows.append(row)
    print(f"{args.images} JPEGs of 500x375 -> random resized crop 224, flip, RandAugment as "
          f"given; batch {args.batch_size}; {args.epochs} epochs a run; median of "
          f"{args.repeats} runs, alternating; images/s after the first batch (steady) and "
          "over the run (whole)")  # fmt: skip
    print(f"{'randaugment':>24} {'workers':>7} {'threads':>7} | {'first batch s':>13} "
          f"{'steady i/s':>15} {'whole i/s':>15} | {'steady':>6} {'whole':>6}")  # fmt: skip
    print(f"{'':>24} {'':>7} {'(grain)':>7} | {'grain / torch':>13} {'grain / torch':>15} "
          f"{'grain / torch':>15} | {'ratio':>6} {'ratio':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['randaugment']:>24} {r['workers']:>7} {r['threads']:>7} | "
              f"{r['grain_first']:>6.2f}/{r['torch_first']:<6.2f} "
              f"{r['grain_steady']:>7.0f}/{r['torch_steady']:<7.0f} "
              f"{r['grain_whole']:>7.0f}/{r['torch_whole']:<7.0f} | "
              f"{r['grain_steady'] / r['torch_steady']:>6.2f} "
              f"{r['grain_whole'] / r['torch_whole']:>6.2f}")  # fmt: skip
    if args.json:
        result = {"images": args.images, "batch_size": args.batch_size, "epochs": args.epochs,
                  "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "python": sys.version.split()[0], "rows": rows,
                  "cpu_ms_per_image": {k: statistics.median(v)
                                       for k, v in costs.items()}}  # fmt: skip
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
