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
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, rel_err
from timm_reference import import_timm, timm_model


NAME = "vit_small_patch16_224.augreg_in21k_ft_in1k"
SMALL: dict[str, Any] = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 8}
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
