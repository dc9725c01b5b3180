"""Gradient checkpointing and loop unrolling of the block stacks change memory and speed,
never the numbers: outputs and gradients equal the default ones for every architecture."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
from eqx_vision.layers import Stack
from zoo import ZOO, batched


# One architecture per way of running a stack: plain blocks (ViT), blocks with layer dropout
# and a second stack with a context (CaiT), blocks with BatchNorm state (CvT), blocks over
# two token sets in hierarchical stages (RegionViT). The option is the same code for all.
NAMES = ["ViT", "CaiT", "CvT", "RegionViT"]


def stacks(model):
    return [n for n in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, Stack))
            if isinstance(n, Stack)]  # fmt: skip


def grads(entry, model, state, x):
    def loss(model, x):
        return jnp.sum(batched(entry, model, state, x) ** 2)

    return eqx.filter_jit(eqx.filter_grad(loss))(model, x)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    assert len(leaves_a) == len(leaves_b) > 0
    for u, v in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_keeps_gradients(name):
    entry = ZOO[name]
    model, state = entry.build(jax.random.key(0))
    model = eqx.nn.inference_mode(model)
    x = jax.random.normal(jax.random.key(1), (2, *entry.input_shape))
    assert all(s.remat == "linear" for s in stacks(model)), "the default policy"
    expected = grads(entry, model, state, x)
    for remat in ("inputs", "all"):
        changed = ev.checkpoint_blocks(model, remat)
        assert all(s.remat == remat for s in stacks(changed))
        assert_trees_close(grads(entry, changed, state, x), expected)


@pytest.mark.parametrize(
    "options",
    [
        dict(unroll=2),
        dict(unroll=5),
        dict(remat="all", unroll=2),
    ],
    ids=["unroll-2", "unroll-more-than-depth", "keep-all-unroll-2"],
)  # fmt: skip
def test_stack_options_keep_outputs_and_gradients(options):
    entry = ZOO["ViT"]
    model, _ = entry.build(jax.random.key(0), depth=3)
    model = eqx.nn.inference_mode(model)
    x = jax.random.normal(jax.random.key(1), (2, *entry.input_shape))
    changed = eqx.tree_at(lambda m: m.transformer.layers, model,
                          model.transformer.layers.with_options(**options))  # fmt: skip
    np.testing.assert_allclose(jax.vmap(changed)(x), jax.vmap(model)(x), rtol=1e-6, atol=1e-6)
    assert_trees_close(grads(entry, changed, None, x), grads(entry, model, None, x))


def test_stacks_within_stacks_run_unrolled_with_the_same_numbers():
    entry = ZOO["CrossViT"]
    model, _ = entry.build(jax.random.key(0))
    model = eqx.nn.inference_mode(model)
    (outer,) = stacks(model)
    inner = stacks(outer.blocks)
    assert outer.unroll == 1
    assert len(inner) == 3 and all(s.unroll == s.depth for s in inner)
    # The same model with its inner stacks as loops of their own.
    looped = eqx.tree_at(
        lambda m: stacks(m.multi_scale_encoder.blocks),
        model,
        [s.with_options(unroll=1) for s in inner],
    )
    assert all(s.unroll == 1 for s in stacks(looped.multi_scale_encoder.blocks))
    x = jax.random.normal(jax.random.key(1), (2, *entry.input_shape))
    np.testing.assert_allclose(jax.vmap(model)(x), jax.vmap(looped)(x), rtol=1e-6, atol=1e-6)
    assert_trees_close(grads(entry, model, None, x), grads(entry, looped, None, x))
    # A new policy keeps the unrolling.
    changed = ev.checkpoint_blocks(model, "inputs")
    assert [s.unroll for s in stacks(changed.multi_scale_encoder.blocks)] == [
        s.depth for s in inner
    ]


def test_checkpointing_reduces_training_memory():
    model = ev.ViT(image_size=32, patch_size=4, num_classes=10, dim=64, depth=8, heads=4,
                   mlp_dim=256, key=jax.random.key(0))  # fmt: skip
    x = jnp.zeros((8, 3, 32, 32))

    def temp_bytes(model):
        loss = lambda m, x: jnp.sum(jax.vmap(m)(x) ** 2)
        grad = eqx.filter_jit(eqx.filter_grad(loss))
        compiled = grad.lower(model, x).compile()  # pyright: ignore[reportFunctionMemberAccess]
        return compiled.compiled.memory_analysis().temp_size_in_bytes

    everything = temp_bytes(ev.checkpoint_blocks(model, "all"))
    linear = temp_bytes(model)
    inputs = temp_bytes(ev.checkpoint_blocks(model, "inputs"))
    assert inputs < linear < 0.6 * everything, (everything, linear, inputs)


def test_bad_options_are_refused():
    model = ZOO["ViT"].build(jax.random.key(0))[0]
    with pytest.raises(ValueError, match="unroll must be at least 1; got 0"):
        model.transformer.layers.with_options(unroll=0)
    with pytest.raises(
        ValueError, match=r"remat must be one of \['all', 'inputs', 'linear'\]; got 'dots'"
    ):
        ev.checkpoint_blocks(model, "dots")
