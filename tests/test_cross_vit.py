"""CrossViT: parity with vit_pytorch.cross_vit.CrossViT,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
        num_classes=10,
        sm_dim=32,
        lg_dim=48,
        sm_patch_size=8,
        sm_enc_depth=1,
        sm_enc_heads=2,
        sm_enc_mlp_dim=40,
        sm_enc_dim_head=8,
        lg_patch_size=16,
        lg_enc_depth=2,
        lg_enc_heads=4,
        lg_enc_mlp_dim=40,
        lg_enc_dim_head=8,
        cross_attn_depth=2,
        cross_attn_heads=2,
        cross_attn_dim_head=8,
        depth=2,
    ),
    # equal branch dims (no projections around the cross attention), one channel
    dict(
        image_size=24,
        num_classes=6,
        sm_dim=24,
        lg_dim=24,
        sm_patch_size=4,
        sm_enc_depth=2,
        sm_enc_heads=3,
        sm_enc_mlp_dim=32,
        sm_enc_dim_head=8,
        lg_patch_size=12,
        lg_enc_depth=1,
        lg_enc_heads=2,
        lg_enc_mlp_dim=16,
        lg_enc_dim_head=12,
        cross_attn_depth=1,
        cross_attn_heads=1,
        cross_attn_dim_head=16,
        depth=1,
        channels=1,
    ),
    # one head of full width everywhere: every attention keeps its output projection
    dict(
        image_size=16,
        num_classes=3,
        sm_dim=16,
        lg_dim=8,
        sm_patch_size=4,
        sm_enc_depth=1,
        sm_enc_heads=1,
        sm_enc_mlp_dim=16,
        sm_enc_dim_head=16,
        lg_patch_size=8,
        lg_enc_depth=1,
        lg_enc_heads=1,
        lg_enc_mlp_dim=16,
        lg_enc_dim_head=8,
        cross_attn_depth=3,
        cross_attn_heads=1,
        cross_attn_dim_head=8,
        depth=3,
        channels=2,
        dropout=0.0,
        emb_dropout=0.0,
    ),
]


def cross_vit():
    return reference("cross_vit")


@functools.cache
def build(index: int) -> ev.CrossViT:
    """The model of `CONFIGS[index]`, built once: every use of it is functional."""
    return ev.CrossViT(**CONFIGS[index], key=jax.random.key(0))


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 9.5e-7 (relative to the largest output), gradients 4.5e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.3x and
# 4.4x over them.
TOL, GRAD_TOL = 5e-6, 2e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = cross_vit().CrossViT(**config)
    model = build(CONFIGS.index(config))
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    check_parity(
        model, torch_model, (config.get("channels", 3), size, size), tol=TOL, grad_tol=GRAD_TOL
    )


def test_structure():
    config = CONFIGS[0]
    model = build(0)
    assert len(model.multi_scale_encoder) == config["depth"]
    block = model.multi_scale_encoder[1]
    assert len(block.sm_enc.layers) == config["sm_enc_depth"]
    assert len(block.lg_enc.layers) == config["lg_enc_depth"]
    assert len(block.cross_attend.layers) == config["cross_attn_depth"]
    cross = block.cross_attend.layers[0].sm_attend_lg
    assert cross.project_in is not None and cross.project_in.weight.shape == (48, 32)
    equal = build(1)
    layer = equal.multi_scale_encoder[0].cross_attend.layers[0]
    assert layer.sm_attend_lg.project_in is None and layer.sm_attend_lg.project_out is None
    assert layer.lg_attend_sm.project_in is None and layer.lg_attend_sm.project_out is None


def test_patch_tokens_unchanged_by_cross_attention():
    model = eqx.nn.inference_mode(build(0))
    cross = model.multi_scale_encoder[0].cross_attend
    sm = jax.random.normal(jax.random.key(1), (17, 32))
    lg = jax.random.normal(jax.random.key(2), (5, 48))
    sm_out, lg_out = cross(sm, lg)
    np.testing.assert_array_equal(sm_out[1:], sm[1:])
    np.testing.assert_array_equal(lg_out[1:], lg[1:])
    assert not np.allclose(sm_out[0], sm[0]) and not np.allclose(lg_out[0], lg[0])


def test_default_dropout_needs_key():
    model = build(0)
    assert model.sm_image_embedder.dropout.p == 0.1
    x = jnp.ones((3, 32, 32))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x)
    train = eqx.filter_jit(lambda m, x, k: m(x, key=k))
    a = train(model, x, jax.random.key(1))
    b = train(model, x, jax.random.key(2))
    assert a.shape == (10,) and not np.allclose(a, b)
    infer = eqx.filter_jit(lambda m, x: m(x))
    inference = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(infer(inference, x), infer(inference, x))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image_size=36), "sm_patch_size"),
        (dict(image_size=40), "lg_patch_size"),
        (dict(image_size=(32, 32)), "image_size"),
        (dict(sm_patch_size=(8, 8)), "sm_patch_size"),
        (dict(lg_patch_size=0), "lg_patch_size"),
        (dict(sm_dim=0), "sm_dim"),
        (dict(lg_enc_depth=0), "lg_enc_depth"),
        (dict(cross_attn_heads=0), "cross_attn_heads"),
        (dict(depth=0), "depth"),
        (dict(channels=0), "channels"),
    ],
)
def test_config_errors(change, match, monkeypatch):
    config = {**CONFIGS[0], **change}
    raises_value_error(lambda: ev.CrossViT(**config, key=jax.random.key(0)), match, monkeypatch)
