from typing import Any

import equinox as eqx
import jax
import jaxtyping
import numpy as np
import pytest

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


CONFIGS: list[dict[str, Any]] = [
    dict(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=16,
        depth=(1, 2),
        heads=2,
        mlp_dim=24,
        dim_head=8,
    ),
    # Per-stage heads; stage 1 has heads == 1 and dim_head == dim: no output projection.
    # Odd grids (11 -> 6 -> 3) exercise the rounding up of the pooling.
    dict(
        image_size=36,
        patch_size=6,
        num_classes=5,
        dim=8,
        depth=(2, 1, 1),
        heads=(1, 2, 4),
        mlp_dim=16,
        dim_head=8,
        channels=1,
    ),
    # A single stage (no pooling), odd patch size, dropout off in inference mode.
    dict(
        image_size=45,
        patch_size=5,
        num_classes=7,
        dim=12,
        depth=(3,),
        heads=3,
        mlp_dim=20,
        dim_head=4,
        channels=4,
        dropout=0.1,
        emb_dropout=0.1,
    ),
]

SMALL: dict[str, Any] = dict(
    image_size=16, patch_size=4, num_classes=3, dim=8, depth=(1, 1), heads=2, mlp_dim=8
)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 8.0e-7 (relative to the largest output), gradients 1.5e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.0x and
# 5.3x over them.
TOL, GRAD_TOL = 4e-6, 8e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("pit").PiT(**config)
    model = ev.PiT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    check_parity(
        model, torch_model, (config.get("channels", 3), size, size), tol=TOL, grad_tol=GRAD_TOL
    )


def test_structure():
    model = ev.PiT(**CONFIGS[1], key=jax.random.key(0))
    assert model.grid_sizes == (11, 6, 3)
    assert model.pos_embedding.shape == (11 * 11 + 1, 8)
    assert [s.layers.depth for s in model.stages] == [2, 1, 1]
    assert len(model.pools) == 2
    projections = []
    for stage in model.stages:
        attn = stage.layers.blocks.attn
        assert isinstance(attn, ev.layers.Attention)
        projections.append(attn.to_out is not None)
    assert projections == [False, True, True]
    assert all(s.norm is None for s in model.stages)
    assert model.head_norm.weight.shape == (32,)


def test_vmap_matches_single():
    model = eqx.nn.inference_mode(ev.PiT(**SMALL, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16, 16))
    batched = jax.vmap(model)(x)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(model(x[1])), atol=1e-6)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(patch_size=5), "patch_size"),
        (dict(patch_size=1), "patch_size"),
        (dict(image_size=0), "image_size"),
        (dict(depth=()), "depth"),
        (dict(depth=(1, 0)), "depth"),
        (dict(heads=(2, 2, 2)), "heads"),
        (dict(heads=0), "heads"),
        (dict(num_classes=-1), "num_classes"),
        (dict(dim=0), "dim"),
        (dict(mlp_dim=0), "mlp_dim"),
        (dict(dim_head=0), "dim_head"),
        (dict(channels=0), "channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(emb_dropout=-0.1), "emb_dropout"),
        (dict(dim=(8,)), "dim"),
        (dict(dim=(8, 12)), "dim"),
        (dict(stride=0), "stride"),
        (dict(patch_size=20, stride=4), "patch_size"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        ev.PiT(**{**SMALL, **change}, key=jax.random.key(0))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(depth=2), "depth"),
        (dict(depth=[1, 1]), "depth"),
        (dict(image_size=(16, 16)), "image_size"),
    ],
)
def test_config_type_errors(no_typecheck, change, name):
    with pytest.raises(ValueError, match=name):
        ev.PiT(**{**SMALL, **change}, key=jax.random.key(0))


def test_config_type_errors_under_typecheck():
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        ev.PiT(**{**SMALL, "depth": 2}, key=jax.random.key(0))


def test_checkpoint_mismatch():
    torch_model = reference("pit").PiT(**SMALL)
    model = ev.PiT(**{**SMALL, "dim": 16}, key=jax.random.key(0))
    with pytest.raises(ev.CheckpointError, match="shape mismatch"):
        ev.from_vit_pytorch(model, torch_model.state_dict())


def test_without_classifier():
    """`num_classes=0`: the normalised class token (two tokens' mean with distillation)."""
    for distilled in (False, True):
        model = ev.PiT(
            **{**SMALL, "num_classes": 0},
            distillation_token=distilled,
            pos_embed_prefix=False,
            key=jax.random.key(0),
        )
        assert model.mlp_head is None and model.dist_head is None
        assert model.pos_embedding.shape == (7 * 7, 8)
        assert model(jax.random.normal(jax.random.key(1), (3, 16, 16))).shape == (16,)
