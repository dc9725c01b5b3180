"""`ev.pretrained`: timm weights from a Hugging Face Hub cache, offline.

No machine here reaches the hub: each test writes a local cache in the layout
huggingface_hub reads (`models--timm--<name>/snapshots/<revision>/`, `refs/main`), from a
randomly initialised timm model saved by timm's own `save_for_hf` (its `config.json` and
`model.safetensors`), and sets the hub offline.
"""

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision import cli
from eqx_vision.data import imagenet_classes, load_pretrained_image
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, rel_err
from timm_reference import import_timm, timm_model


NAME = "vit_small_patch16_224.augreg_in21k_ft_in1k"
SMALL: dict[str, Any] = {
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 2,
    "img_size": 32,
    "patch_size": 8,
}
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_cache(cache: Path, name: str, torch_model, model_args) -> Path:
    """`torch_model` saved by timm in the hub cache layout under `cache`; returns the
    snapshot folder."""
    timm = import_timm()
    repo = cache / f"models--timm--{name}"
    snapshot = repo / "snapshots" / REVISION
    timm.models.save_for_hf(
        torch_model, str(snapshot), model_args=model_args, safe_serialization=True
    )
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, offline):
    torch_model = timm_model(NAME, **SMALL)
    perturb_(torch_model)
    write_cache(tmp_path, NAME, torch_model, SMALL)
    return tmp_path, torch_model


def test_pretrained_from_cache(hub_cache):
    cache, torch_model = hub_cache
    model, data = ev.pretrained(f"timm/{NAME}", cache_dir=cache)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    assert rel_err(jax.vmap(model)(jnp.asarray(x.numpy())), expected) <= 1e-5
    assert data.input_size == (3, 32, 32)  # from the checkpoint's config.json
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    assert data.crop_pct == 0.9 and data.interpolation == "bicubic"
    assert data.num_classes == 1000 and data.label_set == "imagenet-1k"


def test_pretrained_new_head(hub_cache):
    cache, _ = hub_cache
    model, data = ev.pretrained(NAME, num_classes=7, cache_dir=cache)
    assert model(jnp.zeros((3, 32, 32))).shape == (7,)
    assert data.num_classes == 7 and data.label_set is None


def test_not_cached_offline(tmp_path, offline):
    with pytest.raises(ConnectionError, match=r"not in the local cache.*hf download timm/"):
        ev.pretrained(NAME, cache_dir=tmp_path)


def test_corrupted_weights(hub_cache):
    cache, _ = hub_cache
    weights = next(cache.glob("models--timm--*/snapshots/*/model.safetensors"))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ev.CheckpointError, match="not a readable .safetensors file"):
        ev.pretrained(NAME, cache_dir=cache)


def test_corrupted_config(hub_cache):
    cache, _ = hub_cache
    config = next(cache.glob("models--timm--*/snapshots/*/config.json"))
    config.write_text("{")
    with pytest.raises(ev.CheckpointError, match="not a valid timm config.json"):
        ev.pretrained(NAME, cache_dir=cache)


def test_unknown_and_unsupported_names(tmp_path, offline):
    with pytest.raises(ev_timm.TimmConfigError, match="unknown timm model name 'resnet50.a1_in1k'"):
        ev.pretrained("timm/resnet50.a1_in1k", cache_dir=tmp_path)
    with pytest.raises(ev_timm.TimmConfigError, match="no pretrained tag 'nope'"):
        ev.pretrained(f"timm/{NAME.split('.')[0]}.nope", cache_dir=tmp_path)
    eva = next(
        n
        for n in ev_timm.model_names(pretrained=True, supported=False)
        if ev_timm._entry(n)["class"] == "Eva"
    )
    with pytest.raises(ev_timm.TimmConfigError, match="does not implement"):
        ev.pretrained(eva, cache_dir=tmp_path)


def test_safetensors_path(tmp_path):
    """`from_timm` reads a .safetensors file with NumPy."""
    torch_model = timm_model(NAME, **SMALL)
    perturb_(torch_model)
    snapshot = write_cache(tmp_path, NAME, torch_model, SMALL)
    model = ev.from_timm(NAME, snapshot / "model.safetensors", **SMALL)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    assert rel_err(jax.vmap(model)(jnp.asarray(x.numpy())), expected) <= 1e-5


@pytest.fixture
def cli_cache(hub_cache, monkeypatch):
    cache, torch_model = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return torch_model


def _image(path: Path, seed: int, size=(50, 37)) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _torch_probs(torch_model, paths, data) -> np.ndarray:
    x = np.stack([load_pretrained_image(p, data) for p in paths])
    with torch.no_grad():
        return torch.softmax(torch_model(torch.from_numpy(x)), -1).numpy()


def test_cli_predict_pretrained(cli_cache, tmp_path, capsys):
    """Top-5 ImageNet classes by name, the image prepared as the data configuration says."""
    paths = [_image(tmp_path / "a.png", 0), _image(tmp_path / "b.jpg", 1, (40, 64))]
    assert cli.main(["predict", "--pretrained", f"timm/{NAME}", *paths]) == 0
    out = capsys.readouterr().out.splitlines()
    _, data = ev.pretrained(NAME)
    probs = _torch_probs(cli_cache, paths, data)
    names = [n for _, n in imagenet_classes()]
    for i, path in enumerate(paths):
        block = out[6 * i : 6 * i + 6]
        assert block[0] == path
        top = np.argsort(-probs[i])[:5]
        for line, c in zip(block[1:], top, strict=True):
            p, name = line.strip().split("  ", 1)
            assert name == names[c] and abs(float(p) - probs[i, c]) < 1e-4


def test_cli_evaluate_pretrained(cli_cache, tmp_path, capsys):
    """Top-1 and top-5 accuracy on a folder of ImageNet class folders."""
    synsets = [s for s, _ in imagenet_classes()]
    paths, labels = [], []
    for label in (0, 1, 500):
        folder = tmp_path / "val" / synsets[label]
        folder.mkdir(parents=True)
        for j in range(2):
            paths.append(_image(folder / f"{j}.png", 10 * label + j))
            labels.append(label)
    argv = ["evaluate", "--pretrained", NAME, "--data", str(tmp_path / "val"), "--batch-size", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    _, data = ev.pretrained(NAME)
    ranked = np.argsort(-_torch_probs(cli_cache, paths, data), axis=-1)[:, :5]
    top1 = np.mean(ranked[:, 0] == labels)
    top5 = np.mean(np.any(ranked == np.asarray(labels)[:, None], axis=-1))
    assert f"top-5 accuracy: {top5:.4f}" in out and f"test accuracy: {top1:.4f}" in out
    (tmp_path / "val" / "cats").mkdir()
    assert cli.main(argv) == 2
    assert "not an ImageNet-1k synset id" in capsys.readouterr().err


def test_cli_pretrained_errors(tmp_path, offline, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    image = _image(tmp_path / "a.png", 0)
    assert cli.main(["predict", "--pretrained", NAME, image]) == 2
    assert "not in the local cache" in capsys.readouterr().err
    assert cli.main(["predict", "--pretrained", "timm/resnet50", image]) == 2
    assert "unknown timm model name" in capsys.readouterr().err


def test_pretrained_preprocessing(tmp_path):
    """Shorter side to floor(size / crop_pct), centre crop, normalisation."""
    from eqx_vision.interop.timm import DataConfig

    config = DataConfig(
        input_size=(3, 4, 4),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        crop_pct=0.5,
        interpolation="nearest",
    )
    from PIL import Image

    rows = np.arange(16, dtype=np.uint8)[:, None, None] * 16  # 16 x 32, rows 0, 16, ...
    Image.fromarray(np.broadcast_to(rows, (16, 32, 3)).copy()).save(tmp_path / "r.png")
    x = load_pretrained_image(str(tmp_path / "r.png"), config)
    assert x.shape == (3, 4, 4)
    # resized to 8 x 16 (nearest, sampling pixel centres: rows 1, 3, ..., 15), centre
    # 4 x 4: rows 5, 7, 9, 11
    expected_rows = (np.array([5, 7, 9, 11]) * 16 / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(x[0, :, 0], expected_rows, rtol=1e-6)
