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
        image_size=24,
        patch_size=4,
        num_classes=7,
        dim=48,
        depth=3,
        heads=3,
        mlp_dim=64,
        dim_head=16,
        pool="mean",
        channels=1,
    ),
    dict(
        image_size=16,
        patch_size=8,
        num_classes=5,
        dim=32,
        depth=1,
        heads=2,
        mlp_dim=32,
        dim_head=8,
        channels=4,
        dropout=0.1,
        emb_dropout=0.1,
    ),
]


def _input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    size = config["image_size"]
    return (config.get("channels", 3), size, size)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 9.7e-7 (relative to the largest output), gradients 5.1e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.2x and
# 5.9x over them.
TOL, GRAD_TOL = 5e-6, 3e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("deepvit").DeepViT(**config)
    model = ev.DeepViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, _input_shape(config), tol=TOL, grad_tol=GRAD_TOL)


def test_single_head_keeps_output_projection():
    # heads == 1 and dim_head == dim: vit-pytorch keeps DeepViT's output projection. (With
    # one head the re-attention LayerNorm maps every score to its bias, so only the loading
    # is checked here: the gradient test would compare rounding noise.)
    config = {**CONFIGS[2], "heads": 1, "dim_head": 32}
    torch_model = reference("deepvit").DeepViT(**config)
    model = ev.DeepViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    model = ev.from_vit_pytorch(model, torch_model.state_dict())
    attn = model.transformer.layers[0].attn
    assert isinstance(attn, ev.layers.Attention) and attn.to_out is not None


def test_training_mode_needs_key_and_is_random():
    model = ev.DeepViT(**CONFIGS[2], key=jax.random.key(0))
    x = jnp.ones((4, 16, 16))
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
        (dict(image_size=(32, 32)), "image_size"),
        (dict(patch_size=(8, 8)), "patch_size"),
        (dict(image_size=30), "image_size"),
        (dict(pool="max"), "pool"),
        (dict(channels=0), "channels"),
        (dict(depth=0), "depth"),
        (dict(dim_head=0), "dim_head"),
    ],
)
def test_config_errors(change, name, monkeypatch):
    config = {**CONFIGS[0], **change}
    raises_value_error(lambda: ev.DeepViT(**config, key=jax.random.key(0)), name, monkeypatch)


def test_checkpoint_errors():
    model = ev.DeepViT(**CONFIGS[0], key=jax.random.key(0))
    state_dict = dict(reference("deepvit").DeepViT(**CONFIGS[0]).state_dict())
    bad = {**state_dict, "pos_embedding": state_dict["pos_embedding"][0]}
    with pytest.raises(ev.CheckpointError, match="pos_embedding"):
        ev.from_vit_pytorch(model, bad)
    missing = {k: v for k, v in state_dict.items() if "reattn_weights" not in k}
    with pytest.raises(ev.CheckpointError, match="reattn_weights"):
        ev.from_vit_pytorch(model, missing)
