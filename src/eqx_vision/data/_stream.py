"""Streaming input from a folder of image files: only the file list is held; images are
decoded, augmented and batched by grain, in worker processes, while the device trains.

The pipeline of one epoch: the file list in the epoch's order (a permutation drawn from
`(seed, epoch)` alone, as `training.batches` draws it for the in-memory data), cut into
global batches; each process takes its rows of every global batch; each image is decoded
with Pillow, cropped and flipped by a generator seeded by `(seed, epoch, position)` (its
position in the epoch's order), so an augmentation never depends on the number of
workers or processes, nor on where a run was resumed; images cross to the device as
uint8 `(batch, channels, height, width)` and are normalised inside the compiled step
(`normalize`).
"""

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ._memory import (
    DataError,
    ImageFolder,
    _pillow,
    _pixels,
    _with_image,
    epoch_order,
    resize_center_crop,
    scan_folder,
)


__all__ = [
    "Augment",
    "EvalTransform",
    "StreamingData",
    "TrainTransform",
    "hflip",
    "random_resized_crop_box",
]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop `(top, left, crop_height, crop_width)` of an image `height x width`,
    as torchvision's `RandomResizedCrop` draws it (Szegedy et al., 2015): an area fraction
    uniform in `scale` and an aspect ratio log-uniform in `ratio`, up to 10 tries for a box
    that fits; else the centre crop of the largest box whose ratio lies in `ratio` (at
    least one pixel each way, where torchvision's can be empty). The box always lies
    inside the image."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, int(round(w / min(ratio))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, int(round(h * max(ratio))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class Augment:
    """The training-time augmentation of one image (done in the data workers).

    **Arguments:**

    - `scale`: the range of the random resized crop's area, as a fraction of the image's;
      `(1.0, 1.0)` with `ratio=(1.0, 1.0)`... only squashes the image to size.
    - `ratio`: the range of its aspect ratio (width over height).
    - `hflip`: the probability of a horizontal flip.
    - `interpolation`: how the crop is resized: `"bilinear"`, `"bicubic"` or `"nearest"`.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"Augment.scale must satisfy 0 < low <= high <= 1; got {self.scale}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"Augment.ratio must satisfy 0 < low <= high; got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"Augment.hflip is a probability in 0..1; got {self.hflip}")
        _check_interpolation(self.interpolation)


def _check_interpolation(name: str) -> None:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {name!r}")


def _resample(name: str) -> Any:
    image = _pillow()
    return {
        "bilinear": image.Resampling.BILINEAR,
        "bicubic": image.Resampling.BICUBIC,
        "nearest": image.Resampling.NEAREST,
    }[name]


def hflip(image: np.ndarray) -> np.ndarray:
    """`image` `(..., width)` mirrored left to right (a copy)."""
    return np.ascontiguousarray(image[..., ::-1])


def _converted(img: Any, channels: int, path: str) -> Any:
    """A Pillow image as 8-bit grey (`channels=1`) or RGB: 16-bit and float images scaled
    by their range as the in-memory reader scales them (not clipped), others converted by
    Pillow (alpha dropped)."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        pixels = _pixels(img, path, grey=True)[0]  # (height, width) in 0..1
        img = _pillow().fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    return img if img.mode == mode else img.convert(mode)


def _to_array(img: Any, channels: int) -> np.ndarray:
    """uint8 `(channels, height, width)` of a Pillow image already in the right mode."""
    pixels = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return pixels[None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Decode, random resized crop, flip: one training image as uint8
    `(channels, height, width)`, determined by `(seed, epoch, position)`.

    Called on `(epoch, position, path, label)` (`position`: the image's place in the
    epoch's order), returns `(image, label)`. Picklable: it runs in the data workers."""

    image_size: tuple[int, int]
    channels: int
    augment: Augment
    seed: int

    def rng(self, epoch: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, position])

    def __call__(self, item: tuple[int, int, str, int]) -> tuple[np.ndarray, int]:
        epoch, position, path, label = item
        rng = self.rng(epoch, position)
        resample = _resample(self.augment.interpolation)

        def transform(img: Any) -> np.ndarray:
            img = _converted(img, self.channels, path)
            top, left, h, w = random_resized_crop_box(
                rng, img.height, img.width, self.augment.scale, self.augment.ratio
            )
            img = img.crop((left, top, left + w, top + h))
            img = img.resize((self.image_size[1], self.image_size[0]), resample=resample)
            pixels = _to_array(img, self.channels)
            return hflip(pixels) if rng.random() < self.augment.hflip else pixels

        return _with_image(path, transform), label


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Decode, resize the shorter side to `size / crop_pct`, centre-crop `size` (timm's and
    big_vision's evaluation): one image as uint8 `(channels, height, width)`.

    Called on `(epoch, position, path, label)`, returns `(image, label)` (zeros for the
    padding of the last batch, whose `path` is `None`)."""

    image_size: tuple[int, int]
    channels: int
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __call__(self, item: tuple[int, int, str | None, int]) -> tuple[np.ndarray, int]:
        _, _, path, label = item
        height, width = self.image_size
        if path is None:
            return np.zeros((self.channels, height, width), np.uint8), label
        resample = _resample(self.interpolation)

        def transform(img: Any) -> np.ndarray:
            img = _converted(img, self.channels, path)
            img = resize_center_crop(img, self.image_size, self.crop_pct, resample)
            return _to_array(img, self.channels)

        return _with_image(path, transform), label


class _TestItems(Sequence):
    """`(0, position, path, label)` of the test files at `positions`, a position past the
    last file being padding (`path` `None`, label -1): the grain source of one process's
    evaluation batches."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, positions: np.ndarray):
        self.paths, self.labels, self.positions = paths, labels, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        position = int(self.positions[i])
        if position >= len(self.paths):
            return 0, position, None, -1
        return 0, position, self.paths[position], int(self.labels[position])


# How many epochs one training pipeline serves (its workers live as long as it does).
_EPOCHS_AHEAD = 10_000


class _TrainItems(Sequence):
    """`(epoch, position, path, label)` of this process's rows of every global batch from
    step `first_step` of `first_epoch` on, epoch after epoch: the grain source of one
    training pipeline. Each epoch's order (`epoch_order`) is drawn when first needed."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, *, seed: int,
                 batch_size: int, index: int, rows: int, first_epoch: int,
                 first_step: int):  # fmt: skip
        self.paths, self.labels, self.seed = paths, labels, seed
        self.batch_size, self.process, self.rows = batch_size, index, rows
        self.first_epoch, self.first_step = first_epoch, first_step
        self.steps = len(paths) // batch_size
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return (_EPOCHS_AHEAD * self.steps - self.first_step) * self.rows

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(len(self.paths), seed=self.seed, epoch=epoch)
        return self._orders[epoch]

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, row = divmod(i, self.rows)
        epoch, step = divmod(self.first_step + step, self.steps)
        epoch += self.first_epoch
        position = step * self.batch_size + self.process * self.rows + row
        example = int(self._order(epoch)[position])
        return epoch, position, self.paths[example], int(self.labels[example])


class _Running:
    """A training pipeline in flight and where it stands: the epoch and step of the next
    batch it yields."""

    def __init__(self, key: tuple[int, int], iterator: Any, epoch: int, step: int):
        self.key, self.iterator = key, iterator
        self.epoch, self.step = epoch, step

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


def _stack(items: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([image for image, _ in items])
    labels = np.asarray([label for _, label in items], np.int32)
    return images, labels


def _masked(items: Sequence[tuple[np.ndarray, int]]):
    """An evaluation batch and the mask of its real rows (the padding has label -1)."""
    images, labels = _stack(items)
    return images, np.maximum(labels, 0), labels >= 0


@dataclasses.dataclass(frozen=True)
class StreamingData:
    """Training and evaluation batches streamed from the files of an
    [`ImageFolder`][eqx_vision.data.ImageFolder] (see the module docstring).

    **Arguments:**

    - `folder`: the file lists (from [`scan_folder`][eqx_vision.data.scan_folder]).
    - `image_size`: `(height, width)` of the model's input.
    - `channels`: 1 (grey) or 3 (RGB): every image is converted to it.
    - `augment`: the training augmentation ([`Augment`][eqx_vision.data.Augment]).
    - `crop_pct`, `eval_interpolation`: the evaluation transform
      ([`EvalTransform`][eqx_vision.data.EvalTransform]).
    - `mean`, `std`: per-channel normalisation of the 0..1 pixels, applied on the device
      by `normalize`.
    - `workers`: data worker processes (grain's `mp_prefetch`); 0 decodes in this
      process, in `threads` threads.
    - `threads`: read threads per worker (or in this process; 0: none, each image read
      in turn). Pillow decodes and resizes outside Python's lock, so 2 threads use two
      cores.
    - `prefetch`: batches each worker prepares ahead.
    - `process_index`, `process_count`: this process's share of each global batch (its
      rows `[i * B / n, (i + 1) * B / n)`); by default `jax.process_index()` and
      `jax.process_count()`.
    """

    folder: ImageFolder
    image_size: tuple[int, int]
    channels: int = 3
    augment: Augment = Augment()
    crop_pct: float = 0.875
    eval_interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    workers: int = 0
    threads: int = 2
    prefetch: int = 2
    process_index: int | None = None
    process_count: int | None = None
    _running: dict[str, _Running] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {self.channels}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width) >= 1; got {self.image_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1]; got {self.crop_pct}")
        _check_interpolation(self.eval_interpolation)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.channels):
                raise ValueError(
                    f"{name} has one value or one per channel ({self.channels}); got {value}"
                )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive; got {self.std}")
        if self.workers < 0 or self.threads < 0 or self.prefetch < 1:
            raise ValueError(
                f"workers >= 0, threads >= 0 and prefetch >= 1; got {self.workers}, "
                f"{self.threads}, {self.prefetch}"
            )

    # What `training.fit` reads of a data set.
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.folder.class_names

    @property
    def num_classes(self) -> int:
        return len(self.folder.class_names)

    @property
    def source(self) -> str:
        return self.folder.root

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`(mean, std)`, with which the training step normalises the uint8 batches."""
        return tuple(self.mean), tuple(self.std)

    @property
    def num_train(self) -> int:
        return len(self.folder.train_paths)

    @property
    def num_test(self) -> int:
        return len(self.folder.test_paths)

    def _process(self) -> tuple[int, int]:
        if self.process_index is not None and self.process_count is not None:
            return self.process_index, self.process_count
        import jax

        return jax.process_index(), jax.process_count()

    def _local_batch(self, batch_size: int) -> tuple[int, int, int]:
        index, count = self._process()
        if batch_size % count:
            raise ValueError(
                f"the batch size {batch_size} must be a multiple of the {count} processes"
            )
        return index, count, batch_size // count

    def _iterate(self, source: Sequence, transform: Any, batch_fn: Any, rows: int) -> Iterator:
        import grain

        ds = grain.MapDataset.source(source).map(transform)
        ds = ds.batch(rows, drop_remainder=False, batch_fn=batch_fn)
        threads = self.threads
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch * rows)
        )
        if self.workers:
            _mark_flags_parsed()
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.workers, per_worker_buffer_size=self.prefetch
                )
            )
        return iter(it)

    def train_batches(
        self, epoch: int, batch_size: int, *, seed: int, start: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's part of each global batch of `epoch` from step `start` (of the
        epoch) on: `(images, labels)`, uint8 `(batch_size / processes, channels, height,
        width)` and int32. The last incomplete global batch is dropped.

        Asked for the epoch after the one just read (or the rest of an epoch read in
        part), the pipeline goes on with the same worker processes; otherwise it starts
        anew there."""
        index, _, rows = self._local_batch(batch_size)
        steps = self.num_train // batch_size
        if not 0 <= start <= steps:
            raise ValueError(f"start must lie in 0..{steps} (the steps of an epoch); got {start}")
        key = (batch_size, seed)
        running = self._running.get("train")
        if running is None or running.key != key or (running.epoch, running.step) != (epoch, start):
            if running is not None:
                running.close()
            source = _TrainItems(
                self.folder.train_paths, self.folder.train_labels, seed=seed,
                batch_size=batch_size, index=index, rows=rows, first_epoch=epoch,
                first_step=start,
            )  # fmt: skip
            transform = TrainTransform(self.image_size, self.channels, self.augment, seed)
            running = _Running(key, self._iterate(source, transform, _stack, rows), epoch, start)
            self._running["train"] = running
        return self._epoch(running, steps)

    @staticmethod
    def _epoch(running: _Running, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while running.step < steps:
            batch = next(running.iterator)
            running.step += 1
            yield batch
        running.epoch, running.step = running.epoch + 1, 0

    def test_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This process's part of each global evaluation batch, in the files' order:
        `(images, labels, mask)`, the last global batch padded to full size with zero
        images (`mask` marks the real rows)."""
        index, _, rows = self._local_batch(batch_size)
        steps = -(-self.num_test // batch_size)
        positions = (
            np.arange(steps)[:, None] * batch_size + index * rows + np.arange(rows)[None]
        ).reshape(-1)
        source = _TestItems(self.folder.test_paths, self.folder.test_labels, positions)
        transform = EvalTransform(
            self.image_size, self.channels, self.crop_pct, self.eval_interpolation
        )
        return self._iterate(source, transform, _masked, rows)


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an `absl.app` program they are
    not parsed, and the workers would fail on that."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def image_folder_stream(root: str, **kwargs: Any) -> StreamingData:
    """[`StreamingData`][eqx_vision.data.StreamingData] over the folder `root` (scanned by
    [`scan_folder`][eqx_vision.data.scan_folder]; the other arguments are
    `StreamingData`'s)."""
    if not os.path.isdir(root):
        raise DataError(f"expected a folder of images with train/ and val/; got {root}")
    return StreamingData(scan_folder(root), **kwargs)
