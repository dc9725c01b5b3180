"""timm's LeViT (`Levit`, `LevitDistilled`: the `levit_*` names) loaded into
`eqx_vision.TimmLeViT`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from eqx_vision.models.levit import grid_bias_indices
from reference import batch_call, perturb_, raises_value_error, randomize_batchnorm_, rel_err
from timm_reference import check_timm_parity, import_timm, timm_model


# Two stages on a 4x4 then 2x2 map (64 px), small widths and heads.
REDUCED: dict[str, Any] = dict(
    img_size=64, embed_dim=[32, 48], depth=[1, 2], num_heads=[2, 3], key_dim=8
)

# Every kind of configuration of the family, reduced. The largest errors measured against
# timm (outputs, and gradients of the input and of every parameter, each relative to its
# own largest), with the tolerances 5-8x over them. Gradients through Hardswish are the
# least precise: timm's own float32 gradients of the first model differ from its float64
# ones by 2.4e-4 (3.1e-5 with SiLU), and both implementations agree to 1e-14 in float64.
CASES = [
    # LevitDistilled, Linear layout, Hardswish, 16x stem: outputs 4.3e-6, gradients 8.8e-4
    pytest.param("levit_128s", {}, 3e-5, 5e-3, id="linear-distilled"),
    # the same in the 1x1-convolution layout: outputs 2.9e-6, gradients 5.7e-4
    pytest.param("levit_conv_128s", {}, 3e-5, 5e-3, id="conv-distilled"),
    # Levit (one head), SiLU, 8x stem, a 6x8 map (rectangular), value and MLP ratios per
    # stage: outputs 1.7e-6, gradients 1.8e-5
    pytest.param(
        "levit_512_s8",
        dict(img_size=[48, 64], attn_ratio=[2, 3], mlp_ratio=[3, 2]),
        3e-5,
        3e-4,
        id="linear-silu-s8-rect",
    ),
    # LevitDistilled, conv layout, SiLU, 8x stem, three stages on 5x5 -> 3x3 -> 2x2 maps
    # (odd maps halved rounding up), head dropout (off in eval): outputs 3.1e-6,
    # gradients 4.1e-5
    pytest.param(
        "levit_conv_384_s8",
        dict(
            img_size=40, embed_dim=[32, 48, 64], depth=[1, 1, 1], num_heads=[2, 3, 4], drop_rate=0.1
        ),
        3e-5,
        3e-4,
        id="conv-distilled-s8-3stages",
    ),
    # Levit in the conv layout, GELU in the MLPs and Hardswish in the attention, no head
    # (the pooled features): outputs 3.6e-6, gradients 5.9e-5
    pytest.param(
        "levit_conv_512d",
        dict(act_layer="gelu", attn_act_layer="hard_swish", num_classes=0),
        3e-5,
        3e-4,
        id="conv-gelu-features",
    ),
]


def _shape(overrides: dict[str, Any]) -> tuple[int, int, int]:
    size = overrides["img_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return (overrides.get("in_chans", 3), h, w)


@pytest.mark.parametrize("name, overrides, tol, grad_tol", CASES)
def test_parity(name, overrides, tol, grad_tol):
    overrides = {**REDUCED, **overrides}
    model, state = check_timm_parity(
        name, _shape(overrides), tol=tol, grad_tol=grad_tol, **overrides
    )
    assert isinstance(model, ev.TimmLeViT)
    assert isinstance(state, eqx.nn.State)


# The full-size models, one per architecture: the Linear and conv layouts, the 8x stem with
# SiLU (distilled), the wide SiLU model without a distillation head. Logits only.
FULL = ["levit_128s", "levit_conv_128s", "levit_384_s8", "levit_conv_512"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_parity(name):
    torch_model = timm_model(name)
    perturb_(torch_model, scale=0.02)
    randomize_batchnorm_(torch_model, input_shape=(3, 224, 224))
    torch_model.eval()
    x = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    model, state = ev.from_timm(name, torch_model.state_dict())
    model = eqx.nn.inference_mode(model)
    out = eqx.filter_jit(lambda m, x, s: batch_call(m, x, s)[0])(
        model, jnp.asarray(x.numpy()), state
    )
    err = rel_err(out, expected)
    # measured: 7.2e-6 (levit_128s), 6.8e-6 (conv_128s), 7.8e-6 (384_s8), 2.5e-5
    # (conv_512), where timm's own float32 logits differ from its float64 ones by 5.4e-6
    # (levit_128s) and 2.2e-5 (conv_512)
    assert err <= 1e-4, f"{name}: output relative error {err:.2e}"


LEVIT_NAMES = [
    name
    for name in ev_timm.model_names()
    if ev_timm._entry(name)["class"] in ("Levit", "LevitDistilled")
]


def test_every_name_is_listed():
    bare = {n for n in LEVIT_NAMES if "." not in n}
    assert len(bare) == 20 and len(LEVIT_NAMES) - len(bare) == 10


@pytest.mark.parametrize("name", LEVIT_NAMES)
def test_every_name_builds(name):
    ev_timm.check(name)


def test_abstract_build_matches_timm_parameter_count():
    """levit_128s and levit_conv_384_s8: as many parameters (and BatchNorm statistics) as
    timm's, counted on our side without building the model concretely."""
    for name in ("levit_128s", "levit_conv_384_s8"):
        model, state = eqx.filter_eval_shape(
            lambda name=name: ev_timm.build(name, key=jax.random.key(0))
        )
        abstract = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
        ours = sum(x.size for x in abstract if jnp.issubdtype(x.dtype, jnp.inexact))
        sd = timm_model(name).state_dict()
        params = sum(v.numel() for k, v in sd.items() if not _is_bn_statistic(k))
        assert ours == params
        statistics = sum(v.numel() for k, v in sd.items() if _is_bn_statistic(k))
        assert sum(x.size for x in jax.tree.leaves(state)) == statistics


def _is_bn_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize(
    "override, option",
    [
        (dict(drop_path_rate=0.1), "drop_path_rate"),
        (dict(act_layer="mish"), "act_layer"),
        (dict(attn_act_layer="prelu"), "attn_act_layer"),
        (dict(global_pool=""), "global_pool"),
        (dict(stem_type="s4"), "stem_type"),
        (dict(down_op="pool"), "down_op"),
        (dict(stem_stride=4), "stem_stride"),
        (dict(embed_dim=[128, 256]), "embed_dim"),
        (dict(use_pool=True), "use_pool"),
    ],
)
def test_rejected_options_are_named(override, option):
    with pytest.raises(
        ev_timm.TimmConfigError, match=rf"levit_128s: timm's LevitDistilled option.* {option}="
    ):
        ev_timm.build("levit_128s", key=jax.random.key(0), **override)


def test_wrong_checkpoints_are_refused():
    overrides = dict(REDUCED)
    sd = timm_model("levit_128s", **overrides).state_dict()
    # a conv-layout checkpoint for a Linear-layout name: the weight shapes differ
    conv_sd = timm_model("levit_conv_128s", **overrides).state_dict()
    with pytest.raises(
        ev.CheckpointError, match=r"stages\.0\.blocks\.0\.attn\.qkv\.linear\.weight"
    ):
        ev.from_timm("levit_128s", conv_sd, **overrides)
    # a LevitDistilled checkpoint for a Levit (no head_dist) configuration
    with pytest.raises(ev.CheckpointError, match="head_dist"):
        ev.from_timm("levit_512", sd, **overrides, act_layer="hard_swish")
    missing = {
        k: v for k, v in sd.items() if k != "stages.1.downsample.attn_downsample.attention_biases"
    }
    with pytest.raises(ev.CheckpointError, match="missing.*attention_biases"):
        ev.from_timm("levit_128s", missing, **overrides)


def test_new_classifier():
    """`num_classes` replaces both heads' Linears (timm's `reset_classifier`); the head
    BatchNorms are kept."""
    torch_model = timm_model("levit_128s", **REDUCED)
    model, _ = ev.from_timm("levit_128s", torch_model.state_dict(), num_classes=7, **REDUCED)
    assert model.head is not None and model.head_dist is not None
    assert model.head.linear.weight.shape == (7, 48)
    assert model.head_dist.linear.weight.shape == (7, 48)
    np.testing.assert_array_equal(
        np.asarray(model.head.bn.weight), torch_model.head.bn.weight.detach().numpy()
    )


def test_attention_bias_indices_match_timm():
    import_timm()
    from timm.models.levit import Attention, AttentionDownsample

    for resolution in ((4, 4), (3, 5)):
        attn = Attention(16, 8, num_heads=2, resolution=resolution)
        np.testing.assert_array_equal(
            grid_bias_indices(resolution), np.asarray(attn.attention_bias_idxs)
        )
        down = AttentionDownsample(16, 24, 8, num_heads=2, resolution=resolution)
        np.testing.assert_array_equal(
            grid_bias_indices(resolution, 2), np.asarray(down.attention_bias_idxs)
        )


TINY: dict[str, Any] = dict(
    image_size=32, num_classes=5, dim=(16, 24), depth=1, heads=2, key_dim=8, key=jax.random.key(0)
)


def test_layouts_and_heads():
    """`use_conv` changes only the layout of `forward_features`; a distilled model's logits
    are the mean of its two heads'; `num_classes=0` returns the pooled features."""
    x = jax.random.normal(jax.random.key(1), (3, 32, 32))
    model, state = eqx.nn.make_with_state(ev.TimmLeViT)(**TINY, distilled=True)
    model = eqx.nn.inference_mode(model)
    conv, _ = eqx.nn.make_with_state(ev.TimmLeViT)(**TINY, distilled=True, use_conv=True)
    conv = eqx.nn.inference_mode(conv)
    tokens, _ = model.forward_features(x, state)
    fmap, _ = conv.forward_features(x, state)
    assert tokens.shape == (1, 24) and fmap.shape == (24, 1, 1)
    np.testing.assert_allclose(np.asarray(model(x, state)[0]), np.asarray(conv(x, state)[0]))
    pooled, _ = model.forward_head(tokens, state, pre_logits=True)
    assert model.head is not None and model.head_dist is not None
    a, _ = model.head(pooled, state)
    b, _ = model.head_dist(pooled, state)
    np.testing.assert_allclose(np.asarray(model(x, state)[0]), np.asarray((a + b) / 2), rtol=1e-6)
    features, state = eqx.nn.make_with_state(ev.TimmLeViT)(**{**TINY, "num_classes": 0})
    out, _ = eqx.nn.inference_mode(features)(x, state)
    assert out.shape == (24,)


def test_training_step_updates_statistics():
    """In training mode the BatchNorm statistics are taken over the mapped batch, and the
    head dropout needs a key."""
    model, state = eqx.nn.make_with_state(ev.TimmLeViT)(**TINY, dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 3, 32, 32))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        batch_call(model, x, state)
    out, new_state = batch_call(model, x, state, key=jax.random.key(2))
    assert out.shape == (4, 5)
    index = model.stem[0].bn.state_index
    assert int(new_state.get(index)[2]) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image_size=40), "multiple of stem_stride=16"),
        (dict(image_size=(32, 24), stem_stride=8, dim=(2, 24)), "dim\\[0\\] must be at least 4"),
        (dict(dim=(4, 24)), "dim\\[0\\] must be at least 8"),
        (dict(dim=(16, 24), key_dim=32), "dim\\[0\\] must be at least key_dim=32"),
        (dict(depth=(1, 0)), "depth"),
        (dict(heads=(1, 2, 3)), "heads"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(stem_stride=4), "stem_stride"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        eqx.nn.make_with_state(ev.TimmLeViT)(**{**TINY, **change})


def test_wrong_image_is_refused(monkeypatch):
    model, state = eqx.nn.make_with_state(ev.TimmLeViT)(**TINY)
    infer = eqx.nn.inference_mode(model)
    raises_value_error(
        lambda: infer(jnp.zeros((3, 48, 48)), state), r"\(3, 32, 32\).*\(3, 48, 48\)", monkeypatch
    )
