from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest
import torch

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


CONFIGS: list[dict[str, Any]] = [
    dict(
        image_size=32,
        patch_size=4,
        num_classes=10,
        dim=16,
        heads=2,
        num_hierarchies=3,
        block_repeats=(2, 1, 1),
        mlp_mult=2,
    ),
    # One level: no aggregation at all; one channel; dropout (off in inference).
    dict(
        image_size=12,
        patch_size=3,
        num_classes=4,
        dim=12,
        heads=3,
        num_hierarchies=1,
        block_repeats=2,
        channels=1,
        dropout=0.1,
    ),
    # dim % heads != 0: heads of dim // heads = 3, inner width 9 < dim; a level without
    # blocks; four channels.
    dict(
        image_size=24,
        patch_size=2,
        num_classes=6,
        dim=10,
        heads=3,
        num_hierarchies=2,
        block_repeats=(1, 0),
        mlp_mult=3,
        channels=4,
        dim_head=7,
    ),
]

SMALL: dict[str, Any] = dict(
    image_size=16, patch_size=2, num_classes=3, dim=8, heads=2, num_hierarchies=2, block_repeats=1
)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 4.5e-7 (relative to the largest output), gradients 1.8e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 6.7x and
# 5.6x over them.
TOL, GRAD_TOL = 3e-6, 1e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config, exact_zero_gradients):
    torch_model = reference("nest").NesT(**config)
    model = ev.NesT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    # The last level's position embedding is a per-pixel shift of all channels, which every
    # later channel LayerNorm removes: its exact gradient is zero, and both sides hold
    # rounding noise there.
    last = config["num_hierarchies"] - 1
    stop = exact_zero_gradients(
        torch_model, rf"^layers\.{last}\.0\.pos_emb$", rf"^\.levels\[{last}\]\.pos_embedding$"
    )
    call = eqx.filter_jit(lambda m, x: jax.vmap(stop(m))(x))
    shape = (config.get("channels", 3), size, size)
    check_parity(model, torch_model, shape, call=call, tol=TOL, grad_tol=GRAD_TOL)


def test_position_embedding_is_one_scalar_per_position():
    model = ev.NesT(**SMALL, key=jax.random.key(0))
    # 16 / 2 = 8 patches per side, 2 blocks per side at the first level: blocks of 4 x 4.
    assert [level.pos_embedding.shape for level in model.levels] == [(16,), (16,)]
    torch_model = reference("nest").NesT(**SMALL)
    for i, level in enumerate(model.levels):
        assert torch_model.layers[i][0].pos_emb.shape == level.pos_embedding.shape


def test_last_level_position_embedding_has_no_effect():
    torch_model = reference("nest").NesT(**SMALL)
    torch_model.eval()
    model = eqx.nn.inference_mode(
        ev.from_vit_pytorch(ev.NesT(**SMALL, key=jax.random.key(0)), torch_model.state_dict())
    )
    x = jax.random.normal(jax.random.key(1), (3, 16, 16))
    shifted = eqx.tree_at(
        lambda m: m.levels[-1].pos_embedding, model, model.levels[-1].pos_embedding + 3.0
    )
    call = eqx.filter_jit(lambda m, x: m(x))
    out = np.asarray(call(model, x))
    np.testing.assert_allclose(out, np.asarray(call(shifted, x)), atol=1e-5)
    with torch.no_grad():
        expected = torch_model(torch.tensor(np.array(x))[None])[0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(patch_size=3), "patch_size"),
        (dict(image_size=(16, 16)), "image_size"),
        # 6 patches per side cannot be cut into 4 blocks per side.
        (dict(image_size=12, num_hierarchies=3), "num_hierarchies"),
        (dict(patch_size=4, num_hierarchies=4), "num_hierarchies"),
        (dict(num_hierarchies=0), "num_hierarchies"),
        (dict(block_repeats=(1, 1, 1)), "block_repeats"),
        (dict(block_repeats=-1), "block_repeats"),
        (dict(heads=16), "heads"),
        (dict(num_classes=-1), "num_classes"),
        (dict(mlp_mult=2.5), "mlp_mult"),
        (dict(dim=(8, 16, 32)), "dim"),
        (dict(channels=0), "channels"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(change, name, no_typecheck):
    with pytest.raises(ValueError, match=name):
        ev.NesT(**{**SMALL, **change}, key=jax.random.key(0))
