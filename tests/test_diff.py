"""`eqx_vision.interop.diff`: a converted model agrees with its torch reference block by
block, and a weight perturbed in block k makes block k the first divergence."""

import inspect
from typing import Any

import equinox as eqx
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import RECIPES, Report, diff, timm as timm_interop
from eqx_vision.training import is_stateful
from reference import perturb_, reference
from timm_reference import import_timm, timm_model
from tiny import config, input_shape


TINY = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64)
TIMM_TINY: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def vit_pytorch_vit():
    torch_model = reference("vit").ViT(**TINY)
    perturb_(torch_model)
    return torch_model, ev.from_vit_pytorch(ev.ViT(**TINY, key=jr.key(0)), torch_model.state_dict())


def timm_vit(name):
    import_timm()
    torch_model = timm_model(name, **TIMM_TINY)
    perturb_(torch_model)
    return torch_model, ev.from_timm(name, torch_model.state_dict(), **TIMM_TINY)


def images(batch=2, seed=0, size=32):
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def perturb_block(model, k, scale=0.05):
    """`model` with row k of its stacked first feed-forward weight changed."""
    where = lambda m: m.transformer.layers.blocks.ff.fc1.weight  # noqa: E731
    return eqx.tree_at(where, model, where(model).at[k].add(scale))


def check_diverges_at(report, model, k):
    names = [info.name for info in model.feature_info]
    first = report.first_divergence
    assert first is not None and first.name == names[k] and first.index == k, str(report)
    for row in report.rows:
        if row.index is not None and row.index < k or row.name == "embed":
            assert row.ok, str(report)
    assert [row.ok for row in report.rows if row.index is not None][k:] == [False] * (
        len(names) - k
    )
    assert not report.ok
    assert f"first divergence: {names[k]}" in str(report)


CASES = {
    "vit_pytorch": vit_pytorch_vit,
    "timm_vit": lambda: timm_vit("vit_small_patch16_224"),
    "timm_deit_distilled": lambda: timm_vit("deit_tiny_distilled_patch16_224"),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request):
    return CASES[request.param]()


def test_converted_model_agrees(converted):
    """Every block, the embedding, the features and the logits. Measured: at most 1.3e-6
    relative."""
    torch_model, model = converted
    report = diff(torch_model, model, images())
    assert isinstance(report, Report) and report.ok, str(report)
    names = [row.name for row in report.rows]
    blocks = [info.name for info in model.feature_info]
    assert names == ["embed", *blocks, "features", "output"]
    for row in report.rows:
        assert row.rel <= 1e-5 and row.max_abs >= 0, str(report)
        assert row.shape[0] == 2
    assert "all 6 outputs agree" in str(report)


def test_perturbed_block_is_the_first_divergence(converted):
    torch_model, model = converted
    for k in (0, 2):
        check_diverges_at(diff(torch_model, perturb_block(model, k), images()), model, k)


def test_one_image_torch_input_and_modes_restored():
    torch_model, model = vit_pytorch_vit()
    torch_model.train()
    x = torch.from_numpy(images(1)[0])
    report = diff(torch_model, model, x)
    assert report.ok and report.rows[0].shape == (1, 17, 32)
    assert torch_model.training  # the reference's mode is restored
    assert all(not p.grad_fn for p in torch_model.parameters())


def test_tolerance():
    torch_model, model = vit_pytorch_vit()
    model = perturb_block(model, 1, scale=3e-3)
    report = diff(torch_model, model, images())
    assert report.first_divergence is not None and report.first_divergence.index == 1
    assert diff(torch_model, model, images(), tol=0.1).ok
    with pytest.raises(ValueError, match="tol"):
        diff(torch_model, model, images(), tol=-1.0)


def test_vit_pytorch_without_head_compares_the_tokens():
    config = {**TINY, "num_classes": 0}
    torch_model = reference("vit").ViT(**config)
    model = ev.from_vit_pytorch(ev.ViT(**config, key=jr.key(0)), torch_model.state_dict())
    report = diff(torch_model, model, images())
    assert report.ok and report.rows[-1].name == "features"


def test_unsupported_reference_class():
    with pytest.raises(TypeError, match=r"torch.nn.modules.linear.Linear.*vit_pytorch.vit.ViT"):
        diff(torch.nn.Linear(2, 2), ev.ViT(**TINY, key=jr.key(0)), images())
    torch_model = reference("vit").ViT(**TINY)
    simple = ev.SimpleViT(**{k: v for k, v in TINY.items()}, key=jr.key(0))
    with pytest.raises(TypeError, match="ViT; got SimpleViT"):
        diff(torch_model, simple, images())


def test_model_and_reference_shape_mismatch():
    torch_model = reference("vit").ViT(**TINY)
    with pytest.raises(ValueError, match=r"\(2, 17, 32\) in the reference"):
        diff(torch_model, ev.ViT(**{**TINY, "dim": 48}, key=jr.key(0)), images())
    with pytest.raises(ValueError, match="3 blocks.*4 outputs"):
        diff(torch_model, ev.ViT(**{**TINY, "depth": 4}, key=jr.key(0)), images())
    with pytest.raises(ValueError, match="one image"):
        diff(torch_model, ev.ViT(**TINY, key=jr.key(0)), images()[0, 0])


def test_recipes_name_module_and_class():
    assert {"vit_pytorch.vit.ViT", "timm.models.vision_transformer.VisionTransformer"} <= set(
        RECIPES
    )
    assert all(name.startswith(("vit_pytorch.", "timm.models.")) for name in RECIPES)
    # every model class that loads a vit-pytorch checkpoint can be compared with it
    from eqx_vision.interop.vit_pytorch import CONVERTERS

    layers = {ev.LSA, ev.SPT, ev.PatchMerger}
    covered = {cls for recipe in RECIPES.values() for cls in recipe.models}
    assert set(CONVERTERS) - layers <= covered


# vit-pytorch module, class, overrides of the tiny preset (at least two blocks or stages)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ViT": ("vit", "ViT", dict(depth=2)),
    "SimpleViT": ("simple_vit", "SimpleViT", dict(depth=2)),
    "DeepViT": ("deepvit", "DeepViT", dict(depth=2)),
    "ParallelViT": ("parallel_vit", "ViT", dict(depth=2)),
    "SmallDatasetViT": ("vit_for_small_dataset", "ViT", dict(depth=2)),
    "ViTWithPatchMerger": ("vit_with_patch_merger", "ViT", dict(depth=3, patch_merge_layer=2)),
    "CaiT": ("cait", "CaiT", dict(depth=2)),
    "NesT": ("nest", "NesT", {}),
    "TwinsSVT": ("twins_svt", "TwinsSVT", {}),
    "ScalableViT": ("scalable_vit", "ScalableViT", {}),
    "T2TViT": ("t2t", "T2TViT", {}),
    "PiT": ("pit", "PiT", {}),
    "RegionViT": ("regionvit", "RegionViT", {}),
    "LeViT": ("levit", "LeViT", {}),
    "CvT": ("cvt", "CvT", {}),
    "CrossFormer": ("crossformer", "CrossFormer", {}),
    "CrossViT": ("cross_vit", "CrossViT", dict(depth=2)),
}
SMALL_CROSSVIT: dict[str, Any] = dict(
    img_size=48, img_scale=[1.0, 2 / 3], patch_size=[12, 16], embed_dim=[16, 32],
    num_heads=[2, 2], mlp_ratio=[2, 2], depth=[[1, 1, 0], [1, 1, 0]],
)  # fmt: skip
TIMM_LEVIT: dict[str, Any] = dict(
    img_size=64, embed_dim=[32, 48], depth=[1, 2], num_heads=[2, 3], key_dim=8
)
# timm name, size, overrides
TIMM_FAMILIES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "vit": ("vit_small_patch16_224", 32, dict(TIMM_TINY, depth=2)),
    "crossvit": ("crossvit_tiny_240", 48, SMALL_CROSSVIT),
    "pit": ("pit_ti_224", 32, dict(img_size=32, base_dims=[8, 8, 8], depth=[1, 2, 1],
                                   heads=[1, 2, 4])),
    "levit": ("levit_128s", 64, TIMM_LEVIT),
    "levit_conv": ("levit_conv_128s", 64, TIMM_LEVIT),
    "cait": ("cait_xxs24_224", 32, dict(TIMM_TINY, depth=2, depth_token_only=1)),
    "nest": ("nest_tiny", 16, dict(img_size=16, patch_size=2, embed_dims=(8, 16, 32),
                                   num_heads=(2, 4, 4), depths=(1, 2, 1))),
    "twins": ("twins_svt_small", 64, dict(img_size=64, embed_dims=[16, 32, 32, 48],
              num_heads=[2, 2, 4, 3], mlp_ratios=[2, 4, 4, 2], depths=[2, 2, 2, 2],
              wss=[4, 4, 2, 2], sr_ratios=[4, 2, 2, 1], num_classes=10)),
}  # fmt: skip


def vit_pytorch_family(name):
    module, cls, overrides = FAMILIES[name]
    c = config(name, **overrides)
    torch_cls = getattr(reference(module), cls)
    accepted = inspect.signature(torch_cls).parameters
    torch_model = torch_cls(**{k: v for k, v in c.kwargs.items() if k in accepted})
    perturb_(torch_model)
    template, state = c.build(jr.key(0))
    if is_stateful(template):
        model, state = ev.from_vit_pytorch(template, torch_model.state_dict(), state=state)
    else:
        model, state = ev.from_vit_pytorch(template, torch_model.state_dict()), None
    x = np.random.default_rng(1).normal(size=(2, *input_shape(name))).astype(np.float32)
    return torch_model, model, state, x


def timm_family(name):
    import_timm()
    timm_name, size, overrides = TIMM_FAMILIES[name]
    if name == "nest":  # built from its class, as tests/test_backbone_windowed.py does
        from timm.models.nest import Nest

        kwargs = timm_interop._table()["models"][timm_name]["kwargs"]
        torch_model = Nest(**{**kwargs, **overrides})
    else:
        torch_model = timm_model(timm_name, **overrides)
    perturb_(torch_model)
    model = ev.from_timm(timm_name, torch_model.state_dict(), **overrides)
    model, state = model if isinstance(model, tuple) else (model, None)  # TimmLeViT
    return torch_model, model, state, images(size=size)


def check_family(torch_model, model, state, x):
    """The converted model agrees; with the reference's last computed block perturbed (the
    parameters of its tap's module), the first output read from that module is the first
    divergence, the outputs before it agree."""
    report = diff(torch_model, model, x, state=state)
    assert report.ok, str(report)
    recipe = RECIPES[f"{type(torch_model).__module__}.{type(torch_model).__qualname__}"]
    taps = recipe.blocks(torch_model)
    blocks = [(row.index, row) for row in report.rows if row.index is not None]
    assert sorted(index for index, _ in blocks) == list(range(len(model.feature_info)))
    target = taps[blocks[-1][0]].module
    expected = next(row for index, row in blocks if taps[index].module == target)
    with torch.no_grad():
        for p in torch_model.get_submodule(target).parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    report = diff(torch_model, model, x, state=state)
    first = report.first_divergence
    assert first is not None and first.index == expected.index, str(report)
    position = report.rows.index(first)
    assert position > 0 and all(row.ok for row in report.rows[:position]), str(report)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vit_pytorch_family(name):
    """Each vit-pytorch family with a recipe, on its tiny preset, within `diff`'s default
    tolerance (1e-4; the per-family parity errors are those of the backbone tests)."""
    check_family(*vit_pytorch_family(name))


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_timm_family(name):
    """Each timm family with a recipe, on a reduced configuration."""
    check_family(*timm_family(name))
