"""The streaming input pipeline (`eqx_vision.data.StreamingData`): the folder scan, the
augmentation's properties and determinism, the batches of several workers and processes,
resuming mid-epoch, evaluation batches, and bad input."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from eqx_vision import data


CLASSES = ("ant", "bee", "cat")


def _jpeg(path: str, rng: np.random.Generator, size: tuple[int, int]) -> None:
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(root: str, per_class: int = 6, val_per_class: int = 2, flat_val=False) -> str:
    """train/<class>/*.jpg and val/<class>/*.jpg (or a flat val/ and val_labels.txt) of
    random images of several sizes."""
    rng = np.random.default_rng(0)
    lines = []
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, "train", name))
        for i in range(per_class):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            _jpeg(os.path.join(root, "train", name, f"{i}.jpg"), rng, size)
        for i in range(val_per_class):
            file = f"{name}_{i}.jpg" if flat_val else os.path.join(name, f"{i}.jpg")
            os.makedirs(os.path.dirname(os.path.join(root, "val", file)), exist_ok=True)
            _jpeg(os.path.join(root, "val", file), rng, (30 + c, 40))
            lines.append(f"{file} {name}")
    if flat_val:
        with open(os.path.join(root, "val_labels.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("images")))


def stream(root: str, **kwargs) -> data.StreamingData:
    kwargs = {"image_size": (16, 16), "process_index": 0, "process_count": 1, **kwargs}
    return data.StreamingData(data.scan_folder(root), **kwargs)


def collect(it, n=None):
    out = []
    for i, batch in enumerate(it):
        if n is not None and i == n:
            break
        out.append(batch)
    return out


# The folder scan --------------------------------------------------------------------------


def test_scan_reads_the_file_list_only(folder):
    files = data.scan_folder(folder)
    assert files.class_names == CLASSES
    assert len(files.train_paths) == 18 and len(files.test_paths) == 6
    assert np.bincount(files.train_labels).tolist() == [6, 6, 6]
    assert all(p.endswith(".jpg") for p in files.train_paths)


def test_a_flat_val_folder_reads_its_labels_file(tmp_path):
    root = make_folder(str(tmp_path), flat_val=True)
    files = data.scan_folder(root)
    assert files.test_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_a_flat_val_folder_without_labels_is_an_error(tmp_path):
    root = make_folder(str(tmp_path), flat_val=True)
    os.remove(os.path.join(root, "val_labels.txt"))
    with pytest.raises(data.DataError, match="val_labels.txt"):
        data.scan_folder(root)


def test_a_labels_file_naming_an_unknown_class_or_missing_an_image_is_an_error(tmp_path):
    root = make_folder(str(tmp_path), flat_val=True)
    path = os.path.join(root, "val_labels.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1] + [lines[-1].replace("cat", "dog")]) + "\n")
    with pytest.raises(data.DataError, match="dog"):
        data.scan_folder(root)
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(data.DataError, match="cat_1.jpg"):
        data.scan_folder(root)


# The augmentation ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 2**32 - 1),
    st.floats(0.01, 1.0), st.floats(0.2, 5.0),
)  # fmt: skip
def test_crop_boxes_lie_inside_the_image(height, width, seed, low, ratio_low):
    rng = np.random.default_rng(seed)
    scale = (low, 1.0)
    ratio = (ratio_low, max(ratio_low, 1 / ratio_low))
    top, left, h, w = data.random_resized_crop_box(rng, height, width, scale, ratio)
    assert 0 <= top and 0 <= left and h >= 1 and w >= 1
    assert top + h <= height and left + w <= width


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 1000))
def test_flipping_twice_is_the_identity(h, w, seed):
    image = np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)
    np.testing.assert_array_equal(data.hflip(data.hflip(image)), image)
    np.testing.assert_array_equal(data.hflip(image)[..., 0], image[..., -1])


def test_an_augmentation_is_determined_by_seed_epoch_and_position(folder):
    files = data.scan_folder(folder)
    path, label = files.train_paths[3], int(files.train_labels[3])

    def run(seed, epoch, position=5):
        transform = data.TrainTransform((16, 16), 3, data.Augment(), seed)
        return transform((epoch, position, path, label))[0]

    first = run(0, 1)
    np.testing.assert_array_equal(first, run(0, 1))
    assert first.dtype == np.uint8 and first.shape == (3, 16, 16)
    for other in (run(1, 1), run(0, 2), run(0, 1, position=6)):
        assert not np.array_equal(first, other)


def test_without_augmentation_the_crop_is_the_whole_image(folder):
    files = data.scan_folder(folder)
    path = files.train_paths[0]
    plain = data.Augment(scale=(1.0, 1.0), ratio=(0.01, 100.0), hflip=0.0)
    out, _ = data.TrainTransform((16, 16), 3, plain, 0)((0, 0, path, 0))
    bilinear = Image.Resampling.BILINEAR
    expected = np.asarray(Image.open(path).convert("RGB").resize((16, 16), bilinear))
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))


def test_evaluation_resizes_the_shorter_side_and_crops_the_centre(folder):
    files = data.scan_folder(folder)
    path = files.test_paths[0]  # 30 x 40 (height x width)
    out, _ = data.EvalTransform((16, 16), 3, crop_pct=0.8)((0, 0, path, 0))
    # The shorter side to 20 = 16 / 0.8, the longer in proportion.
    img = Image.open(path).convert("RGB").resize((26, 20), Image.Resampling.BILINEAR)
    expected = np.asarray(img.crop((5, 2, 21, 18))).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)


# Batches -------------------------------------------------------------------------------------


def test_an_epoch_is_the_shuffled_files_in_full_batches(folder):
    ds = stream(folder)
    batches = collect(ds.train_batches(1, 4, seed=0))
    assert len(batches) == 18 // 4
    images, labels = batches[0]
    assert images.dtype == np.uint8 and images.shape == (4, 3, 16, 16)
    assert labels.dtype == np.int32
    order = np.random.default_rng([0, 1]).permutation(18)
    files = data.scan_folder(folder)
    got = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(got, files.train_labels[order[:16]])
    other = collect(ds.train_batches(2, 4, seed=0))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))


def test_two_processes_read_the_rows_of_one(folder):
    whole = collect(stream(folder).train_batches(3, 6, seed=1))
    parts = [
        collect(stream(folder, process_index=i, process_count=2).train_batches(3, 6, seed=1))
        for i in range(2)
    ]
    for step, (images, labels) in enumerate(whole):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step][0], parts[1][step][0]]), images
        )
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step][1], parts[1][step][1]]), labels
        )


def test_resuming_mid_epoch_gives_the_rest_of_the_epoch(folder):
    ds = stream(folder)
    whole = collect(ds.train_batches(1, 4, seed=0))
    rest = collect(stream(folder).train_batches(1, 4, seed=0, start=2))
    assert len(rest) == len(whole) - 2
    for a, b in zip(whole[2:], rest, strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_one_pipeline_serves_consecutive_epochs_as_fresh_ones_would(folder):
    """Reading epoch 1 in part, the rest of it, then epoch 2 from one data set (one
    pipeline, its workers kept) gives the batches of separate pipelines."""
    ds = stream(folder)
    part = collect(ds.train_batches(1, 4, seed=0), n=2)
    rest = collect(ds.train_batches(1, 4, seed=0, start=2))
    second = collect(ds.train_batches(2, 4, seed=0))
    again = collect(ds.train_batches(1, 4, seed=0))  # not where the pipeline stands
    fresh = [collect(stream(folder).train_batches(e, 4, seed=0)) for e in (1, 2)]
    for a, b in zip(part + rest + second, fresh[0] + fresh[1], strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for a, b in zip(again, fresh[0], strict=True):
        np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(folder):
    inline = collect(stream(folder).train_batches(1, 4, seed=0))
    inline += collect(stream(folder).train_batches(2, 4, seed=0))
    ds = stream(folder, workers=2)
    workers = collect(ds.train_batches(1, 4, seed=0)) + collect(ds.train_batches(2, 4, seed=0))
    assert len(inline) == len(workers)
    for a, b in zip(inline, workers, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_evaluation_batches_cover_every_file_once_padded_at_the_end(folder):
    ds = stream(folder)
    batches = collect(ds.test_batches(4))
    assert [len(b[1]) for b in batches] == [4, 4]
    mask = np.concatenate([b[2] for b in batches])
    assert mask.tolist() == [True] * 6 + [False] * 2
    labels = np.concatenate([b[1] for b in batches])[mask]
    np.testing.assert_array_equal(labels, data.scan_folder(folder).test_labels)
    assert not batches[-1][0][2:].any()
    halves = [collect(stream(folder, process_index=i, process_count=2).test_batches(4))
              for i in range(2)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([halves[0][1][2], halves[1][1][2]]), batches[1][2])


# Bad input -----------------------------------------------------------------------------------


def test_a_corrupt_image_names_its_file(tmp_path):
    root = make_folder(str(tmp_path))
    bad = os.path.join(root, "train", "bee", "2.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(data.DataError, match="2.jpg"):
        collect(stream(root).train_batches(0, 18, seed=0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 2}, "channels"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"std": (0.0,)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"workers": -1}, "workers"),
    ],
)
def test_bad_settings_are_errors(folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stream(folder, **kwargs)


def test_bad_augment_settings_are_errors():
    with pytest.raises(ValueError, match="scale"):
        data.Augment(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="interpolation"):
        data.Augment(interpolation="lanczos")


def test_a_batch_that_the_processes_cannot_share_is_an_error(folder):
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        stream(folder, process_index=0, process_count=2).train_batches(0, 5, seed=0)


# Training on a stream ----------------------------------------------------------------------


def test_uint8_batches_are_normalised_inside_the_step():
    import jax
    import jax.numpy as jnp

    from eqx_vision import training

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (pixels / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    got = training.normalize_images(jnp.asarray(pixels), (mean, std))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    default = training.normalize_images(jnp.asarray(pixels))
    np.testing.assert_allclose(default, pixels / 127.5 - 1.0, rtol=1e-6, atol=1e-6)
    floats = jnp.asarray(expected, jnp.float32)
    assert training.normalize_images(floats, (mean, std)) is floats
    jax.clear_caches()


def test_fit_trains_on_a_stream_and_resumes_to_the_same_end(folder, tmp_path):
    import jax.random as jr

    import eqx_vision as ev
    from eqx_vision import training

    def model():
        return ev.ViT(image_size=16, patch_size=8, num_classes=3, dim=16, depth=1, heads=2,
                      mlp_dim=16, key=jr.key(0))  # fmt: skip

    config = training.TrainConfig(epochs=2, batch_size=4, warmup_epochs=0.0)
    ds = stream(folder, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    whole = training.fit(model(), None, ds, config)
    assert [m["epoch"] for m in whole.metrics] == [1, 2]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["test_loss"]) for m in whole.metrics)
    first = training.fit(model(), None, ds, config, out=tmp_path / "run",
                         callback=lambda metrics: True)  # fmt: skip
    assert first.epoch == 1
    resumed = training.fit(model(), None, ds, config, out=tmp_path / "run", resume=True)
    assert resumed.metrics[-1]["train_loss"] == whole.metrics[-1]["train_loss"]
    assert resumed.test_loss == whole.test_loss
