"""Image-classification data for training: the embedded digits, image folders, `.npz` files.

**The embedded default: handwritten digits.** `eqx_vision/data/digits.npz` holds the
1,797 8x8 grey-scale images of handwritten digits (10 classes, about 180 each) of the UCI
Machine Learning Repository data set "Optical Recognition of Handwritten Digits"
(E. Alpaydin and C. Kaynak, 1998, https://doi.org/10.24432/C50P49), in the version that
scikit-learn ships as `sklearn.datasets.load_digits`. Each pixel counts the "on" pixels
of a 4x4 block of a 32x32 bitmap, 0 to 16. The data set is licensed under Creative
Commons Attribution 4.0 International (CC BY 4.0,
https://creativecommons.org/licenses/by/4.0/); it is stored here unchanged (as uint8)
together with its labels.

**Other data.** `load_dataset(spec)` also reads:

- a folder of images, one sub-folder per class (`root/cat/1.png`, `root/dog/2.jpg`, ...),
  read with Pillow; or a folder with `train/` and `test/` (or `val/`) sub-folders laid out
  the same way. A folder is read as a folder whatever its name (a folder named `x.npz`
  too). Files with an image extension (`.png`, `.jpg`, `.jpeg`, `.bmp`, `.gif`, `.tif`,
  `.tiff`, `.webp`, `.ppm`, `.pgm`) are read from each class folder and its
  sub-folders; names starting with `.` are skipped.
- an `.npz` file (a zip of `.npy` arrays, as `numpy.savez` writes) with `images`
  (`(N, H, W)` grey, `(N, C, H, W)` or `(N, H, W, C)` with 1, 3 or 4 channels, the
  fourth, alpha, dropped; height, width and channels at least 1) and integer `labels`
  `(N,)`, and optionally `test_images` and `test_labels` (both or neither) and
  `class_names` (a 1-D array of strings, one per class). Arrays of Python objects are
  not read.

What is read, exactly, and what is refused with a `DataError`:

- **Pixel values.** Integer pixels are scaled by the range of their type, never by the
  values found: 8-bit images and uint8 arrays by 255; 16-bit grey images (Pillow modes
  `I;16`, `I;16B`, `I;16L`, and `I` from 16-bit PNG and PGM files) and uint16 arrays by
  65535. Other integer types (signed, 32-bit) are refused. Float pixels (float arrays,
  32-bit float TIFF images) must lie in 0..1; values outside, NaN and infinities are
  refused, with the minimum and maximum found.
- **Channels.** A folder whose images are all grey (1-bit, 8-bit or 16-bit grey, with or
  without alpha) is read as one channel; otherwise every image is read as RGB (grey
  images repeated to three channels, at their full precision; palette, CMYK, ... images
  converted by Pillow; alpha dropped). `RawDataset.channels` is what was read: 1 or 3.
- **Image size.** An image of more pixels than Pillow's limit
  (`PIL.Image.MAX_IMAGE_PIXELS`) is refused as a possible decompression bomb.
- **Labels.** Class indices from 0; they must be below the number of `class_names`
  when these are given, and below `MAX_CLASSES` (2**20) otherwise.
- **Classes.** Without `class_names`, the classes of an `.npz` are 0 .. the largest
  label. A class without any training image (an empty class folder, a gap in the
  labels, a class name no label uses) is refused, naming the classes; with
  `keep_empty_classes=True` it is kept and a warning names it. A class with training
  images but none in an explicit test split is fine. Class names (folder names and
  `class_names` entries) must be non-empty, distinct and printable: no line breaks,
  tabs or other control characters.
- **Links.** A class folder may be a symbolic link to a folder outside the data folder.
  A class folder that resolves to the data folder or a folder that contains it, or to a
  folder that another class folder also reads (or that contains it or lies inside it),
  is refused: its images would be read twice or under two labels. Links to folders
  inside a class folder are not followed.

Without an explicit test split, a fixed stratified 20% of each class is held out (the same
for every run, whatever the training seed).

Images become float32 arrays `(N, channels, height, width)`: scaled to 0..1, converted
to the model's channels (grey repeated to 3 channels, or colour averaged to 1), resized
bilinearly to the model's image size, then normalised to -1..1 by `(x - 0.5) / 0.5`.
Every `DataError` message is one line.
"""

import dataclasses
import io
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


T = TypeVar("T")


__all__ = [
    "DIGITS",
    "MAX_CLASSES",
    "DataError",
    "Dataset",
    "ImageFolder",
    "TrainingData",
    "epoch_order",
    "padded_batches",
    "process_rows",
    "RawDataset",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_image",
    "load_npz",
    "prepare",
    "prepare_images",
    "scan_folder",
]

DIGITS = "digits"
"""The name of the embedded digits data set, for `load_dataset`."""

MAX_CLASSES = 2**20
"""The most classes a data set may have (labels are below it)."""

TEST_FRACTION = 0.2
SPLIT_SEED = 0
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
MEAN, STD = 0.5, 0.5
NPZ_KEYS = ("images", "labels", "test_images", "test_labels", "class_names")
# The first bytes of a zip archive (a file, or an empty archive) and of an .npy array.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
# Pillow modes of grey-scale images; every other mode is read as RGB.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Formats whose Pillow mode "I" holds 16-bit unsigned values (PNG, PGM with maxval > 255).
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
# What Pillow's decoders raise on malformed files, besides its own OSError subclasses.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)
NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


def _one_line(text: str) -> str:
    """`text` with every non-printable character (line breaks, tabs, ...) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DataError(ValueError):
    """A data set or an image that cannot be used: missing, empty, unreadable or malformed.

    The message is one line: line breaks and other control characters (of a file name,
    say) are escaped.
    """

    def __init__(self, message: str):
        super().__init__(_one_line(message))


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """Images as read, before resizing: each image an array `(channels, height, width)`
    scaled to 0..1 (float32), all of the same number of channels.

    `train_images` / `test_images` are either one array `(N, C, H, W)` (all images of one
    size) or a list of per-image arrays.
    """

    train_images: np.ndarray | list[np.ndarray]
    train_labels: np.ndarray
    test_images: np.ndarray | list[np.ndarray]
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    channels: int
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def process_rows(batch_size: int) -> tuple[int, int]:
    """`(first, stop)`: the rows of each global batch of `batch_size` that this process
    reads (all of them in a single process; `[i * B / n, (i + 1) * B / n)` for process `i`
    of `n`)."""
    index, count = jax.process_index(), jax.process_count()
    if batch_size % count:
        raise ValueError(f"the batch size {batch_size} must be a multiple of the {count} processes")
    rows = batch_size // count
    return index * rows, (index + 1) * rows


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in `epoch`: a permutation drawn from `(seed, epoch)`
    alone, so that a resumed run sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model-ready data held in memory: float32 `(N, channels, height, width)` normalised
    images and int32 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    def train_batches(
        self, epoch: int, batch_size: int, *, seed: int, start: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches `(images, labels)` of `epoch` from its step `start` on, in the order
        of `epoch_order`; the last incomplete batch is dropped. Across several processes,
        this process's rows of each (`process_rows`)."""
        first, stop = process_rows(batch_size)
        order = epoch_order(self.num_train, seed=seed, epoch=epoch)
        for step in range(start, self.num_train // batch_size):
            idx = order[step * batch_size : (step + 1) * batch_size][first:stop]
            yield self.train_images[idx], self.train_labels[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The test split in order, in batches `(images, labels, mask)` of `batch_size`
        (see `padded_batches`)."""
        return padded_batches(self.test_images, self.test_labels, batch_size)


def padded_batches(
    images: Any, labels: Any, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`images` and `labels` in order, in batches `(images, labels, mask)` of
    `batch_size`, the last one padded with zeros (`mask` marks the real rows), so that one
    compiled program serves every batch. Across several processes, this process's rows of
    each (`process_rows`)."""
    first, stop = process_rows(batch_size)
    for x, y, mask in _padded(images, labels, batch_size):
        yield x[first:stop], y[first:stop], mask[first:stop]


def _padded(
    images: Any, labels: Any, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for begin in range(0, len(labels), batch_size):
        x = np.asarray(images[begin : begin + batch_size])
        y = np.asarray(labels[begin : begin + batch_size])
        count = len(y)
        mask = np.arange(batch_size) < count
        if count < batch_size:
            pad = batch_size - count
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        yield x, y, mask


@runtime_checkable
class TrainingData(Protocol):
    """What [`training.fit`][eqx_vision.training.fit] reads of a data set: the in-memory
    [`Dataset`][eqx_vision.data.Dataset] and the streaming
    [`StreamingData`][eqx_vision.data.StreamingData] both are one."""

    @property
    def class_names(self) -> tuple[str, ...]: ...
    @property
    def source(self) -> str: ...
    @property
    def num_train(self) -> int: ...
    @property
    def num_test(self) -> int: ...
    def train_batches(
        self, epoch: int, batch_size: int, *, seed: int, start: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def test_batches(
        self, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of the indices of `labels` into (train, test): `test_fraction` of each
    class (rounded, at least one when a class has two or more examples) goes to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits() -> RawDataset:
    """The embedded handwritten digits (see the module docstring), with the fixed split."""
    with resources.files("eqx_vision").joinpath("data/digits.npz").open("rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        images, labels = arrays["images"], arrays["labels"]
    images = images[:, None].astype(np.float32) / 16.0
    labels = labels.astype(np.int32)
    train, test = stratified_split(labels)
    return RawDataset(
        images[train],
        labels[train],
        images[test],
        labels[test],
        tuple(str(d) for d in range(10)),
        1,
        DIGITS,
    )


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            'reading image files needs Pillow: pip install "eqx_vision[train]"'
        ) from e
    return Image


def _names(names: Iterable[str], limit: int = 10) -> str:
    """Class names for a message: quoted, the first `limit` of them."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _check_class_name(name: str, where: str) -> None:
    if not name or not name.isprintable():
        raise DataError(
            f"{where}: class name {name!r} is empty or holds a line break, tab or other "
            "non-printable character; class names must be printable text"
        )


def _check_unit_range(arr: np.ndarray, what: str) -> None:
    """Float pixels must be finite and lie in 0..1."""
    if not arr.size:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        raise DataError(
            f"{what} holds {int(arr.size - finite.sum())} NaN or infinite values; "
            "pixels must be finite floats in 0..1"
        )
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 1:
        raise DataError(
            f"{what} must hold floats in 0..1 (or integers: uint8 0..255, uint16 "
            f"0..65535); found values from {low:g} to {high:g}"
        )


def _pixels(img, path: str, grey: bool) -> np.ndarray:
    """A loaded PIL image as float32 `(channels, height, width)` in 0..1: one channel for
    grey modes, three for the others; `grey` converts colour images to grey (Pillow's
    "L")."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and img.format in SIXTEEN_BIT_I_FORMATS):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):  # not from a 16-bit file
            raise DataError(f"image {path}: 16-bit values out of 0..65535")
        arr = arr.astype(np.float32) / np.float32(65535)
    elif mode == "I":
        raise DataError(
            f"image {path}: {img.format} images of 32-bit or signed integers (Pillow mode "
            "I) are not read; grey images must be 8- or 16-bit unsigned, or floats in 0..1"
        )
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        _check_unit_range(arr, f"image {path}")
    elif mode in GREY_MODES or grey:
        arr = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255)
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def _read_pixels(path: str, *, grey: bool = False) -> np.ndarray:
    """An image file as float32 `(channels, height, width)` in 0..1: one channel for grey
    images, three for colour ones (or one with `grey`)."""
    return _with_image(path, lambda img: _pixels(img, path, grey))


def _with_image(path: str, use: Callable[[Any], T], *, load: bool = True) -> T:
    """`use(image)` on the Pillow image of a file, loaded (only opened, its header read,
    without `load`) with the decompression-bomb limit enforced; a file Pillow cannot read
    is a `DataError`."""
    if not os.path.isfile(path):  # a named pipe would block, a broken link not open
        raise DataError(f"expected an image file; {path} is not a regular file")
    image_mod = _pillow()
    bombs = (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning)
    # The size is checked here, not by turning Pillow's warning into an error with
    # `warnings.catch_warnings`, which is not thread-safe: the streaming pipeline reads
    # images in threads, and that would clobber the warning filters of the main thread.
    try:
        with image_mod.open(path) as img:
            limit = image_mod.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise image_mod.DecompressionBombError(f"({img.width * img.height} pixels)")
            if load:
                img.load()
            return use(img)
    except DataError:
        raise
    except bombs as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({found.group(1)} pixels)" if found else ""
        raise DataError(
            f"image {path} is larger{size} than the limit of {image_mod.MAX_IMAGE_PIXELS} "
            "pixels (PIL.Image.MAX_IMAGE_PIXELS): refused as a possible decompression bomb"
        ) from None
    except IMAGE_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def load_image(path: str, *, channels: int, image_size: tuple[int, int]) -> np.ndarray:
    """One image file, model-ready: `(channels, height, width)` float32, normalised.

    **Arguments:**

    - `path`: an image file Pillow can read (see the module docstring for what is read).
    - `channels`: 1 (grey) or 3 (RGB).
    - `image_size`: `(height, width)` to resize to (bilinear).

    Raises `DataError` if the file is missing, unreadable or refused.
    """
    if os.path.isdir(path):
        raise DataError(f"expected an image file; {path} is a folder")
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    pixels = _read_pixels(path, grey=channels == 1)
    return prepare_images([pixels], channels=channels, image_size=image_size)[0]


def _raise(error: OSError) -> NoReturn:
    raise DataError(f"cannot read folder {error.filename}: {error.strerror or error}")


def _list_classes(root: str) -> list[str]:
    """The sub-folders of `root` (links to folders included), sorted, hidden ones skipped."""
    try:
        entries = os.listdir(root)
    except OSError as e:
        _raise(e)
    return sorted(
        d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def _folder_hint(root: str) -> str:
    return " (it is a folder, not an .npz file)" if root.lower().endswith(".npz") else ""


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_links(folders: Sequence[str], root: str) -> None:
    """Refuse class folders that resolve to the data folder (or a folder containing it),
    or that overlap another class folder: their images would be read twice."""
    real_root = os.path.realpath(root)
    real = [os.path.realpath(f) for f in folders]
    for folder, target in zip(folders, real, strict=True):
        if _contains(target, real_root):
            raise DataError(
                f"class folder {folder} is a link to {target}, which holds the data folder "
                f"{root}: it would read the data again; links that loop back are not followed"
            )
    index: dict[str, str] = {}
    for folder, target in zip(folders, real, strict=True):
        if target in index:
            _overlap(index[target], folder)
        index[target] = folder
    for folder, target in zip(folders, real, strict=True):
        parent = os.path.dirname(target)
        while True:
            if parent in index:
                _overlap(index[parent], folder)
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)


def _overlap(first: str, second: str) -> NoReturn:
    raise DataError(
        f"class folders {first} and {second} read the same images (one is a link to the "
        "other or to a folder inside it, or holds it): each image must belong to one class"
    )


def _scan_folder(root: str, class_names: Sequence[str]) -> list[list[str]]:
    """The image files of each class folder, in a fixed order (none for a missing one)."""
    files = []
    for name in class_names:
        found = []
        if not os.path.isdir(os.path.join(root, name)):
            files.append(found)
            continue
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), onerror=_raise):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    found.append(os.path.join(dirpath, f))
        files.append(found)
    return files


def _check_empty_classes(
    counts: np.ndarray, class_names: Sequence[str], source: str, keep: bool
) -> None:
    """`counts[c]`: the training images of class `c`."""
    empty = [class_names[int(c)] for c in np.flatnonzero(counts == 0)]
    if not empty:
        return
    message = (
        f"{source}: {len(empty)} of {len(class_names)} classes have no training image: "
        f"{_names(empty)}"
    )
    if not keep:
        raise DataError(f"{message} (pass keep_empty_classes=True to keep them)")
    warnings.warn(_one_line(message), stacklevel=3)


def _read_files(files: Sequence[str]) -> list[np.ndarray]:
    return [_read_pixels(path) for path in files]


def _labels(files: Sequence[Sequence[str]]) -> np.ndarray:
    return np.repeat(np.arange(len(files), dtype=np.int32), [len(f) for f in files])


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The file lists of a folder of images, before anything is read: what
    [`scan_folder`][eqx_vision.data.scan_folder] finds.

    `train_paths` / `test_paths` are the image files of each split, `train_labels` /
    `test_labels` their class indices (int32), `class_names` the class folders' names,
    `root` the folder, `held_out` whether the test split was held out of the training
    images (a folder without `test/` or `val/`), `channels` 1 if the first image of every
    class is grey-scale, else 3 (only these images' headers are read).
    """

    train_paths: tuple[str, ...]
    train_labels: np.ndarray
    test_paths: tuple[str, ...]
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    root: str
    held_out: bool
    channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def source(self) -> str:
        return self.root

    @property
    def num_train(self) -> int:
        return len(self.train_paths)

    @property
    def num_test(self) -> int:
        return len(self.test_paths)


def _peek_channels(paths: Sequence[str], labels: np.ndarray) -> int:
    """1 if the first image of every class is grey-scale (by its header), else 3."""
    firsts = [paths[int(i)] for i in np.unique(labels, return_index=True)[1]]

    def grey(img: Any) -> bool:
        return img.mode in GREY_MODES

    return 1 if all(_with_image(path, grey, load=False) for path in firsts) else 3


def _image_files(folder: str) -> list[str]:
    """The image files directly in `folder` (not in its sub-folders), sorted."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        _raise(e)
    return [
        os.path.join(folder, f)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        and os.path.isfile(os.path.join(folder, f))
    ]  # fmt: skip


def _read_labels_file(
    path: str, test_root: str, files: Sequence[str], class_names: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """The labels of the images of a flat test folder from a labels file: one line
    `<file> <class>` per image (see `scan_folder`)."""
    index = {name: i for i, name in enumerate(class_names)}
    by_name: dict[str, str] = {}
    for f in files:
        relative = os.path.relpath(f, test_root)
        by_name[relative] = f
        by_name.setdefault(os.path.splitext(relative)[0], f)
    try:
        with open(path, encoding="utf-8") as fp:
            lines = fp.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the labels file {path}: {e}") from None
    labels: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split(",", 1) if "," in text else text.split(None, 1)
        name = fields[0].strip()
        label = fields[1].split()[0] if len(fields) == 2 and fields[1].split() else None
        if number == 1 and name not in by_name and label not in index:
            continue  # a header line (ImageId,PredictionString)
        if label is None:
            raise DataError(f"{path}, line {number}: expected '<file> <class>'; got {line!r}")
        if label not in index:
            raise DataError(
                f"{path}, line {number}: class {label!r} is not a class folder of train/ "
                f"(classes: {_names(class_names)})"
            )
        if name not in by_name:
            raise DataError(f"{path}, line {number}: {name!r} is not an image in {test_root}")
        file = by_name[name]
        if file in labels:
            raise DataError(f"{path}, line {number}: {name!r} is labelled twice")
        labels[file] = index[label]
    missing = [os.path.relpath(f, test_root) for f in files if f not in labels]
    if missing:
        raise DataError(
            f"{path} gives no label to {len(missing)} of the {len(files)} images in "
            f"{test_root}: {_names(missing, 5)}"
        )
    return list(files), np.asarray([labels[f] for f in files], np.int32)


def scan_folder(
    root: str, *, keep_empty_classes: bool = False, labels_file: str | None = None
) -> ImageFolder:
    """The file lists of a folder of images, without reading any image.

    The layouts read:

    - `root/<class>/...`: the images of each class folder (and its sub-folders); a fixed
      stratified 20% of each class is held out as the test split;
    - `root/train/<class>/...` with `root/test/<class>/...` or `root/val/<class>/...`;
    - `root/train/<class>/...` with a flat `root/val/` (images directly in it, as
      ImageNet's validation images come) and a labels file: `labels_file`, or
      `root/val_labels.txt` (`root/test_labels.txt` for `test/`). One line per image:
      its file name (relative to `val/`, with or without its extension) and its class
      folder's name, separated by a comma or spaces (`ILSVRC2012_val_00000001.JPEG
      n01751748`); lines starting with `#`, a header line and further fields (Kaggle's
      `LOC_val_solution.csv` boxes) are skipped.

    See the module docstring for the files, names and links refused.

    Raises `DataError` with a one-line message if the folder cannot be used.
    """
    if not os.path.exists(root):
        raise DataError(f"data folder not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"not a folder of images or an .npz file: {root}")
    top = _list_classes(root)
    test_dir = next((d for d in ("test", "val") if d in top), None)
    flat_test: list[str] | None = None
    if "train" in top and test_dir is not None:
        train_root, test_root = os.path.join(root, "train"), os.path.join(root, test_dir)
        class_names = _list_classes(train_root)
        if not class_names:
            raise DataError(f"no class sub-folders in {train_root}")
        test_names = _list_classes(test_root)
        if not test_names and _image_files(test_root):
            flat_test = _image_files(test_root)
        extra = set(test_names) - set(class_names)
        if extra:
            raise DataError(f"{test_root} has classes missing from train/: {sorted(extra)}")
        folders = [os.path.join(train_root, c) for c in class_names]
        folders += [os.path.join(test_root, c) for c in test_names]
    else:
        train_root, test_root = root, None
        class_names = top
        if not class_names:
            raise DataError(
                f"no class sub-folders in {root}: expected root/<class>/<image>{_folder_hint(root)}"
            )
        folders = [os.path.join(root, c) for c in class_names]
    for name in class_names:
        _check_class_name(name, os.path.join(train_root, name))
    _check_links(folders, root)
    train_files = _scan_folder(train_root, class_names)
    if not any(train_files):
        raise DataError(f"no images found in the class sub-folders of {root}{_folder_hint(root)}")
    if len(class_names) < 2:
        raise DataError(f"need at least 2 classes; {root} has {len(class_names)}")
    counts = np.array([len(f) for f in train_files])
    _check_empty_classes(counts, class_names, train_root, keep_empty_classes)
    train_paths = [f for files in train_files for f in files]
    train_labels = _labels(train_files)
    if flat_test is not None:
        assert test_root is not None and test_dir is not None
        labels_path = labels_file or os.path.join(root, f"{test_dir}_labels.txt")
        if not os.path.isfile(labels_path):
            raise DataError(
                f"{test_root} holds images but no class folders: their labels are read from "
                f"{labels_path}, which is missing (one line '<file> <class>' per image), or "
                f"lay {test_dir}/ out in class folders as train/ is"
            )
        test_paths, test_labels = _read_labels_file(labels_path, test_root, flat_test, class_names)
    elif test_root is not None:
        test_files = _scan_folder(test_root, class_names)
        test_paths = [f for files in test_files for f in files]
        test_labels = _labels(test_files) if test_files else np.zeros(0, np.int32)
    else:
        train_idx, test_idx = stratified_split(train_labels)
        test_paths = [train_paths[i] for i in test_idx]
        test_labels = train_labels[test_idx]
        train_paths = [train_paths[i] for i in train_idx]
        train_labels = train_labels[train_idx]
    if not len(test_labels):
        if test_root is not None:
            raise DataError(f"no test images in the class sub-folders of {test_root}")
        raise DataError(f"no test images in {root}: every class needs at least 2 images")
    return ImageFolder(
        tuple(train_paths),
        train_labels.astype(np.int32),
        tuple(test_paths),
        test_labels.astype(np.int32),
        tuple(class_names),
        os.path.abspath(root),
        test_root is None,
        _peek_channels(train_paths, train_labels),
    )


def load_folder(
    root: str, *, keep_empty_classes: bool = False, labels_file: str | None = None
) -> RawDataset:
    """A folder of images in class sub-folders (or with `train/` and `test/` or `val/`
    sub-folders of class sub-folders, or a flat `val/` with a labels file: the layouts of
    [`scan_folder`][eqx_vision.data.scan_folder]), every image read into memory. Grey-scale
    data stays one channel; anything else is read as RGB. See the module docstring for
    what is read and what is refused.

    **Arguments:**

    - `root`: the folder.
    - `keep_empty_classes`: keep class folders without any training image (with a
        warning naming them) instead of refusing them.
    - `labels_file`: the labels of a flat `val/` folder (see `scan_folder`).

    Raises `DataError` with a one-line message if the folder cannot be used.
    """
    folder = scan_folder(root, keep_empty_classes=keep_empty_classes, labels_file=labels_file)
    train_images = _read_files(folder.train_paths)
    test_images = _read_files(folder.test_paths)
    channels = max((im.shape[0] for im in train_images + test_images), default=1)
    if channels == 3:
        train_images = [_convert_channels(im, 3) for im in train_images]
        test_images = [_convert_channels(im, 3) for im in test_images]
    return RawDataset(
        train_images,
        folder.train_labels,
        test_images,
        folder.test_labels,
        folder.class_names,
        channels,
        folder.root,
    )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: str):
    """One `.npy` member of an `.npz`, after checking its header: no Python objects, and
    the size its shape and dtype announce."""
    with archive.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise DataError(
                f"{path} is not an .npz archive as numpy.savez writes: its member "
                f"{info.filename!r} has an unknown .npy format version {version}"
            )
        offset = fp.tell()
    if dtype.hasobject:
        raise DataError(
            f"{path}: array {key!r} holds Python objects (dtype {dtype}), which are not "
            "read; save numbers (images, labels) or strings (class_names)"
        )
    expected = math.prod(shape) * dtype.itemsize
    if expected != info.file_size - offset:
        raise DataError(
            f"{path}: array {key!r} is malformed: its header gives {dtype} of shape {shape} "
            f"({expected} bytes) but it holds {info.file_size - offset} bytes"
        )
    with archive.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of `NPZ_KEYS` an `.npz` holds, and the names of all its arrays."""
    not_npz = f"{path} is not an .npz archive (a zip of .npy arrays, as numpy.savez writes)"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if magic.startswith(NPY_MAGIC):
        raise DataError(f"{not_npz}: it is a single .npy array")
    if not magic.startswith(ZIP_MAGIC):
        raise DataError(not_npz)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {
                info.filename[: -len(".npy")]: info
                for info in archive.infolist()
                if info.filename.endswith(".npy") and not info.is_dir()
            }
            arrays = {
                key: _read_member(archive, members[key], key, path)
                for key in NPZ_KEYS
                if key in members
            }
    except DataError:
        raise
    except NPZ_ERRORS as e:
        raise DataError(f"{not_npz}: {type(e).__name__}: {e}") from None
    return arrays, sorted(members)


def _npz_images(arr: np.ndarray, name: str, path: str) -> np.ndarray:
    shape = arr.shape
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] not in (1, 3, 4) and arr.shape[3] in (1, 3, 4):
            arr = np.moveaxis(arr, 3, 1)
        elif arr.shape[1] not in (1, 3, 4):
            raise DataError(
                f"{path}: {name} of shape {shape} has no channel axis of size 1, 3 or 4"
            )
    else:
        raise DataError(
            f"{path}: {name} must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {shape}"
        )
    if 0 in arr.shape[2:]:
        raise DataError(
            f"{path}: {name} of shape {shape} has images of height or width 0; "
            "expected at least 1 pixel"
        )
    if arr.shape[1] == 4:
        arr = arr[:, :3]
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size in (1, 2):
        return arr.astype(np.float32) / np.float32(255 if size == 1 else 65535)
    if kind == "f":
        _check_unit_range(arr, f"{path}: {name}")
        return arr.astype(np.float32)
    raise DataError(
        f"{path}: {name} must be uint8 (0..255), uint16 (0..65535) or floats in 0..1; "
        f"got {arr.dtype}"
    )


def _npz_labels(arr: np.ndarray, n: int, name: str, path: str, limit: int, of: str) -> np.ndarray:
    """Labels as int32, checked: `n` integers in 0..`limit` - 1."""
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {name} must be {n} integers; got {arr.dtype} of shape {arr.shape}"
        )
    if n:
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= limit:
            raise DataError(
                f"{path}: {name} must be class indices 0..{limit - 1} ({of}); "
                f"found {low if low < 0 else high}"
            )
    return arr.astype(np.int32)


def _npz_class_names(arr: np.ndarray, path: str) -> tuple[str, ...]:
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(
            f"{path}: class_names must be a 1-D array of strings; got {arr.dtype} of "
            f"shape {arr.shape}"
        )
    try:
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in arr.tolist())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: class_names holds bytes that are not UTF-8: {e}") from None
    for name in names:
        _check_class_name(name, f"{path}: class_names")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: class_names must be distinct; repeated: {_names(twice)}")
    return names


def load_npz(path: str, *, keep_empty_classes: bool = False) -> RawDataset:
    """An `.npz` file with `images` and `labels` (and optional `test_images`, `test_labels`,
    `class_names`). See the module docstring for what is read and what is refused.

    **Arguments:**

    - `path`: the file.
    - `keep_empty_classes`: keep classes without any training image (with a warning naming
        them) instead of refusing them.

    Raises `DataError` with a one-line message if the file cannot be used.
    """
    if os.path.isdir(path):
        raise DataError(f"expected an .npz file; {path} is a folder")
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"expected an .npz file; {path} is not a regular file")
    arrays, names = _read_npz(path)
    for k in ("images", "labels"):
        if k not in arrays:
            raise DataError(f"{path} has no array '{k}' (it has {names})")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(f"{path}: give both test_images and test_labels, or neither")
    class_names = None
    if "class_names" in arrays:
        class_names = _npz_class_names(arrays["class_names"], path)
        limit, of = len(class_names), f"one per class name, {len(class_names)}"
    else:
        limit, of = MAX_CLASSES, "MAX_CLASSES"
    images = _npz_images(arrays["images"], "images", path)
    if not len(images):
        raise DataError(f"{path} holds no images")
    labels = _npz_labels(arrays["labels"], len(images), "labels", path, limit, of)
    if "test_images" in arrays:
        test_images = _npz_images(arrays["test_images"], "test_images", path)
        test_labels = _npz_labels(
            arrays["test_labels"], len(test_images), "test_labels", path, limit, of
        )
        if test_images.shape[1] != images.shape[1]:
            raise DataError(
                f"{path}: images have {images.shape[1]} channels and test_images "
                f"{test_images.shape[1]}; expected the same"
            )
    else:
        train, test = stratified_split(labels)
        images, labels, test_images, test_labels = (
            images[train],
            labels[train],
            images[test],
            labels[test],
        )
    if class_names is None:
        top = max(labels.max(), test_labels.max() if len(test_labels) else 0)
        class_names = tuple(str(c) for c in range(int(top) + 1))
    if len(class_names) < 2:
        raise DataError(f"{path}: need at least 2 classes; found {len(class_names)}")
    counts = np.bincount(labels, minlength=len(class_names))
    _check_empty_classes(counts, class_names, path, keep_empty_classes)
    if not len(test_labels):
        raise DataError(f"{path}: no test images (every class needs at least 2 images)")
    return RawDataset(
        images,
        labels,
        test_images,
        test_labels,
        class_names,
        int(images.shape[1]),
        os.path.abspath(path),
    )


def load_dataset(spec: str, *, keep_empty_classes: bool = False) -> RawDataset:
    """Read a data set: `"digits"` (embedded), a folder of class sub-folders (whatever its
    name), or an `.npz` file.

    **Arguments:**

    - `spec`: `"digits"`, a folder or an `.npz` file.
    - `keep_empty_classes`: keep classes without any training image (with a warning naming
        them) instead of refusing them.

    Raises `DataError` (a `ValueError`) with a one-line message if it cannot be used.
    """
    if spec == DIGITS:
        return load_digits()
    if not os.path.isdir(spec) and spec.lower().endswith(".npz"):
        return load_npz(spec, keep_empty_classes=keep_empty_classes)
    return load_folder(spec, keep_empty_classes=keep_empty_classes)


def _convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    have = image.shape[-3]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=-3)
    if channels == 1:
        return image.mean(axis=-3, keepdims=True)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def _resize_batch(images: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    n, c = images.shape[:2]
    if images.shape[2:] == tuple(image_size):
        return images
    out = jax.image.resize(jnp.asarray(images), (n, c, *image_size), method="bilinear")
    return np.asarray(out, dtype=np.float32)


def _resize_pil(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    if image.shape[1:] == tuple(image_size):
        return image
    image_mod = _pillow()
    height, width = image_size
    return np.stack(
        [
            np.asarray(
                image_mod.fromarray(channel, mode="F").resize(
                    (width, height), image_mod.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )
            for channel in image.astype(np.float32)
        ]
    )


def prepare_images(
    images: np.ndarray | list[np.ndarray], *, channels: int, image_size: tuple[int, int]
) -> np.ndarray:
    """Images in 0..1 (one array `(N, C, H, W)` or a list of `(C, H, W)`) to model input:
    `channels` channels, `image_size`, normalised to -1..1, float32 `(N, channels, *size)`."""
    if isinstance(images, np.ndarray):
        groups = [images]
    else:
        groups = None
        if len({im.shape for im in images}) <= 1:
            groups = [np.stack(images)] if images else []
    if groups is None:
        # Images of different sizes: resize one by one with Pillow (bilinear).
        out = [_resize_pil(_convert_channels(im, channels), image_size) for im in images]
        batch = np.stack(out)
    elif not groups or not len(groups[0]):
        batch = np.zeros((0, channels, *image_size), np.float32)
    else:
        batch = _resize_batch(_convert_channels(groups[0], channels), image_size)
    return ((batch - MEAN) / STD).astype(np.float32)


def prepare(raw: RawDataset, *, channels: int, image_size: tuple[int, int]) -> Dataset:
    """Make a `RawDataset` model-ready (see `prepare_images`)."""
    return Dataset(
        prepare_images(raw.train_images, channels=channels, image_size=image_size),
        raw.train_labels.astype(np.int32),
        prepare_images(raw.test_images, channels=channels, image_size=image_size),
        raw.test_labels.astype(np.int32),
        raw.class_names,
        raw.source,
    )


def resize_center_crop(
    img: Any, size: tuple[int, int], crop_pct: float, resample: Any, *, squash: bool = False
) -> Any:
    """timm's evaluation transform of a Pillow image: the shorter side resized to
    `floor(size / crop_pct)` and the longer in proportion (truncated), or both sides to it
    with `squash` or a non-square `size`, then the centre `size` `(height, width)` cropped
    (rounded as torchvision's `CenterCrop`)."""
    height, width = size
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    w, h = img.size
    if squash or scaled[0] != scaled[1]:
        new = (scaled[1], scaled[0])
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(scaled[0] * long / short)
        new = (scaled[0], new_long) if w <= h else (new_long, scaled[0])
    img = img.resize(new, resample=resample)
    top = int(round((img.size[1] - height) / 2.0))
    left = int(round((img.size[0] - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def load_pretrained_image(path: str, config: Any) -> np.ndarray:
    """One image file prepared as a pretrained model's data configuration says (an
    `eqx_vision.DataConfig`), as timm's evaluation transform does: converted to RGB, the
    shorter side resized to `floor(size / crop_pct)` (both sides, for
    `crop_mode="squash"`) with the configured interpolation, the centre `size` cropped,
    scaled to `[0, 1]` and normalised by `mean` and `std`. Returns `(3, height, width)`
    float32.

    Raises `DataError` if the file is missing, unreadable or refused.
    """
    if os.path.isdir(path):
        raise DataError(f"expected an image file; {path} is a folder")
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    image_mod = _pillow()
    resample = {
        "bicubic": image_mod.Resampling.BICUBIC,
        "bilinear": image_mod.Resampling.BILINEAR,
        "nearest": image_mod.Resampling.NEAREST,
    }.get(config.interpolation)
    if resample is None or config.crop_mode not in ("center", "squash"):
        raise DataError(
            f"unsupported preprocessing: interpolation={config.interpolation!r}, "
            f"crop_mode={config.crop_mode!r} (supported: bicubic, bilinear or nearest; "
            "center or squash)"
        )
    _, height, width = config.input_size

    def prepare(img: Any) -> np.ndarray:
        img = resize_center_crop(
            img.convert("RGB"), (height, width), config.crop_pct, resample,
            squash=config.crop_mode == "squash",
        )  # fmt: skip
        pixels = np.asarray(img, dtype=np.float32) / 255.0
        mean = np.asarray(config.mean, np.float32)
        std = np.asarray(config.std, np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    return _with_image(path, prepare)


def imagenet_classes() -> list[tuple[str, str]]:
    """The 1,000 ImageNet-1k classes in class-index order: `(synset id, names)`, e.g.
    `("n01440764", "tench, Tinca tinca")` (package data, with its source)."""
    text = resources.files("eqx_vision").joinpath("data/imagenet_classes.tsv").read_text()
    rows = [line.split("\t", 1) for line in text.splitlines() if not line.startswith("#")]
    return [(synset, names) for synset, names in rows]


def imagenet_folder_files(root: str, index: dict[str, int]) -> list[tuple[str, int]]:
    """`(path, label)` of every image under `root/<synset id>/`, labels from `index`
    (synset id to class index); a class folder of another name is a `DataError`."""
    if not os.path.isdir(root):
        raise DataError(f"expected a folder of ImageNet class folders; {root} is not a folder")
    files = []
    for name in _list_classes(root):
        if name not in index:
            raise DataError(
                f"{root} has a class folder {name!r}, which is not an ImageNet-1k synset id "
                "(such as n01440764)"
            )
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if not file.startswith(".") and os.path.isfile(os.path.join(folder, file)):
                files.append((os.path.join(folder, file), index[name]))
    if not files:
        raise DataError(f"{root} holds no images in ImageNet class folders")
    return files
