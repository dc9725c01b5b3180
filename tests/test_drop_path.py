"""Stochastic depth (drop-path) in the transformer encoder."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
from eqx_vision.layers import DropPath, Transformer


def _encoder(p: float) -> Transformer:
    return Transformer(8, 2, 2, 4, 16, drop_path=p, key=jax.random.key(0))


def test_rates_rise_linearly():
    np.testing.assert_allclose(DropPath(0.3).rates(4), [0.0, 0.1, 0.2, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\); got 1.0"):
        DropPath(1.0)


def test_inference_and_no_key_are_unchanged():
    x = jax.random.normal(jax.random.key(1), (5, 8))
    plain, dropping = _encoder(0.0), _encoder(0.9)
    np.testing.assert_array_equal(plain(x), dropping(x))  # no key: nothing is dropped
    inference = eqx.nn.inference_mode(dropping)
    np.testing.assert_array_equal(plain(x), inference(x, key=jax.random.key(2)))


def test_branches_dropped_or_scaled():
    """Block 0 (rate 0) always runs; each branch of block 1 (rate p) is either dropped or
    scaled by 1 / (1 - p), and dropped about p of the time."""
    p = 0.5
    encoder = _encoder(p)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    block0, block1 = encoder.layers[0], encoder.layers[1]
    h = block0(x)
    candidates = []
    for keep_attn in (0, 1):
        y = h + keep_attn * block1.attn(h) / (1 - p)
        for keep_ff in (0, 1):
            candidates.append(((keep_attn, keep_ff), y + keep_ff * block1.ff(y) / (1 - p)))
    run = jax.jit(lambda k: jax.vmap(lambda k: encoder(x, key=k))(jax.random.split(k, 400)))
    outs = run(jax.random.key(3))
    kept = []
    norm = encoder.norm
    assert norm is not None
    for out in np.asarray(outs):
        errors = [float(jnp.max(jnp.abs(norm(c) - out))) for _, c in candidates]
        best = int(np.argmin(errors))
        assert errors[best] < 1e-4
        kept.append(candidates[best][0])
    frequency = np.mean(np.asarray(kept), axis=0)
    assert np.all(np.abs(frequency - (1 - p)) < 0.1), frequency


def test_vit_option():
    model = ev.ViT(
        image_size=8,
        patch_size=4,
        num_classes=3,
        dim=8,
        depth=2,
        heads=2,
        mlp_dim=16,
        drop_path=0.2,
        key=jax.random.key(0),
    )
    x = jnp.ones((3, 8, 8))
    a, b = model(x, key=jax.random.key(1)), model(x, key=jax.random.key(2))
    assert a.shape == (3,) and not np.allclose(a, b)
    inference = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(inference(x, key=jax.random.key(1)), inference(x))
