"""Streaming input from a folder of image files: only the file list is held; images are
decoded, augmented and batched by grain, in worker processes, while the device trains.

The pipeline of one epoch: the file list in the epoch's order (a permutation drawn from
`(seed, epoch)` alone, as `training.batches` draws it for the in-memory data), cut into
global batches; each process takes its rows of every global batch; each image is decoded
with Pillow, cropped, flipped and (optionally) RandAugmented by a generator seeded by
`(seed, epoch, position)` (its position in the epoch's order), so an augmentation never
depends on the number of workers or processes, nor on where a run was resumed; images
cross to the device as uint8 `(batch, channels, height, width)` and are normalised inside
the compiled step (`normalize`).
"""

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

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
    "RAND_AUGMENT_OPS",
    "RAND_AUGMENT_ORIGINAL_OPS",
    "Augment",
    "EvalTransform",
    "RandAugment",
    "RandAugmentDraw",
    "StreamingData",
    "TrainTransform",
    "hflip",
    "rand_augment_op",
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


# RandAugment ------------------------------------------------------------------------------

RAND_AUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
"""The operations of RandAugment whose strength increases with the magnitude (timm's
`inc1` list, DeiT's recipe): those of `RAND_AUGMENT_ORIGINAL_OPS` with posterize, solarize
and the four enhancements made stronger, not weaker, as the magnitude grows."""

RAND_AUGMENT_ORIGINAL_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
"""The operations of RandAugment as first published (Cubuk et al., 2019; timm's `inc0`
list; Cutout left to a separate random erasing)."""

# Magnitude 10 is each operation's strongest setting (its "level" 1).
MAGNITUDE_SCALE = 10.0
# The fill of the area a geometric operation uncovers, without a mean pixel to use.
DEFAULT_FILL = (128, 128, 128)
_ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
_SIGNED = frozenset(
    {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    | {f"{name}Increasing" for name in _ENHANCE}
)
_KNOWN_OPS = frozenset(RAND_AUGMENT_OPS) | frozenset(RAND_AUGMENT_ORIGINAL_OPS)


def _op_argument(name: str, magnitude: float, negate: bool) -> Any:
    """What operation `name` does at `magnitude` (0..10 for the documented range): the
    angle in degrees, the shear factor, the translation as a fraction of the size, the bits
    kept, the solarize threshold or addition, the enhancement factor; `None` for the
    operations without one."""
    level = magnitude / MAGNITUDE_SCALE
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":  # up to 30 degrees either way
        return sign * 30.0 * level
    if name in ("ShearX", "ShearY"):  # up to 0.3 either way
        return sign * 0.3 * level
    if name in ("TranslateXRel", "TranslateYRel"):  # up to 45% of the size either way
        return sign * 0.45 * level
    if name == "Posterize":  # keep 0 up to 4 bits: weaker as the magnitude grows
        return int(4 * level)
    if name == "PosterizeIncreasing":  # keep 4 down to 0 bits
        return 4 - int(4 * level)
    if name == "Solarize":  # invert the pixels at or above 0 up to 256
        return min(256, int(256 * level))
    if name == "SolarizeIncreasing":  # ... above 256 down to 0
        return 256 - min(256, int(256 * level))
    if name == "SolarizeAdd":  # add 0 up to 110 to the pixels below 128
        return min(128, int(110 * level))
    if name in _ENHANCE:  # a factor 0.1 up to 1.9 (1: the image unchanged)
        return 1.8 * level + 0.1
    if name.endswith("Increasing") and name[: -len("Increasing")] in _ENHANCE:
        return max(0.1, 1.0 + sign * 0.9 * level)  # 1 -> 1.9 or 0.1
    raise ValueError(f"unknown RandAugment operation {name!r}; expected one of {RAND_AUGMENT_OPS}")


def _fill_for(img: Any, fill: int | tuple[int, ...] | None) -> Any:
    """The fill colour of a geometric operation in `img`'s mode: one value for grey
    images (the mean of three), three for RGB (one repeated)."""
    values = DEFAULT_FILL if fill is None else (fill,) if isinstance(fill, int) else tuple(fill)
    bands = len(img.getbands())
    if bands == 1 and len(values) == 3:
        return round(sum(values) / 3)
    if len(values) == bands:
        return values[0] if bands == 1 else values
    if len(values) == 1:
        return values * bands
    raise ValueError(
        f"the fill has one value or one per channel ({bands} for a {img.mode} image); got {values}"
    )


def rand_augment_op(
    img: Any,
    name: str,
    magnitude: float,
    *,
    negate: bool = False,
    interpolation: str = "bilinear",
    fill: int | tuple[int, ...] | None = None,
) -> Any:
    """One RandAugment operation on a Pillow image (grey `"L"` or `"RGB"`), as timm does it.

    **Arguments:**

    - `img`: the image.
    - `name`: one of `RAND_AUGMENT_OPS` or `RAND_AUGMENT_ORIGINAL_OPS`.
    - `magnitude`: the strength, 10 being the strongest of the usual range: `Rotate` turns
      by `3 * magnitude` degrees (counter-clockwise), `ShearX`/`ShearY` shear by
      `0.03 * magnitude`, `TranslateXRel`/`TranslateYRel` move by `4.5 * magnitude`% of the
      width/height; `PosterizeIncreasing` keeps `4 - int(0.4 * magnitude)` bits,
      `SolarizeIncreasing` inverts the pixels at or above `256 - int(25.6 * magnitude)`,
      `SolarizeAdd` adds `int(11 * magnitude)` (at most 128) to the pixels below 128; the
      `...Increasing` enhancements (`Color`, `Contrast`, `Brightness`, `Sharpness`) blend
      with factor `1 +- 0.09 * magnitude` (at least 0.1), the original ones with
      `0.1 + 0.18 * magnitude`; `Posterize` keeps `int(0.4 * magnitude)` bits and `Solarize`
      inverts at or above `int(25.6 * magnitude)`. `AutoContrast`, `Equalize` and `Invert`
      have no strength.
    - `negate`: turn, shear, move or enhance the other way (the signed operations only).
    - `interpolation`: the resampling of the geometric operations.
    - `fill`: the colour of the area they uncover (one value, or one per channel);
      `None`: grey 128.

    **Returns:**

    The new image (the same mode and size).
    """
    image_mod = _pillow()
    from PIL import ImageEnhance, ImageOps

    arg = _op_argument(name, magnitude, negate)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name.startswith("Posterize"):  # (Pillow's `ImageOps.posterize` refuses 0 bits)
        bits = min(8, max(0, arg))
        mask = (0xFF << (8 - bits)) & 0xFF
        return img.point([i & mask for i in range(256)] * len(img.getbands()))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    for enhance in _ENHANCE:
        if name.startswith(enhance):
            return getattr(ImageEnhance, enhance)(img).enhance(arg)
    _check_interpolation(interpolation)
    resample, color = _resample(interpolation), _fill_for(img, fill)
    if name == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=color)
    matrix = {
        "ShearX": (1, arg, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateXRel": (1, 0, arg * img.width, 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, arg * img.height),
    }[name]
    affine = image_mod.Transform.AFFINE
    return img.transform(img.size, affine, matrix, resample=resample, fillcolor=color)


class RandAugmentDraw(NamedTuple):
    """One operation drawn by [`RandAugment.sample`][eqx_vision.data.RandAugment.sample]:
    its name, magnitude and direction, and whether it is applied."""

    op: str
    magnitude: float
    negate: bool
    applied: bool


def _spec_number(key: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"RandAugment spec {spec!r}: {key} takes a number; got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment (Cubuk et al., 2019, [arXiv:1909.13719](https://arxiv.org/abs/1909.13719))
    as timm does it; the defaults are timm's `rand-m9-mstd0.5-inc1`, DeiT's recipe.

    Each image gets `num_ops` operations, each drawn uniformly (with replacement) from
    `ops` and applied with probability `probability`, at a magnitude drawn from a normal
    distribution of mean `magnitude` and deviation `magnitude_std` (uniform in
    `[0, magnitude]` for a deviation above 100; fixed for 0), clipped to
    `[0, max_magnitude]`, in a direction (the signed operations) drawn with probability
    1/2 each way; see [`rand_augment_op`][eqx_vision.data.rand_augment_op] for what each
    operation does at a magnitude. Every draw comes from the generator it is given: in the
    streaming pipeline, the one seeded by `(seed, epoch, position)` that also draws the
    crop and the flip.

    **Arguments:**

    - `num_ops`: operations per image.
    - `magnitude`: their mean magnitude (10: the strongest of the usual range).
    - `magnitude_std`: the deviation of the drawn magnitude.
    - `probability`: the probability of applying each drawn operation.
    - `max_magnitude`: the largest magnitude.
    - `ops`: the operations to draw from: `RAND_AUGMENT_OPS` (timm's "increasing" list,
      `inc1`), `RAND_AUGMENT_ORIGINAL_OPS` (`inc0`), or any subset of their names.
    - `fill`: the colour (0..255, one value or one per channel) of the area a geometric
      operation uncovers; `None`: the mean pixel of the data's normalisation in
      [`StreamingData`][eqx_vision.data.StreamingData] (as timm fills with the mean),
      grey 128 elsewhere.
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    probability: float = 0.5
    max_magnitude: float = MAGNITUDE_SCALE
    ops: tuple[str, ...] = RAND_AUGMENT_OPS
    fill: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ValueError(f"RandAugment.num_ops must be an integer >= 0; got {self.num_ops!r}")
        for name in ("magnitude", "magnitude_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"RandAugment.{name} must be a number >= 0; got {value!r}")
        if not 0 <= self.probability <= 1:
            raise ValueError(
                f"RandAugment.probability is a probability in 0..1; got {self.probability!r}"
            )
        if not 0 < self.max_magnitude < math.inf:
            raise ValueError(
                f"RandAugment.max_magnitude must be a positive number; got {self.max_magnitude!r}"
            )
        if not self.ops or not all(isinstance(op, str) for op in self.ops):
            raise ValueError(f"RandAugment.ops must name at least one operation; got {self.ops!r}")
        unknown = [op for op in self.ops if op not in _KNOWN_OPS]
        if unknown:
            raise ValueError(
                f"unknown RandAugment operations {unknown}; expected names of "
                f"{RAND_AUGMENT_OPS} or {RAND_AUGMENT_ORIGINAL_OPS}"
            )
        if self.fill is not None and (
            len(self.fill) not in (1, 3)
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.fill)
        ):
            raise ValueError(
                f"RandAugment.fill is one value or three (R, G, B) in 0..255; got {self.fill!r}"
            )

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> "RandAugment":
        """RandAugment from a configuration string in timm's form: sections separated by
        `-`, an optional leading `rand`, then any of `m<magnitude>`, `n<num_ops>`,
        `mstd<magnitude_std>`, `mmax<max_magnitude>`, `p<probability>`, `inc<0 or 1>` (the
        original or the increasing operations). A section left out keeps this class's
        default (DeiT's recipe), where timm's would take magnitude 10, no deviation and the
        original operations: `"m9-n2-mstd0.5"` is timm's `"rand-m9-n2-mstd0.5-inc1"`,
        which this reads the same. `kwargs` set the other fields (`fill`)."""
        if not isinstance(spec, str):
            raise TypeError(f"a RandAugment spec is a string; got {type(spec).__name__}")
        sections = spec.strip().split("-")
        if sections and sections[0] == "rand":
            sections = sections[1:]
        if not sections or sections == [""]:
            raise ValueError(f"empty RandAugment spec {spec!r}; e.g. 'm9-n2-mstd0.5'")
        fields: dict[str, Any] = {}
        for section in sections:
            found = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(.+)", section)
            if found is None:
                raise ValueError(
                    f"RandAugment spec {spec!r}: unknown section {section!r}; expected "
                    "m<magnitude>, n<operations>, mstd<deviation>, mmax<largest magnitude>, "
                    "p<probability> or inc<0|1>, joined by '-'"
                )
            key, text = found.groups()
            name = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std",
                    "mmax": "max_magnitude", "p": "probability", "inc": "ops"}[key]  # fmt: skip
            if name in fields:
                raise ValueError(f"RandAugment spec {spec!r}: {key} given twice")
            if key == "n":
                if not text.isdigit():
                    raise ValueError(f"RandAugment spec {spec!r}: n takes an integer; got {text!r}")
                fields[name] = int(text)
            elif key == "inc":
                if text not in ("0", "1"):
                    raise ValueError(f"RandAugment spec {spec!r}: inc takes 0 or 1; got {text!r}")
                fields[name] = RAND_AUGMENT_OPS if text == "1" else RAND_AUGMENT_ORIGINAL_OPS
            else:
                fields[name] = _spec_number(key, text, spec)
        try:
            return cls(**fields, **kwargs)
        except ValueError as e:
            raise ValueError(f"RandAugment spec {spec!r}: {e}") from None

    @property
    def spec(self) -> str:
        """The configuration string of these settings (`from_spec` reads it back; timm's
        `rand_augment_transform` reads it the same)."""
        if self.ops == RAND_AUGMENT_OPS:
            inc = "inc1"
        elif self.ops == RAND_AUGMENT_ORIGINAL_OPS:
            inc = "inc0"
        else:
            raise ValueError(f"no configuration string names the operations {self.ops}")
        parts = ["rand", f"m{self.magnitude:g}", f"n{self.num_ops}", f"mstd{self.magnitude_std:g}"]
        if self.probability != 0.5:
            parts.append(f"p{self.probability:g}")
        if self.max_magnitude != MAGNITUDE_SCALE:
            parts.append(f"mmax{self.max_magnitude:g}")
        return "-".join([*parts, inc])

    def _draw_magnitude(self, rng: np.random.Generator) -> float:
        if self.magnitude_std > 100:
            magnitude = rng.uniform(0.0, self.magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(self.magnitude, self.magnitude_std)
        else:
            magnitude = self.magnitude
        return float(min(max(magnitude, 0.0), self.max_magnitude))

    def sample(self, rng: np.random.Generator) -> tuple[RandAugmentDraw, ...]:
        """The `num_ops` operations of one image, drawn from `rng` (each with whether it
        is applied)."""
        draws = []
        for _ in range(self.num_ops):
            op = self.ops[int(rng.integers(len(self.ops)))]
            applied = bool(rng.random() < self.probability)
            magnitude = self._draw_magnitude(rng)
            negate = bool(rng.random() < 0.5)
            draws.append(RandAugmentDraw(op, magnitude, negate, applied))
        return tuple(draws)

    def apply(
        self, img: Any, draws: Sequence[RandAugmentDraw], *, interpolation: str = "bilinear"
    ) -> Any:
        """The image after the applied `draws`, in turn."""
        for draw in draws:
            if draw.applied:
                img = rand_augment_op(
                    img, draw.op, draw.magnitude, negate=draw.negate,
                    interpolation=interpolation, fill=self.fill,
                )  # fmt: skip
        return img

    def __call__(
        self, img: Any, rng: np.random.Generator, *, interpolation: str = "bilinear"
    ) -> Any:
        """`img` (a Pillow image, grey or RGB) with operations drawn from `rng`."""
        return self.apply(img, self.sample(rng), interpolation=interpolation)


@dataclasses.dataclass(frozen=True)
class Augment:
    """The training-time augmentation of one image (done in the data workers).

    **Arguments:**

    - `scale`: the range of the random resized crop's area, as a fraction of the image's;
      `(1.0, 1.0)` with `ratio=(1.0, 1.0)`... only squashes the image to size.
    - `ratio`: the range of its aspect ratio (width over height).
    - `hflip`: the probability of a horizontal flip.
    - `interpolation`: how the crop is resized (and how RandAugment's geometric operations
      resample): `"bilinear"`, `"bicubic"` or `"nearest"`.
    - `randaugment`: RandAugment after the crop and flip
      ([`RandAugment`][eqx_vision.data.RandAugment], e.g. `RandAugment()` for DeiT's
      `rand-m9-mstd0.5-inc1`), or `None` for none.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"
    randaugment: RandAugment | None = None

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
        if self.randaugment is not None and not isinstance(self.randaugment, RandAugment):
            raise TypeError(
                f"Augment.randaugment must be a RandAugment or None; got {self.randaugment!r}"
            )


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
    """Decode, random resized crop, flip, RandAugment (if `augment` has it): one training
    image as uint8 `(channels, height, width)`, determined by `(seed, epoch, position)`:
    every draw (the crop's, the flip's, then RandAugment's) comes from one generator
    seeded by the three (`rng`).

    Called on `(epoch, position, path, label)` (`position`: the image's place in the
    epoch's order), returns `(image, label)`. Picklable: it runs in the data workers."""

    image_size: tuple[int, int]
    channels: int
    augment: Augment
    seed: int

    def rng(self, epoch: int, position: int) -> np.random.Generator:
        """The generator of every draw of the image at `position` in `epoch`."""
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
            if rng.random() < self.augment.hflip:
                img = img.transpose(_pillow().Transpose.FLIP_LEFT_RIGHT)  # as `hflip`
            if self.augment.randaugment is not None:
                img = self.augment.randaugment(img, rng, interpolation=self.augment.interpolation)
            return _to_array(img, self.channels)

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
    - `augment`: the training augmentation ([`Augment`][eqx_vision.data.Augment]); a
      RandAugment without a `fill` fills with the mean pixel of `mean`, as timm's does.
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
        fill = self.augment.randaugment and self.augment.randaugment.fill
        if fill and len(fill) not in (1, self.channels):
            raise ValueError(
                f"the RandAugment fill has one value or one per channel ({self.channels}); "
                f"got {fill}"
            )
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
    def train_augment(self) -> Augment:
        """`augment` as the training transform applies it: a RandAugment without a `fill`
        fills with the mean pixel, `round(255 * mean)` per channel."""
        ra = self.augment.randaugment
        if ra is None or ra.fill is not None:
            return self.augment
        fill = tuple(min(255, max(0, round(255 * m))) for m in self.mean)
        return dataclasses.replace(self.augment, randaugment=dataclasses.replace(ra, fill=fill))

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
            transform = TrainTransform(self.image_size, self.channels, self.train_augment, seed)
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
