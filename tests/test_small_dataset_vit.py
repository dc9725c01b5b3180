"""SmallDatasetViT, SPT and LSA: parity with vit_pytorch.vit_for_small_dataset,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eqx_vision as ev
from reference import (
    check_parity,
    count_params,
    raises_value_error,
    reference,
    torch_param_count,
)


CONFIGS: list[dict[str, Any]] = [
    dict(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=32,
        depth=2,
        heads=4,
        mlp_dim=48,
        dim_head=8,
    ),
    dict(
        image_size=(16, 24),
        patch_size=4,
        num_classes=7,
        dim=24,
        depth=3,
        heads=2,
        mlp_dim=32,
        dim_head=12,
        pool="mean",
        channels=1,
    ),
    # one head of full width: the output projection is kept, as in the reference
    dict(
        image_size=12,
        patch_size=4,
        num_classes=5,
        dim=16,
        depth=1,
        heads=1,
        mlp_dim=16,
        dim_head=16,
        channels=4,
        dropout=0.1,
        emb_dropout=0.1,
    ),
]


def small_dataset():
    return reference("vit_for_small_dataset")


@functools.cache
def build(index: int) -> ev.SmallDatasetViT:
    """The model of `CONFIGS[index]`, built once: every use of it is functional."""
    return ev.SmallDatasetViT(**CONFIGS[index], key=jax.random.key(0))


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 6.6e-7 (relative to the largest output), gradients 7.4e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 4.5x and
# 5.4x over them.
TOL, GRAD_TOL = 3e-6, 4e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = small_dataset().ViT(**config)
    model = build(CONFIGS.index(config))
    assert count_params(model) == torch_param_count(torch_model)
    h, w = ev.layers.pair(config["image_size"], "image_size")
    check_parity(model, torch_model, (config.get("channels", 3), h, w), tol=TOL, grad_tol=GRAD_TOL)


def test_parity_with_attention_in_chunks(monkeypatch):
    """Long sequences are attended in chunks of queries (`MAX_SCORES`, lowered here so
    that 4 heads x 17 tokens are taken in chunks of 5 queries and a last one of 2, the
    locality mask offset in each): still the reference's values and gradients."""
    from eqx_vision.layers import _attention

    monkeypatch.setattr(_attention, "MAX_SCORES", 300)
    config = CONFIGS[0]
    torch_model = small_dataset().ViT(**config)
    h, w = ev.layers.pair(config["image_size"], "image_size")
    check_parity(
        build(0), torch_model, (config.get("channels", 3), h, w), tol=TOL, grad_tol=GRAD_TOL
    )


@pytest.mark.parametrize(
    "config",
    [dict(dim=16, patch_size=4), dict(dim=24, patch_size=2, channels=2)],
)
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_spt_parity(config, size):
    torch_model = small_dataset().SPT(**config)
    model = ev.SPT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (config.get("channels", 3), *size), tol=TOL, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("config", [dict(heads=2, dim_head=8), dict(heads=1, dim_head=16)])
def test_lsa_parity(config):
    torch_model = small_dataset().LSA(16, **config)
    model = ev.LSA(16, **config, key=jax.random.key(0))
    assert isinstance(model, ev.layers.Attention)
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (5, 16), tol=TOL, grad_tol=GRAD_TOL)


def test_lsa_structure():
    lsa = ev.LSA(16, heads=2, dim_head=8, key=jax.random.key(0))
    assert lsa.temperature is not None
    np.testing.assert_allclose(lsa.temperature, np.log(8**-0.5), rtol=1e-6)
    assert lsa.to_qkv is not None and lsa.to_qkv.bias is None
    assert lsa.to_out is not None
    # a token never attends to itself: with two tokens, each one's (pre-projection) output
    # is exactly the other token's value
    x = jax.random.normal(jax.random.key(1), (2, 16))
    probe = eqx.tree_at(lambda m: m.to_out, lsa, None)
    assert probe.norm is not None and probe.to_qkv is not None
    v = jnp.split(probe.to_qkv(probe.norm(x)), 3, axis=-1)[2]
    out = probe(x)
    np.testing.assert_allclose(out[0], v[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], v[0], rtol=1e-5, atol=1e-6)


def test_spt_shifts():
    """Channel blocks are x, then x shifted right, left, down and up (zero-filled), as
    `F.pad` with `(1, -1, 0, 0)`, `(-1, 1, 0, 0)`, `(0, 0, 1, -1)`, `(0, 0, -1, 1)`."""
    from eqx_vision.models.small_dataset_vit import shift_image

    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    ours = [shift_image(jnp.asarray(x), dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    pads = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))
    theirs = [F.pad(torch.from_numpy(x)[None], p)[0].numpy() for p in pads]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    right = np.asarray(ours[0])
    assert (right[:, :, 0] == 0).all() and (right[:, :, 1:] == x[:, :, :-1]).all()


def test_training_mode_needs_key():
    model = build(2)
    x = jnp.ones((4, 12, 12))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x)
    train = eqx.filter_jit(lambda m, x, k: m(x, key=k))
    a = train(model, x, jax.random.key(1))
    b = train(model, x, jax.random.key(2))
    assert a.shape == (5,) and not np.allclose(a, b)
    infer = eqx.filter_jit(lambda m, x: m(x))
    inference = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(infer(inference, x), infer(inference, x))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image_size=30), "patch_size"),
        (dict(image_size=(32, 30)), "patch_size"),
        (dict(patch_size=(8, 8)), "patch_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(pool="max"), "pool"),
        (dict(dim=0), "dim"),
        (dict(depth=0), "depth"),
        (dict(heads=0), "heads"),
        (dict(channels=0), "channels"),
        (dict(image_size="32"), "image_size"),
    ],
)
def test_config_errors(change, match, monkeypatch):
    config = {**CONFIGS[0], **change}
    raises_value_error(
        lambda: ev.SmallDatasetViT(**config, key=jax.random.key(0)), match, monkeypatch
    )


@pytest.mark.parametrize(
    "change, match",
    [(dict(patch_size=(4, 4)), "patch_size"), (dict(dim=0), "dim"), (dict(channels=0), "channels")],
)
def test_spt_config_errors(change, match, monkeypatch):
    config = {"dim": 16, "patch_size": 4, **change}
    raises_value_error(lambda: ev.SPT(**config, key=jax.random.key(0)), match, monkeypatch)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 10, 8), "multiples of patch_size=4"),
        ((2, 8, 8), "3 input channels"),
        ((8, 8), "one image"),
        ((1, 3, 8, 8), "a batch"),
    ],
)
def test_spt_input_errors(shape, match, monkeypatch):
    spt = ev.SPT(dim=16, patch_size=4, key=jax.random.key(0))
    raises_value_error(lambda: spt(jnp.zeros(shape)), match, monkeypatch)
