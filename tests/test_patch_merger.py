"""ViTWithPatchMerger and PatchMerger: parity with vit_pytorch.vit_with_patch_merger,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

from typing import Any

import jax
import jax.numpy as jnp
import jaxtyping
import pytest

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


CONFIGS: list[dict[str, Any]] = [
    # Default merge layer: depth // 2 = 2.
    dict(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=32,
        depth=4,
        heads=4,
        mlp_dim=48,
        dim_head=8,
        patch_merge_num_tokens=3,
    ),
    # Rectangular, one channel, merger after the last block.
    dict(
        image_size=(32, 48),
        patch_size=(8, 16),
        num_classes=7,
        dim=24,
        depth=3,
        heads=2,
        mlp_dim=32,
        dim_head=12,
        patch_merge_layer=3,
        patch_merge_num_tokens=2,
        channels=1,
    ),
    # heads == 1 and dim_head == dim: no output projection; merger after the first block,
    # to more tokens than there are patches.
    dict(
        image_size=12,
        patch_size=4,
        num_classes=5,
        dim=16,
        depth=2,
        heads=1,
        mlp_dim=16,
        dim_head=16,
        patch_merge_layer=1,
        patch_merge_num_tokens=12,
        channels=4,
        dropout=0.1,
        emb_dropout=0.1,
    ),
    dict(
        image_size=16,
        patch_size=8,
        num_classes=3,
        dim=16,
        depth=1,
        heads=2,
        mlp_dim=16,
        dim_head=8,
        patch_merge_layer=1,
    ),
]

SMALL: dict[str, Any] = dict(
    image_size=16, patch_size=8, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=16, dim_head=8
)


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    h, w = ev.layers.pair(config["image_size"], "image_size")
    return config.get("channels", 3), h, w


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 7.7e-7 (relative to the largest output), gradients 3.7e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.2x and
# 5.4x over them.
TOL, GRAD_TOL = 4e-6, 2e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("vit_with_patch_merger").ViT(**config)
    model = ev.ViTWithPatchMerger(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, image_shape(config), tol=TOL, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("dim, num_tokens_out, seq", [(16, 4, 10), (32, 1, 5), (8, 12, 6)])
def test_patch_merger_parity(dim, num_tokens_out, seq):
    torch_model = reference("vit_with_patch_merger").PatchMerger(dim, num_tokens_out)
    model = ev.PatchMerger(dim, num_tokens_out, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    loaded = check_parity(model, torch_model, (seq, dim), tol=TOL, grad_tol=GRAD_TOL)
    assert isinstance(loaded, ev.PatchMerger)
    assert loaded(jnp.ones((seq, dim))).shape == (num_tokens_out, dim)


def test_split_encoder():
    def build(**change: Any) -> ev.ViTWithPatchMerger:
        return ev.ViTWithPatchMerger(**{**SMALL, **change}, key=jax.random.key(0))

    model = build(depth=5, patch_merge_layer=2)
    assert model.patch_merge_layer == 2
    assert len(model.transformer.layers) == 2
    assert model.merged_transformer is not None and len(model.merged_transformer.layers) == 3
    assert model.transformer.norm is None and model.merged_transformer.norm is None
    assert build(depth=3, patch_merge_layer=3).merged_transformer is None
    assert build(depth=7).patch_merge_layer == 3


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(patch_size=5), "patch_size"),
        (dict(image_size=(16, 12)), "image_size"),
        (dict(patch_merge_layer=0), "patch_merge_layer"),
        (dict(patch_merge_layer=3), "patch_merge_layer"),
        (dict(depth=1), "patch_merge_layer"),  # the default depth // 2 is 0
        (dict(depth=0), "depth"),
        (dict(patch_merge_num_tokens=0), "patch_merge_num_tokens"),
        (dict(channels=0), "channels"),
    ],
)
def test_config_errors(change, name, no_typecheck):
    with pytest.raises(ValueError, match=name):
        ev.ViTWithPatchMerger(**{**SMALL, **change}, key=jax.random.key(0))


@pytest.mark.parametrize("args, name", [((0, 4), "dim"), ((16, 0), "num_tokens_out")])
def test_patch_merger_config_errors(args, name):
    with pytest.raises(ValueError, match=name):
        ev.PatchMerger(*args, key=jax.random.key(0))


def test_patch_merger_input_errors(no_typecheck):
    merger = ev.PatchMerger(16, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(seq, 16\).*\(10, 8\)"):
        merger(jnp.zeros((10, 8)))
    with pytest.raises(ValueError, match=r"\(seq, 16\).*\(2, 10, 16\)"):
        merger(jnp.zeros((2, 10, 16)))


def test_patch_merger_input_errors_under_typecheck():
    merger = ev.PatchMerger(16, 4, key=jax.random.key(0))
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        merger(jnp.zeros((2, 10, 16)))
