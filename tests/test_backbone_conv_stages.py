"""The backbone API of the models with convolutional stages (CvT, LeViT, TimmLeViT, PiT):
their contract, their stage outputs equal to vit-pytorch's (forward hooks) and to timm's
`forward_intermediates`, new image sizes, and their attention maps in image
coordinates."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from eqx_vision.inspect import AttentionMap, image_attention
from reference import perturb_, reference, rel_err
from timm_reference import import_timm, timm_model


def _image(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    return x, jnp.asarray(x[0].numpy())


def _check_maps(
    maps: list[AttentionMap], image_size: tuple[int, int], total: float | None = 1.0
) -> None:
    """Every map's cells over the image; the attention each key receives averaged over the
    queries: a distribution over the keys (sums to one, `total`) for each layer and head,
    or at most one (`total=None`: a class token's row without the prefix tokens)."""
    for m in maps:
        assert m.maps.shape[2] * m.stride[0] >= image_size[0] - m.stride[0], m.name
        assert m.maps.shape[3] * m.stride[1] >= image_size[1] - m.stride[1], m.name
        sums = np.asarray(m.maps.sum(axis=(2, 3)))
        if total is None:
            assert (sums <= 1 + 1e-5).all() and (np.asarray(m.maps) >= 0).all()
        else:
            np.testing.assert_allclose(sums, total, rtol=1e-5)
        assert m.on_image(image_size).shape == (*m.maps.shape[:2], *image_size)


# CvT ------------------------------------------------------------------------------------

CVT = dict(
    num_classes=5, s1_emb_dim=8, s1_emb_kernel=3, s1_emb_stride=2, s1_heads=1, s1_depth=2,
    s1_mlp_mult=2, s2_emb_dim=16, s2_heads=2, s2_depth=1, s2_mlp_mult=2, s3_emb_dim=16,
    s3_heads=2, s3_depth=2, s3_mlp_mult=2,
)  # fmt: skip


def _cvt(**overrides: Any) -> tuple[ev.CvT, eqx.nn.State]:
    return eqx.nn.make_with_state(ev.CvT)(**{**CVT, **overrides}, key=jr.key(0))


def test_cvt_contract():
    model, state = _cvt()
    check_backbone(model, (32, 32), state=state, new_size=(48, 40))
    assert [i.reduction for i in model.feature_info] == [(2, 2), (4, 4), (8, 8)]
    assert [i.channels for i in model.feature_info] == [8, 16, 16]
    assert ev.set_image_size(model, (9, 13)) is model  # any size the convolutions reduce
    headless, _ = _cvt(num_classes=0)
    assert headless.head is None


def test_cvt_intermediates_equal_vit_pytorch():
    """Each stage's output map is the output of vit-pytorch's `layers[i]` (forward hooks).
    Measured: at most 4.9e-7."""
    torch_model = reference("cvt").CvT(**CVT)
    perturb_(torch_model)
    torch_model.eval()
    model, state = _cvt()
    model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    model = eqx.nn.inference_mode(model)
    x, jx = _image((3, 32, 40))
    expected = torch_outputs(torch_model, [f"layers.{i}" for i in range(3)], x)
    (final, outputs), _ = model.forward_intermediates(jx, state)
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    assert rel_err(final, expected[-1][0]) <= 5e-6
    tokens, _ = model.forward_intermediates(
        jx, state, indices=[1], output_fmt="tokens", intermediates_only=True
    )
    assert rel_err(tokens[0], expected[1][0].reshape(16, -1).T) <= 5e-6


def test_cvt_attention_maps():
    model, state = _cvt()
    model = eqx.nn.inference_mode(model)
    _, image = _image((3, 32, 40))
    maps = eqx.filter_jit(image_attention)(model, image, state)
    assert [m.name for m in maps] == ["stages[0]", "stages[1]", "stages[2]"]
    # layers, heads, and the key grids of the stride-2 key/value projections
    assert [m.maps.shape for m in maps] == [(2, 1, 8, 10), (1, 2, 4, 5), (2, 2, 2, 3)]
    assert [m.stride for m in maps] == [(4, 4), (8, 8), (16, 16)]
    _check_maps(maps, (32, 40))
    # queries of zero: every key gets the same attention
    flat = eqx.tree_at(
        lambda m: m.stages[1].blocks.blocks.attn.to_q.pointwise.weight,
        model,
        replace_fn=jnp.zeros_like,
    )
    np.testing.assert_allclose(
        np.asarray(image_attention(flat, image, state)[1].maps), 1 / 20, rtol=1e-6
    )


# PiT ------------------------------------------------------------------------------------

PIT = dict(image_size=32, patch_size=4, num_classes=5, dim=8, depth=(1, 2, 1), heads=2,
           mlp_dim=16, dim_head=8)  # fmt: skip


def test_pit_contract():
    # windows with stride = patch_size tile the image: grids of exactly size / reduction
    model = ev.PiT(**PIT, stride=4, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(64, 64), bad_size=(32, 40))
    assert [(i.channels, i.reduction) for i in model.feature_info] == [
        (8, (4, 4)), (16, (8, 8)), (32, (16, 16))
    ]  # fmt: skip
    with pytest.raises(ValueError, match="patch_size"):
        ev.set_image_size(model, 2)
    # vit-pytorch's overlapping windows: the grids are `grid_sizes`
    model = eqx.nn.inference_mode(ev.PiT(**PIT, distillation_token=True, key=jr.key(0)))
    x = jr.normal(jr.key(1), (3, 32, 32))
    feats = model.forward_features(x)
    np.testing.assert_array_equal(model(x), model.forward_head(feats))
    final, outputs = model.forward_intermediates(x, prefix_tokens=True)
    np.testing.assert_array_equal(final, feats)
    assert [(y.shape, p.shape) for y, p in outputs] == [
        ((8, 15, 15), (2, 8)), ((16, 8, 8), (2, 16)), ((32, 4, 4), (2, 32))
    ]  # fmt: skip
    headless = ev.reset_head(model, 0)
    np.testing.assert_allclose(headless(x), model.forward_head(feats, pre_logits=True))
    assert ev.reset_head(model, 3, key=jr.key(2))(x).shape == (3,)
    resized = ev.set_image_size(model, 48)
    assert resized.grid_sizes == (23, 12, 6) and resized(jnp.zeros((3, 48, 48))).shape == (5,)


def test_pit_intermediates_equal_vit_pytorch():
    """Each stage's tokens are the output of vit-pytorch's `layers[2 * i]` (forward hooks).
    Measured: at most 5.2e-7."""
    config = {k: v for k, v in PIT.items() if k != "dim_head"}
    torch_model = reference("pit").PiT(**config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.PiT(**config, key=jr.key(0)), torch_model.state_dict())
    x, jx = _image((3, 32, 32))
    expected = torch_outputs(torch_model, ["layers.0", "layers.2", "layers.4"], x)
    final, outputs = model.forward_intermediates(jx, output_fmt="tokens", prefix_tokens=True)
    for (y, prefix), e in zip(outputs, expected, strict=True):
        assert rel_err(jnp.concatenate([prefix, y]), e[0]) <= 5e-6
    assert rel_err(final, expected[-1][0]) <= 5e-6


@pytest.mark.parametrize(
    "name, config",
    [
        ("pit_ti_224", dict(img_size=32, base_dims=[8, 8, 8], depth=[1, 2, 1], heads=[1, 2, 4])),
        ("pit_b_distilled_224", dict(img_size=28, base_dims=[8, 4, 4], depth=[1, 1, 1],
                                     heads=[1, 4, 8])),
    ],
)  # fmt: skip
def test_pit_intermediates_equal_timm(name, config):
    """timm's `forward_intermediates` (NCHW maps after each stage, the final normalised
    prefix tokens are our head's; the final tokens' prefix part through the head's norm).
    Measured: at most 1.2e-6."""
    import_timm()
    torch_model = timm_model(name, **config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_timm(name, torch_model.state_dict(), **config)
    x, jx = _image((3, config["img_size"], config["img_size"]))
    with torch.no_grad():
        final, inter = torch_model.forward_intermediates(x, indices=[0, 2])
    ours_final, ours = model.forward_intermediates(jx, indices=[0, 2])
    for y, e in zip(ours, inter, strict=True):
        assert rel_err(y, e[0].numpy()) <= 1e-5
    normed = model.head_norm(ours_final[: model.num_prefix_tokens])
    assert rel_err(normed, final[0].numpy()) <= 1e-5


def test_pit_set_image_size_equals_timm_resample():
    """The position embeddings of the patches resampled as timm's `resample_abs_pos_embed`
    (timm's PiT keeps them as a map, without the prefix tokens). Measured: 1.3e-6."""
    timm = import_timm()
    model = ev.PiT(**PIT, stride=2, pos_embed_prefix=False, key=jr.key(0))
    resized = ev.set_image_size(model, 48)
    g, new = model.grid_sizes[0], resized.grid_sizes[0]
    with torch.no_grad():
        expected = timm.layers.resample_abs_pos_embed(
            torch.tensor(np.array(model.pos_embedding))[None], (new, new), (g, g),
            num_prefix_tokens=0,
        )[0].numpy()  # fmt: skip
    assert rel_err(resized.pos_embedding, expected) <= 1e-5


def test_pit_attention_maps():
    model = eqx.nn.inference_mode(ev.PiT(**PIT, distillation_token=True, key=jr.key(0)))
    _, image = _image((3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, image)
    assert [m.maps.shape for m in maps] == [(1, 2, 15, 15), (2, 2, 8, 8), (1, 2, 4, 4)]
    assert [m.stride for m in maps] == [(2, 2), (4, 4), (8, 8)]
    _check_maps(maps, (32, 32), total=None)
    # queries of zero in the second stage: the class token attends evenly to all 66 tokens
    flat = eqx.tree_at(
        lambda m: m.stages[1].layers.blocks.attn.to_qkv.weight,
        model,
        replace_fn=lambda w: w.at[:, :16].set(0.0),
    )
    np.testing.assert_allclose(np.asarray(image_attention(flat, image)[1].maps), 1 / 66, rtol=1e-5)


# LeViT (vit-pytorch's) ------------------------------------------------------------------

LEVIT = dict(image_size=64, num_classes=5, dim=(8, 16, 24), depth=(1, 2, 1), heads=(1, 2, 2),
             mlp_mult=2, stages=3, dim_key=8, dim_value=8)  # fmt: skip


def _levit(**overrides: Any) -> tuple[ev.LeViT, eqx.nn.State]:
    return eqx.nn.make_with_state(ev.LeViT)(**{**LEVIT, **overrides}, key=jr.key(0))


def _perturbed_levit(**overrides: Any) -> tuple[Any, ev.LeViT, eqx.nn.State]:
    torch_model = reference("levit").LeViT(**{**LEVIT, **overrides})
    perturb_(torch_model)
    torch_model.eval()
    model, state = _levit(**overrides)
    model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    return torch_model, eqx.nn.inference_mode(model), state


def test_levit_contract():
    _, model, state = _perturbed_levit()
    check_backbone(model, (64, 64), state=state, new_size=(128, 128), bad_size=(64, 72))
    distilled, state = _levit(num_distill_classes=3)
    x = jnp.zeros((3, 64, 64))
    (logits, dist), _ = eqx.nn.inference_mode(distilled)(x, state)
    assert logits.shape == (5,) and dist.shape == (3,)
    seven, _ = ev.reset_head(distilled, 7, key=jr.key(1), state=state)
    assert [h.weight.shape for h in (seven.mlp_head, seven.distill_head)] == [(7, 24)] * 2
    assert [(i.channels, i.reduction) for i in model.feature_info] == [
        (8, (16, 16)), (16, (32, 32)), (24, (64, 64))
    ]  # fmt: skip
    headless, _ = _levit(num_classes=0)
    assert headless.mlp_head is None and headless.distill_head is None


def test_levit_intermediates_equal_vit_pytorch():
    """Each stage's output map is the output of vit-pytorch's `backbone[2 * i]` (forward
    hooks). Measured: at most 2.5e-6."""
    torch_model, model, state = _perturbed_levit()
    x, jx = _image((3, 64, 64))
    expected = torch_outputs(torch_model, ["backbone.0", "backbone.2", "backbone.4"], x)
    (final, outputs), _ = model.forward_intermediates(jx, state)
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 2e-5
    assert rel_err(final, expected[-1][0]) <= 2e-5


def test_levit_set_image_size_resizes_the_biases():
    """Every attention-bias table is timm's `resize_rel_pos_bias_table_levit` of the old one
    (bicubic, antialiased), queries and keys on the new maps. Measured: 1.1e-7."""
    timm = import_timm()
    _, model, state = _perturbed_levit()
    for size, maps in ((128, (8, 4)), (32, (2, 1))):
        resized = ev.set_image_size(model, size)
        for old, new, fmap in (
            (model.stages[0].blocks.attn, resized.stages[0].blocks.attn, maps[0]),
            (model.downsamples[1].attn, resized.downsamples[1].attn, maps[1]),
        ):
            assert new.bias_map_size == fmap
            pos_bias = np.array(old.pos_bias)
            table = pos_bias.reshape(-1, *pos_bias.shape[-2:])[0]
            expected = timm.layers.resize_rel_pos_bias_table_levit(
                torch.tensor(table), (fmap * fmap, table.shape[1])
            ).numpy()
            ours = np.asarray(new.pos_bias).reshape(-1, fmap * fmap, table.shape[1])[0]
            assert rel_err(ours, expected) <= 1e-5
        out, _ = resized(jnp.zeros((3, size, size)), state)
        assert out.shape == (5,)


def test_levit_attention_maps():
    _, model, state = _perturbed_levit()
    _, image = _image((3, 64, 64))
    maps = eqx.filter_jit(image_attention)(model, image, state)
    names = ["stages[0]", "downsamples[0]", "stages[1]", "downsamples[1]", "stages[2]"]
    assert [m.name for m in maps] == names
    assert [m.maps.shape for m in maps] == [
        (1, 1, 4, 4), (1, 2, 4, 4), (2, 2, 2, 2), (1, 4, 2, 2), (1, 2, 1, 1)
    ]  # fmt: skip
    assert [m.stride for m in maps] == [(16, 16), (16, 16), (32, 32), (32, 32), (64, 64)]
    _check_maps(maps, (64, 64))
    # queries of zero and no attention bias: every key gets the same attention
    flat = eqx.tree_at(
        lambda m: (m.stages[1].blocks.attn.to_q.bn.weight, m.stages[1].blocks.attn.to_q.bn.bias,
                   m.stages[1].blocks.attn.pos_bias),
        model,
        replace_fn=jnp.zeros_like,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(image_attention(flat, image, state)[2].maps), 0.25)


# TimmLeViT ------------------------------------------------------------------------------

TIMM_LEVIT = dict(img_size=64, embed_dim=[32, 48], depth=[1, 2], num_heads=[2, 3], key_dim=8)


def _timm_levit(
    name: str, scale: float = 0.2, **overrides: Any
) -> tuple[Any, ev.TimmLeViT, eqx.nn.State]:
    import_timm()
    config = {**TIMM_LEVIT, **overrides}
    torch_model = timm_model(name, **config)
    perturb_(torch_model, scale=scale)
    torch_model.eval()
    model, state = ev.from_timm(name, torch_model.state_dict(), **config)
    return torch_model, eqx.nn.inference_mode(model), state


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s", "levit_384_s8"])
def test_timm_levit_contract(name):
    # weights near timm's initialisation: strongly perturbed BatchNorms amplify the float32
    # rounding differences of compiled and eager code past check_backbone's 1e-6
    _, model, state = _timm_levit(name, scale=0.02)
    check_backbone(model, (64, 64), state=state, new_size=(96, 128), bad_size=(64, 70))
    stride = 8 if name.endswith("s8") else 16
    assert [i.reduction for i in model.feature_info] == [(stride, stride), (2 * stride,) * 2]
    seven, seven_state = ev.reset_head(model, 7, key=jr.key(1), state=state)
    assert seven.head is not None and seven.head_dist is not None  # distilled: both heads
    feats, _ = model.forward_features(jnp.zeros((3, 64, 64)), state)
    pooled, _ = seven.forward_head(feats, seven_state, pre_logits=True)
    np.testing.assert_array_equal(pooled, model.forward_head(feats, state, pre_logits=True)[0])


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s", "levit_384_s8"])
def test_timm_levit_intermediates_equal_timm(name):
    """timm's `forward_intermediates` (NCHW maps after each stage). Measured: at most
    3.0e-6 (levit_384_s8; at most 8.3e-7 for the others)."""
    torch_model, model, state = _timm_levit(name)
    x, jx = _image((3, 64, 64))
    with torch.no_grad():
        final, inter = torch_model.forward_intermediates(x)
    (ours_final, ours), _ = model.forward_intermediates(jx, state)
    for y, e in zip(ours, inter, strict=True):
        assert rel_err(y, e[0].numpy()) <= 2e-5
    assert rel_err(ours_final, final[0].numpy()) <= 2e-5


def test_timm_levit_set_image_size_resizes_the_biases():
    """The bias tables resized as timm's `resize_rel_pos_bias_table_levit`; timm's model
    with those tables on the new size gives the same outputs. Measured: 3.4e-7 (tables),
    4.5e-7 (logits)."""
    timm = import_timm()
    torch_model, model, state = _timm_levit("levit_128s")
    resized = ev.set_image_size(model, 96)
    big = timm_model("levit_128s", **{**TIMM_LEVIT, "img_size": 96})
    sd = dict(torch_model.state_dict())
    for key, value in sd.items():
        if key.endswith("attention_biases") and value.shape != big.state_dict()[key].shape:
            n = big.state_dict()[key].shape[1]
            sd[key] = timm.layers.resize_rel_pos_bias_table_levit(value.T, (n, value.shape[0])).T
    big.load_state_dict(sd)
    big.eval()
    attn = resized.stages[0].blocks.attn
    expected = sd["stages.0.blocks.0.attn.attention_biases"].numpy()
    assert rel_err(np.asarray(attn.attention_biases)[0], expected) <= 1e-5
    x, jx = _image((3, 96, 96))
    with torch.no_grad():
        logits = big(x)[0].numpy()
    assert rel_err(resized(jx, state)[0], logits) <= 1e-5


def test_timm_levit_attention_maps():
    _, model, state = _timm_levit("levit_128s")
    _, image = _image((3, 64, 64))
    maps = eqx.filter_jit(image_attention)(model, image, state)
    assert [m.name for m in maps] == ["stages[0]", "downsamples[0]", "stages[1]"]
    assert [m.maps.shape for m in maps] == [(1, 2, 4, 4), (1, 4, 4, 4), (2, 3, 2, 2)]
    assert [m.stride for m in maps] == [(16, 16), (16, 16), (32, 32)]
    _check_maps(maps, (64, 64))
    # queries of zero and no attention bias: every key gets the same attention
    flat = eqx.tree_at(
        lambda m: (m.stages[1].blocks.attn.qkv.bn.weight, m.stages[1].blocks.attn.qkv.bn.bias,
                   m.stages[1].blocks.attn.attention_biases),
        model,
        replace_fn=jnp.zeros_like,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(image_attention(flat, image, state)[2].maps), 0.25)
