"""The data loaders read data exactly or refuse it with a one-line `DataError`."""

import os
import struct
import tempfile
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from eqx_vision import data


# ---- helpers ----------------------------------------------------------------------------


def refused(call, *args, match: str = "", **kwargs) -> str:
    """The message of the `DataError` that `call` raises: one line, containing `match`."""
    with pytest.raises(data.DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and message.isprintable(), repr(message)
    assert match in message, message
    return message


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def huge_png(path, width: int = 20000, height: int = 20000) -> None:
    """A 1-bit PNG announcing `width` x `height` pixels, in a few bytes: Pillow refuses its
    size on opening, before reading any pixel."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def grey(value: int, size: int = 4) -> Image.Image:
    return Image.fromarray(np.full((size, size), value, np.uint8))


def colour(rgb: tuple[int, int, int], size: int = 4) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), rgb, np.uint8))


def image_folder(root, classes: dict[str, list[Image.Image]]):
    """`root/<class>/<i>.png` for each image; returns `root`."""
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(root / name / f"{i}.png")
    return root


def two_classes(root):
    return image_folder(root, {"a": [grey(10), grey(20)], "b": [grey(30), grey(40)]})


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


LABELS = np.repeat(np.arange(3), 3)


def unit(raw: data.RawDataset, split: str = "train") -> list[np.ndarray]:
    """The images of a split, as a list of `(C, H, W)` arrays in 0..1."""
    return list(getattr(raw, f"{split}_images"))


# ---- tracebacks that became DataErrors ---------------------------------------------------


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    huge_png(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    message = refused(data.load_image, str(bomb), channels=1, image_size=(8, 8), match=str(bomb))
    assert str(limit) in message and "400000000 pixels" in message
    root = two_classes(tmp_path / "folder")
    huge_png(root / "b" / "bomb.png")
    refused(data.load_dataset, str(root), match=str(root / "b" / "bomb.png"))
    assert Image.MAX_IMAGE_PIXELS == limit  # the limit is not raised


def test_image_over_the_pixel_limit_but_under_twice_it_is_refused(tmp_path, monkeypatch):
    """Between the limit and twice it, Pillow only warns: still refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    grey(0, size=12).save(tmp_path / "big.png")  # 144 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning must not be what stops it
        message = refused(data.load_image, str(tmp_path / "big.png"), channels=3,
                          image_size=(4, 4), match="limit of 100 pixels")  # fmt: skip
    assert "144 pixels" in message
    grey(0, size=10).save(tmp_path / "fine.png")  # 100 pixels: at the limit, read
    assert data.load_image(str(tmp_path / "fine.png"), channels=1, image_size=(4, 4)).shape


def test_npy_file_named_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.uint8))
    os.rename(tmp_path / "a.npy", tmp_path / "a.npz")
    message = refused(data.load_dataset, str(tmp_path / "a.npz"), match="not an .npz archive")
    assert "single .npy array" in message


@pytest.mark.parametrize("shape", [(6, 0, 0), (6, 0, 5), (6, 1, 5, 0), (6, 3, 0, 4), (6, 0, 4, 4)])
def test_images_of_zero_size(tmp_path, shape):
    path = npz(tmp_path / "d.npz", images=np.zeros(shape, np.uint8), labels=np.arange(6) % 2)
    refused(data.load_dataset, path, match="height or width 0")


def test_random_bytes_named_npz(tmp_path):
    (tmp_path / "r.npz").write_bytes(np.random.default_rng(0).bytes(300))
    message = refused(data.load_dataset, str(tmp_path / "r.npz"),
                      match="not an .npz archive (a zip of .npy arrays")  # fmt: skip
    assert "pickle" not in message


def test_object_arrays_are_not_read_and_pickle_is_not_suggested(tmp_path):
    images = np.empty(9, object)
    images[:] = [np.zeros((4, 4))] * 9
    path = npz(tmp_path / "o.npz", images=images, labels=LABELS)
    message = refused(data.load_dataset, path, match="Python objects")
    assert "pickle" not in message


def test_zip_that_is_not_an_npz(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        z.writestr("images", b"raw bytes")
        z.writestr("labels.npy", b"\x93NUMPY garbage")
    refused(data.load_dataset, str(tmp_path / "z.npz"), match="not an .npz archive")


def test_folder_named_npz(tmp_path):
    """A folder is read as an image folder whatever its name; an empty one says it is a
    folder."""
    root = two_classes(tmp_path / "x.npz")
    raw = data.load_dataset(str(root))
    assert raw.class_names == ("a", "b")
    (tmp_path / "empty.npz").mkdir()
    refused(data.load_dataset, str(tmp_path / "empty.npz"), match="is a folder, not an .npz")
    refused(data.load_npz, str(root), match="is a folder")


# ---- integer images scaled by their type's range -----------------------------------------


def normalised(values) -> np.ndarray:
    return ((np.asarray(values, np.float32) - 0.5) / 0.5).astype(np.float32)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_images_are_scaled_by_65535(tmp_path, fmt, dtype):
    for values in ([1000, 60000], [0, 200]):  # not by a per-image maximum
        path = str(tmp_path / f"x.{fmt}")
        Image.fromarray(np.array([values], dtype)).save(path)
        expected = normalised(np.array(values) / 65535)
        for channels in (1, 3):
            x = data.load_image(path, channels=channels, image_size=(1, 2))
            np.testing.assert_allclose(x, np.broadcast_to(expected, (channels, 1, 2)), atol=1e-6)


def test_16_bit_pgm_mode_i_is_scaled_by_65535(tmp_path):
    path = tmp_path / "x.pgm"
    path.write_bytes(b"P5\n2 1\n65535\n" + np.array([0, 200], ">u2").tobytes())
    x = data.load_image(str(path), channels=1, image_size=(1, 2))
    np.testing.assert_allclose(x, normalised([[[0, 200 / 65535]]]), atol=1e-6)


def test_16_bit_grey_next_to_colour_images_keeps_its_values(tmp_path):
    root = image_folder(tmp_path / "d", {"a": [colour((255, 0, 0)), colour((0, 0, 255))]})
    (root / "b").mkdir()
    for i, values in enumerate(([1000, 60000], [0, 200])):
        Image.fromarray(np.array([values], np.uint16)).save(root / "b" / f"{i}.png")
    raw = data.load_dataset(str(root))
    assert raw.channels == 3
    sixteen = [im for im in unit(raw) + unit(raw, "test") if im.shape == (3, 1, 2)]
    assert len(sixteen) == 2
    assert all((im == im[:1]).all() for im in sixteen)  # grey repeated to three channels
    values = {tuple(np.round(im[0, 0] * 65535).astype(int).tolist()) for im in sixteen}
    assert values == {(1000, 60000), (0, 200)}


def test_8_bit_images_are_scaled_by_255(tmp_path):
    root = image_folder(tmp_path / "d", {"a": [grey(0), grey(51)], "b": [grey(255), grey(102)]})
    raw = data.load_dataset(str(root))
    assert raw.channels == 1
    values = sorted(float(im[0, 0, 0]) for im in unit(raw) + unit(raw, "test"))
    assert values == [0.0, np.float32(51) / 255, np.float32(102) / 255, 1.0]


def test_npz_uint16_images(tmp_path):
    images = np.zeros((9, 1, 2), np.uint16)
    images[:] = [1000, 60000]
    raw = data.load_dataset(npz(tmp_path / "d.npz", images=images, labels=LABELS))
    np.testing.assert_allclose(unit(raw)[0][0, 0], np.array([1000, 60000]) / 65535)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32, np.bool_])
def test_npz_other_integer_images_are_refused_naming_what_is_accepted(tmp_path, dtype):
    path = npz(tmp_path / "d.npz", images=np.ones((9, 4, 4), dtype), labels=LABELS)
    message = refused(data.load_dataset, path, match="uint8 (0..255), uint16 (0..65535)")
    assert np.dtype(dtype).name in message


@pytest.mark.parametrize(
    ("values", "found"),
    [((0.0, 255.0), "from 0 to 255"), ((-0.5, 0.5), "from -0.5 to 0.5")],
)
def test_npz_float_images_outside_0_1_are_refused(tmp_path, values, found):
    images = np.zeros((9, 4, 4), np.float32)
    images[0, 0, :2] = values
    refused(data.load_dataset, npz(tmp_path / "d.npz", images=images, labels=LABELS),
            match=found)  # fmt: skip


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_non_finite_pixels_are_refused(tmp_path, bad):
    images = np.zeros((9, 4, 4), np.float64)
    images[3, 1, 1] = bad
    refused(data.load_dataset, npz(tmp_path / "d.npz", images=images, labels=LABELS),
            match="NaN or infinite")  # fmt: skip
    test = np.zeros((3, 4, 4), np.float32)
    test[0, 0, 0] = bad
    path = npz(tmp_path / "t.npz", images=np.zeros((9, 4, 4), np.float32), labels=LABELS,
               test_images=test, test_labels=np.arange(3))  # fmt: skip
    refused(data.load_dataset, path, match="test_images holds 1 NaN or infinite")


def test_float_image_file_outside_0_1_is_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 255.0]], np.float32)).save(tmp_path / "f.tiff")
    message = refused(data.load_image, str(tmp_path / "f.tiff"), channels=1, image_size=(1, 2),
                      match="from 0 to 255")  # fmt: skip
    assert message.count("f.tiff") == 1
    Image.fromarray(np.array([[0.0, 0.25]], np.float32)).save(tmp_path / "g.tiff")
    x = data.load_image(str(tmp_path / "g.tiff"), channels=1, image_size=(1, 2))
    np.testing.assert_allclose(x, normalised([[[0.0, 0.25]]]))


# ---- labels and classes ------------------------------------------------------------------


@pytest.mark.parametrize("big", [2**31, 2**32, 2**32 + 1])
def test_npz_labels_that_do_not_fit_int32_are_refused(tmp_path, big):
    labels = np.array([0, 0, 0, 1, 1, 1, big, big, big], np.int64)
    path = npz(tmp_path / "d.npz", images=np.zeros((9, 4, 4), np.uint8), labels=labels)
    refused(data.load_dataset, path, match=f"found {big}")


def test_npz_labels_beyond_the_class_names_are_refused(tmp_path):
    path = npz(tmp_path / "d.npz", images=np.zeros((9, 4, 4), np.uint8), labels=LABELS,
               class_names=np.array(["a", "b"]))  # fmt: skip
    refused(data.load_dataset, path, match="0..1 (one per class name, 2); found 2")


def test_empty_class_folder(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "c").mkdir()
    refused(data.load_dataset, str(root), match="no training image: 'c'")
    with pytest.warns(UserWarning, match="no training image: 'c'"):
        raw = data.load_dataset(str(root), keep_empty_classes=True)
    assert raw.class_names == ("a", "b", "c")
    with pytest.warns(UserWarning, match="'c'"):
        assert data.load_folder(str(root), keep_empty_classes=True).num_classes == 3


def test_class_with_train_images_only_is_fine_but_test_only_is_not(tmp_path):
    root = tmp_path / "d"
    image_folder(root / "train", {"a": [grey(1)], "b": [grey(2)], "c": [grey(3)]})
    image_folder(root / "test", {"a": [grey(4)], "b": [grey(5)]})
    raw = data.load_dataset(str(root))
    assert raw.class_names == ("a", "b", "c") and list(raw.test_labels) == [0, 1]
    for name in ("a", "b"):
        os.rename(root / "test" / name / "0.png", root / "test" / name / ".hidden.png")
    refused(
        data.load_dataset,
        str(root),
        match=f"no test images in the class sub-folders of {root / 'test'}",
    )
    for name in ("a", "b"):
        os.rename(root / "test" / name / ".hidden.png", root / "test" / name / "0.png")
    image_folder(root / "test", {"d": [grey(6)]})
    (root / "train" / "d").mkdir()
    refused(data.load_dataset, str(root), match="no training image: 'd'")


def test_npz_label_gaps_and_unused_class_names(tmp_path):
    images = np.zeros((6, 4, 4), np.uint8)
    labels = np.array([0, 0, 0, 2, 2, 2])
    path = npz(tmp_path / "gap.npz", images=images, labels=labels)
    refused(data.load_dataset, path, match="1 of 3 classes have no training image: '1'")
    with pytest.warns(UserWarning, match="'1'"):
        assert data.load_npz(path, keep_empty_classes=True).num_classes == 3
    names = np.array(["cat", "dog", "eel", "fox"])
    path = npz(tmp_path / "names.npz", images=images, labels=labels, class_names=names)
    refused(data.load_dataset, path, match="2 of 4 classes have no training image: 'dog', 'fox'")
    # A class in the test split only has no training image either.
    path = npz(tmp_path / "test.npz", images=images, labels=LABELS[:6],
               test_images=images[:3], test_labels=np.array([0, 1, 2]))  # fmt: skip
    refused(data.load_dataset, path, match="no training image: '2'")
    # ... but a class without test images is fine.
    path = npz(tmp_path / "ok.npz", images=images, labels=labels, test_images=images[:1],
               test_labels=np.array([0]), class_names=names[:3])  # fmt: skip
    with pytest.warns(UserWarning, match="'dog'"):
        raw = data.load_dataset(path, keep_empty_classes=True)
    assert raw.class_names == ("cat", "dog", "eel") and list(raw.test_labels) == [0]


def test_class_folder_linking_back_is_refused(tmp_path):
    root = two_classes(tmp_path / "d")
    os.symlink(root, root / "loop")
    refused(data.load_dataset, str(root), match=f"class folder {root / 'loop'} is a link")
    os.remove(root / "loop")
    os.symlink(tmp_path, root / "up")  # a folder holding the data folder
    refused(data.load_dataset, str(root), match="links that loop back are not followed")
    os.remove(root / "up")
    os.symlink(root / "a", root / "c")  # the images of a under a second label
    refused(data.load_dataset, str(root), match="read the same images")


def test_class_folder_linking_outside_is_read(tmp_path):
    root = two_classes(tmp_path / "d")
    image_folder(tmp_path / "elsewhere", {"c": [grey(50), grey(60)]})
    os.symlink(tmp_path / "elsewhere" / "c", root / "c")
    raw = data.load_dataset(str(root))
    assert raw.class_names == ("a", "b", "c")
    assert len(raw.train_labels) + len(raw.test_labels) == 6


def test_test_class_linking_to_train_is_refused(tmp_path):
    root = tmp_path / "d"
    image_folder(root / "train", {"a": [grey(1)], "b": [grey(2)]})
    image_folder(root / "test", {"a": [grey(4)]})
    os.symlink(root / "train" / "b", root / "test" / "b")
    refused(data.load_dataset, str(root), match="read the same images")


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "cr\r", "nul\x1f", "ls\u2028"])
def test_class_names_with_control_characters_are_refused(tmp_path, name):
    root = two_classes(tmp_path / "d")
    image_folder(root, {name: [grey(1), grey(2)]})
    refused(data.load_dataset, str(root), match="non-printable")
    path = npz(tmp_path / "d.npz", images=np.zeros((9, 4, 4), np.uint8), labels=LABELS,
               class_names=np.array(["a", name, "c"]))  # fmt: skip
    refused(data.load_dataset, path, match="non-printable")


def test_printable_unicode_class_names_are_read(tmp_path):
    names = ["chat é", "猫", "🐕 dog"]
    root = image_folder(tmp_path / "d", {n: [grey(1), grey(2)] for n in names})
    assert data.load_dataset(str(root)).class_names == tuple(sorted(names))
    path = npz(tmp_path / "d.npz", images=np.zeros((9, 4, 4), np.uint8), labels=LABELS,
               class_names=np.array(names))  # fmt: skip
    assert data.load_dataset(path).class_names == tuple(names)


@pytest.mark.parametrize(
    ("class_names", "match"),
    [
        (np.array("abc"), "1-D array of strings"),
        (np.array([0, 1, 2]), "1-D array of strings"),
        (np.array(["a", "b", "a"]), "repeated: 'a'"),
        (np.array(["a", "", "c"]), "is empty"),
    ],
)
def test_bad_npz_class_names(tmp_path, class_names, match):
    path = npz(tmp_path / "d.npz", images=np.zeros((9, 4, 4), np.uint8), labels=LABELS,
               class_names=class_names)  # fmt: skip
    refused(data.load_dataset, path, match=match)


def test_files_that_are_not_regular_are_refused(tmp_path):
    """A named pipe among the images would block reading; a broken link cannot be read."""
    root = two_classes(tmp_path / "d")
    os.mkfifo(root / "a" / "pipe.png")
    refused(data.load_dataset, str(root), match=f"{root / 'a' / 'pipe.png'} is not a regular")
    os.remove(root / "a" / "pipe.png")
    os.symlink(tmp_path / "nowhere.png", root / "b" / "broken.png")
    refused(data.load_dataset, str(root), match="broken.png is not a regular file")


def test_file_names_with_line_breaks_give_one_line_messages(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "a" / "bad\nname.png").write_bytes(b"not an image")
    message = refused(data.load_dataset, str(root), match="cannot read image")
    assert "bad\\nname.png" in message


# ---- channels: what was read --------------------------------------------------------------


def test_channels_say_what_was_read(tmp_path):
    sixteen = Image.fromarray(np.full((4, 4), 3000, np.uint16))
    root = image_folder(tmp_path / "g", {"a": [grey(1), sixteen], "b": [grey(2), grey(3)]})
    Image.fromarray(np.full((4, 4), 3000, ">u2")).save(root / "b" / "big-endian.tiff")  # I;16B
    raw = data.load_dataset(str(root))
    assert raw.channels == 1 and all(im.shape == (1, 4, 4) for im in unit(raw) + unit(raw, "test"))
    image_folder(root, {"c": [colour((1, 2, 3)), colour((4, 5, 6))]})
    raw = data.load_dataset(str(root))
    assert raw.channels == 3 and all(im.shape == (3, 4, 4) for im in unit(raw) + unit(raw, "test"))
    rgba = np.zeros((9, 4, 4, 4), np.uint8)
    raw = data.load_dataset(npz(tmp_path / "rgba.npz", images=rgba, labels=LABELS))
    assert raw.channels == 3 and np.asarray(raw.train_images).shape[1:] == (3, 4, 4)


# ---- any input: a valid data set or a one-line DataError -----------------------------------


def check_valid(raw: data.RawDataset) -> None:
    """The invariants of a `RawDataset`."""
    assert raw.channels in (1, 3)
    assert raw.num_classes >= 2 and len(set(raw.class_names)) == raw.num_classes
    assert all(name and name.isprintable() for name in raw.class_names)
    assert len(raw.test_labels) >= 1
    for images, labels in [
        (raw.train_images, raw.train_labels),
        (raw.test_images, raw.test_labels),
    ]:
        assert labels.dtype == np.int32 and labels.ndim == 1 and len(images) == len(labels)
        if len(labels):
            assert labels.min() >= 0 and labels.max() < raw.num_classes
        for image in images:
            assert image.dtype == np.float32 and image.ndim == 3 and min(image.shape) >= 1
            assert image.shape[0] == raw.channels
            assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert np.bincount(raw.train_labels, minlength=raw.num_classes).min() >= 1


def check_outcome(spec: str) -> None:
    """`load_dataset(spec)` gives a valid data set or a one-line `DataError`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings on damaged files are not errors
        try:
            raw = data.load_dataset(spec)
        except data.DataError as e:
            assert str(e) and str(e).isprintable(), repr(str(e))
            return
    check_valid(raw)


DTYPES = ["uint8", "uint16", "int8", "int32", "int64", "uint64", "float16", "float32",
          "float64", "bool", "complex64", "object", "<U3", "|S3", ">u2", ">f8"]  # fmt: skip


@st.composite
def arrays(draw, n: int) -> np.ndarray:
    """A small array of a random dtype and shape, with random, often nearly valid values."""
    dtype = draw(st.sampled_from(DTYPES))
    dims = st.integers(0, 4)
    shape = draw(st.one_of(
        st.just(()),
        st.tuples(st.sampled_from([n, n, 0, n + 1])),
        st.tuples(st.sampled_from([n, 0]), dims, dims),
        st.tuples(st.sampled_from([n, 0]), st.sampled_from([0, 1, 3, 4, 2]), dims, dims),
        st.tuples(st.sampled_from([n, 0]), dims, dims, st.sampled_from([0, 1, 3, 4, 2])),
    ))  # fmt: skip
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    top = draw(st.sampled_from([1, 2, 3, 255, 65535, 2**31, 2**33]))
    values = rng.integers(0, top, shape, dtype=np.int64, endpoint=True)
    if dtype == "object":
        out = np.empty(shape, object)
        out[...] = values
        return out
    if dtype in ("<U3", "|S3"):
        words = ["a", "b\n", "", "猫", "cc", "a"]
        if dtype == "|S3":
            words = [w.encode() for w in words] + [b"\xff"]
        return np.array(words, dtype)[values % len(words)]
    if dtype.lstrip("<>").startswith(("f", "float", "complex")):
        scale = draw(st.sampled_from([1.0, 1.0, 255.0, -1.0]))
        out = (values / max(top, 1) * scale).astype(dtype)
        if out.size and draw(st.booleans()):
            out.flat[0] = draw(st.sampled_from([np.nan, np.inf, 1.5]))
        return out
    with np.errstate(over="ignore"):
        return values.astype(dtype)


@st.composite
def valid_images(draw, n: int) -> np.ndarray:
    """`n` valid images of a random accepted dtype and layout."""
    shape = draw(st.sampled_from([(n, 2, 3), (n, 1, 2, 2), (n, 3, 2, 2), (n, 2, 2, 4)]))
    dtype = draw(st.sampled_from(["uint8", ">u2", "float32", "float64"]))
    values = np.random.default_rng(n).random(shape)
    return values.astype(dtype) if dtype.startswith("f") else (values * 255).astype(dtype)


KEYS = ["images", "labels", "test_images", "test_labels", "class_names"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_npz_arrays(draws):
    """A valid `.npz` with one array (or all, or none) replaced by a random one, or removed:
    a valid data set or a one-line error."""
    n = 9
    contents = {"images": draws.draw(valid_images(n)), "labels": np.arange(n) % 3}
    if draws.draw(st.booleans()):
        contents["test_images"] = draws.draw(valid_images(3))
        contents["test_labels"] = np.arange(3)
    if draws.draw(st.booleans()):
        contents["class_names"] = np.array(["cat", "dog", "猫"])
    fault = draws.draw(st.sampled_from(["none", "one", "one", "one", "all"]))
    faulty = {"none": [], "one": [draws.draw(st.sampled_from(KEYS))], "all": KEYS}[fault]
    for key in faulty:
        if draws.draw(st.integers(0, 4)) == 0:
            contents.pop(key, None)
        else:
            size = draws.draw(st.sampled_from([n, 3, 0, 1, 4]))
            contents[key] = draws.draw(arrays(size))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.npz")
        np.savez(path, **contents)
        check_outcome(path)


def valid_files(tmp: str) -> tuple[str, str]:
    """A valid `.npz` and a valid PNG."""
    path = os.path.join(tmp, "valid.npz")
    np.savez(path, images=np.arange(9 * 16, dtype=np.uint8).reshape(9, 4, 4), labels=LABELS,
             class_names=np.array(["a", "b", "c"]))  # fmt: skip
    png = os.path.join(tmp, "valid.png")
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(png)
    return path, png


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["npz", "png"]),
    damage=st.sampled_from(["truncate", "flip", "random"]),
    where=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_damaged_files(kind, damage, where, seed):
    """Truncated and corrupted `.npz` and PNG files, and random bytes under their names."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        npz_path, png_path = valid_files(tmp)
        with open(npz_path if kind == "npz" else png_path, "rb") as f:
            original = f.read()
        cut = int(where * len(original))
        if damage == "truncate":
            content = original[:cut]
        elif damage == "flip":
            content = bytearray(original)
            for i in rng.integers(0, len(content), 4):
                content[i] = int(rng.integers(0, 256))
            content = bytes(content)
        else:
            content = rng.bytes(cut)
        if kind == "npz":
            with open(npz_path, "wb") as f:
                f.write(content)
            check_outcome(npz_path)
        else:
            root = os.path.join(tmp, "folder")
            for c in ("a", "b"):
                os.makedirs(os.path.join(root, c))
                for i in range(2):
                    os.link(png_path, os.path.join(root, c, f"{i}.png"))
            with open(os.path.join(root, "b", "damaged.png"), "wb") as f:
                f.write(content)
            check_outcome(root)
