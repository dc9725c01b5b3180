"""The training and evaluation transforms of the streaming pipeline: RandAugment (each
operation's magnitude mapping, the draws and their determinism), the crop and flip, the
evaluation's resize and centre crop, and the command line's --randaugment, --mean, --std,
--crop-pct and --interpolation, saved with the run and read back by evaluate and predict."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from eqx_vision import checkpoint, data
from eqx_vision.cli import main


FEW = settings(max_examples=25, deadline=None)
# The operations that leave an image unchanged at magnitude 0 (the others: AutoContrast,
# Equalize, Invert, and PosterizeIncreasing, which keeps 4 bits there).
IDENTITY_AT_ZERO = (
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing",
)  # fmt: skip
ALL_OPS = sorted(set(data.RAND_AUGMENT_OPS) | set(data.RAND_AUGMENT_ORIGINAL_OPS))


def random_image(seed: int, size=(24, 32), mode="RGB") -> Image.Image:
    """Smooth random colours (a small image upsampled), `size` `(height, width)`."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size[::-1], Image.Resampling.BICUBIC)
    return img.convert(mode)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def centroid(img: Image.Image) -> tuple[float, float]:
    """`(x, y)` of the intensity centroid of a grey image, in Pillow's coordinates (the
    centre of pixel (i, j) at (j + 0.5, i + 0.5))."""
    p = pixels(img)
    ys, xs = np.indices(p.shape)
    return float((p * (xs + 0.5)).sum() / p.sum()), float((p * (ys + 0.5)).sum() / p.sum())


def one_op(name: str, magnitude: float, **kwargs) -> data.RandAugment:
    """RandAugment that always applies `name` at exactly `magnitude`."""
    return data.RandAugment(num_ops=1, magnitude=magnitude, magnitude_std=0.0,
                            probability=1.0, ops=(name,), **kwargs)  # fmt: skip


# The crop and the flip ---------------------------------------------------------------------


@FEW
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 1000))
def test_flipping_twice_is_the_identity(h, w, seed):
    image = np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)
    np.testing.assert_array_equal(data.hflip(data.hflip(image)), image)
    np.testing.assert_array_equal(data.hflip(image)[..., 0], image[..., -1])


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 3000), st.integers(1, 3000), st.integers(0, 2**32 - 1),
    st.floats(0.001, 1.0), st.floats(0.001, 1.0), st.floats(0.05, 20.0), st.floats(0.05, 20.0),
)  # fmt: skip
def test_crop_boxes_lie_inside_the_image_for_any_ranges(h, w, seed, s1, s2, r1, r2):
    scale, ratio = (min(s1, s2), max(s1, s2)), (min(r1, r2), max(r1, r2))
    top, left, ch, cw = data.random_resized_crop_box(np.random.default_rng(seed), h, w, scale,
                                                     ratio)  # fmt: skip
    assert all(isinstance(v, int) for v in (top, left, ch, cw))
    assert 0 <= top and 0 <= left and ch >= 1 and cw >= 1
    assert top + ch <= h and left + cw <= w


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("one") / "image.png")
    random_image(7, (30, 44)).save(path)
    return path


def test_the_flip_mirrors_the_crop(image_file):
    """With a fixed crop (the whole image), a flip probability of 1 gives the mirror image
    of a probability of 0."""

    def out(p):
        augment = data.Augment(scale=(1.0, 1.0), ratio=(0.01, 100.0), hflip=p)
        return data.TrainTransform((12, 12), 3, augment, 0)((0, 0, image_file, 0))[0]

    np.testing.assert_array_equal(out(1.0), data.hflip(out(0.0)))
    assert not np.array_equal(out(1.0), out(0.0))


def replayed(transform: data.TrainTransform, epoch: int, position: int, path: str):
    """The draws of one image from the generator of `(seed, epoch, position)`, in the
    pipeline's order (crop, flip, RandAugment), and the image they make."""
    augment = transform.augment
    rng = transform.rng(epoch, position)
    img = Image.open(path).convert("RGB")
    box = data.random_resized_crop_box(rng, img.height, img.width, augment.scale, augment.ratio)
    flip = bool(rng.random() < augment.hflip)
    ops = augment.randaugment.sample(rng) if augment.randaugment else ()
    top, left, h, w = box
    resample = Image.Resampling.BICUBIC
    height, width = transform.image_size
    img = img.crop((left, top, left + w, top + h)).resize((width, height), resample)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment.randaugment:
        img = augment.randaugment.apply(img, ops, interpolation="bicubic")
    return (box, flip, ops), np.asarray(img).transpose(2, 0, 1)


TRIPLES = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 10_000), st.integers(0, 10**6))


@FEW
@given(TRIPLES, st.sampled_from(["seed", "epoch", "position"]), st.integers(1, 1000))
def test_every_draw_is_determined_by_seed_epoch_and_position(image_file, triple, which, step):
    """The transform's output is the replay of the draws of the generator of (seed, epoch,
    position); the same triple gives the same uint8 image, and changing any one of the
    three changes the draws."""
    seed, epoch, position = triple
    augment = data.Augment(interpolation="bicubic", randaugment=data.RandAugment(fill=(9,)))

    def run(seed, epoch, position):
        transform = data.TrainTransform((16, 16), 3, augment, seed)
        out, label = transform((epoch, position, image_file, 4))
        assert label == 4 and out.dtype == np.uint8 and out.shape == (3, 16, 16)
        draws, expected = replayed(transform, epoch, position, image_file)
        np.testing.assert_array_equal(out, expected)
        return draws, out

    first = run(seed, epoch, position)
    again = run(seed, epoch, position)
    np.testing.assert_array_equal(first[1], again[1])
    assert first[0] == again[0]
    changed = {"seed": (seed + step, epoch, position), "epoch": (seed, epoch + step, position),
               "position": (seed, epoch, position + step)}[which]  # fmt: skip
    other = run(*changed)
    assert other[0] != first[0]


# RandAugment: the draws ---------------------------------------------------------------------


def test_the_draws_follow_the_settings():
    rng = np.random.default_rng(0)
    ra = data.RandAugment()
    draws = [d for _ in range(2000) for d in ra.sample(rng)]
    assert len(draws) == 4000
    assert {d.op for d in draws} == set(data.RAND_AUGMENT_OPS)  # uniform over the 15
    counts = np.unique([d.op for d in draws], return_counts=True)[1]
    assert counts.min() > 4000 / 15 * 0.7
    magnitudes = np.array([d.magnitude for d in draws])
    assert 0 <= magnitudes.min() and magnitudes.max() <= 10
    assert abs(np.median(magnitudes) - 9) < 0.05  # normal about 9 ...
    assert 0.45 < np.std(magnitudes) < 0.52  # ... of deviation 0.5, cut at 10
    assert abs(np.mean([d.applied for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d.negate for d in draws]) - 0.5) < 0.03
    fixed = data.RandAugment(num_ops=3, magnitude=12.0, magnitude_std=0.0, probability=1.0)
    assert all(d.magnitude == 10 and d.applied for d in fixed.sample(rng))  # clipped at mmax
    uniform = data.RandAugment(magnitude=6.0, magnitude_std=101.0)  # > 100: uniform in [0, m]
    values = np.array([d.magnitude for _ in range(1000) for d in uniform.sample(rng)])
    assert values.min() >= 0 and values.max() <= 6 and abs(values.mean() - 3) < 0.2
    assert not any(d.applied for d in data.RandAugment(probability=0.0).sample(rng))


def test_specs_read_as_timm_reads_them():
    deit = data.RandAugment()
    assert deit.spec == "rand-m9-n2-mstd0.5-inc1"
    for spec in ("rand-m9-mstd0.5-inc1", "m9-n2-mstd0.5", "n2-m9", "mstd0.5", deit.spec):
        assert data.RandAugment.from_spec(spec) == deit
    other = data.RandAugment.from_spec("rand-m7-n3-mstd0-p0.3-mmax12-inc0")
    assert other == data.RandAugment(
        num_ops=3, magnitude=7.0, magnitude_std=0.0, probability=0.3, max_magnitude=12.0,
        ops=data.RAND_AUGMENT_ORIGINAL_OPS,
    )  # fmt: skip
    assert data.RandAugment.from_spec(other.spec) == other
    bad_specs = [("m9-x3", "unknown section 'x3'"), ("n2.5", "n takes an integer"),
                 ("inc2", "inc takes 0 or 1"), ("mnan", "m takes a number"),
                 ("m9-m8", "m given twice"), ("", "empty"), ("p1.5", "probability")]  # fmt: skip
    for bad, match in bad_specs:
        with pytest.raises(ValueError, match=match):
            data.RandAugment.from_spec(bad)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="unknown RandAugment operations"):
        data.RandAugment(ops=("Rotate", "Cutout"))
    with pytest.raises(ValueError, match="magnitude"):
        data.RandAugment(magnitude=-1.0)
    with pytest.raises(ValueError, match="fill"):
        data.RandAugment(fill=(1, 2))
    with pytest.raises(TypeError, match="randaugment"):
        data.Augment(randaugment="m9")  # pyright: ignore[reportArgumentType]


# RandAugment: the operations ------------------------------------------------------------------


@FEW
@given(st.sampled_from(ALL_OPS), st.floats(0, 15), st.booleans(), st.sampled_from(["L", "RGB"]),
       st.integers(1, 20), st.integers(1, 20), st.integers(0, 100))  # fmt: skip
def test_every_operation_keeps_the_shape_and_mode(name, magnitude, negate, mode, h, w, seed):
    img = random_image(seed, (h, w), mode)
    out = data.rand_augment_op(img, name, magnitude, negate=negate, fill=(3, 4, 5))
    assert out.mode == mode and out.size == img.size
    assert np.asarray(out).dtype == np.uint8


@FEW
@given(st.sampled_from(IDENTITY_AT_ZERO), st.booleans(), st.integers(0, 100))
def test_at_magnitude_zero_the_identity_like_operations_change_nothing(name, negate, seed):
    img = random_image(seed)
    out = data.rand_augment_op(img, name, 0.0, negate=negate, interpolation="bicubic")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def dot(size: int = 65, offset=(24, 0)) -> Image.Image:
    """A grey image with a bright 3x3 square `offset` (x, y) pixels from the centre."""
    p = np.zeros((size, size), np.uint8)
    c = size // 2
    x, y = c + offset[0], c + offset[1]
    p[y - 1 : y + 2, x - 1 : x + 2] = 255
    return Image.fromarray(p)


@FEW
@given(st.floats(1.0, 10.0), st.booleans())
def test_rotate_turns_by_three_degrees_per_unit_of_magnitude(magnitude, negate):
    img = dot()
    x0, y0 = centroid(img)
    centre = img.width / 2, img.height / 2
    out = data.rand_augment_op(img, "Rotate", magnitude, negate=negate, fill=(0,))
    x, y = centroid(out)
    angle = math.radians(3 * magnitude * (-1 if negate else 1))  # counter-clockwise
    dx, dy = x0 - centre[0], y0 - centre[1]
    expected = (centre[0] + dx * math.cos(angle) + dy * math.sin(angle),
                centre[1] - dx * math.sin(angle) + dy * math.cos(angle))  # fmt: skip
    assert abs(x - expected[0]) < 0.3 and abs(y - expected[1]) < 0.3


@FEW
@given(st.floats(1.0, 10.0), st.booleans(), st.sampled_from(["ShearX", "ShearY"]))
def test_shear_slants_by_three_hundredths_per_unit_of_magnitude(magnitude, negate, name):
    """A dot at (dx, dy) from the corner moves to (dx - f dy, dy) under ShearX (the output
    pixel (x, y) reads the input at (x + f y, y)), f = +-0.03 magnitude."""
    size = 65
    p = np.zeros((size, size), np.uint8)
    p[39:42, 29:32] = 255  # centre (30.5, 40.5) in Pillow's coordinates
    img = Image.fromarray(p if name == "ShearX" else p.T.copy())
    f = 0.03 * magnitude * (-1 if negate else 1)
    x, y = centroid(data.rand_augment_op(img, name, magnitude, negate=negate, fill=(0,)))
    if name == "ShearY":
        x, y = y, x
    assert abs(x - (30.5 - f * 40.5)) < 0.3 and abs(y - 40.5) < 0.3


@FEW
@given(st.floats(1.0, 10.0), st.booleans(), st.sampled_from(["TranslateXRel", "TranslateYRel"]))
def test_translate_moves_by_four_and_a_half_percent_per_unit_of_magnitude(magnitude, negate, name):
    img = dot(size=81, offset=(0, 0))
    if name == "TranslateYRel":  # a wide image: the move is relative to the height
        img = img.resize((120, 81))
    x0, y0 = centroid(img)
    shift = 0.045 * magnitude * (-1 if negate else 1)
    x, y = centroid(data.rand_augment_op(img, name, magnitude, negate=negate, fill=(0,)))
    if name == "TranslateXRel":  # the output at x reads the input at x + shift * width
        assert abs(x - (x0 - shift * img.width)) < 0.3 and abs(y - y0) < 0.3
    else:
        assert abs(y - (y0 - shift * img.height)) < 0.3 and abs(x - x0) < 0.3


RAMP = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))


@FEW
@given(st.floats(0.0, 10.0))
def test_posterize_keeps_four_down_to_zero_bits(magnitude):
    bits = 4 - int(0.4 * magnitude)
    out = np.asarray(data.rand_augment_op(RAMP, "PosterizeIncreasing", magnitude))
    np.testing.assert_array_equal(out.ravel(), np.arange(256) & (0xFF << (8 - bits)) & 0xFF)
    original = np.asarray(data.rand_augment_op(RAMP, "Posterize", magnitude))
    kept = int(0.4 * magnitude)
    np.testing.assert_array_equal(original.ravel(), np.arange(256) & (0xFF << (8 - kept)) & 0xFF)


@FEW
@given(st.floats(0.0, 10.0))
def test_solarize_inverts_above_a_threshold_falling_with_the_magnitude(magnitude):
    threshold = 256 - int(25.6 * magnitude)
    x = np.arange(256)
    out = np.asarray(data.rand_augment_op(RAMP, "SolarizeIncreasing", magnitude)).ravel()
    np.testing.assert_array_equal(out, np.where(x >= threshold, 255 - x, x))
    add = min(128, int(11 * magnitude))
    out = np.asarray(data.rand_augment_op(RAMP, "SolarizeAdd", magnitude)).ravel()
    np.testing.assert_array_equal(out, np.where(x < 128, np.minimum(255, x + add), x))


@FEW
@given(st.floats(0.0, 10.0), st.booleans(), st.integers(20, 200))
def test_the_enhancements_blend_by_one_plus_or_minus_nine_hundredths(magnitude, negate, value):
    factor = max(0.1, 1 + 0.09 * magnitude * (-1 if negate else 1))
    grey = Image.new("L", (8, 8), value)
    out = pixels(data.rand_augment_op(grey, "BrightnessIncreasing", magnitude, negate=negate))
    np.testing.assert_allclose(out, min(255, value * factor), atol=1)
    halves = np.full((8, 8), value, np.uint8)
    halves[:, 4:] = value // 2
    mean = int(halves.mean() + 0.5)
    halves = halves.astype(np.float64)
    contrast = Image.fromarray(halves.astype(np.uint8))
    out = pixels(data.rand_augment_op(contrast, "ContrastIncreasing", magnitude, negate=negate))
    np.testing.assert_allclose(out, np.clip(mean + factor * (halves - mean), 0, 255), atol=1)
    colour = random_image(value)
    luma = pixels(colour.convert("L"))[..., None]
    out = pixels(data.rand_augment_op(colour, "ColorIncreasing", magnitude, negate=negate))
    np.testing.assert_allclose(out, np.clip(luma + factor * (pixels(colour) - luma), 0, 255),
                               atol=1)  # fmt: skip
    original = 0.1 + 0.18 * magnitude
    out = pixels(data.rand_augment_op(grey, "Brightness", magnitude))
    np.testing.assert_allclose(out, min(255, value * original), atol=1)


def timm_auto_augment():
    """timm's `timm/data/auto_augment.py`, loaded alone (it needs Pillow and numpy only,
    where the `timm` package needs torch and torchvision); skips without timm."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    assert spec is not None and spec.submodule_search_locations, "timm 1.0.31 is needed"
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "auto_augment.py")
    module_spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_every_operation_gives_timms_pixels(monkeypatch):
    """Each operation at magnitudes 0..10, both ways, against timm's `AugmentOp` with the
    same interpolation and fill (its one random draw, the direction, fixed); where timm
    fails (Pillow 13 refuses to posterize to 0 bits) the image keeps no bit."""
    import types

    aa = timm_auto_augment()
    img = random_image(3, (32, 40))
    fill = (124, 116, 104)
    hparams = {"translate_const": 100, "img_mean": fill,
               "interpolation": Image.Resampling.BICUBIC}  # fmt: skip
    for name in ALL_OPS:
        for magnitude in (0.0, 1.0, 2.5, 3.3, 5.0, 7.7, 9.0, 10.0):
            for negate in (False, True):
                draw = 0.9 if negate else 0.1  # timm negates when random() > 0.5
                monkeypatch.setattr(aa, "random", types.SimpleNamespace(random=lambda d=draw: d))
                op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
                ours = data.rand_augment_op(img, name, magnitude, negate=negate,
                                            interpolation="bicubic", fill=fill)  # fmt: skip
                try:
                    theirs = np.asarray(op(img))
                except ValueError as e:
                    assert "bits" in str(e) and name.startswith("Posterize")
                    assert not np.asarray(ours).any()
                    continue
                np.testing.assert_array_equal(
                    np.asarray(ours), theirs, err_msg=f"{name} {magnitude}"
                )


def test_geometric_operations_fill_with_the_given_colour():
    img = Image.new("RGB", (20, 20), (200, 200, 200))
    out = np.asarray(data.rand_augment_op(img, "TranslateXRel", 10.0, fill=(10, 20, 30)))
    np.testing.assert_array_equal(out[:, -5], [[10, 20, 30]] * 20)  # 9 columns uncovered
    grey = np.asarray(data.rand_augment_op(img.convert("L"), "ShearY", 10.0, fill=(77,)))
    assert grey[-1, -1] == 77


def test_the_stream_fills_with_the_mean_pixel(tmp_path):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for c in "ab":
        for i in range(5):
            random_image(i).save(root / c / f"{i}.png")
    files = data.scan_folder(str(root))
    ra = data.RandAugment()
    ds = data.StreamingData(files, (8, 8), mean=(0.485, 0.456, 0.406), std=(0.2, 0.2, 0.2),
                            augment=data.Augment(randaugment=ra))  # fmt: skip
    assert ds.train_augment.randaugment == data.RandAugment(fill=(124, 116, 104))
    given_fill = data.Augment(randaugment=data.RandAugment(fill=(1, 2, 3)))
    assert data.StreamingData(files, (8, 8), augment=given_fill).train_augment == given_fill
    with pytest.raises(ValueError, match="fill"):
        data.StreamingData(files, (8, 8), channels=1, augment=given_fill)


# The evaluation transform ------------------------------------------------------------------


def coordinates(height: int, width: int) -> np.ndarray:
    """An RGB image whose pixel (i, j) is (i, j, 7)."""
    i, j = np.indices((height, width))
    return np.stack([i, j, np.full_like(i, 7)], axis=-1).astype(np.uint8)


def test_evaluation_resizes_the_shorter_side_to_size_over_crop_pct_and_crops_the_centre(
    tmp_path,
):
    path = str(tmp_path / "coords.png")
    image = coordinates(40, 80)
    Image.fromarray(image).save(path)
    # crop_pct 0.8: the shorter side to 16 / 0.8 = 20, half the image: nearest
    # resampling reads the input pixel 2i + 1; then the centre 16x16 of 20x40.
    out, _ = data.EvalTransform((16, 16), 3, crop_pct=0.8, interpolation="nearest")((0, 0, path, 0))
    expected = image[1::2, 1::2][2:18, 12:28]
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    # crop_pct 0.4: the shorter side stays 40 (no resize), the centre 16x16 of 40x80.
    out, _ = data.EvalTransform((16, 16), 3, crop_pct=0.4, interpolation="nearest")((0, 0, path, 0))
    np.testing.assert_array_equal(out, image[12:28, 32:48].transpose(2, 0, 1))


# The command line ------------------------------------------------------------------------------

TINY = ["--model", "vit-tiny", "--image-size", "8", "--batch-size", "8", "--epochs", "1",
        "--no-progress", "--workers", "0"]  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """train/ and val/ of two classes of PNGs and JPEGs of several sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("ant", "bee"):
            os.makedirs(root / split / c)
            for i in range(n):
                size = (int(rng.integers(10, 30)), int(rng.integers(10, 30)))
                img = random_image(int(rng.integers(1000)), size)
                img.save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


class Spy:
    """Records the arguments of the calls of a library function (an iterator read into a
    list), and calls it."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls: list[tuple[tuple, dict]] = []
        original = getattr(module, name)

        def spy(*args, **kwargs):
            args = tuple(list(a) if hasattr(a, "__next__") else a for a in args)
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


INPUT_FLAGS = ["--mean", "0.4,0.5,0.6", "--std", "0.2,0.25,0.3", "--crop-pct", "0.6",
               "--interpolation", "bicubic", "--randaugment", "m9-n2-mstd0.5"]  # fmt: skip
INPUT_FACTS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "crop_pct": 0.6,
               "interpolation": "bicubic"}  # fmt: skip


@pytest.fixture(scope="module")
def streamed_run(folder, tmp_path_factory) -> tuple[str, data.StreamingData]:
    """A run on the folder with the flags of INPUT_FLAGS, and the data `fit` trained on."""
    from eqx_vision import training

    out = str(tmp_path_factory.mktemp("run") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fit = Spy(monkeypatch, training, "fit")
        assert main(["train", *TINY, "--data", folder, *INPUT_FLAGS, "--out", out]) == 0
    return out, fit.calls[0][0][2]


def test_the_flags_reach_the_stream_and_are_saved_with_the_run(streamed_run):
    out, ds = streamed_run
    assert ds.normalization == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert (ds.crop_pct, ds.eval_interpolation, ds.augment.interpolation) == (0.6, "bicubic",
                                                                            "bicubic")  # fmt: skip
    assert ds.augment.randaugment == data.RandAugment()
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["settings"]["randaugment"] == "rand-m9-n2-mstd0.5-inc1"
    assert {k: saved["data"][k] for k in INPUT_FACTS} == INPUT_FACTS
    header = checkpoint.read_header(os.path.join(out, "last.safetensors"))
    assert {k: header["training"]["data"][k] for k in INPUT_FACTS} == INPUT_FACTS


def evaluated(monkeypatch) -> list:
    """The data sets that the command's evaluation reads (`cli._model_data`'s)."""
    from eqx_vision import cli

    made = []
    original = cli._model_data

    def model_data(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(cli, "_model_data", model_data)
    return made


def first_test_image(ds) -> np.ndarray:
    return next(iter(ds.test_batches(4)))[0][0]


def test_evaluate_and_predict_prepare_images_as_the_run_did(streamed_run, folder, capsys,
                                                            monkeypatch):  # fmt: skip
    from eqx_vision import training

    streamed_run = streamed_run[0]
    made = evaluated(monkeypatch)
    code, _, err = run(capsys, "evaluate", "--checkpoint", streamed_run, "--workers", "0")
    assert code == 0, err
    assert made[-1].normalization == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    # the test images: the centre crop at crop_pct 0.6, bicubic
    files = data.scan_folder(folder)
    expected = data.EvalTransform((8, 8), 3, 0.6, "bicubic")((0, 0, files.test_paths[0], 0))[0]
    np.testing.assert_array_equal(first_test_image(made[-1]), expected)
    code, _, err = run(capsys, "evaluate", "--checkpoint", streamed_run, "--workers", "0",
                       "--crop-pct", "1.0", "--interpolation", "nearest")  # fmt: skip
    assert code == 0, err
    expected = data.EvalTransform((8, 8), 3, 1.0, "nearest")((0, 0, files.test_paths[0], 0))[0]
    np.testing.assert_array_equal(first_test_image(made[-1]), expected)

    eval_step = Spy(monkeypatch, training, "eval_step")
    path = files.test_paths[1]
    code, stdout, err = run(capsys, "predict", "--checkpoint", streamed_run, path)
    assert code == 0, err
    (_, _, x, _), kwargs = eval_step.calls[-1]
    assert kwargs["normalization"] == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    expected = data.EvalTransform((8, 8), 3, 0.6, "bicubic")((0, 0, path, 0))[0]
    np.testing.assert_array_equal(np.asarray(x)[0], expected)


def test_a_checkpoint_without_the_entries_is_read_with_the_defaults(
    streamed_run, tmp_path, capsys, monkeypatch
):
    import safetensors.numpy as sn

    source = os.path.join(streamed_run[0], "last.safetensors")
    header = checkpoint.read_header(source)
    for key in INPUT_FACTS:
        del header["training"]["data"][key]
    old = str(tmp_path / "old.safetensors")
    metadata = {"format": checkpoint.FORMAT, "model_config": json.dumps(header["model_config"]),
                "training": json.dumps(header["training"])}  # fmt: skip
    sn.save_file(sn.load_file(source), old, metadata=metadata)
    made = evaluated(monkeypatch)
    code, _, err = run(capsys, "evaluate", "--checkpoint", old, "--workers", "0")
    assert code == 0, err
    assert made[-1].normalization == ((0.5,), (0.5,))
    files = data.scan_folder(header["training"]["data"]["source"])
    expected = data.EvalTransform((8, 8), 3, 0.875, "bilinear")((0, 0, files.test_paths[0], 0))
    np.testing.assert_array_equal(first_test_image(made[-1]), expected[0])
    # a malformed entry names the checkpoint
    header["training"]["data"]["std"] = [0.5, -1, 0.5]
    metadata["training"] = json.dumps(header["training"])
    sn.save_file(sn.load_file(source), old, metadata=metadata)
    code, _, err = run(capsys, "evaluate", "--checkpoint", old, "--workers", "0")
    assert code == 2 and "old.safetensors: data.std must be null or a list" in err


def test_in_memory_data_is_normalised_by_the_flags(small_npz, tmp_path, capsys, monkeypatch):
    from eqx_vision import training

    fit = Spy(monkeypatch, training, "fit")
    out = str(tmp_path / "run")
    code, _, err = run(capsys, "train", *TINY, "--data", small_npz, "--mean", "0.3", "--std",
                       "0.2", "--out", out)  # fmt: skip
    assert code == 0, err
    ds = fit.calls[0][0][2]
    plain = data.prepare(data.load_dataset(small_npz), channels=1, image_size=(8, 8))
    np.testing.assert_allclose(ds.train_images, (plain.train_images * 0.5 + 0.5 - 0.3) / 0.2,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with open(os.path.join(out, "config.json")) as f:
        facts = json.load(f)["data"]
    assert (facts["mean"], facts["std"]) == ([0.3], [0.2]) and "crop_pct" not in facts
    eval_step = Spy(monkeypatch, training, "eval_step")
    image = str(tmp_path / "digit.png")
    Image.fromarray((np.asarray(data.load_digits().test_images)[0, 0] * 255).astype(np.uint8)).save(
        image
    )
    code, _, err = run(capsys, "predict", "--checkpoint", out, image)
    assert code == 0, err
    x = np.asarray(eval_step.calls[-1][0][2])
    loaded = data.load_image(image, channels=1, image_size=(8, 8))
    np.testing.assert_allclose(x[0], (loaded * 0.5 + 0.5 - 0.3) / 0.2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mean", "0.5,0.5"], "--mean: expected one number, or three comma-separated"),
        (["--std", "0.2,0,0.2"], "--std: expected positive numbers; got '0.2,0,0.2'"),
        (["--std", "nan"], "--std: expected one number"),
        (["--crop-pct", "0"], "--crop-pct: expected a number in (0, 1]"),
        (["--randaugment", "m9-k2"], "unknown section 'k2'"),
        (["--interpolation", "lanczos"], "--interpolation: invalid choice"),
        (["--mean", "0.1,0.2,0.3", "--data", "digits"],
         "--mean has 3 values for the model's 1-channel input: give one value or 1"),
        (["--randaugment", "m9", "--data", "digits"], "--randaugment augments streamed folders"),
        (["--crop-pct", "0.9", "--data", "digits"], "--crop-pct applies to streamed folders"),
    ],
)  # fmt: skip
def test_bad_input_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run(capsys, "train", *TINY, *flags, "--out", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


def test_init_from_timm_takes_its_data_configuration_unless_flags_say(folder, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    """--init timm/<name> (here a tiny ViT under timm's name, standing in for the download):
    the model's mean, std, crop fraction and interpolation, each overridden by a flag."""
    import jax

    from eqx_vision import ViT, interop, training
    from eqx_vision.interop import timm

    def build(name, num_classes=1000, *, key):
        return ViT(image_size=8, patch_size=4, num_classes=num_classes, dim=16, depth=1,
                   heads=2, mlp_dim=16, key=key)  # fmt: skip

    def pretrained(spec):
        config = interop.DataConfig(input_size=(3, 8, 8), mean=(0.1, 0.2, 0.3),
                                    std=(0.7, 0.8, 0.9), crop_pct=0.95)  # fmt: skip
        return build(spec, key=jax.random.key(3)), config

    monkeypatch.setattr(interop, "pretrained", pretrained)
    monkeypatch.setattr(timm, "build", build)
    fit = Spy(monkeypatch, training, "fit")
    argv = ["train", "--init", "timm/tiny", "--data", folder, "--epochs", "1", "--batch-size",
            "8", "--workers", "0", "--no-progress"]  # fmt: skip
    out = str(tmp_path / "run")
    code, _, err = run(capsys, *argv, "--std", "0.5", "--interpolation", "bilinear", "--out", out)
    assert code == 0, err
    ds = fit.calls[-1][0][2]
    assert ds.normalization == ((0.1, 0.2, 0.3), (0.5,))  # the model's mean, --std
    assert (ds.crop_pct, ds.eval_interpolation) == (0.95, "bilinear")
    with open(os.path.join(out, "config.json")) as f:
        facts = json.load(f)["data"]
    expected = {"mean": [0.1, 0.2, 0.3], "std": [0.5], "crop_pct": 0.95,
                "interpolation": "bilinear"}  # fmt: skip
    assert {k: facts[k] for k in INPUT_FACTS} == expected
