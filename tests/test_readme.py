"""The usage snippets of README.md ("Usage of each system"), one per architecture: the
snippet's configuration is the architecture's `-reference` preset, which builds with the
snippet's parameter count (that of the vit-pytorch module) and runs on a full-size image."""

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_vision as ev
from compilation import compile_optimized
from eqx_vision.presets import CATALOGUE, resolve_model
from eqx_vision.training import is_stateful
from reference import count_params, reference, torch_param_count


README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = [a.model for a in CATALOGUE]
SLUGS = {a.model: a.slug for a in CATALOGUE}

# The vit-pytorch module and class of each architecture, and the snippet's parameter count.
TORCH: dict[str, tuple[str, str, int]] = {
    "ViT": ("vit", "ViT", 54_630_376),
    "SimpleViT": ("simple_vit", "SimpleViT", 54_556_648),
    "CaiT": ("cait", "CaiT", 121_839_592),
    "CrossFormer": ("crossformer", "CrossFormer", 28_780_740),
    "CrossViT": ("cross_vit", "CrossViT", 55_180_176),
    "CvT": ("cvt", "CvT", 17_970_216),
    "DeepViT": ("deepvit", "DeepViT", 54_632_104),
    "LeViT": ("levit", "LeViT", 17_348_972),
    "NesT": ("nest", "NesT", 16_520_692),
    "ParallelViT": ("parallel_vit", "ViT", 77_674_472),
    "ViTWithPatchMerger": ("vit_with_patch_merger", "ViT", 77_687_272),
    "PiT": ("pit", "PiT", 47_499_752),
    "RegionViT": ("regionvit", "RegionViT", 12_749_176),
    "ScalableViT": ("scalable_vit", "ScalableViT", 75_917_544),
    "T2TViT": ("t2t", "T2TViT", 23_465_986),
    "TwinsSVT": ("twins_svt", "TwinsSVT", 252_025_096),
    "SmallDatasetViT": ("vit_for_small_dataset", "ViT", 55_612_910),
}

# What the snippets show of a model beyond its output: its derived sizes.
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "PiT": {"grid_sizes": (31, 16, 8)},
    "T2TViT": {"grid_sizes": (56, 28, 14)},
    "TwinsSVT": {"size_multiple": 224, "min_size": 224},
}


def _class_name(call: ast.Call) -> str | None:
    """`X` for a call of `ev.X(...)` or of `eqx.nn.make_with_state(ev.X)(...)`."""
    func = call.func
    if isinstance(func, ast.Call) and func.args:  # make_with_state(ev.X)
        func = func.args[0]
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        if func.value.id == "ev" and func.attr[0].isupper():
            return func.attr
    return None


def snippet_arguments() -> dict[str, dict[str, Any]]:
    """The keyword arguments (all but `key`) of the first construction of every class in
    the README's usage snippets, by class name."""
    text = README.read_text(encoding="utf-8")
    usage = text[text.index("## Usage of each system") :]
    usage = usage[: usage.index("\n## ", 1)]
    found: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```python\n(.*?)```", usage, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            name = _class_name(node) if isinstance(node, ast.Call) else None
            if name is not None and isinstance(node, ast.Call):
                found.setdefault(name, {
                    k.arg: ast.literal_eval(k.value)
                    for k in node.keywords
                    if k.arg is not None and k.arg != "key"
                })  # fmt: skip
    return found


def test_every_architecture_has_a_snippet_with_its_reference_configuration():
    """The snippet's arguments are the preset's, where the preset spells out a default."""
    snippets = snippet_arguments()
    for name in NAMES:
        preset = resolve_model(f"{SLUGS[name]}-reference", num_classes=1000, data_channels=3)
        defaults = {
            k: p.default
            for k, p in inspect.signature(preset.cls).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        kwargs = {**defaults, **preset.kwargs}
        assert set(snippets[name]) <= set(kwargs), name
        assert {**defaults, **snippets[name]} == kwargs, name
    assert sorted(TORCH) == sorted(NAMES)


def _forward(name: str) -> Callable[..., Any]:
    """The inference-mode forward pass, compiled (Twins-SVT fully optimised)."""

    def run(model, state, x):
        return model(x, state)[0] if is_stateful(model) else model(x)

    if name == "TwinsSVT":
        return lambda m, s, x: compile_optimized(run, m, s, x)(m, s, x)
    return eqx.filter_jit(run)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_readme_snippet(name):
    config = resolve_model(f"{SLUGS[name]}-reference", num_classes=1000, data_channels=3)
    built: tuple[Any, Any] = config.build(jax.random.key(1))
    model, state = built
    for attribute, value in ATTRIBUTES.get(name, {}).items():
        assert getattr(model, attribute) == value, attribute
    module, cls, count = TORCH[name]
    kwargs = {k: v for k, v in config.kwargs.items() if k != "channels"}
    assert count_params(model) == torch_param_count(getattr(reference(module), cls)(**kwargs))
    assert count_params(model) == count
    image = jax.random.normal(jax.random.key(0), (config.channels, *config.image_size))
    logits = _forward(name)(eqx.nn.inference_mode(model), state, image)
    assert isinstance(logits, jax.Array) and logits.shape == (1000,)
    assert bool(jnp.all(jnp.isfinite(logits)))
    if name == "ViT":  # a batch in inference mode, one image in training mode
        infer = eqx.nn.inference_mode(model)
        out = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(infer, jnp.ones((1, 3, 256, 256)))
        assert out.shape == (1, 1000)
        assert model(jnp.ones((3, 256, 256)), key=jax.random.key(1)).shape == (1000,)


@pytest.mark.slow
def test_readme_snippet_patch_merger_alone():
    merger = ev.PatchMerger(dim=1024, num_tokens_out=8, key=jax.random.key(2))
    features = jax.random.normal(jax.random.key(5), (4, 256, 1024))
    merged = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(merger, features)
    assert merged.shape == (4, 8, 1024)
    expected = torch_param_count(reference("vit_with_patch_merger").PatchMerger(1024, 8))
    assert count_params(merger) == expected == 10_240


@pytest.mark.slow
def test_readme_snippet_spt_alone():
    spt = ev.SPT(dim=1024, patch_size=16, key=jax.random.key(1))
    imgs = jax.random.normal(jax.random.key(0), (4, 3, 256, 256))
    tokens = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(eqx.nn.inference_mode(spt), imgs)
    assert tokens.shape == (4, 256, 1024)
    expected = torch_param_count(reference("vit_for_small_dataset").SPT(dim=1024, patch_size=16))
    assert count_params(spt) == expected == 3_940_864
