"""CaiT: parity with vit_pytorch.cait.CaiT,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


CONFIGS: list[dict[str, Any]] = [
    dict(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=32,
        depth=2,
        cls_depth=1,
        heads=4,
        mlp_dim=48,
        dim_head=8,
    ),
    # heads == 1 and dim_head == dim: CaiT still projects the heads out.
    dict(
        image_size=24,
        patch_size=4,
        num_classes=5,
        dim=16,
        depth=1,
        cls_depth=2,
        heads=1,
        mlp_dim=32,
        dim_head=16,
    ),
    dict(
        image_size=48,
        patch_size=16,
        num_classes=7,
        dim=24,
        depth=3,
        cls_depth=2,
        heads=3,
        mlp_dim=32,
        dim_head=12,
        dropout=0.1,
        emb_dropout=0.1,
    ),
]

SMALL: dict[str, Any] = dict(
    image_size=16, patch_size=8, num_classes=3, dim=16, depth=4, cls_depth=2, heads=2, mlp_dim=16
)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 5.1e-7 (relative to the largest output), gradients 3.3e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.9x and
# 6.1x over them.
TOL, GRAD_TOL = 3e-6, 2e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config):
    torch_model = reference("cait").CaiT(**config)  # layer_dropout=0: deterministic in eval
    model = ev.CaiT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    check_parity(model, torch_model, (3, size, size), tol=TOL, grad_tol=GRAD_TOL)


def test_layer_scale_init_by_layer_index():
    config = dict(SMALL, depth=25, cls_depth=1, dim=8, heads=1, dim_head=4, mlp_dim=8)
    torch_model = reference("cait").CaiT(**config)
    model = ev.CaiT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    sd = torch_model.state_dict()
    blocks = model.patch_transformer.layers.blocks
    attn_scale, ff_scale = blocks.attn_scale, blocks.ff_scale
    assert attn_scale is not None and ff_scale is not None
    for i in range(25):
        for ours, name in ((attn_scale, "0.scale"), (ff_scale, "1.scale")):
            expected = sd[f"patch_transformer.layers.{i}.{name}"].numpy().reshape(-1)
            np.testing.assert_array_equal(np.asarray(ours[i]), expected)
    assert float(attn_scale[17, 0]) == pytest.approx(0.1)
    assert float(attn_scale[18, 0]) == pytest.approx(1e-5)
    assert float(attn_scale[24, 0]) == pytest.approx(1e-6)


def test_layer_dropout_needs_key_in_training():
    model = ev.CaiT(**SMALL, layer_dropout=0.5, key=jax.random.key(0))
    x = jnp.ones((3, 16, 16))
    with pytest.raises(ValueError, match="key"):
        model(x)
    out = eqx.filter_jit(lambda m, x, k: m(x, key=k))(model, x, jax.random.key(1))
    assert out.shape == (3,)


def test_layer_dropout_off_in_inference():
    model = eqx.nn.inference_mode(ev.CaiT(**SMALL, layer_dropout=0.9, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(5), (3, 16, 16))
    a = model(x, key=jax.random.key(1))
    b = model(x, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(a))


def test_layer_dropout_random_in_training():
    model = ev.CaiT(**SMALL, layer_dropout=0.9, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(5), (3, 16, 16))
    call = eqx.filter_jit(lambda m, x, k: m(x, key=k))
    outs = [np.asarray(call(model, x, jax.random.key(i))) for i in range(6)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])
    # Same key, same layers dropped.
    np.testing.assert_array_equal(outs[0], np.asarray(call(model, x, jax.random.key(0))))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(patch_size=5), "patch_size"),
        (dict(image_size=(16, 16)), "image_size"),
        (dict(patch_size=(8, 8)), "patch_size"),
        (dict(depth=0), "depth"),
        (dict(cls_depth=0), "cls_depth"),
        (dict(num_classes=-1), "num_classes"),
        (dict(cls_mlp_dim=0), "cls_mlp_dim"),
        (dict(patch_embedding="linear"), "patch_embedding"),
        (dict(layer_dropout=1.0), "layer_dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(emb_dropout=1.5), "emb_dropout"),
    ],
)
def test_config_errors(change, name, no_typecheck):
    with pytest.raises(ValueError, match=name):
        ev.CaiT(**{**SMALL, **change}, key=jax.random.key(0))
