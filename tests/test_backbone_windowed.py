"""The backbone API of the windowed and spatial-reduction models (NesT, Twins-SVT,
ScalableViT): their contract, their stage outputs equal to vit-pytorch's (forward hooks)
and to timm's `forward_intermediates`, NesT's resized position embeddings equal to timm's,
and their attention maps in image coordinates."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch
from einops import rearrange

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from eqx_vision.inspect import AttentionMap, image_attention
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, reference, rel_err
from timm_reference import import_timm


NEST = dict(
    image_size=16, patch_size=2, num_classes=3, dim=8, heads=2, num_hierarchies=2, block_repeats=1
)
NEST3 = dict(
    image_size=16, patch_size=2, num_classes=3, dim=4, heads=1, num_hierarchies=3,
    block_repeats=(1, 2, 0),
)  # fmt: skip
# timm's Nest, reduced (as tests/test_timm_nest.py): three levels, heads of 4 dimensions.
TIMM_NEST: dict[str, Any] = dict(
    img_size=16, patch_size=2, embed_dims=(8, 16, 32), num_heads=(2, 4, 4), depths=(1, 2, 1)
)


def twins_stages(*rows: tuple[int, int, int, int, int]) -> dict[str, int]:
    """`s{i}_{emb_dim, patch_size, local_patch_size, global_k, depth}`, one row per stage."""
    names = ("emb_dim", "patch_size", "local_patch_size", "global_k", "depth")
    return {
        f"s{i}_{n}": v for i, row in enumerate(rows, 1) for n, v in zip(names, row, strict=True)
    }


TWINS = dict(
    num_classes=10,
    **twins_stages((8, 2, 2, 2, 1), (16, 2, 2, 2, 0), (16, 2, 2, 2, 2), (24, 1, 5, 2, 1)),
)
TIMM_TWINS: dict[str, Any] = dict(
    img_size=64,
    embed_dims=[16, 32, 32, 48],
    num_heads=[2, 2, 4, 3],
    mlp_ratios=[2, 4, 4, 2],
    depths=[2, 4, 2, 2],
    wss=[4, 4, 2, 2],
    sr_ratios=[4, 2, 2, 1],
    num_classes=10,
)
SCALABLE = dict(
    num_classes=10,
    dim=16,
    depth=(2, 1),
    heads=(2, 1),
    reduction_factor=(2, 1),
    window_size=(4, None),
    ssa_dim_key=8,
    ssa_dim_value=(8, 12),
    iwsa_dim_key=(8, 4),
    iwsa_dim_value=8,
    ff_expansion_factor=2,
)
SCALABLE3 = dict(
    num_classes=4, dim=8, depth=(1, 0, 2), heads=2, reduction_factor=(2, 1, 1),
    window_size=(2, 2, None), ssa_dim_key=4, ssa_dim_value=4, iwsa_dim_key=4, iwsa_dim_value=4,
    ff_expansion_factor=1,
)  # fmt: skip


def _x(torch_x: torch.Tensor) -> jax.Array:
    return jnp.asarray(torch_x[0].numpy())


# ---------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("config", [NEST, NEST3], ids=["two-levels", "three-levels"])
def test_nest_contract(config, monkeypatch):
    model = ev.NesT(**config, key=jr.key(0))
    # the patch grid (8) must stay divisible by the blocks per side of the first level
    bad = (18, 18) if config["num_hierarchies"] == 2 else (20, 20)
    _check_contract(monkeypatch, model, (16, 16), new_size=(24, 24), bad_size=bad)
    with pytest.raises(ValueError, match="square"):
        ev.set_image_size(model, (16, 24))


@pytest.mark.parametrize("name", ["nest_tiny", "nest_tiny_jx"])
def test_timm_nest_contract(name):
    model = ev_timm.build(name, key=jr.key(0), **TIMM_NEST)
    check_backbone(model, (16, 16), new_size=(32, 32), bad_size=(20, 20))


def _check_contract(monkeypatch: Any, model: Any, size: tuple[int, int], **kwargs: Any) -> None:
    """The contract, its comparisons at a relative 1e-5: under `jit`, XLA rounds this model's
    float32 arithmetic differently from eager execution by up to 2.7e-6 (Twins-SVT, measured on
    five images, values up to 1.5; NesT 1.8e-6, its final channel LayerNorm amplifying the
    rounding), over the contract's `1e-6 + 1e-6` relative for the jitted
    `forward_features` against the eager `forward_intermediates`. `model(x) ==
    forward_head(forward_features(x))` stays exact."""
    close = np.testing.assert_allclose

    def looser(actual: Any, desired: Any, rtol: float = 1e-7, atol: float = 0, **kw: Any):
        close(actual, desired, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5), **kw)

    monkeypatch.setattr(np.testing, "assert_allclose", looser)
    check_backbone(model, size, **kwargs)


def test_twins_contract(monkeypatch):
    model = ev.TwinsSVT(**TWINS, key=jr.key(0))
    m = model.size_multiple
    _check_contract(monkeypatch, model, (32, 32), new_size=(2 * m, m), bad_size=(m + 2, m))


def test_timm_twins_contract(monkeypatch):
    model = ev_timm.build("twins_svt_small", key=jr.key(0), **TIMM_TWINS)
    assert model.norm is not None
    _check_contract(monkeypatch, model, (64, 64), new_size=(64, 128), bad_size=(60, 64))


@pytest.mark.parametrize("config", [SCALABLE, SCALABLE3], ids=["two-stages", "three-stages"])
def test_scalable_contract(config):
    model = ev.ScalableViT(**config, key=jr.key(0))
    m = model.size_multiple
    assert m is not None
    check_backbone(model, (m, m), new_size=(2 * m, m), bad_size=(m + 4, m))


def test_scalable_without_classes():
    model = ev.ScalableViT(**{**SCALABLE, "num_classes": 0}, key=jr.key(0))
    assert model.head is None
    x = jr.normal(jr.key(1), (3, 32, 32))
    assert model(x).shape == (32,)


# ---------------------------------------------------------------------------------------
# vit-pytorch: the stage outputs captured with forward hooks


def test_nest_intermediates_equal_vit_pytorch():
    """Each level's map after its blocks is vit-pytorch's `Transformer` output (blocks put
    back on the map). Measured: at most 3.6e-7 (the final features 2.6e-7)."""
    torch_model = reference("nest").NesT(**NEST3)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.NesT(**NEST3, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    levels = len(torch_model.layers)
    expected = [
        torch_outputs(
            torch_model,
            [f"layers.{i}.0"],
            x,
            lambda t, b=2 ** (levels - 1 - i): rearrange(
                t, "(n b1 b2) c h w -> n c (b1 h) (b2 w)", b1=b, b2=b
            ),
        )[0]
        for i in range(levels)
    ]
    final, outputs = model.forward_intermediates(_x(x))
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 2e-6
    tokens = model.forward_intermediates(_x(x), indices=[0], output_fmt="tokens")[1][0]
    assert rel_err(tokens, rearrange(expected[0][0], "c h w -> (h w) c")) <= 2e-6
    # the final features: the head's channel LayerNorm on the last map
    head_norm = torch_outputs(torch_model, ["mlp_head.0"], x)[0]
    assert rel_err(final, head_norm[0]) <= 2e-6


def test_twins_intermediates_equal_vit_pytorch():
    """Each stage's output is the output of vit-pytorch's stage (its last `Transformer`).
    Measured: at most 1.4e-6."""
    torch_model = reference("twins_svt").TwinsSVT(**TWINS)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.TwinsSVT(**TWINS, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    expected = torch_outputs(torch_model, [f"layers.{i}" for i in range(4)], x)
    final, outputs = model.forward_intermediates(_x(x))
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 1e-5
    assert rel_err(final, expected[-1][0]) <= 1e-5


def test_scalable_intermediates_equal_vit_pytorch():
    """Each stage's output is vit-pytorch's stage `Transformer` output (with its channel
    LayerNorm, before the downsampling). Measured: at most 6.4e-7."""
    torch_model = reference("scalable_vit").ScalableViT(**SCALABLE3)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(
        ev.ScalableViT(**SCALABLE3, key=jr.key(0)), torch_model.state_dict()
    )
    x = torch.randn(1, 3, 32, 32)
    names = [f"layers.{i}.0" for i in range(3)]
    expected = torch_outputs(torch_model, names, x)
    final, outputs = model.forward_intermediates(_x(x), indices=[2, 0, 1])
    for y, e in zip(outputs, [expected[2], expected[0], expected[1]], strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    assert rel_err(final, expected[2][0]) <= 5e-6


# ---------------------------------------------------------------------------------------
# timm: forward_intermediates, NesT's resized position embeddings


def _timm_nest(name: str, **overrides: Any) -> Any:
    """timm's `Nest` with the arguments of `name` and `overrides` (its named models fix
    their widths)."""
    import_timm()
    from timm.models.nest import Nest

    kwargs = {**ev_timm._table()["models"][name]["kwargs"], **overrides}
    torch.manual_seed(0)
    return Nest(**kwargs).eval()


def _timm_pair(name: str, **overrides: Any) -> tuple[Any, Any]:
    import_timm()
    from timm_reference import timm_model

    if name.startswith("nest_"):
        torch_model = _timm_nest(name, **overrides)
    else:
        torch_model = timm_model(name, **overrides)
    perturb_(torch_model)
    torch_model.eval()
    return torch_model, ev.from_timm(name, torch_model.state_dict(), **overrides)


@pytest.mark.parametrize("name", ["nest_tiny", "nest_tiny_jx"])
def test_nest_intermediates_equal_timm(name):
    """timm's `forward_intermediates` (its final norm on the last level only). Measured: at
    most 4.5e-7."""
    torch_model, model = _timm_pair(name, **TIMM_NEST)
    x = torch.randn(1, 3, 16, 16)
    for norm in (False, True):
        with torch.no_grad():
            final, inter = torch_model.forward_intermediates(x, indices=[0, 2], norm=norm)
        ours_final, ours = model.forward_intermediates(_x(x), indices=[0, 2], norm=norm)
        assert rel_err(ours_final, final[0].numpy()) <= 3e-6
        for y, e in zip(ours, inter, strict=True):
            assert rel_err(y, e[0].numpy()) <= 3e-6


def test_twins_intermediates_equal_timm():
    """timm's `forward_intermediates` (final norm on the last stage only; timm's final
    features are tokens, ours the same values as a map). Measured: at most 7.9e-7."""
    torch_model, model = _timm_pair("twins_svt_small", **TIMM_TWINS)
    x = torch.randn(1, 3, 64, 64)
    for norm in (False, True):
        with torch.no_grad():
            final, inter = torch_model.forward_intermediates(x, indices=[1, 3], norm=norm)
        ours_final, ours = model.forward_intermediates(_x(x), indices=[1, 3], norm=norm)
        assert rel_err(ours_final, final[0].T.reshape(ours_final.shape).numpy()) <= 5e-6
        for y, e in zip(ours, inter, strict=True):
            assert rel_err(y, e[0].numpy()) <= 5e-6
    feats = model.forward_intermediates(_x(x), indices=1, output_fmt="tokens", norm=True)[1][0]
    assert rel_err(feats, final[0].numpy()) <= 5e-6


def test_nest_set_image_size_equals_timm():
    """`set_image_size` resizes every level's `(blocks, seq, channels)` position embedding
    as timm's `resize_pos_embed` (which timm applies to a checkpoint loaded into a model of
    another size), and the resized model equals timm's model at that size with the filtered
    checkpoint. Measured: 5.3e-7 for the embeddings, 2.3e-7 for the logits."""
    torch_model, model = _timm_pair("nest_tiny", **TIMM_NEST)
    from timm.models.nest import checkpoint_filter_fn, resize_pos_embed

    resized = ev.set_image_size(model, 24)
    big = _timm_nest("nest_tiny", **{**TIMM_NEST, "img_size": 24})
    sd = checkpoint_filter_fn(torch_model.state_dict(), big)
    for i in range(len(big.levels)):  # the filter looks for the old `pos_embed_{i}` names
        key = f"levels.{i}.pos_embed"
        sd[key] = resize_pos_embed(sd[key], big.levels[i].pos_embed)
    big.load_state_dict(sd)
    for i, level in enumerate(resized.levels):
        expected = big.levels[i].pos_embed
        assert level.pos_embedding.shape == tuple(expected.shape[1:])
        assert rel_err(level.pos_embedding, expected[0].detach().numpy()) <= 5e-6
    assert resized.levels[0].block == 3 and resized.image_size == 24
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        logits = big(x)[0].numpy()
    assert rel_err(eqx.filter_jit(resized)(_x(x)), logits) <= 3e-6


def test_nest_scalar_position_embedding_resized():
    """vit-pytorch's scalar embedding (one per position of a block) is resized as a
    `block x block` map; the windows follow the new block size."""
    model = ev.NesT(**NEST, key=jr.key(0))
    resized = ev.set_image_size(model, 24)
    level = resized.levels[0]
    assert level.block == 6 and level.pos_embedding.shape == (36,)
    assert level.blocks is not None and level.blocks.blocks.attn.window == (6, 6)
    # a constant embedding stays constant
    const = eqx.tree_at(lambda m: m.levels[0].pos_embedding, model, jnp.full((16,), 0.5))
    np.testing.assert_allclose(ev.set_image_size(const, 24).levels[0].pos_embedding, 0.5, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Attention maps in image coordinates


def _check_maps(maps: list[AttentionMap], image_size: int) -> None:
    for m in maps:
        assert m.maps.ndim == 4
        cells = (image_size // m.stride[0], image_size // m.stride[1])
        assert m.maps.shape[2:] == cells, (m.name, m.maps.shape, m.stride)
        assert bool(jnp.all(jnp.isfinite(m.maps))) and bool(jnp.all(m.maps >= 0))
        assert m.on_image((image_size, image_size)).shape[2:] == (image_size, image_size)


def test_nest_image_attention():
    """One map per level, block-local attention stitched back: averaged over the queries of
    each block, the attention every block's keys receive sums to the block's pixels over
    its queries, so each block of the map sums to one."""
    model = ev.NesT(**NEST3, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 16, 16))
    maps = eqx.filter_jit(image_attention)(model, x)
    names = [m.name for m in maps]
    assert names == ["levels[0]", "levels[1]"]  # the last level has no blocks
    _check_maps(maps, 16)
    first = maps[0]
    assert first.maps.shape == (1, 1, 8, 8) and first.stride == (2, 2)
    assert maps[1].maps.shape == (2, 2, 4, 4) and maps[1].stride == (4, 4)
    # level 0: 4x4 blocks of 2x2 pixels; each block's mean-over-queries row sums to one
    sums = first.maps[0, 0].reshape(4, 2, 4, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_nest_attention_of_a_constant_map_is_uniform():
    """With the queries and keys projected to zero, every block attends uniformly: each
    pixel receives `1 / (block pixels)`."""
    model = ev.NesT(**NEST, key=jr.key(0))
    level = model.levels[0]
    assert level.blocks is not None
    attn = level.blocks.blocks.attn
    assert attn.to_qkv is not None
    w = attn.to_qkv.weight  # (depth, 3 * inner, dim): queries, keys, values
    inner = w.shape[1] // 3
    w = w.at[:, : 2 * inner].set(0.0)
    model = eqx.tree_at(lambda m: m.levels[0].blocks.blocks.attn.to_qkv.weight, model, w)
    maps = image_attention(model, jr.normal(jr.key(1), (3, 16, 16)))
    np.testing.assert_allclose(maps[0].maps, 1 / 16, rtol=1e-5)


def test_twins_image_attention():
    """Per stage a local map (windows stitched back, stride of the stage) and a global map
    on the reduced key grid (stride times `global_k`); rows of probabilities sum to one."""
    model = ev.TwinsSVT(**TWINS, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    by_name = {m.name: m for m in maps}
    assert list(by_name) == [
        "stages[0].local", "stages[0].global", "stages[1].local", "stages[1].global",
        "stages[2].local", "stages[2].global", "stages[3].global",
    ]  # fmt: skip
    _check_maps(maps, 32)
    local, glob = by_name["stages[0].local"], by_name["stages[0].global"]
    assert local.stride == (2, 2) and local.maps.shape == (2, 8, 16, 16)  # 1 + 1 blocks
    assert glob.stride == (4, 4) and glob.maps.shape == (2, 8, 8, 8)
    # the global attention of a pixel is a softmax over the reduced grid: averaged over
    # the queries it still sums to one
    np.testing.assert_allclose(glob.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    # local windows (2x2): every window's cells sum to one
    sums = local.maps.reshape(2, 8, 8, 2, 8, 2).sum(axis=(3, 5))
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    assert by_name["stages[1].local"].maps.shape == (1, 8, 8, 8)  # no blocks after the first
    last = by_name["stages[3].global"]
    assert last.maps.shape == (2, 8, 2, 2) and last.stride == (16, 16)


def test_timm_twins_image_attention():
    model = ev_timm.build("twins_svt_small", key=jr.key(0), **TIMM_TWINS)
    maps = image_attention(model, jr.normal(jr.key(1), (3, 64, 64)))
    _check_maps(maps, 64)
    last = maps[-1]
    assert last.name == "stages[3].global" and last.stride == (32, 32)
    np.testing.assert_allclose(last.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_scalable_image_attention():
    """Per stage the scalable self-attention (keys on the grid reduced by
    `reduction_factor`) and the windowed self-attention (windows stitched back)."""
    model = ev.ScalableViT(**SCALABLE, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    assert [m.name for m in maps] == [
        "stages[0].ssa",
        "stages[0].iwsa",
        "stages[1].ssa",
        "stages[1].iwsa",
    ]
    _check_maps(maps, 32)
    ssa, iwsa = maps[0], maps[1]
    assert ssa.stride == (8, 8) and ssa.maps.shape == (2, 2, 4, 4)
    assert iwsa.stride == (4, 4) and iwsa.maps.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(ssa.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    sums = iwsa.maps.reshape(2, 2, 2, 4, 2, 4).sum(axis=(3, 5))
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    # the last stage has no window: one softmax over the whole map
    np.testing.assert_allclose(maps[3].maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
