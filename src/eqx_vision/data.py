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
  the same way;
- an `.npz` file with `images` (`(N, H, W)` grey, `(N, C, H, W)` or `(N, H, W, C)` with 1,
  3 or 4 channels; uint8 in 0..255 or floats in 0..1) and integer `labels` `(N,)`, and
  optionally `test_images`, `test_labels` and `class_names`.

Without an explicit test split, a fixed stratified 20% of each class is held out (the same
for every run, whatever the training seed).

Images become float32 arrays `(N, channels, height, width)`: scaled to 0..1, converted
to the model's channels (grey repeated to 3 channels, or colour averaged to 1), resized
bilinearly to the model's image size, then normalised to -1..1 by `(x - 0.5) / 0.5`.
"""

import dataclasses
import io
import os
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np


__all__ = [
    "DIGITS",
    "DataError",
    "Dataset",
    "RawDataset",
    "load_dataset",
    "load_digits",
    "load_image",
    "prepare",
    "prepare_images",
]

DIGITS = "digits"
"""The name of the embedded digits data set, for `load_dataset`."""

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


class DataError(ValueError):
    """A data set or an image that cannot be used: missing, empty, unreadable or malformed."""


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


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model-ready data: float32 `(N, channels, height, width)` normalised images and int32
    labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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


def _read_image(path: str, mode: str | None):
    """An image file as a PIL image in `mode` ("L" or "RGB"; None keeps grey as "L" and
    turns everything else into "RGB")."""
    image_mod = _pillow()
    try:
        with image_mod.open(path) as img:
            img.load()
            if mode is None:
                mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            if img.mode in ("I", "I;16", "F") and mode == "L":
                arr = np.asarray(img, dtype=np.float32)
                scale = 65535.0 if arr.max() > 255 else 255.0
                return image_mod.fromarray(np.clip(arr / scale * 255, 0, 255).astype(np.uint8))
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _to_chw(img) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def load_image(path: str, *, channels: int, image_size: tuple[int, int]) -> np.ndarray:
    """One image file, model-ready: `(channels, height, width)` float32, normalised.

    **Arguments:**

    - `path`: an image file Pillow can read.
    - `channels`: 1 (grey) or 3 (RGB).
    - `image_size`: `(height, width)` to resize to (bilinear).
    """
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    img = _read_image(path, "L" if channels == 1 else "RGB")
    return prepare_images([_to_chw(img)], channels=channels, image_size=image_size)[0]


def _list_classes(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def _scan_folder(root: str, class_names: Sequence[str]) -> list[tuple[str, int]]:
    files = []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    files.append((os.path.join(dirpath, f), label))
    return files


def _read_files(files: list[tuple[str, int]], mode: str) -> tuple[list[np.ndarray], np.ndarray]:
    images = [_to_chw(_read_image(path, mode)) for path, _ in files]
    return images, np.array([label for _, label in files], dtype=np.int32)


def _folder_mode(files: list[tuple[str, int]]) -> str:
    image_mod = _pillow()
    for path, _ in files:
        try:
            with image_mod.open(path) as img:
                if img.mode not in ("1", "L", "I", "I;16", "F", "LA"):
                    return "RGB"
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    return "L"


def load_folder(root: str) -> RawDataset:
    """A folder of images in class sub-folders (or with `train/` and `test/` or `val/`
    sub-folders of class sub-folders). Grey-scale data stays one channel; anything else is
    read as RGB."""
    if not os.path.exists(root):
        raise DataError(f"data folder not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"not a folder of images or an .npz file: {root}")
    top = _list_classes(root)
    test_dir = next((d for d in ("test", "val") if d in top), None)
    if "train" in top and test_dir is not None:
        class_names = _list_classes(os.path.join(root, "train"))
        if not class_names:
            raise DataError(f"no class sub-folders in {os.path.join(root, 'train')}")
        train_files = _scan_folder(os.path.join(root, "train"), class_names)
        test_files = _scan_folder(os.path.join(root, test_dir), class_names)
        extra = set(_list_classes(os.path.join(root, test_dir))) - set(class_names)
        if extra:
            raise DataError(
                f"{os.path.join(root, test_dir)} has classes missing from train/: {sorted(extra)}"
            )
    else:
        class_names = top
        if not class_names:
            raise DataError(f"no class sub-folders in {root}: expected root/<class>/<image>")
        train_files = _scan_folder(root, class_names)
        test_files = []
    if not train_files:
        raise DataError(f"no images found in the class sub-folders of {root}")
    if len(class_names) < 2:
        raise DataError(f"need at least 2 classes; {root} has {len(class_names)}")
    mode = _folder_mode(train_files + test_files)
    train_images, train_labels = _read_files(train_files, mode)
    if test_files:
        test_images, test_labels = _read_files(test_files, mode)
    else:
        train_idx, test_idx = stratified_split(train_labels)
        test_images = [train_images[i] for i in test_idx]
        test_labels = train_labels[test_idx]
        train_images = [train_images[i] for i in train_idx]
        train_labels = train_labels[train_idx]
    if not len(test_labels):
        raise DataError(f"no test images in {root}: every class needs at least 2 images")
    return RawDataset(
        train_images,
        train_labels,
        test_images,
        test_labels,
        tuple(class_names),
        1 if mode == "L" else 3,
        os.path.abspath(root),
    )


def _npz_images(arr: np.ndarray, name: str, path: str) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] not in (1, 3, 4) and arr.shape[3] in (1, 3, 4):
            arr = np.moveaxis(arr, 3, 1)
        elif arr.shape[1] not in (1, 3, 4):
            raise DataError(
                f"{path}: {name} of shape {arr.shape} has no channel axis of size 1, 3 or 4"
            )
    else:
        raise DataError(
            f"{path}: {name} must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {arr.shape}"
        )
    if arr.shape[1] == 4:
        arr = arr[:, :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise DataError(f"{path}: {name} must be uint8 (0..255) or float (0..1); got {arr.dtype}")


def _npz_labels(arr: np.ndarray, n: int, name: str, path: str) -> np.ndarray:
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{path}: {name} must be {n} integers; got {arr.dtype} of shape {arr.shape}"
        )
    if n and arr.min() < 0:
        raise DataError(f"{path}: {name} must be non-negative class indices")
    return arr.astype(np.int32)


def load_npz(path: str) -> RawDataset:
    """An `.npz` file with `images` and `labels` (and optional `test_images`, `test_labels`,
    `class_names`)."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    for k in ("images", "labels"):
        if k not in arrays:
            raise DataError(f"{path} has no array '{k}' (it has {sorted(arrays)})")
    images = _npz_images(arrays["images"], "images", path)
    labels = _npz_labels(arrays["labels"], len(images), "labels", path)
    if not len(images):
        raise DataError(f"{path} holds no images")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(f"{path}: give both test_images and test_labels, or neither")
    if "test_images" in arrays:
        test_images = _npz_images(arrays["test_images"], "test_images", path)
        test_labels = _npz_labels(arrays["test_labels"], len(test_images), "test_labels", path)
        if test_images.shape[1] != images.shape[1]:
            raise DataError(f"{path}: images and test_images have different channels")
    else:
        train, test = stratified_split(labels)
        images, labels, test_images, test_labels = (
            images[train],
            labels[train],
            images[test],
            labels[test],
        )
    num_classes = int(max(labels.max(), test_labels.max() if len(test_labels) else 0)) + 1
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in arrays["class_names"].tolist())
        if len(class_names) < num_classes:
            raise DataError(
                f"{path}: {len(class_names)} class_names for labels up to {num_classes - 1}"
            )
    else:
        class_names = tuple(str(c) for c in range(num_classes))
    if len(class_names) < 2:
        raise DataError(f"{path}: need at least 2 classes; found {len(class_names)}")
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


def load_dataset(spec: str) -> RawDataset:
    """Read a data set: `"digits"` (embedded), a folder of class sub-folders, or an `.npz`.

    Raises `DataError` (a `ValueError`) with a one-line message if it cannot be used.
    """
    if spec == DIGITS:
        return load_digits()
    if spec.lower().endswith(".npz"):
        return load_npz(spec)
    return load_folder(spec)


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
