from typing import Any

import equinox as eqx
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
        pool="mean",
        num_parallel_branches=3,
        channels=1,
    ),
    # heads == 1 and dim_head == dim: no output projection, as in the reference
    dict(
        image_size=24,
        patch_size=4,
        num_classes=5,
        dim=32,
        depth=1,
        heads=1,
        mlp_dim=32,
        dim_head=32,
        num_parallel_branches=1,
        channels=4,
        dropout=0.1,
        emb_dropout=0.1,
    ),
]


def _input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    h, w = ev.layers.pair(config["image_size"], "image_size")
    return (config.get("channels", 3), h, w)


def _reference(config: dict[str, Any]):
    return reference("parallel_vit").ViT(**config)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 6.5e-7 (relative to the largest output), gradients 1.6e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 4.6x and
# 5.0x over them.
TOL, GRAD_TOL = 3e-6, 8e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = _reference(config)
    model = ev.ParallelViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, _input_shape(config), tol=TOL, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("branches", [1, 3])
def test_parity_branches(branches):
    config: dict[str, Any] = dict(
        image_size=16,
        patch_size=(8, 4),
        num_classes=3,
        dim=32,
        depth=2,
        heads=2,
        mlp_dim=48,
        dim_head=8,
        num_parallel_branches=branches,
    )
    torch_model = _reference(config)
    model = ev.ParallelViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (3, 16, 16), tol=TOL, grad_tol=GRAD_TOL)


def test_training_mode_needs_key_and_is_random():
    model = ev.ParallelViT(**{**CONFIGS[0], "dropout": 0.1}, key=jax.random.key(0))
    x = jnp.ones((3, 32, 32))
    with pytest.raises(ValueError, match="key"):
        model(x)
    a = model(x, key=jax.random.key(1))
    b = model(x, key=jax.random.key(2))
    assert not jnp.allclose(a, b)
    infer = eqx.nn.inference_mode(model)
    assert jnp.array_equal(infer(x), infer(x, key=jax.random.key(1)))


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(num_parallel_branches=0), "num_parallel_branches"),
        (dict(image_size=(32, 36)), "image_size"),
        (dict(patch_size=(8, 3)), "patch_size"),
        (dict(pool="max"), "pool"),
        (dict(channels=0), "channels"),
        (dict(depth=0), "depth"),
        (dict(heads=0), "heads"),
    ],
)
def test_config_errors(change, name, monkeypatch):
    config = {**CONFIGS[0], **change}
    raises_value_error(lambda: ev.ParallelViT(**config, key=jax.random.key(0)), name, monkeypatch)


def test_checkpoint_branch_mismatch():
    model = ev.ParallelViT(**CONFIGS[0], key=jax.random.key(0))
    state_dict = _reference({**CONFIGS[0], "num_parallel_branches": 3}).state_dict()
    with pytest.raises(ev.CheckpointError, match="fns.2"):
        ev.from_vit_pytorch(model, state_dict)
