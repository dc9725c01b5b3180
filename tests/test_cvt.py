from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.layers import ConvProjection
from reference import batch_call, check_parity, count_params, reference, torch_param_count


TINY: dict[str, Any] = dict(
    num_classes=5,
    s1_emb_dim=8,
    s1_emb_kernel=3,
    s1_emb_stride=2,
    s1_heads=1,
    s1_depth=1,
    s1_mlp_mult=2,
    s2_emb_dim=8,
    s2_heads=1,
    s2_depth=1,
    s2_mlp_mult=2,
    s3_emb_dim=8,
    s3_heads=1,
    s3_depth=1,
    s3_mlp_mult=2,
)

CONFIGS: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    # Default kernels and strides, deeper first stage, rectangular input.
    (
        dict(
            num_classes=10,
            s1_emb_dim=8,
            s1_depth=2,
            s2_emb_dim=16,
            s2_heads=2,
            s2_depth=1,
            s3_emb_dim=16,
            s3_heads=2,
            s3_depth=1,
            s3_mlp_mult=2,
        ),
        (3, 32, 40),
    ),
    # One channel, even embedding kernel, 1x1 and 5x5 projections, kv strides 1 and 3.
    (
        dict(
            TINY,
            s1_emb_kernel=4,
            s1_proj_kernel=5,
            s1_kv_proj_stride=1,
            s2_heads=2,
            s2_depth=2,
            s2_proj_kernel=1,
            s2_kv_proj_stride=3,
            s3_emb_stride=1,
            s3_heads=3,
            channels=1,
        ),
        (1, 24, 24),
    ),
    # Four channels, odd image sides, dropout (off in inference), deeper last stage.
    (
        dict(
            TINY,
            s1_emb_dim=12,
            s1_emb_kernel=5,
            s1_emb_stride=3,
            s2_emb_dim=12,
            s2_emb_stride=1,
            s3_depth=3,
            s3_heads=2,
            dropout=0.1,
            channels=4,
        ),
        (4, 17, 23),
    ),
]


def make(config: dict[str, Any]) -> tuple[ev.CvT, eqx.nn.State]:
    return eqx.nn.make_with_state(ev.CvT)(**config, key=jax.random.key(0))


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 1.0e-6 (relative to the largest output), gradients 9.1e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.0x and
# 5.5x over them.
TOL, GRAD_TOL = 5e-6, 5e-5


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_parity(config, shape):
    torch.manual_seed(0)
    torch_model = reference("cvt").CvT(**config)
    model, state = make(config)
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, shape, state=state, tol=TOL, grad_tol=GRAD_TOL)


def test_blocks_are_stacked():
    model, state = make(CONFIGS[2][0])
    blocks = model.stages[2].blocks
    assert blocks.depth == 3
    to_q, to_kv = blocks.blocks.attn.to_q, blocks[1].attn.to_kv
    assert isinstance(to_q, ConvProjection) and isinstance(to_kv, ConvProjection)
    assert to_q.depthwise.conv.weight.shape == (3, 8, 1, 3, 3)
    running_mean, running_var, count = state.get(to_kv.depthwise.bn.state_index)
    assert running_mean.shape == running_var.shape == (3, 8)
    assert count.shape == (3,)


def test_any_image_size():
    model, state = make(TINY)
    assert model.min_image_size == (1, 1)
    model = eqx.nn.inference_mode(model)
    for size in [(1, 1), (2, 9), (16, 16), (31, 7)]:
        logits, state = model(jnp.ones((3, *size)), state)
        assert logits.shape == (5,)


def test_inference_leaves_state_unchanged_and_training_updates_it():
    model, state = make(TINY)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16, 16))
    _, same = batch_call(eqx.nn.inference_mode(model), x, state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, new = batch_call(model, x, state)
    counts = [a for a in jax.tree.leaves(new) if jnp.issubdtype(a.dtype, jnp.integer)]
    assert counts and all(bool(jnp.all(c == 1)) for c in counts)


def test_loading_needs_state():
    model, _ = make(TINY)
    sd = reference("cvt").CvT(**TINY).state_dict()
    with pytest.raises(ValueError, match="state=state"):
        ev.from_vit_pytorch(model, sd)


def test_checkpoint_errors():
    model, state = make(TINY)
    sd = dict(reference("cvt").CvT(**TINY).state_dict())
    key = "layers.1.2.layers.0.0.to_kv.net.1.running_var"
    bad = dict(sd, **{key: sd[key][:4]})
    with pytest.raises(ev.CheckpointError, match=r"to_kv\.net\.1\.running_var.*\(8,\).*\(4,\)"):
        ev.from_vit_pytorch(model, bad, state=state)
    # A failed load leaves the state usable.
    assert len(jax.tree.leaves(state)) == 3 * 3 * 2
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ev.CheckpointError, match="missing"):
        ev.from_vit_pytorch(model, missing, state=state)
    with pytest.raises(ev.CheckpointError, match="unexpected"):
        ev.from_vit_pytorch(model, dict(sd, extra=sd[key]), state=state)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(s1_proj_kernel=2), "s1_proj_kernel"),
        (dict(s2_emb_dim=0), "s2_emb_dim"),
        (dict(s3_depth=0), "s3_depth"),
        (dict(s2_heads=-1), "s2_heads"),
        (dict(s1_emb_stride=0), "s1_emb_stride"),
        (dict(s3_kv_proj_stride=0), "s3_kv_proj_stride"),
        (dict(s1_mlp_mult=0), "s1_mlp_mult"),
        (dict(num_classes=-1), "num_classes"),
        (dict(channels=0), "channels"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        make({**TINY, **change})


def test_training_without_batch_axis_is_a_clear_error():
    model, state = make(TINY)
    with pytest.raises(NameError, match="axis_name"):
        model(jnp.zeros((3, 16, 16)), state)
