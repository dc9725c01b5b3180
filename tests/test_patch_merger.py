"""ViTWithPatchMerger and PatchMerger: parity with vit_pytorch.vit_with_patch_merger,
loaded through `reference`; configuration and input errors; and the full-size reference snippet."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
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


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("vit_with_patch_merger").ViT(**config)
    model = ev.ViTWithPatchMerger(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, image_shape(config))


@pytest.mark.parametrize("dim, num_tokens_out, seq", [(16, 4, 10), (32, 1, 5), (8, 12, 6)])
def test_patch_merger_parity(dim, num_tokens_out, seq):
    torch_model = reference("vit_with_patch_merger").PatchMerger(dim, num_tokens_out)
    model = ev.PatchMerger(dim, num_tokens_out, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    loaded = check_parity(model, torch_model, (seq, dim))
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


def test_dropout_needs_key_in_training():
    model = ev.ViTWithPatchMerger(**SMALL, dropout=0.1, key=jax.random.key(0))
    x = jnp.ones((3, 16, 16))
    with pytest.raises(ValueError, match="key"):
        model(x)
    infer = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(np.asarray(infer(x)), np.asarray(infer(x, key=jax.random.key(1))))


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
        (dict(num_classes=0), "num_classes"),
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


def test_input_errors(no_typecheck):
    model = ev.ViTWithPatchMerger(**SMALL, channels=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(2, 16, 16\).*\(3, 16, 16\)"):
        model(jnp.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(2, 8, 16\)"):
        model(jnp.zeros((2, 8, 16)))
    with pytest.raises(ValueError, match="jax.vmap"):
        model(jnp.zeros((4, 2, 16, 16)))
    with pytest.raises(ValueError, match="floating"):
        model(jnp.zeros((2, 16, 16), dtype=jnp.int32))
    merger = ev.PatchMerger(16, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(seq, 16\).*\(10, 8\)"):
        merger(jnp.zeros((10, 8)))
    with pytest.raises(ValueError, match=r"\(seq, 16\).*\(2, 10, 16\)"):
        merger(jnp.zeros((2, 10, 16)))


def test_input_errors_under_typecheck():
    merger = ev.PatchMerger(16, 4, key=jax.random.key(0))
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        merger(jnp.zeros((2, 10, 16)))
    model = ev.ViTWithPatchMerger(**SMALL, key=jax.random.key(0))
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((1, 16, 16)))


@pytest.mark.slow
def test_readme_snippet():
    config: dict[str, Any] = dict(
        image_size=256,
        patch_size=16,
        num_classes=1000,
        dim=1024,
        depth=12,
        heads=8,
        patch_merge_layer=6,
        patch_merge_num_tokens=8,
        mlp_dim=2048,
        dropout=0.1,
        emb_dropout=0.1,
    )
    model = ev.ViTWithPatchMerger(**config, key=jax.random.key(1))
    image = jax.random.normal(jax.random.key(0), (3, 256, 256))
    logits = eqx.filter_jit(lambda m, x: m(x))(eqx.nn.inference_mode(model), image)
    assert logits.shape == (1000,)
    assert bool(jnp.all(jnp.isfinite(logits)))
    expected = torch_param_count(reference("vit_with_patch_merger").ViT(**config))
    assert count_params(model) == expected == 77_687_272

    merger = ev.PatchMerger(dim=1024, num_tokens_out=8, key=jax.random.key(2))
    features = jax.random.normal(jax.random.key(5), (4, 256, 1024))
    merged = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(merger, features)
    assert merged.shape == (4, 8, 1024)
    expected = torch_param_count(reference("vit_with_patch_merger").PatchMerger(1024, 8))
    assert count_params(merger) == expected == 10_240
