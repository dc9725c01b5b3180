"""timm's `Twins` (the `twins_svt_*` names) loaded into `eqx_vision.TwinsSVT`."""

import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, rel_err
from timm_reference import check_timm_parity, import_timm, timm_model


def _array(t: Any) -> jax.Array:
    return jnp.asarray(t.detach().numpy())


def test_spatial_reduction_attention_matches_timm():
    """MapAttention with `spatial_reduction` (and a map that the reduction does not tile,
    5x4 by 2) against timm's `GlobalSubSampleAttn` after its block's LayerNorm."""
    import_timm()
    from timm.models.twins import GlobalSubSampleAttn

    dim, heads, sr, size = 16, 2, 2, (5, 4)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    attn = GlobalSubSampleAttn(dim, heads, sr_ratio=sr).eval()
    perturb_(norm)
    perturb_(attn, seed=1)
    m = ev.layers.MapAttention(
        dim,
        heads=heads,
        dim_head=dim // heads,
        projections="q_kv",
        kv_reduction=sr,
        spatial_reduction=True,
        qkv_bias=True,
        norm_eps=1e-6,
        key=jax.random.key(0),
    )
    assert m.kv_reduce is not None and m.kv_reduce_norm is not None
    block_norm, attn_sd = norm.state_dict(), attn.state_dict()
    tensors = [block_norm["weight"], block_norm["bias"]] + [
        attn_sd[f"{layer}.{p}"]
        for layer in ("q", "sr", "norm", "kv", "proj")
        for p in ("weight", "bias")
    ]
    m = eqx.tree_at(
        lambda m: (
            m.norm.weight,
            m.norm.bias,
            m.to_q.weight,
            m.to_q.bias,
            m.kv_reduce.weight,
            m.kv_reduce.bias,
            m.kv_reduce_norm.weight,
            m.kv_reduce_norm.bias,
            m.to_kv.weight,
            m.to_kv.bias,
            m.to_out.weight,
            m.to_out.bias,
        ),
        m,
        tuple(_array(t) for t in tensors),
    )
    x = torch.randn(dim, *size)
    with torch.no_grad():
        tokens = x.reshape(dim, -1).T[None]
        expected = attn(norm(tokens), size)[0].T.reshape(dim, *size)
    out = m(_array(x))
    # measured 2.9e-7
    assert rel_err(out, expected.numpy()) < 1e-6


# Reduced versions of timm's Twins-SVT (the same architecture as every twins_svt_* name):
# small dimensions and images, per-stage heads, windows and reductions of other sizes.
REDUCED: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    # 64 px: maps 16, 8, 4, 2; a stage of two eqx_vision blocks (timm's depth 4).
    (
        dict(
            img_size=64,
            embed_dims=[16, 32, 32, 48],
            num_heads=[2, 2, 4, 3],
            mlp_ratios=[2, 4, 4, 2],
            depths=[2, 4, 2, 2],
            wss=[4, 4, 2, 2],
            sr_ratios=[4, 2, 2, 1],
            num_classes=10,
        ),
        (3, 64, 64),
    ),
    # Rectangular, one input channel, patch size 2; a sub-sampling (3) that does not tile
    # the first map (16x32), a stage without reduction before the last (sr 1).
    (
        dict(
            img_size=(32, 64),
            in_chans=1,
            patch_size=2,
            embed_dims=[8, 16, 24, 24],
            num_heads=[1, 2, 3, 2],
            depths=[2, 2, 4, 2],
            wss=[4, 2, 2, 2],
            sr_ratios=[3, 2, 1, 1],
            num_classes=5,
        ),
        (1, 32, 64),
    ),
]


# Measured (float32, this CPU): outputs 6.2e-7 and 3.9e-7 (relative to the largest
# output), gradients 4.3e-6 and 1.5e-6 (of the input and of every parameter, each relative
# to its own largest). The tolerances are 4-5x over them.
@pytest.mark.parametrize("overrides, input_shape", REDUCED, ids=["square", "rectangular"])
def test_parity_reduced(overrides, input_shape):
    check_timm_parity("twins_svt_small", input_shape, tol=3e-6, grad_tol=2e-5, **overrides)


def test_features_without_a_classifier():
    """`num_classes=0`: the pooled features, as timm's model without a head."""
    overrides, input_shape = REDUCED[0]
    overrides = {**overrides, "num_classes": 0}
    torch_model = timm_model("twins_svt_small", **overrides)
    perturb_(torch_model)
    model = ev.from_timm("twins_svt_small", torch_model.state_dict(), **overrides)
    assert model.mlp_head is None
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(eqx.nn.inference_mode(model), _array(x))
    assert out.shape == (2, overrides["embed_dims"][-1])
    assert rel_err(out, expected) < 2e-6  # measured 4.0e-7


def test_checkpoint_errors_name_the_key():
    overrides, _ = REDUCED[0]
    sd = timm_model("twins_svt_small", **overrides).state_dict()
    bad = {**sd, "blocks.1.2.attn.qkv.weight": sd["blocks.1.2.attn.qkv.weight"][:-1]}
    with pytest.raises(ev_timm.CheckpointError, match=r"'blocks.1.2.attn.qkv.weight'.*\(96, 32\)"):
        ev.from_timm("twins_svt_small", bad, **overrides)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.1.attn.sr.bias"}
    with pytest.raises(ev_timm.CheckpointError, match="blocks.0.1.attn.sr.bias"):
        ev.from_timm("twins_svt_small", missing, **overrides)
    extra = {**sd, "blocks.0.1.attn.extra": sd["norm.weight"]}
    with pytest.raises(ev_timm.CheckpointError, match="blocks.0.1.attn.extra"):
        ev.from_timm("twins_svt_small", extra, **overrides)


NAMES = [n for n in ev_timm.model_names() if n.startswith("twins_svt_")]


def test_every_name_is_listed():
    assert {n.partition(".")[0] for n in NAMES} == {
        "twins_svt_small",
        "twins_svt_base",
        "twins_svt_large",
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds(name):
    ev_timm.check(name)


# timm's parameter counts (timm.create_model(name), random init)
PARAMETERS = {
    "twins_svt_small": 24_060_776,
    "twins_svt_base": 56_070_952,
    "twins_svt_large": 99_271_400,
}


@pytest.mark.parametrize("name, count", PARAMETERS.items())
def test_parameter_count(name, count):
    model = eqx.filter_eval_shape(lambda: ev_timm.build(name, key=jax.random.key(0)))
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert sum(x.size for x in leaves if isinstance(x, jax.ShapeDtypeStruct)) == count


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(wss=None), "wss=None"),  # the pcpvt layout: global attention only
        (dict(wss=[7, 1, 7, 7]), "wss"),
        (dict(depths=[2, 3, 10, 4]), "depths"),
        (dict(depths=[2, 2, 10]), "depths"),
        (dict(num_heads=[3, 4, 8, 16]), "num_heads"),
        (dict(mlp_ratios=[4, 4, 4, 2.5]), "mlp_ratios"),
        (dict(img_size=112), "img_size"),  # windows of 7 on a 3.5-pixel map
        (dict(drop_path_rate=0.1), "drop_path_rate"),
        (dict(attn_drop_rate=0.1), "attn_drop_rate"),
        (dict(global_pool=""), "global_pool"),
        (dict(block_cls="my.Block"), "block_cls"),
        (dict(norm_layer="torch.nn.BatchNorm2d"), "norm_layer"),
        (dict(some_option=1), "some_option"),
    ],
)
def test_rejected_configurations_name_the_option(overrides, option):
    build = lambda: ev_timm.build("twins_svt_small", key=jax.random.key(0), **overrides)  # noqa: E731
    with pytest.raises(ev_timm.TimmConfigError, match=re.escape(option)):
        eqx.filter_eval_shape(build)


def test_pcpvt_names_are_not_known():
    with pytest.raises(ev_timm.TimmConfigError, match="unknown timm model name"):
        ev_timm.check("twins_pcpvt_small")


@pytest.mark.slow
def test_parity_full_size():
    """twins_svt_small at 224 px, every parameter perturbed: logits of one image."""
    torch_model = timm_model("twins_svt_small")
    perturb_(torch_model)
    model = eqx.nn.inference_mode(ev.from_timm("twins_svt_small", torch_model.state_dict()))
    x = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, _array(x))
    err = rel_err(out, expected)
    print("ERRFULL", err)
    # measured 8.5e-6 (the perturbed weights give large activations); 4.7x over it
    assert err < 4e-5, err
