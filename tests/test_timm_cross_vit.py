"""timm's CrossViT (`crossvit_*`) as `eqx_vision.TimmCrossViT`: parity with timm 1.0.31
(reduced configurations fast, one full-size model of each kind slow), the bicubic resize
against torch's, every timm name built, rejected configurations."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from eqx_vision.layers import Attention, FeedForward, resize_bicubic
from reference import count_params, perturb_, rel_err
from timm_reference import check_timm_parity, import_timm, timm_model


NAMES = [n for n in ev_timm.model_names() if n.startswith("crossvit_")]

# Reduced models: small dims, one or two multi-scale blocks, small images. `img_scale`
# keeps each branch's image a multiple of its patch size, as timm's position embeddings
# need; 2/3 shrinks the second branch's image (as 224/240 does), 4/3 enlarges it.
SMALL = dict(embed_dim=[16, 32], num_heads=[2, 4], num_classes=5)

# With gradients (input and every parameter). Measured (plain / dagger): logits
# 3.2e-7 / 2.9e-7, input gradient 4.0e-6 / 1.4e-6, the largest parameter gradient
# 1.9e-5 / 9.7e-7.
GRADIENT_CONFIGS: dict[str, tuple[str, tuple[int, int, int], dict[str, Any]]] = {
    # blocks of different depths (run one after the other), a bicubic shrink
    "plain": (
        "crossvit_tiny_240",
        (3, 48, 48),
        dict(SMALL, img_size=48, img_scale=[1.0, 2 / 3], depth=[[1, 2, 0], [1, 1, 0]]),
    ),
    # the three-convolution patch embedding, two equal (scanned) blocks
    "dagger": (
        "crossvit_9_dagger_240",
        (3, 72, 72),
        dict(SMALL, img_size=72, img_scale=[1.0, 2 / 3], depth=[[1, 2, 0], [1, 2, 0]]),
    ),
}

# Logits only. Measured relative errors: crop_avg 1.0e-6, cross_depth 2.9e-7,
# one_branch 2.8e-7.
LOGIT_CONFIGS: dict[str, tuple[str, tuple[int, int, int], dict[str, Any]]] = {
    # a centre crop instead of the resize, mean-pooled patch tokens, no qkv bias
    "crop_avg": (
        "crossvit_small_240",
        (3, 48, 48),
        dict(
            SMALL,
            img_size=48,
            img_scale=[1.0, 2 / 3],
            depth=[[1, 1, 0]],
            crop_scale=True,
            global_pool="avg",
            qkv_bias=False,
        ),
    ),
    # two cross-attention blocks per branch (an nn.Sequential: the second sees the class
    # token alone), a bicubic enlargement
    "cross_depth": (
        "crossvit_tiny_240",
        (3, 24, 24),
        dict(SMALL, img_size=24, img_scale=[1.0, 4 / 3], depth=[[1, 1, 2]], num_classes=3),
    ),
    # a single branch (its class token attends to its own patches), no classifier
    "one_branch": (
        "crossvit_tiny_240",
        (3, 36, 36),
        dict(
            img_size=36,
            img_scale=[1.0],
            patch_size=[12],
            embed_dim=[24],
            num_heads=[3],
            mlp_ratio=[2.0],
            depth=[[2, 1]],
            num_classes=0,
        ),
    ),
}


def logits_error(
    name: str,
    input_shape: tuple[int, int, int],
    *,
    batch: int = 2,
    scale: float = 0.2,
    **overrides: Any,
) -> float:
    """The relative max error of `from_timm`'s logits against timm's, its parameters
    perturbed first (noise of standard deviation `scale`)."""
    torch_model = timm_model(name, **overrides)
    perturb_(torch_model, scale=scale)
    model = eqx.nn.inference_mode(ev.from_timm(name, torch_model.state_dict(), **overrides))
    assert count_params(model) == sum(p.numel() for p in torch_model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *input_shape), generator=gen)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, jnp.asarray(x.numpy()))
    return rel_err(out, expected)


@pytest.mark.parametrize("case", sorted(GRADIENT_CONFIGS))
def test_parity_with_gradients(case):
    name, shape, overrides = GRADIENT_CONFIGS[case]
    check_timm_parity(name, shape, tol=2e-6, grad_tol=1e-4, **overrides)


@pytest.mark.parametrize("case", sorted(LOGIT_CONFIGS))
def test_logits_parity(case):
    name, shape, overrides = LOGIT_CONFIGS[case]
    err = logits_error(name, shape, **overrides)
    assert err <= 5e-6, f"relative error {err:.2e}"


# One model of each kind at full size, its parameters perturbed by noise of the scale of
# timm's initialisation (0.02). The reduced models' 0.2 would make these deep models
# chaotic: rounding differences of 1e-6 in each block (float32) then grow about tenfold
# from one multi-scale block to the next (crossvit_15_dagger_408: 8.5e-4 at the logits,
# 3.2e-5 for crossvit_tiny_240). Measured at 0.02: 1.3e-6 (tiny_240), 1.1e-6
# (9_dagger_240), 8.2e-7 (15_dagger_408).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, size",
    [("crossvit_tiny_240", 240), ("crossvit_9_dagger_240", 240), ("crossvit_15_dagger_408", 408)],
)
def test_full_size_parity(name, size):
    err = logits_error(name, (3, size, size), batch=1, scale=0.02)
    assert err <= 5e-6, f"relative error {err:.2e}"


def test_checkpoint_without_its_classifier():
    """`from_timm(..., num_classes=0)` drops both heads: the pooled tokens of the two
    branches, concatenated, as timm's `forward_head(pre_logits=True)`."""
    name, shape, overrides = LOGIT_CONFIGS["crop_avg"]
    torch_model = timm_model(name, **overrides)
    perturb_(torch_model)
    rest = {k: v for k, v in overrides.items() if k != "num_classes"}
    model = ev.from_timm(name, torch_model.state_dict(), num_classes=0, **rest)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model.forward_head(torch_model.forward_features(x), pre_logits=True)
    out = eqx.filter_jit(model)(jnp.asarray(x[0].numpy()))
    assert out.shape == (48,) and rel_err(out, expected[0].numpy()) <= 5e-6


@pytest.mark.parametrize(
    "in_size, out_size",
    [((240, 240), (224, 224)), ((408, 408), (384, 384)), ((17, 23), (30, 11)), ((5, 5), (1, 9))],
)
def test_resize_bicubic_is_torchs(in_size, out_size):
    """Shrinking (as 240 -> 224 and 408 -> 384), enlarging, one pixel, different sides.
    Measured: at most 1.2e-6."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 3, *in_size), generator=gen)
    expected = torch.nn.functional.interpolate(
        x, size=out_size, mode="bicubic", align_corners=False
    )[0]
    out = resize_bicubic(jnp.asarray(x[0].numpy()), out_size)
    assert rel_err(out, expected.numpy()) <= 5e-6


def test_every_timm_name_is_known():
    assert len(NAMES) == 22  # 11 architectures, each with its `.in1k` weights


@pytest.mark.parametrize("name", NAMES)
def test_every_timm_name_builds(name):
    ev_timm.check(name)


@pytest.mark.parametrize("name", [n for n in NAMES if "." not in n])
def test_parameter_counts_are_timms(name):
    """The abstract model has timm's parameters, counted on torch's meta device."""
    timm = import_timm()
    with torch.device("meta"):
        expected = sum(p.numel() for p in timm.create_model(name).parameters())
    model = eqx.filter_eval_shape(lambda: ev_timm.build(name, key=jax.random.key(0)))
    shapes = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    assert sum(x.size for x in shapes) == expected
    if name == "crossvit_tiny_240":
        assert expected == 7_014_800


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(drop_path_rate=0.1), "drop_path_rate"),
        (dict(global_pool="max"), "global_pool"),
        (dict(patch_size=[8, 12, 16]), "patch_size"),
        (dict(norm_layer="torch.nn.modules.batchnorm.BatchNorm1d"), "norm_layer"),
        (dict(some_option=1), "some_option"),
        (dict(multi_conv=True, patch_size=[8, 16]), "multi-conv"),
        (dict(img_size=250), "multiple of its patch size"),
    ],
)
def test_rejected_configurations_name_the_option(overrides, option):
    with pytest.raises(ev_timm.TimmConfigError, match=option):
        ev_timm.build("crossvit_tiny_240", key=jax.random.key(0), **overrides)


def _small(**changes: Any) -> ev.TimmCrossViT:
    options: dict[str, Any] = dict(
        image_size=24,
        num_classes=3,
        dims=(8, 16),
        patch_sizes=(12, 8),
        depth=((1, 1, 0),),
        heads=(2, 2),
        mlp_ratios=(2.0, 2.0),
    )
    return ev.TimmCrossViT(**(options | changes), key=jax.random.key(0))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(heads=(2,)), "one entry per branch"),
        (dict(heads=(3, 2)), "divisible by its heads"),
        (dict(depth=((1, 1),)), "each entry of depth"),
        (dict(depth=((0, 1, 0),)), "each entry of depth"),
        (dict(image_scales=(1.0, 0.5)), "multiple of its patch size"),
        (dict(mlp_ratios=(2.0, 0.0)), "must be positive"),
    ],
)
def test_bad_arguments(changes, match):
    with pytest.raises(ValueError, match=match):
        _small(**changes)


def test_dropout_rates_reach_their_layers():
    """proj/attn/pos/head rates as timm's; training mode needs a key."""
    model = _small(dropout=0.1, attn_dropout=0.2, emb_dropout=0.3, head_dropout=0.4)
    block = model.blocks[0]
    attn, ff = block.encoders[0].layers.blocks.attn, block.encoders[1].layers.blocks.ff
    cross = block.fusions[0][0].attn
    assert isinstance(attn, Attention) and isinstance(ff, FeedForward)
    assert (attn.attn_dropout.p, attn.out_dropout.p) == (0.2, 0.1)
    assert (cross.attn_dropout.p, cross.out_dropout.p) == (0.2, 0.1)
    assert ff.hidden_dropout.p == 0.1
    assert (model.emb_dropout.p, model.head_dropout.p) == (0.3, 0.4)
    x = jax.random.normal(jax.random.key(1), (3, 24, 24))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x)
    train = model(x, key=jax.random.key(2))
    infer = eqx.nn.inference_mode(model)(x)
    assert np.all(np.isfinite(np.asarray(train))) and not np.allclose(train, infer)
