from typing import Any

import jax
import pytest

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


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


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 7.1e-7 (relative to the largest output), gradients 3.1e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.6x and
# 6.5x over them.
TOL, GRAD_TOL = 4e-6, 2e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("vit").ViT(**config)
    model = ev.ViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    h, w = ev.layers.pair(config["image_size"], "image_size")
    check_parity(model, torch_model, (config.get("channels", 3), h, w), tol=TOL, grad_tol=GRAD_TOL)


def test_parity_features():
    config: dict[str, Any] = dict(
        image_size=16, patch_size=8, num_classes=0, dim=32, depth=2, heads=2, mlp_dim=32
    )
    model = ev.ViT(**config, key=jax.random.key(0))
    check_parity(
        model,
        reference("vit").ViT(**config),
        (3, 16, 16),
        tol=TOL,
        grad_tol=GRAD_TOL,
        call=lambda m, x: jax.vmap(m.forward_features)(x),
    )
