"""The backbone API of the two-branch models CrossViT and TimmCrossViT: the contract, the
patch tokens of each branch after each multi-scale block equal to vit-pytorch's (forward
hooks) and to timm's `forward_intermediates`, `set_image_size` against timm's
`resample_abs_pos_embed`, and the attention maps of `eqx_vision.inspect`."""

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
from eqx_vision.inspect import image_attention
from reference import perturb_, reference, rel_err
from timm_reference import import_timm, timm_model


TINY = dict(
    image_size=32,
    num_classes=5,
    sm_dim=16,
    lg_dim=24,
    sm_patch_size=4,
    lg_patch_size=8,
    sm_enc_depth=1,
    lg_enc_depth=2,
    sm_enc_heads=2,
    lg_enc_heads=2,
    sm_enc_mlp_dim=32,
    lg_enc_mlp_dim=32,
    sm_enc_dim_head=8,
    lg_enc_dim_head=8,
    cross_attn_depth=2,
    cross_attn_heads=2,
    cross_attn_dim_head=8,
    depth=2,
)

TIMM_TINY: dict[str, Any] = dict(
    image_size=24,
    num_classes=3,
    dims=(8, 16),
    patch_sizes=(12, 8),
    heads=(2, 2),
    mlp_ratios=(2.0, 2.0),
    image_scales=(1.0, 2 / 3),
)

# timm's reduced configurations (as tests/test_timm_cross_vit.py): a stack of equal
# blocks, blocks of different depths run one after the other, the multi-conv embedding
SMALL = dict(embed_dim=[16, 32], num_heads=[2, 4], num_classes=5)
TIMM_CONFIGS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "stacked": ("crossvit_tiny_240", 48,
                dict(SMALL, img_size=48, img_scale=[1.0, 2 / 3], depth=[[1, 2, 0], [1, 2, 0]])),
    "unequal": ("crossvit_tiny_240", 48,
                dict(SMALL, img_size=48, img_scale=[1.0, 2 / 3], depth=[[1, 2, 0], [1, 1, 2]])),
    "dagger": ("crossvit_9_dagger_240", 72,
               dict(SMALL, img_size=72, img_scale=[1.0, 2 / 3], depth=[[1, 1, 0], [1, 1, 0]])),
}  # fmt: skip


def test_contract_cross_vit():
    model = ev.CrossViT(**TINY, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(48, 40), bad_size=(36, 32))


@pytest.mark.parametrize(
    "depth, options",
    [
        (((1, 1, 0), (1, 1, 0)), {}),
        (((1, 2, 0), (1, 1, 2)), dict(pool="mean", crop_scale=True)),
        (((2, 1), (2, 1)), dict(dims=(8,), patch_sizes=(12,), heads=(2,), mlp_ratios=(2.0,),
                         image_scales=(1.0,), num_classes=0)),
    ],
)  # fmt: skip
def test_contract_timm_cross_vit(depth, options):
    model = ev.TimmCrossViT(**{**TIMM_TINY, **options}, depth=depth, key=jr.key(0))
    # the second branch sees 2/3 of the image: 36 -> 24 (three 8-pixel patches), 30 -> 20
    check_backbone(model, (24, 24), new_size=(36, 48), bad_size=(30, 24))


def test_feature_info_is_branch_major():
    model = ev.TimmCrossViT(**TIMM_TINY, depth=((1, 1, 0),) * 3, key=jr.key(0))
    info = model.feature_info
    assert [(i.name, i.channels) for i in info] == [
        ("blocks[0][0]", 8), ("blocks[1][0]", 8), ("blocks[2][0]", 8),
        ("blocks[0][1]", 16), ("blocks[1][1]", 16), ("blocks[2][1]", 16),
    ]  # fmt: skip
    # the second branch's 8-pixel patches of a 2/3 image: 12 image pixels per cell
    assert {i.reduction for i in info} == {(12, 12)}
    cross = ev.CrossViT(**TINY, key=jr.key(0))
    assert [i.reduction for i in cross.feature_info] == [(4, 4)] * 2 + [(8, 8)] * 2


def test_intermediates_equal_vit_pytorch():
    """Each branch's tokens after each multi-scale block are vit-pytorch's outputs of the
    block's cross transformer (forward hooks); the logits are its logits. Measured: at
    most 1.1e-6."""
    config = {**TINY, "dropout": 0.0, "emb_dropout": 0.0}
    torch_model = reference("cross_vit").CrossViT(**config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.CrossViT(**config, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    names = [f"multi_scale_encoder.layers.{i}.2" for i in range(2)]
    expected = [
        torch_outputs(torch_model, names, x, lambda out, b=b: out[b]) for b in range(2)
    ]  # per branch, per block
    final, outputs = model.forward_intermediates(
        jnp.asarray(x[0].numpy()), output_fmt="tokens", prefix_tokens=True
    )
    errors = []
    for index, (patches, cls) in enumerate(outputs):
        branch, block = divmod(index, 2)
        errors.append(rel_err(jnp.concatenate([cls, patches]), expected[branch][block][0]))
    for branch in range(2):
        errors.append(rel_err(final[branch], expected[branch][-1][0]))
    with torch.no_grad():
        logits = torch_model(x)[0].numpy()
    errors.append(rel_err(model.forward_head(final), logits))
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_intermediates_equal_timm(name):
    """timm's `forward_intermediates` (maps of the patch tokens, branch-major, with and
    without the final norms; the final normalised tokens). Measured: at most 1.1e-6
    (stacked, unequal), 5.3e-7 (dagger)."""
    import_timm()
    timm_name, size, overrides = TIMM_CONFIGS[name]
    torch_model = timm_model(timm_name, **overrides)
    perturb_(torch_model)
    model = eqx.nn.inference_mode(ev.from_timm(timm_name, torch_model.state_dict(), **overrides))
    x = torch.randn(1, 3, size, size)
    count = 2 * len(overrides["depth"])
    indices = [0, count - 1, 1]
    errors = []
    for norm in (False, True):
        with torch.no_grad():
            final, inter = torch_model.forward_intermediates(x, indices=indices, norm=norm)
        ours_final, ours = model.forward_intermediates(
            jnp.asarray(x[0].numpy()), indices=indices, norm=norm
        )
        # timm returns its outputs sorted by index, ours in the order asked for
        for y, e in zip([ours[0], ours[2], ours[1]], inter, strict=True):
            errors.append(rel_err(y, e[0].numpy()))
        errors += [rel_err(o, f[0].numpy()) for o, f in zip(ours_final, final, strict=True)]
    assert max(errors) <= 1e-5, errors


def _timm_pos(torch_model: Any, i: int) -> np.ndarray:
    return getattr(torch_model, f"pos_embed_{i}")[0].detach().numpy()


def test_set_image_size_equals_timm():
    """timm's CrossVit has no `set_input_size`; a model built for the new size, its
    position embeddings resampled by timm's `resample_abs_pos_embed` (each branch on its
    own grid, the class token kept apart), is what `set_image_size` gives: the same
    embeddings and logits. Measured: 1.9e-7 (embeddings), 1.7e-6 (logits)."""
    timm = import_timm()
    from timm.layers import resample_abs_pos_embed

    timm_name, _, overrides = TIMM_CONFIGS["stacked"]
    torch_model = timm_model(timm_name, **overrides)
    perturb_(torch_model)
    model = ev.from_timm(timm_name, torch_model.state_dict(), **overrides)
    resized = ev.set_image_size(model, (72, 96))
    assert [e.size for e in resized.embeddings] == [(72, 96), (48, 64)]
    bigger = timm.create_model(timm_name, **{**overrides, "img_size": (72, 96)}).eval()
    state = torch_model.state_dict()
    # 12- and 16-pixel patches; the second branch sees 2/3 of the image
    old_grids, new_grids = [(4, 4), (2, 2)], [(6, 8), (3, 4)]
    for i in range(2):
        with torch.no_grad():
            pos = resample_abs_pos_embed(
                getattr(torch_model, f"pos_embed_{i}"),
                new_size=list(new_grids[i]),
                old_size=list(old_grids[i]),
                num_prefix_tokens=1,
            )
        state[f"pos_embed_{i}"] = pos
        assert rel_err(resized.embeddings[i].pos_embedding, pos[0].numpy()) <= 1e-6
    bigger.load_state_dict(state)
    x = torch.randn(1, 3, 72, 96)
    with torch.no_grad():
        expected = bigger(x)[0].numpy()
    infer = eqx.nn.inference_mode(resized)
    assert rel_err(eqx.filter_jit(infer)(jnp.asarray(x[0].numpy())), expected) <= 1e-5


def test_set_image_size_cross_vit_resamples_each_branch():
    """Each branch's embeddings are timm's `resample_abs_pos_embed` of its own on its
    grid (non-square here). Measured: 4.3e-7."""
    import_timm()
    from timm.layers import resample_abs_pos_embed

    model = ev.CrossViT(**TINY, key=jr.key(0))
    resized = ev.set_image_size(model, (48, 40))
    for old, new, grid in (
        (model.sm_image_embedder, resized.sm_image_embedder, (12, 10)),
        (model.lg_image_embedder, resized.lg_image_embedder, (6, 5)),
    ):
        pos = torch.from_numpy(np.array(old.pos_embedding))[None]
        expected = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)[0]
        assert rel_err(new.pos_embedding, expected.numpy()) <= 3e-6
    with pytest.raises(ValueError, match="lg_patch_size|patch_size"):
        ev.set_image_size(model, (36, 32))


def test_reset_head_keeps_the_body():
    model = ev.CrossViT(**TINY, key=jr.key(0))
    new = ev.reset_head(model, 7, key=jr.key(3))
    assert new.sm_mlp_head is not None and new.sm_mlp_head.weight.shape == (7, 16)
    assert new.lg_mlp_head is not None and new.lg_mlp_head.weight.shape == (7, 24)
    np.testing.assert_array_equal(new.sm_head_norm.weight, model.sm_head_norm.weight)
    headless = ev.reset_head(model, 0)
    assert headless.sm_mlp_head is None and headless.lg_mlp_head is None
    timm_model_ = ev.TimmCrossViT(**TIMM_TINY, depth=((1, 1, 0),), key=jr.key(0))
    heads = ev.reset_head(timm_model_, 4, key=jr.key(1)).mlp_heads
    assert heads is not None and [h.weight.shape for h in heads] == [(4, 8), (4, 16)]


# attention maps


def _grid_sums(maps: jax.Array) -> np.ndarray:
    return np.asarray(maps.sum(axis=(-2, -1)))


def test_attention_maps_cross_vit():
    """Per branch its encoders' class-token rows, then the cross attention of each class
    token over the other branch's patches. A self-attention row over the patches sums to
    one less the class token's own weight; the cross maps likewise."""
    model = ev.CrossViT(**TINY, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    shapes = [(m.name, m.maps.shape, m.stride) for m in maps]
    assert shapes == [
        ("multi_scale_encoder.sm_enc", (2, 2, 8, 8), (4, 4)),
        ("multi_scale_encoder.lg_enc", (4, 2, 4, 4), (8, 8)),
        ("multi_scale_encoder.cross_attend.sm_attend_lg", (4, 2, 4, 4), (8, 8)),
        ("multi_scale_encoder.cross_attend.lg_attend_sm", (4, 2, 8, 8), (4, 4)),
    ]
    for m in maps:
        sums = _grid_sums(m.maps)
        assert np.all(sums > 0) and np.all(sums < 1 + 1e-5)
        assert m.on_image((32, 32)).shape == (m.maps.shape[0], m.maps.shape[1], 32, 32)


def _zero_queries(model: Any) -> Any:
    """`model` with every query projection (weights and biases) zero: every attention
    softmax is uniform."""

    def zero(path: Any, leaf: Any) -> Any:
        query = eqx.is_array(leaf) and ".to_q" in jax.tree_util.keystr(path)
        return jnp.zeros_like(leaf) if query else leaf

    return jax.tree_util.tree_map_with_path(zero, model)


def _check_uniform(maps: list[Any]) -> None:
    """Under uniform attention each cell gets `1 / (1 + cells)` (the class token, the
    only other key, the rest)."""
    for m in maps:
        cells = m.maps.shape[-2] * m.maps.shape[-1]
        np.testing.assert_allclose(np.asarray(m.maps), 1 / (1 + cells), rtol=1e-5)


def test_attention_maps_cross_vit_with_uniform_attention():
    model = _zero_queries(ev.CrossViT(**TINY, key=jr.key(0)))
    _check_uniform(image_attention(model, jr.normal(jr.key(1), (3, 32, 32))))


def test_attention_maps_timm_cross_vit():
    model = ev.TimmCrossViT(**TIMM_TINY, depth=((1, 2, 0), (1, 1, 2)), key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 24, 24))
    maps = eqx.filter_jit(image_attention)(model, x)
    shapes = [(m.name, m.maps.shape, m.stride) for m in maps]
    assert shapes == [
        ("blocks.encoders[0]", (2, 2, 2, 2), (12, 12)),
        ("blocks.encoders[1]", (3, 2, 2, 2), (12, 12)),
        ("blocks.fusions[0]", (2, 2, 2, 2), (12, 12)),
        ("blocks.fusions[1]", (2, 2, 2, 2), (12, 12)),
    ]
    for m in maps:
        sums = _grid_sums(m.maps)
        assert np.all(sums > 0) and np.all(sums < 1 + 1e-5)
    _check_uniform(image_attention(_zero_queries(model), x))
