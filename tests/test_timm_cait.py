"""timm's CaiT (`Cait`) in eqx_vision: the layer options it needs, parity with timm 1.0.31
(outputs and gradients of reduced models, outputs of a full-size one), every `cait_*` name
buildable, configurations and checkpoints eqx_vision refuses."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from eqx_vision.interop.timm import CheckpointError, TimmConfigError
from eqx_vision.layers import Attention, LayerNorm
from reference import check_parity, perturb_, rel_err
from timm_reference import timm_model


# Reduced versions of the family's names (which differ only in size and LayerScale's initial
# value), and one with every other option of timm's Cait changed: one input channel, no qkv
# bias, other MLP widths, one class-attention block.
CONFIGS: list[tuple[str, tuple[int, int, int], dict[str, Any]]] = [
    (
        "cait_xxs24_224",
        (3, 32, 32),
        dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4),
    ),
    ("cait_m36_384", (3, 48, 48), dict(img_size=48, depth=2, embed_dim=64, num_heads=16)),
    (
        "cait_s24_384",
        (1, 24, 24),
        dict(
            img_size=24,
            patch_size=4,
            depth=3,
            embed_dim=24,
            num_heads=3,
            in_chans=1,
            qkv_bias=False,
            mlp_ratio=2.0,
            mlp_ratio_token_only=3.0,
            depth_token_only=1,
            init_values=1e-6,
        ),
    ),
]

# The largest errors of the parity tests below, measured (float32, this suite's CPU):
# outputs 8.4e-7 (relative to the largest output), gradients 4.9e-6 (of the input and of
# every parameter, each relative to its own largest); the tolerances are 6x over them.
TOL, GRAD_TOL = 5e-6, 3e-5


def _parity(name: str, shape: tuple[int, int, int], zero_gradients: Any, **overrides: Any) -> None:
    torch_model = timm_model(name, **overrides)
    # `proj_l`'s bias adds one constant to every score of a head before the softmax, which
    # removes it: its exact gradient is zero, and both sides hold rounding noise there.
    stop = zero_gradients(torch_model, r"\.attn\.proj_l\.bias$", r"\.attn\.mix_pre_bias$")
    call = eqx.filter_jit(lambda m, x: jax.vmap(stop(m))(x))
    template = eqx.filter_eval_shape(
        lambda: ev_timm.build(name, key=jax.random.key(0), **overrides)
    )
    check_parity(
        template,
        torch_model,
        shape,
        call=call,
        tol=TOL,
        grad_tol=GRAD_TOL,
        load=lambda sd, _: ev.from_timm(name, sd, **overrides),
    )


@pytest.mark.parametrize("name, shape, overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parity(name, shape, overrides, exact_zero_gradients):
    _parity(name, shape, exact_zero_gradients, **overrides)


@pytest.mark.slow
def test_parity_full_size():
    name = "cait_xxs24_224"
    torch_model = timm_model(name)
    perturb_(torch_model, seed=0, scale=0.02)
    model = eqx.nn.inference_mode(ev.from_timm(name, torch_model.state_dict()))
    x = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, jnp.asarray(x.numpy()))
    assert out.shape == (1, 1000)
    # measured 4.5e-7 (relative to the largest logit), the tolerance 6.7x over it
    assert rel_err(out, expected) <= 3e-6


def test_without_classifier_returns_the_normalised_class_token():
    name = "cait_xxs24_224"
    overrides: dict[str, Any] = dict(
        img_size=16, patch_size=8, depth=1, embed_dim=8, num_heads=2, num_classes=3
    )
    torch_model = timm_model(name, **overrides)
    perturb_(torch_model)
    model = ev.from_timm(name, torch_model.state_dict(), **{**overrides, "num_classes": 0})
    assert model.mlp_head is None
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model.forward_head(torch_model.forward_features(x), pre_logits=True)
    out = jax.vmap(eqx.nn.inference_mode(model))(jnp.asarray(x.numpy()))
    assert out.shape == (2, 8)
    assert rel_err(out, expected.numpy()) <= TOL


def test_timm_structure():
    model = eqx.filter_eval_shape(lambda: ev_timm.build("cait_s24_224", key=jax.random.key(0)))
    assert isinstance(model, ev.CaiT)
    assert model.to_patch_embedding.pre_norm is None and model.to_patch_embedding.post_norm is None
    assert model.pos_embedding.shape == (196, 384)
    patch_attn = model.patch_transformer.layers.blocks.attn
    cls_attn = model.cls_transformer.layers.blocks.attn
    assert isinstance(patch_attn, Attention) and isinstance(cls_attn, Attention)
    assert patch_attn.mix_pre_bias is not None and patch_attn.dim_head == 48
    assert cls_attn.mix_pre is None and cls_attn.norm_context
    assert patch_attn.norm is not None and patch_attn.norm.eps == 1e-6
    assert model.head_norm.eps == 1e-6
    assert model.patch_transformer.layers.depth == 24
    assert model.cls_transformer.layers.depth == 2
    concrete = ev_timm.build("cait_s24_224", key=jax.random.key(0), depth=1, pos_drop_rate=0.1)
    scale = concrete.patch_transformer.layers.blocks.attn_scale
    np.testing.assert_array_equal(scale, np.full(scale.shape, 1e-5, np.float32))
    assert concrete.dropout.p == 0.1


@pytest.mark.parametrize(
    "override, option",
    [
        (dict(drop_path_rate=0.1), "drop_path_rate"),
        (dict(attn_drop_rate=0.1), "attn_drop_rate"),
        (dict(global_pool="avg"), "global_pool"),
        (dict(img_size=[224, 192]), "img_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(depth_token_only=0), "depth_token_only"),
        (dict(act_layer="relu"), "act_layer"),
        (dict(norm_layer="torch.nn.modules.batchnorm.BatchNorm1d"), "norm_layer"),
        (dict(weight_init="jax"), "weight_init"),
    ],
)
def test_rejected_configuration_names_the_option(override, option):
    with pytest.raises(TimmConfigError, match=option):
        ev_timm.build("cait_xxs24_224", key=jax.random.key(0), **override)


def test_checkpoint_errors_name_the_key():
    overrides: dict[str, Any] = dict(
        img_size=16, patch_size=8, depth=1, embed_dim=8, num_heads=2, num_classes=3
    )
    sd = {k: v.numpy() for k, v in timm_model("cait_xxs24_224", **overrides).state_dict().items()}
    bad = dict(sd, **{"blocks.0.attn.qkv.weight": np.zeros((24, 9), np.float32)})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*\(24, 8\)"):
        ev.from_timm("cait_xxs24_224", bad, **overrides)
    missing = {k: v for k, v in sd.items() if k != "blocks_token_only.1.attn.v.bias"}
    with pytest.raises(CheckpointError, match=r"blocks_token_only\.1\.attn\.v\.bias"):
        ev.from_timm("cait_xxs24_224", missing, **overrides)


# The layer options timm's CaiT needs, against direct computations.


def test_talking_heads_bias_adds_a_bias_per_head_to_each_mix():
    key = jax.random.key(0)
    attn = Attention(8, heads=2, dim_head=4, talking_heads=True, talking_heads_bias=True, key=key)
    assert attn.mix_pre_bias is not None and attn.mix_post_bias is not None
    attn = eqx.tree_at(
        lambda a: (a.mix_pre_bias, a.mix_post_bias),
        attn,
        (jnp.array([0.3, -1.0]), jnp.array([0.5, 2.0])),
    )
    x = jax.random.normal(jax.random.key(1), (5, 8))
    assert attn.norm is not None and attn.to_q is None and attn.to_qkv is not None
    h = attn.norm(x)
    q, k, v = (t.reshape(5, 2, 4).transpose(1, 0, 2) for t in jnp.split(attn.to_qkv(h), 3, -1))
    dots = jnp.einsum("hid,hjd->hij", q, k) / 2.0
    dots = jnp.einsum("hij,hg->gij", dots, attn.mix_pre) + jnp.array([0.3, -1.0])[:, None, None]
    probs = jax.nn.softmax(dots, axis=-1)
    probs = jnp.einsum("hij,hg->gij", probs, attn.mix_post) + jnp.array([0.5, 2.0])[:, None, None]
    np.testing.assert_allclose(attn.probabilities(x), probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="talking_heads_bias"):
        Attention(8, talking_heads_bias=True, key=key)


def test_norm_context_normalises_the_context_with_the_same_norm():
    key = jax.random.key(0)
    attn = Attention(8, heads=2, dim_head=4, fused_qkv=False, norm_context=True, key=key)
    plain = Attention(8, heads=2, dim_head=4, fused_qkv=False, key=key)  # the same weights
    cls = jax.random.normal(jax.random.key(1), (1, 8))
    patches = 3.0 + 2.0 * jax.random.normal(jax.random.key(2), (6, 8))
    norm = attn.norm
    assert isinstance(norm, LayerNorm)
    np.testing.assert_allclose(attn(cls, patches), plain(cls, norm(patches)), rtol=1e-6, atol=1e-6)
    assert rel_err(attn(cls, patches), plain(cls, patches)) > 1e-2
    with pytest.raises(ValueError, match="norm_context"):
        Attention(8, norm=False, norm_context=True, key=key)
