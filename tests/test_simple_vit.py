"""SimpleViT: parity with vit_pytorch.simple_vit.SimpleViT,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

from typing import Any

import jax
import jax.numpy as jnp
import pytest

import eqx_vision as ev
from reference import (
    check_parity,
    count_params,
    raises_value_error,
    reference,
    torch_param_count,
)


CONFIGS: list[dict[str, Any]] = [
    dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=96),
    dict(
        image_size=(32, 48),
        patch_size=(8, 16),
        num_classes=7,
        dim=48,
        depth=3,
        heads=2,
        mlp_dim=64,
        dim_head=24,
        channels=1,
    ),
    dict(
        image_size=24,
        patch_size=4,
        num_classes=5,
        dim=32,
        depth=1,
        heads=1,
        mlp_dim=32,
        dim_head=32,
        channels=4,
    ),
]


def _input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    h, w = ev.layers.pair(config["image_size"], "image_size")
    return (config.get("channels", 3), h, w)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 5.1e-7 (relative to the largest output), gradients 1.5e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.9x and
# 5.3x over them.
TOL, GRAD_TOL = 3e-6, 8e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("simple_vit").SimpleViT(**config)
    model = ev.SimpleViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, _input_shape(config), tol=TOL, grad_tol=GRAD_TOL)


def test_position_embedding_is_not_a_parameter():
    config = CONFIGS[0]
    model = ev.SimpleViT(**config, key=jax.random.key(0))
    state_dict = reference("simple_vit").SimpleViT(**config).state_dict()
    assert not any("pos" in name for name in state_dict)
    # every array leaf of the model is filled from the state dict, so none is the embedding
    assert count_params(model) == sum(v.numel() for v in state_dict.values())


def test_key_is_optional_and_ignored():
    model = ev.SimpleViT(**CONFIGS[0], key=jax.random.key(0))
    x = jnp.ones((3, 32, 32))
    assert jnp.array_equal(model(x), model(x, key=jax.random.key(1)))


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(dim=66), "dim"),
        (dict(dim=4), "dim"),
        (dict(image_size=30), "image_size"),
        (dict(image_size=(32, 36)), "image_size"),
        (dict(patch_size=(8, 0)), "patch_size"),
        (dict(channels=0), "channels"),
        (dict(depth=0), "depth"),
        (dict(heads=0), "heads"),
    ],
)
def test_config_errors(change, name, monkeypatch):
    config = {**CONFIGS[0], **change}
    raises_value_error(lambda: ev.SimpleViT(**config, key=jax.random.key(0)), name, monkeypatch)
