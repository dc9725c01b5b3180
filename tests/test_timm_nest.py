"""timm's NesT (`Nest`: `nest_tiny`, `nest_small`, `nest_base` and their `_jx` ports) loaded
into `eqx_vision.NesT` with `from_timm`, against timm 1.0.31."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from eqx_vision.layers import MapAttention, MapFeedForward
from reference import check_parity, perturb_, reference, rel_err
from timm_reference import import_timm, timm_model


NEST_NAMES = [n for n in ev_timm.model_names() if n.startswith("nest_")]

# timm's named models fix their widths, heads and depths, so the reduced models are built
# from the `Nest` class with a name's arguments and these overrides, which `from_timm`
# takes as well. Heads of 4 dimensions, so that the head order of the attention output
# (timm's `(head_dim, heads)`) matters; a level of two blocks.
SMALL: dict[str, Any] = dict(
    img_size=16, patch_size=2, embed_dims=(8, 16, 32), num_heads=(2, 4, 4), depths=(1, 2, 1)
)
# Other options: two levels, 3 heads, no qkv bias, MLP ratio 2, a level without blocks.
OPTIONS: dict[str, Any] = dict(
    img_size=16,
    patch_size=4,
    num_levels=2,
    embed_dims=(12, 24),
    num_heads=(3, 6),
    depths=(2, 0),
    qkv_bias=False,
    mlp_ratio=2.0,
)

# The largest errors of the reduced models against timm, measured (float32, this CPU):
# outputs 6.6e-7 (relative to the largest output), gradients 2.7e-6 (of the input and of
# every parameter, each relative to its own largest); the tolerances are 7.5x and 7.4x over.
TOL, GRAD_TOL = 5e-6, 2e-5


def timm_nest(name: str, **overrides: Any) -> Any:
    """timm's `Nest` with the arguments of `name` and `overrides`, in eval mode."""
    import_timm()
    from timm.models.nest import Nest

    kwargs = {**ev_timm._table()["models"][name]["kwargs"], **overrides}
    torch.manual_seed(0)
    return Nest(**kwargs).eval()


def check_reduced(name: str, overrides: dict[str, Any], **kwargs: Any) -> Any:
    torch_model = timm_nest(name, **overrides)
    model = ev_timm.build(name, key=jax.random.key(0), **overrides)
    size = overrides["img_size"]
    return check_parity(
        model,
        torch_model,
        (3, size, size),
        tol=TOL,
        grad_tol=GRAD_TOL,
        load=lambda sd, _: ev.from_timm(name, sd, **overrides),
        **kwargs,
    )


@pytest.mark.parametrize("name", ["nest_tiny", "nest_tiny_jx"])
def test_parity(name):
    """Outputs and gradients; `_jx`: TensorFlow's 'SAME' padding in the max pooling."""
    model = check_reduced(name, SMALL)
    first = model.levels[0]
    assert first.pool_padding == ("same" if name.endswith("_jx") else "symmetric")
    assert first.pos_embedding.shape == (16, 4, 8)  # (blocks, seq, dim)
    # timm's LayerNorm: epsilon 1e-6 (1e-5 moves the outputs by only 7e-6 here)
    assert first.norm is not None and first.norm.eps == 1e-6 and model.norm.eps == 1e-6


def test_parity_other_options():
    model = check_reduced("nest_small", OPTIONS)
    assert len(model.levels) == 2 and model.levels[1].blocks is None
    blocks = model.levels[0].blocks
    assert blocks is not None and blocks.blocks.attn.to_qkv.bias is None


def test_without_classifier():
    """`num_classes=0` drops timm's head: the pooled, normalised features."""
    torch_model = timm_nest("nest_tiny_jx", **SMALL)
    perturb_(torch_model)
    model = ev.from_timm("nest_tiny_jx", torch_model.state_dict(), num_classes=0, **SMALL)
    assert model.mlp_head is None
    x = jax.random.normal(jax.random.key(1), (2, 3, 16, 16))
    with torch.no_grad():
        feats = torch_model.forward_features(torch.tensor(np.asarray(x)))
        expected = torch_model.forward_head(feats, pre_logits=True).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(eqx.nn.inference_mode(model), x)
    assert out.shape == (2, 32)
    assert rel_err(out, expected) <= TOL


@pytest.mark.parametrize("name", NEST_NAMES)
def test_every_name_builds(name):
    ev_timm.check(name)


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(pad_type="valid"), "pad_type"),
        (dict(attn_drop_rate=0.1), "attn_drop_rate"),
        (dict(drop_rate=0.1), "drop_rate"),
        (dict(drop_path_rate=0.2), "drop_path_rate"),
        (dict(global_pool="max"), "global_pool"),
        (dict(mlp_ratio=2.5), "mlp_ratio"),
        (dict(act_layer="torch.nn.modules.activation.ReLU"), "act_layer"),
        (dict(norm_layer="torch.nn.modules.normalization.GroupNorm"), "norm_layer"),
        (dict(img_size=(224, 192)), "img_size"),
        (dict(embed_dims=(96, 192)), "embed_dims"),
        (dict(num_heads=(5, 6, 12)), "num_heads"),
        (dict(unknown_option=1), "unknown_option"),
    ],
)
def test_rejected_configuration_names_the_option(overrides, option):
    with pytest.raises(ev_timm.TimmConfigError, match=option):
        eqx.filter_eval_shape(
            lambda: ev_timm.build("nest_tiny", key=jax.random.key(0), **overrides)
        )


def test_same_padding_pools_differently():
    """The two paddings of the aggregation's max pooling: one pixel on each side, or (TF
    'SAME' on an even map) only after the last row and column."""
    x = jnp.arange(16.0).reshape(1, 4, 4)
    config = dict(image_size=8, patch_size=1, num_classes=2, dim=4, heads=1, num_hierarchies=2,
                  block_repeats=0)  # fmt: skip
    pooled = {
        padding: ev.NesT(**config, pool_padding=padding, key=jax.random.key(0)).levels[0]._pool(x)
        for padding in ("same", "symmetric")
    }
    np.testing.assert_array_equal(pooled["same"][0], [[10.0, 11.0], [14.0, 15.0]])
    np.testing.assert_array_equal(pooled["symmetric"][0], [[5.0, 7.0], [13.0, 15.0]])


def test_vit_pytorch_converter_refuses_timm_options():
    config = dict(image_size=16, patch_size=2, num_classes=3, dim=8, heads=2, num_hierarchies=2,
                  block_repeats=1)  # fmt: skip
    torch_model = reference("nest").NesT(**config)
    model = ev.NesT(**config, patch_embedding="conv", pos_embedding="full", key=jax.random.key(0))
    with pytest.raises(TypeError, match="from_timm"):
        ev.from_vit_pytorch(model, torch_model.state_dict())


def test_map_attention_qkv_bias_and_norm_eps():
    attn = MapAttention(8, heads=2, dim_head=4, qkv_bias=True, norm_eps=1e-6, key=jax.random.key(0))
    assert attn.to_qkv is not None and attn.to_qkv.bias is not None
    assert attn.to_qkv.bias.shape == (24,)
    assert attn.norm is not None and attn.norm.eps == 1e-6
    plain = MapAttention(8, heads=2, dim_head=4, key=jax.random.key(0))
    assert plain.to_qkv is not None and plain.to_qkv.bias is None
    assert plain.norm is not None and plain.norm.eps == 1e-5
    ff = MapFeedForward(8, 16, norm_eps=1e-6, key=jax.random.key(0))
    assert ff.ff.norm is not None and ff.ff.norm.eps == 1e-6
    with pytest.raises(ValueError, match="qkv_bias"):
        MapAttention(8, heads=2, dim_head=4, projection="conv_bn", projections="q_k_v",
                     qkv_bias=True, key=jax.random.key(0))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nest_tiny", "nest_tiny_jx"])
def test_full_size_parity(name):
    """The full-size models at 224 px, logits only, timm's parameters perturbed. Measured:
    relative errors 1.4e-5 (`nest_tiny`) and 9.2e-6 (`nest_tiny_jx`); tolerance 7x over."""
    torch_model = timm_model(name)
    perturb_(torch_model)
    model = eqx.nn.inference_mode(ev.from_timm(name, torch_model.state_dict()))
    x = jax.random.normal(jax.random.key(1), (1, 3, 224, 224))
    with torch.no_grad():
        expected = torch_model(torch.tensor(np.asarray(x))).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
    err = rel_err(out, expected)
    assert err <= 1e-4, f"relative error {err:.2e}"
