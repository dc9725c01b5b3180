"""The backbone API of the flat ViT-like models (SimpleViT, DeepViT, ParallelViT,
SmallDatasetViT, ViTWithPatchMerger, CaiT): the contract, the intermediate outputs equal to
vit-pytorch's residual stream after each block (forward hooks) and, for CaiT, to timm's
`forward_intermediates`; and their attention maps in image coordinates."""

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
from eqx_vision.layers import resample_pos_embed
from reference import perturb_, reference, rel_err
from timm_reference import import_timm, timm_model


TINY = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64)
MERGER = dict(patch_merge_layer=2, patch_merge_num_tokens=4)
CAIT_TIMM = dict(patch_embedding="conv", qkv_bias=True, talking_heads_bias=True,
                 cls_talking_heads=False, cls_norm_patches=True, layer_scale=1e-5,
                 norm_eps=1e-6, cls_mlp_dim=48)  # fmt: skip

MODELS = [
    ("SimpleViT", ev.SimpleViT, {}),
    ("DeepViT", ev.DeepViT, {}),
    ("DeepViT-mean", ev.DeepViT, dict(pool="mean")),
    ("ParallelViT", ev.ParallelViT, {}),
    ("ParallelViT-1", ev.ParallelViT, dict(num_parallel_branches=1)),
    ("SmallDatasetViT", ev.SmallDatasetViT, dict(pool="mean")),
    ("ViTWithPatchMerger", ev.ViTWithPatchMerger, MERGER),
    ("ViTWithPatchMerger-last", ev.ViTWithPatchMerger, dict(patch_merge_layer=3)),
    ("CaiT", ev.CaiT, dict(cls_depth=2)),
    ("CaiT-timm", ev.CaiT, dict(cls_depth=1, **CAIT_TIMM)),
]


def _image(seed: int = 0, size: tuple[int, int] = (32, 32)) -> jax.Array:
    return jr.normal(jr.key(seed), (3, *size))


@pytest.mark.parametrize("cls, options", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_contract(cls, options):
    model = cls(**TINY, **options, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(48, 40), bad_size=(30, 32))


def test_num_classes_zero_returns_the_pooled_features():
    x = _image()
    for _, cls, options in MODELS:
        model = cls(**{**TINY, "num_classes": 0}, **options, key=jr.key(0))
        feats = model.forward_features(x)
        np.testing.assert_array_equal(model(x), model.forward_head(feats, pre_logits=True))
        assert model(x).shape == (32,)


# (vit-pytorch module, class, extra arguments, hooked block modules)
REFERENCES = {
    "SimpleViT": ("simple_vit", "SimpleViT", {}),
    "DeepViT": ("deepvit", "DeepViT", {}),
    "ParallelViT": ("parallel_vit", "ViT", {}),
    "SmallDatasetViT": ("vit_for_small_dataset", "ViT", {}),
    "CaiT": ("cait", "CaiT", dict(cls_depth=2)),
}


def _converted(name: str, cls, options):
    module, torch_cls, extra = REFERENCES.get(name, ("vit_with_patch_merger", "ViT", {}))
    torch_model = getattr(reference(module), torch_cls)(**TINY, **extra, **options)
    perturb_(torch_model)
    torch_model.eval()
    model = cls(**TINY, **extra, **options, key=jr.key(0))
    return torch_model, ev.from_vit_pytorch(model, torch_model.state_dict())


@pytest.mark.parametrize(
    "name, cls", [("SimpleViT", ev.SimpleViT), ("DeepViT", ev.DeepViT),
                  ("ParallelViT", ev.ParallelViT), ("SmallDatasetViT", ev.SmallDatasetViT),
                  ("CaiT", ev.CaiT)],
)  # fmt: skip
def test_intermediates_equal_vit_pytorch(name, cls):
    """The tokens after each block are vit-pytorch's residual stream after each block's
    feed-forward (forward hooks; CaiT's patch transformer). Measured: at most 5e-7."""
    torch_model, model = _converted(name, cls, {})
    x = torch.randn(1, 3, 32, 32)
    stack = "patch_transformer" if name == "CaiT" else "transformer"
    names = [f"{stack}.layers.{i}.1" for i in range(3)]
    expected = torch_outputs(torch_model, names, x, residual=True)
    image = jnp.asarray(x[0].numpy())
    class_token = name in ("DeepViT", "ParallelViT", "SmallDatasetViT")
    kwargs = dict(prefix_tokens=True) if class_token else {}
    _, outputs = model.forward_intermediates(image, output_fmt="tokens", **kwargs)
    maps = model.forward_intermediates(image, intermediates_only=True)
    for out, grid, e in zip(outputs, maps, expected, strict=True):
        tokens = jnp.concatenate([out[1], out[0]]) if class_token else out
        assert rel_err(tokens, e[0]) <= 5e-6
        patches = e[0, 1:] if class_token else e[0]
        assert rel_err(grid, patches.T.reshape(32, 4, 4)) <= 5e-6
    with torch.no_grad():
        logits = torch_model(x)[0].numpy()
    assert rel_err(model(image), logits) <= 5e-6


def test_patch_merger_intermediates_equal_vit_pytorch():
    """Blocks before the merger (maps) and after it (merged tokens) are vit-pytorch's
    residual stream after each block. Measured: at most 4e-7."""
    torch_model, model = _converted("ViTWithPatchMerger", ev.ViTWithPatchMerger, MERGER)
    x = torch.randn(1, 3, 32, 32)
    expected = torch_outputs(
        torch_model, [f"transformer.layers.{i}.1" for i in range(3)], x, residual=True
    )
    image = jnp.asarray(x[0].numpy())
    final, outputs = model.forward_intermediates(image, output_fmt="tokens")
    assert len(outputs) == 2
    for y, e in zip(outputs, expected[:2], strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    merged_final, merged = model.merged_intermediates(image)
    assert merged.shape == (1, 4, 32)
    assert rel_err(merged[0], expected[2][0]) <= 5e-6
    np.testing.assert_array_equal(final, merged_final)
    with torch.no_grad():
        tokens = torch_model.transformer(
            torch_model.to_patch_embedding(x) + torch_model.pos_embedding[:, :16]
        )
    assert rel_err(final, tokens[0].numpy()) <= 5e-6


CAIT_TIMM_SMALL: dict[str, Any] = dict(
    img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=4, depth_token_only=2
)


def test_cait_intermediates_equal_timm():
    """timm's `Cait.forward_intermediates` (maps of the patch tokens after each block, with
    and without the final norm; the final tokens `norm([cls; patches])`). Measured: at
    most 6e-7."""
    import_timm()
    name = "cait_xxs24_224"
    torch_model = timm_model(name, **CAIT_TIMM_SMALL)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_timm(name, torch_model.state_dict(), **CAIT_TIMM_SMALL)
    x = torch.randn(1, 3, 32, 32)
    image = jnp.asarray(x[0].numpy())
    for norm in (False, True):
        for indices in (None, [0, 2], 2):
            with torch.no_grad():
                final, inter = torch_model.forward_intermediates(x, indices=indices, norm=norm)
            ours_final, ours = model.forward_intermediates(image, indices=indices, norm=norm)
            assert rel_err(ours_final, final[0].numpy()) <= 5e-6
            assert len(ours) == len(inter)
            for y, e in zip(ours, inter, strict=True):
                assert rel_err(y, e[0].numpy()) <= 5e-6
    with torch.no_grad():
        features = torch_model.forward_features(x)[0].numpy()
        pre = torch_model.forward_head(torch_model.forward_features(x), pre_logits=True)
    feats = model.forward_features(image)
    assert rel_err(feats, features) <= 5e-6
    assert rel_err(model.forward_head(feats, pre_logits=True), pre[0].numpy()) <= 5e-6


@pytest.mark.parametrize(
    "cls, options, prefix",
    [(ev.DeepViT, {}, 1), (ev.SmallDatasetViT, {}, 1), (ev.CaiT, dict(cls_depth=1), 0)],
)
def test_set_image_size_resamples_like_timm(cls, options, prefix):
    """The position embeddings equal timm's `resample_abs_pos_embed` (bicubic,
    antialiased, the class token's row kept). Measured: 2e-7."""
    import_timm()
    from timm.layers import resample_abs_pos_embed

    model = cls(**TINY, **options, key=jr.key(0))
    resized = ev.set_image_size(model, (48, 24))
    expected = resample_abs_pos_embed(
        torch.tensor(np.array(model.pos_embedding))[None],
        new_size=[6, 3],
        old_size=[4, 4],
        num_prefix_tokens=prefix,
    )[0].numpy()
    assert rel_err(resized.pos_embedding, expected) <= 1e-6
    assert resized(_image(size=(48, 24))).shape == (10,)


def test_patch_merger_set_image_size_keeps_the_spare_row():
    model = ev.ViTWithPatchMerger(**TINY, **MERGER, key=jr.key(0))
    resized = ev.set_image_size(model, (16, 24))
    assert resized.pos_embedding.shape == (2 * 3 + 1, 32)
    np.testing.assert_array_equal(resized.pos_embedding[-1], model.pos_embedding[-1])
    expected = resample_pos_embed(model.pos_embedding[:-1], (2, 3), (4, 4))
    np.testing.assert_array_equal(resized.pos_embedding[:-1], expected)


def test_simple_vit_set_image_size_uses_the_new_grid():
    model = ev.SimpleViT(**TINY, key=jr.key(0))
    resized = ev.set_image_size(model, (16, 40))
    assert resized.grid == (2, 5)
    assert resized.forward_features(_image(size=(16, 40))).shape == (10, 32)


def test_reset_head_keeps_the_body():
    for _, cls, options in MODELS:
        model = cls(**TINY, **options, key=jr.key(0))
        new = ev.reset_head(model, 5, key=jr.key(3))
        assert new(_image()).shape == (5,)
        np.testing.assert_array_equal(
            new.forward_features(_image()), model.forward_features(_image())
        )


# -- attention maps -----------------------------------------------------------------------


def _maps(model, image):
    return eqx.filter_jit(image_attention)(model, image)


# the groups of maps of each model of MODELS: (name, layers)
GROUPS = {
    "ParallelViT": [("transformer.attn[0]", 3), ("transformer.attn[1]", 3)],
    "ViTWithPatchMerger": [("transformer", 2), ("patch_merger", 1), ("merged_transformer", 1)],
    "ViTWithPatchMerger-last": [("transformer", 3), ("patch_merger", 1)],
    "CaiT": [("patch_transformer", 3), ("cls_transformer", 2)],
    "CaiT-timm": [("patch_transformer", 3), ("cls_transformer", 1)],
}


@pytest.mark.parametrize("name, cls, options", MODELS, ids=[m[0] for m in MODELS])
def test_attention_map_shapes(name, cls, options):
    model = cls(**TINY, **options, key=jr.key(0))
    maps = _maps(model, _image())
    heads = {"patch_merger": options.get("patch_merge_num_tokens", 8)}  # the merger's queries
    assert [(m.name, m.maps.shape[0]) for m in maps] == GROUPS.get(name, [("transformer", 3)])
    for m in maps:
        assert m.maps.shape[1:] == (heads.get(m.name, 2), 4, 4) and m.stride == (8, 8)
        assert np.all(np.isfinite(np.asarray(m.maps)))
        assert m.on_image((32, 32)).shape == (*m.maps.shape[:2], 32, 32)


def test_softmax_maps_sum_to_one():
    """Mean over queries of softmax rows sums to one over the grid; so do the merger's
    queries, the merged blocks carried back through them, and the class token's row in
    LSA (its score with itself is masked)."""
    x = _image()
    for cls, options in [(ev.SimpleViT, {}), (ev.ViTWithPatchMerger, MERGER),
                         (ev.SmallDatasetViT, {}), (ev.ViT, dict(pool="mean"))]:  # fmt: skip
        for m in _maps(cls(**TINY, **options, key=jr.key(0)), x):
            np.testing.assert_allclose(m.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5, err_msg=m.name)
    # a class token's row leaves out its attention to itself: below one
    for cls, options in [
        (ev.ViT, {}),
        (ev.DeepViT, {}),
        (ev.ParallelViT, {}),
        (ev.CaiT, dict(cls_depth=2, **CAIT_TIMM)),
    ]:
        maps = _maps(cls(**TINY, **options, key=jr.key(0)), x)
        m = maps[-1]
        if cls is not ev.DeepViT:  # re-attention is not a softmax
            total = np.asarray(m.maps.sum(axis=(2, 3)))
            assert np.all(total < 1.0) and np.all(total > 0.0), m.name


def test_maps_equal_the_attention_probabilities():
    """The class token's map is row 0 of `attention_maps`, the merger's its softmax."""
    from eqx_vision.inspect import attention_maps

    x = _image()
    for cls in (ev.ViT, ev.DeepViT, ev.SmallDatasetViT):
        model = cls(**TINY, key=jr.key(0))
        (m,) = _maps(model, x)
        probs = attention_maps(model, x)
        np.testing.assert_allclose(
            m.maps, probs[:, :, 0, 1:].reshape(3, 2, 4, 4), rtol=1e-5, atol=1e-7
        )
    model = ev.ViTWithPatchMerger(**TINY, **MERGER, key=jr.key(0))
    merge = _maps(model, x)[1].maps
    tokens = model.transformer(model.embed(x))
    normed = model.patch_merger.norm(tokens)
    sim = model.patch_merger.queries @ normed.T * 32**-0.5
    np.testing.assert_allclose(
        merge[0].reshape(4, 16), jax.nn.softmax(sim, axis=-1), rtol=1e-5, atol=1e-7
    )


def test_parallel_branches_are_their_own_maps():
    """Each branch's map is that branch's attention: with the second branch's query
    projection zeroed, its scores are all equal and its map is uniform."""
    model = ev.ParallelViT(**TINY, key=jr.key(0))
    blocks: Any = model.transformer.layers.blocks
    q = blocks.attn.branches.to_qkv.weight
    dim_inner = q.shape[-2] // 3
    zeroed = q.at[:, 1, :dim_inner].set(0.0)
    model = eqx.tree_at(
        lambda m: m.transformer.layers.blocks.attn.branches.to_qkv.weight, model, zeroed
    )
    first, second = _maps(model, _image())
    np.testing.assert_allclose(second.maps, 1.0 / 17, rtol=1e-5)
    assert not np.allclose(first.maps, 1.0 / 17, rtol=1e-3)


def test_constant_image_gives_uniform_cait_class_attention():
    """On a constant image with a constant position table, every patch token is the same,
    so the class token attends to all of them alike (timm's class attention, no talking
    heads: a softmax whose patch entries are equal)."""
    model = ev.CaiT(**TINY, cls_depth=2, **CAIT_TIMM, key=jr.key(0))
    model = eqx.tree_at(lambda m: m.pos_embedding, model, jnp.zeros_like(model.pos_embedding))
    patches, cls = _maps(model, jnp.ones((3, 32, 32)))
    flat = np.asarray(cls.maps).reshape(-1, 16)
    np.testing.assert_allclose(flat, flat[..., :1] * np.ones(16), rtol=1e-5)
    np.testing.assert_allclose(
        patches.maps, patches.maps[:, :, :1, :1] * np.ones((4, 4)), rtol=1e-4
    )
