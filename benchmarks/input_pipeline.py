"""Images per second of the streaming input pipeline against a torch `DataLoader`.

Both decode JPEGs with Pillow, take a random resized crop to 224x224 and flip at random
(the same `eqx_vision.data.TrainTransform`, so the same Pillow operations on the same
files), and stack batches of uint8 images; eqx_vision through grain (`StreamingData`,
worker processes with `mp_prefetch`, one read thread per worker), torch through
`torch.utils.data.DataLoader` (the same number of worker processes, started as torch
starts them by default). They run side by
side in one process, alternating, `--repeats` times each; the table gives the median
images/s of each and the ratio, at each number of workers.

The images: a generated folder of `--images` JPEGs of 500x375 (random smooth colours,
quality 90) in 10 class folders, created under `--folder` if it is not there.

    python benchmarks/input_pipeline.py                       # 2,000 images, 1 and 2 workers
    python benchmarks/input_pipeline.py --json out.json
"""

import argparse
import json
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


def grain_rate(folder: data.ImageFolder, workers: int, batch: int, epoch: int) -> float:
    ds = data.StreamingData(
        folder, image_size=(224, 224), workers=workers, process_index=0, process_count=1
    )
    start = time.perf_counter()
    n = 0
    for images, _ in ds.train_batches(epoch, batch, seed=0):
        n += len(images)
    return n / (time.perf_counter() - start)


class _TorchFiles:
    # A map-style torch data set by its protocol (`__len__`, `__getitem__`).
    """A torch map-style data set over the same files and transform."""

    def __init__(self, folder: data.ImageFolder, epoch: int):
        self.folder = folder
        self.transform = data.TrainTransform((224, 224), 3, data.Augment(), 0, epoch)

    def __len__(self) -> int:
        return len(self.folder.train_paths)

    def __getitem__(self, i: int) -> Any:
        image, label = self.transform((i, self.folder.train_paths[i], 0))
        return image, label


def torch_rate(folder: data.ImageFolder, workers: int, batch: int, epoch: int) -> float:
    import torch

    loader = torch.utils.data.DataLoader(
        _TorchFiles(folder, epoch),  # pyright: ignore[reportArgumentType]
        batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers,  # started as torch starts them by default (fork on Linux)
    )  # fmt: skip
    start = time.perf_counter()
    n = 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/eqx_vision_jpegs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    root = make_jpeg_folder(os.path.join(args.folder, str(args.images)), args.images)
    folder = data.scan_folder(root)
    rows = []
    for workers in args.workers:
        rates: dict[str, list[float]] = {"grain": [], "torch": []}
        for repeat in range(args.repeats):
            rates["grain"].append(grain_rate(folder, workers, args.batch_size, repeat))
            rates["torch"].append(torch_rate(folder, workers, args.batch_size, repeat))
        grain, torch_ = statistics.median(rates["grain"]), statistics.median(rates["torch"])
        rows.append({"workers": workers, "grain": round(grain, 1), "torch": round(torch_, 1),
                     "ratio": round(grain / torch_, 3), "runs": rates})  # fmt: skip
    print(f"{args.images} JPEGs of 500x375 -> random resized crop 224, flip; batch "
          f"{args.batch_size}; median of {args.repeats} epochs, alternating")  # fmt: skip
    print(f"{'workers':>7}  {'eqx_vision (grain)':>18}  {'torch DataLoader':>16}  {'ratio':>6}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['grain']:>14.1f} i/s  {r['torch']:>12.1f} i/s  "
              f"{r['ratio']:>6.2f}")  # fmt: skip
    if args.json:
        result = {"images": args.images, "batch_size": args.batch_size,
                  "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "python": sys.version.split()[0], "rows": rows}  # fmt: skip
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
