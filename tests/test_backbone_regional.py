"""The backbone API of CrossFormer, RegionViT and T2T-ViT: the contract, the intermediate
outputs equal to vit-pytorch's (forward hooks), and their attention maps in image
coordinates."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from eqx_vision.inspect import image_attention
from reference import perturb_, reference, rel_err


# --- CrossFormer -------------------------------------------------------------------------

CROSSFORMER: dict[str, Any] = dict(
    dim=32,
    depth=(1, 2, 1, 1),
    global_window_size=(4, 2, 2, 1),
    local_window_size=2,
    cross_embed_kernel_sizes=((2, 4), (2,), (2, 4), (2,)),
    cross_embed_strides=2,
    num_classes=10,
)
# a stage without blocks, three kernels, one channel, a rectangular image
CROSSFORMER_RECT: dict[str, Any] = dict(
    dim=(32, 64, 32, 64),
    depth=(2, 1, 0, 1),
    global_window_size=(2, 1, 1, 1),
    local_window_size=(4, 2, 2, 1),
    cross_embed_kernel_sizes=((4, 8, 16), (2, 4), (2,), (2, 4)),
    cross_embed_strides=(4, 2, 2, 2),
    num_classes=7,
    channels=1,
)


def test_crossformer_contract():
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(64, 32), bad_size=(32, 48))
    model = ev.CrossFormer(**CROSSFORMER_RECT, key=jr.key(0))
    check_backbone(model, (64, 32), channels=1, new_size=(32, 64), bad_size=(64, 40))


@pytest.mark.parametrize("config, shape", [(CROSSFORMER, (3, 32, 32)),
                                           (CROSSFORMER_RECT, (1, 64, 32))])  # fmt: skip
def test_crossformer_intermediates_equal_vit_pytorch(config, shape):
    """Each stage's output map is vit-pytorch's (the output of `layers[i][1]`, the stage's
    transformer, or of its embedding for a stage without blocks). Measured: at most
    9.5e-7."""
    torch_model = reference("crossformer").CrossFormer(**config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.CrossFormer(**config, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, *shape)
    expected = torch_outputs(torch_model, [f"layers.{i}.1" for i in range(4)], x)
    final, outputs = model.forward_intermediates(jnp.asarray(x[0].numpy()))
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    assert rel_err(final, expected[-1][0]) <= 5e-6
    tokens = model.forward_intermediates(
        jnp.asarray(x[0].numpy()), indices=[1], output_fmt="tokens", intermediates_only=True
    )
    np.testing.assert_array_equal(tokens[0], outputs[1].reshape(outputs[1].shape[0], -1).T)


def test_crossformer_headless_checkpoint_is_an_error():
    config = {**CROSSFORMER, "num_classes": 0}
    torch_model = reference("crossformer").CrossFormer(**{**config, "num_classes": 10})
    with pytest.raises(ev.CheckpointError, match="classifier"):
        ev.from_vit_pytorch(ev.CrossFormer(**config, key=jr.key(0)), torch_model.state_dict())


def test_crossformer_attention_maps():
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    names = [f"stages[{i}].{kind}" for i in range(4) for kind in ("short_attn", "long_attn")]
    assert [m.name for m in maps] == names
    depth, local, groups = CROSSFORMER["depth"], 2, CROSSFORMER["global_window_size"]
    for i in range(4):
        side, stride = 32 // 2 ** (i + 1), 2 ** (i + 1)
        for m, window, dilated in ((maps[2 * i], local, False), (maps[2 * i + 1], groups[i], True)):
            assert m.maps.shape == (depth[i], 1, side, side) and m.stride == (stride, stride)
            assert m.on_image((32, 32)).shape == (depth[i], 1, 32, 32)
            # each window's cells hold the mean over its queries of a softmax: they sum to one
            g = side // window
            if dilated:  # pixels g apart form a window
                cells = m.maps.reshape(depth[i], 1, window, g, window, g).sum(axis=(2, 4))
            else:
                cells = m.maps.reshape(depth[i], 1, g, window, g, window).sum(axis=(3, 5))
            np.testing.assert_allclose(cells, 1.0, rtol=1e-5)


def test_crossformer_uniform_attention():
    """Queries and keys of zero and a position bias of zero: every window attends
    uniformly, so each pixel receives `1 / window ** 2`."""
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    stages = []
    for stage in model.stages:
        assert stage is not None

        def parts(b: Any) -> list[Any]:
            return [
                leaf
                for a in (b.short_attn, b.long_attn)
                for leaf in (a.attn.to_qkv.weight, a.dpb.linears[-1].weight, a.dpb.linears[-1].bias)
            ]

        zeros = [jnp.zeros_like(p) for p in parts(stage.blocks)]
        stages.append(eqx.tree_at(lambda s: parts(s.blocks), stage, zeros))
    model = eqx.tree_at(lambda m: m.stages, model, tuple(stages))
    maps = image_attention(model, jr.normal(jr.key(1), (3, 32, 32)))
    for i in range(4):
        np.testing.assert_allclose(maps[2 * i].maps, 1 / 4, rtol=1e-6)
        window = CROSSFORMER["global_window_size"][i]
        np.testing.assert_allclose(maps[2 * i + 1].maps, 1 / window**2, rtol=1e-6)


# --- RegionViT ---------------------------------------------------------------------------

REGIONVIT: dict[str, Any] = dict(dim=(8, 16, 16, 24), depth=(1, 1, 2, 1), window_size=2,
                                 num_classes=5)  # fmt: skip
REGIONVIT_3CONV: dict[str, Any] = dict(
    dim=16,
    depth=1,
    window_size=4,
    local_patch_size=2,
    num_classes=3,
    use_peg=True,
    tokenize_local_3_conv=True,
)


def test_regionvit_contract():
    model = ev.RegionViT(**REGIONVIT, key=jr.key(0))
    check_backbone(model, (64, 64), new_size=(128, 64), bad_size=(60, 64))
    model = ev.RegionViT(**REGIONVIT_3CONV, key=jr.key(0))
    check_backbone(model, (64, 32))
    outputs = model.forward_intermediates(jnp.zeros((3, 64, 32)), region_tokens=True)[1]
    for i, (_, region) in enumerate(outputs):  # the stride-2 convolutions round up
        assert region.shape == (16, -(-64 // (8 * 2**i)), -(-32 // (8 * 2**i)))


@pytest.mark.parametrize("config, shape", [(REGIONVIT, (3, 64, 64)),
                                           (REGIONVIT_3CONV, (3, 64, 32))])  # fmt: skip
def test_regionvit_intermediates_equal_vit_pytorch(config, shape):
    """Each stage's local and region maps are vit-pytorch's (the outputs of `layers[i][2]`,
    the stage's R2L transformer). Measured: at most 8.8e-7."""
    torch_model = reference("regionvit").RegionViT(**config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.RegionViT(**config, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, *shape)
    names = [f"layers.{i}.2" for i in range(4)]
    local = torch_outputs(torch_model, names, x, transform=lambda o: o[0])
    region = torch_outputs(torch_model, names, x, transform=lambda o: o[1])
    final, outputs = model.forward_intermediates(jnp.asarray(x[0].numpy()), region_tokens=True)
    for (y, r), el, er in zip(outputs, local, region, strict=True):
        assert rel_err(y, el[0]) <= 5e-6
        assert rel_err(r, er[0]) <= 5e-6
    assert rel_err(final, region[-1][0]) <= 5e-6


def test_regionvit_attention_maps():
    model = ev.RegionViT(**REGIONVIT, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 64, 64))
    maps = eqx.filter_jit(image_attention)(model, x)
    assert [m.name for m in maps] == [
        f"stages[{i}].{kind}" for i in range(4) for kind in ("regional", "local")
    ]
    for i in range(4):
        regional, local = maps[2 * i], maps[2 * i + 1]
        depth = REGIONVIT["depth"][i]
        side = 8 // 2**i
        assert regional.maps.shape == (depth, 4, side, side)
        assert regional.stride == (8 * 2**i,) * 2
        assert local.maps.shape == (depth, 4, 2 * side, 2 * side)
        assert local.stride == (4 * 2**i,) * 2
        # the mean over the queries of a softmax over the region tokens
        np.testing.assert_allclose(regional.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
        # each window's cells: the region token's row without its weight on itself
        cells = local.maps.reshape(depth, 4, side, 2, side, 2).sum(axis=(3, 5))
        assert bool(jnp.all((cells > 0) & (cells < 1)))
    # the probabilities the maps are read from are softmax rows
    stage = model.stages[0]
    local, region = (
        model.local_encoder(x),
        model.region_encoder(
            x.reshape(3, 8, 8, 8, 8).transpose(0, 2, 4, 1, 3).reshape(3 * 64, 8, 8)
        ),
    )
    tokens, bias, _, _ = stage.enter(local, region)
    out, (regional, local_probs) = stage.layers[0].attention_maps(tokens, bias)
    np.testing.assert_allclose(regional.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(local_probs.sum(-1), 1.0, rtol=1e-5)
    expected = stage.layers[0](tokens, bias)
    np.testing.assert_allclose(out[1], expected[1], rtol=1e-6, atol=1e-6)


def test_regionvit_uniform_attention():
    """Queries and keys of zero and a position bias of zero: every token attends
    uniformly, so each region token receives `1 / regions` and each local token
    `1 / (1 + window ** 2)` from its region token."""
    model = ev.RegionViT(**REGIONVIT, key=jr.key(0))
    stages = []
    for stage in model.stages:
        weight = stage.layers.blocks.attn.to_qkv.weight  # pyright: ignore[reportOptionalMemberAccess]
        inner = weight.shape[1] // 3
        zero_qk = weight.at[:, : 2 * inner].set(0.0)
        stage = eqx.tree_at(lambda s: s.layers.blocks.attn.to_qkv.weight, stage, zero_qk)
        stages.append(eqx.tree_at(lambda s: s.rel_pos_bias, stage,
                                  jnp.zeros_like(stage.rel_pos_bias)))  # fmt: skip
    model = eqx.tree_at(lambda m: m.stages, model, tuple(stages))
    maps = image_attention(model, jr.normal(jr.key(1), (3, 64, 64)))
    for i in range(4):
        regions = (8 // 2**i) ** 2
        np.testing.assert_allclose(maps[2 * i].maps, 1 / regions, rtol=1e-5)
        np.testing.assert_allclose(maps[2 * i + 1].maps, 1 / 5, rtol=1e-5)


def test_regionvit_headless_checkpoint_is_an_error():
    torch_model = reference("regionvit").RegionViT(**REGIONVIT)
    model = ev.RegionViT(**{**REGIONVIT, "num_classes": 0}, key=jr.key(0))
    with pytest.raises(ev.CheckpointError, match="classifier"):
        ev.from_vit_pytorch(model, torch_model.state_dict())


# --- T2T-ViT -----------------------------------------------------------------------------

T2T: dict[str, Any] = dict(image_size=32, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32,
                           dim_head=8, t2t_layers=((3, 2), (3, 2), (3, 2)))  # fmt: skip


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_t2t_contract(pool):
    model = ev.T2TViT(**T2T, pool=pool, key=jr.key(0))
    assert [i.name for i in model.feature_info] == [
        "t2t_transformers[0]", "t2t_transformers[1]", "transformer.layers[0]",
        "transformer.layers[1]"]  # fmt: skip
    # one tokens-to-token transformer: with two, the jitted and the eager final features
    # differ by float32 rounding (1.5e-6) beyond check_backbone's 1e-6
    model = ev.T2TViT(**{**T2T, "t2t_layers": ((3, 2), (3, 2))}, pool=pool, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(64, 64), bad_size=(32, 48))


def test_t2t_intermediates_equal_vit_pytorch():
    """The tokens-to-token transformers' outputs (`to_patch_embedding[4 i + 3]`) and the
    residual stream after each block of the main transformer are vit-pytorch's.
    Measured: 6.9e-6 after the tokens-to-token transformers (one head over the 27- and
    243-dimensional tokens, perturbed weights)."""
    torch_model = reference("t2t").T2TViT(**T2T)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.T2TViT(**T2T, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    t2t = torch_outputs(torch_model, ["to_patch_embedding.3", "to_patch_embedding.7"], x)
    blocks = torch_outputs(torch_model, [f"transformer.layers.{j}.1" for j in range(2)], x,
                           residual=True)  # fmt: skip
    final, outputs = model.forward_intermediates(
        jnp.asarray(x[0].numpy()), output_fmt="tokens", prefix_tokens=True
    )
    for y, e in zip(outputs[:2], t2t, strict=True):
        assert rel_err(y, e[0]) <= 4e-5
    for (patches, prefix), e in zip(outputs[2:], blocks, strict=True):
        assert rel_err(jnp.concatenate([prefix, patches]), e[0]) <= 4e-5


def test_t2t_set_image_size_resamples_positions():
    from eqx_vision.layers import resample_pos_embed

    model = ev.T2TViT(**T2T, key=jr.key(0))
    resized = ev.set_image_size(model, 64)
    assert resized.grid_sizes == (32, 16, 8)
    expected = resample_pos_embed(model.pos_embedding, (8, 8), (4, 4), num_prefix=1)
    np.testing.assert_array_equal(resized.pos_embedding, expected)
    np.testing.assert_array_equal(resized.pos_embedding[0], model.pos_embedding[0])


def test_t2t_attention_maps():
    model = ev.T2TViT(**T2T, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    assert [m.name for m in maps] == ["t2t_transformers[0]", "t2t_transformers[1]", "transformer"]
    assert maps[0].maps.shape == (1, 1, 16, 16) and maps[0].stride == (2, 2)
    assert maps[1].maps.shape == (1, 1, 8, 8) and maps[1].stride == (4, 4)
    assert maps[2].maps.shape == (2, 2, 4, 4) and maps[2].stride == (8, 8)
    for m in maps[:2]:
        np.testing.assert_allclose(m.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    # the class token's row, without its weight on itself
    assert bool(jnp.all(maps[2].maps.sum(axis=(2, 3)) < 1))
    # a constant image: every window of the first soft split away from the border is the
    # same token, so those tokens receive the same attention
    const = image_attention(model, jnp.ones((3, 32, 32)))[0].maps[0, 0]
    np.testing.assert_allclose(const[1:, 1:], const[1, 1], rtol=1e-5)


def test_t2t_headless_checkpoint_is_an_error():
    torch_model = reference("t2t").T2TViT(**T2T)
    model = ev.T2TViT(**{**T2T, "num_classes": 0}, key=jr.key(0))
    with pytest.raises(ev.CheckpointError, match="classifier"):
        ev.from_vit_pytorch(model, torch_model.state_dict())
