"""timm's PiT (`PoolingVisionTransformer`, the `pit_*` names) loaded into `ev.PiT`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, rel_err
from timm_reference import check_timm_parity, timm_model


NAMES = [n for n in ev_timm.model_names() if n.startswith("pit_")]

# Reduced versions of each kind of configuration. The plain one has an odd patch grid
# (3 -> 2 -> 1), a stage with one head (which keeps its output projection, unlike
# vit-pytorch's) and a fractional MLP ratio; the distilled one has pit_b's patch 14 with
# stride 7 and a head dimension (base_dims) that changes between stages.
REDUCED: dict[str, dict[str, Any]] = {
    "pit_ti_224": dict(
        img_size=32, base_dims=[8, 8, 8], depth=[1, 2, 1], heads=[1, 2, 4], mlp_ratio=2.5
    ),
    "pit_b_distilled_224": dict(img_size=28, base_dims=[8, 4, 4], depth=[1, 1, 1], heads=[1, 4, 8]),
}

# The largest errors of these reduced models against timm, measured (float32, this suite's
# CPU, seeds 0 and 1): outputs 1.1e-6 (relative to the largest output), gradients 6.4e-6
# (of the input and of every parameter, each relative to its own largest); the
# tolerances are 4.5x and 4.7x over them.
TOL, GRAD_TOL = 5e-6, 3e-5


@pytest.mark.parametrize("name", list(REDUCED))
def test_parity_reduced(name):
    config = REDUCED[name]
    size = config["img_size"]
    check_timm_parity(name, (3, size, size), tol=TOL, grad_tol=GRAD_TOL, **config)


def _logits(name: str, batch: int, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """timm's outputs and those of its weights loaded by `from_timm`, on a random batch;
    the parameters perturbed (see `reference.perturb_`)."""
    torch_model = timm_model(name, **overrides)
    perturb_(torch_model)
    size = overrides.get("img_size", 224)
    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    model = ev.from_timm(name, torch_model.state_dict(), **overrides)
    actual = jax.jit(jax.vmap(model))(jnp.asarray(x.numpy()))
    return np.asarray(actual), expected


# At full size (224 px, batch 1, 12 blocks) the logits' relative errors, measured, are
# 4.1e-6 (pit_ti_224) and 5.2e-6 (pit_ti_distilled_224); the tolerance is 5.8x over them.
FULL_TOL = 3e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pit_ti_224", "pit_ti_distilled_224"])
def test_parity_full_size(name):
    actual, expected = _logits(name, batch=1)
    assert actual.shape == (1, 1000)
    assert rel_err(actual, expected) <= FULL_TOL


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds(name):
    ev_timm.check(name)


def test_names():
    bare = {n for n in NAMES if "." not in n}
    assert len(bare) == 8
    assert {n for n in bare if "distilled" in n} == {
        f"pit_{s}_distilled_224" for s in ("ti", "xs", "s", "b")
    }


def test_structure():
    model = eqx.filter_eval_shape(
        lambda: ev_timm.build("pit_b_distilled_224", key=jax.random.key(0))
    )
    assert isinstance(model, ev.PiT)
    assert model.grid_sizes == (31, 16, 8)
    assert model.stride == 7
    assert model.pos_embedding.shape == (31 * 31, 256)  # no slot for the prefix tokens
    assert model.dist_token is not None and model.dist_head is not None
    assert all(p.pointwise is None for p in model.pools)
    ffs = [s.layers.blocks.ff for s in model.stages]
    dims = [ff.fc1.weight.shape for ff in ffs if isinstance(ff, ev.layers.FeedForward)]
    assert dims == [(3, 1024, 256), (6, 2048, 512), (4, 4096, 1024)]


@pytest.mark.parametrize("name", list(REDUCED))
def test_without_classifier(name):
    """`num_classes=0` drops the classifier: the normalised class token, or the mean of
    the normalised class and distillation tokens, as timm's `pre_logits`."""
    config = REDUCED[name]
    torch_model = timm_model(name, **config)
    perturb_(torch_model)
    size = config["img_size"]
    x = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model.forward_head(torch_model.forward_features(x), pre_logits=True)
    model = ev.from_timm(name, torch_model.state_dict(), num_classes=0, **config)
    assert model.mlp_head is None and model.dist_head is None
    actual = jax.vmap(model)(jnp.asarray(x.numpy()))
    assert rel_err(actual, expected.numpy()) <= TOL


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(global_pool=""), "global_pool"),
        (dict(drop_rate=0.1), "drop_rate"),
        (dict(drop_path_rate=0.1), "drop_path_rate"),
        (dict(proj_drop_rate=0.1), "attn_drop_rate"),
        (dict(img_size=(224, 192)), "img_size"),
        (dict(stem_type="conv"), "stem_type"),
        (dict(device="cpu"), "device"),
    ],
)
def test_rejected_options(overrides, option):
    with pytest.raises(ev_timm.TimmConfigError, match=option):
        ev_timm.build("pit_ti_224", key=jax.random.key(0), **overrides)


def test_dropout_rates_honoured():
    model = ev_timm.build(
        "pit_ti_224",
        key=jax.random.key(0),
        pos_drop_rate=0.1,
        proj_drop_rate=0.2,
        attn_drop_rate=0.2,
    )
    assert model.dropout.p == 0.1
    assert float(model.stages[0].layers.blocks.attn.attn_dropout.p) == 0.2


def test_checkpoint_mismatch():
    config = REDUCED["pit_ti_224"]
    state_dict = timm_model("pit_ti_224", **config).state_dict()
    state_dict["pos_embed"] = state_dict["pos_embed"][:, :, :2]
    with pytest.raises(ev.CheckpointError, match="pos_embed"):
        ev.from_timm("pit_ti_224", state_dict, **config)
