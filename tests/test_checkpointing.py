"""Gradient checkpointing and loop unrolling of the block stacks change memory and speed,
never the numbers: outputs and gradients equal the default ones for every architecture."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
from eqx_vision.layers import Stack
from tiny import batched, build, input_shape


# One architecture per way of running a stack: plain blocks (ViT), blocks with layer dropout
# and a second stack with a context (CaiT), blocks with BatchNorm state (CvT), blocks over
# two token sets in hierarchical stages (RegionViT). The option is the same code for all.
NAMES = ["ViT", "CaiT", "CvT", "RegionViT"]
# Their tiny presets, with stacks of two blocks where the preset has one.
OVERRIDES = {"ViT": dict(depth=2), "CaiT": dict(depth=2, layer_dropout=0.1)}


def stacks(model):
    return [n for n in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, Stack))
            if isinstance(n, Stack)]  # fmt: skip


def grads(model, state, x):
    def loss(model, x):
        return jnp.sum(batched(model, state, x) ** 2)

    return eqx.filter_jit(eqx.filter_grad(loss))(model, x)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    assert len(leaves_a) == len(leaves_b) > 0
    for u, v in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_keeps_gradients(name):
    model, state = build(name, jax.random.key(0), **OVERRIDES.get(name, {}))
    model = eqx.nn.inference_mode(model)
    x = jax.random.normal(jax.random.key(1), (2, *input_shape(name)))
    assert all(s.remat == "linear" for s in stacks(model)), "the default policy"
    expected = grads(model, state, x)
    for remat in ("inputs", "all"):
        changed = ev.remat(model, remat)
        assert all(s.remat == remat for s in stacks(changed))
        assert_trees_close(grads(changed, state, x), expected)


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
    model, _ = build("ViT", jax.random.key(0), depth=3)
    model = eqx.nn.inference_mode(model)
    x = jax.random.normal(jax.random.key(1), (2, *input_shape("ViT")))
    changed = eqx.tree_at(lambda m: m.transformer.layers, model,
                          model.transformer.layers.with_options(**options))  # fmt: skip
    np.testing.assert_allclose(jax.vmap(changed)(x), jax.vmap(model)(x), rtol=1e-6, atol=1e-6)
    assert_trees_close(grads(changed, None, x), grads(model, None, x))


def test_stacks_within_stacks_run_unrolled_with_the_same_numbers():
    model, _ = build("CrossViT", jax.random.key(0))
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
    x = jax.random.normal(jax.random.key(1), (2, *input_shape("CrossViT")))
    np.testing.assert_allclose(jax.vmap(model)(x), jax.vmap(looped)(x), rtol=1e-6, atol=1e-6)
    assert_trees_close(grads(model, None, x), grads(looped, None, x))
    # A new policy keeps the unrolling.
    changed = ev.remat(model, "inputs")
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

    everything = temp_bytes(ev.remat(model, "all"))
    linear = temp_bytes(model)
    inputs = temp_bytes(ev.remat(model, "inputs"))
    assert inputs < linear < 0.6 * everything, (everything, linear, inputs)


def test_bad_options_are_refused():
    model = build("ViT", jax.random.key(0))[0]
    with pytest.raises(ValueError, match="unroll must be at least 1; got 0"):
        model.transformer.layers.with_options(unroll=0)
    with pytest.raises(
        ValueError, match=r"remat must be one of \['all', 'inputs', 'linear'\]; got 'dots'"
    ):
        ev.remat(model, "dots")


def test_checkpoint_blocks_is_a_deprecated_alias_of_remat():
    model = build("ViT", jax.random.key(0))[0]
    with pytest.warns(DeprecationWarning, match=r"use eqx_vision\.remat"):
        changed = ev.checkpoint_blocks(model, "inputs")
    assert eqx.tree_equal(changed, ev.remat(model, "inputs"))
    assert ev.layers.remat is ev.remat


def test_policy_is_an_ordinary_field_outside_the_optimizer_state():
    """The policy and the layers' `keep_bits` are Python values in the model's leaves: an
    optimizer state (of the array leaves) is the same whatever the policy, and `remat`
    leaves such a tree alone."""
    from eqx_vision import training

    model = build("ViT", jax.random.key(0))[0]
    optimizer = training.make_optimizer(1e-3, total_steps=10)
    opt_state = training.init_optimizer(optimizer, model)
    other = training.init_optimizer(optimizer, ev.remat(model, "inputs"))
    assert jax.tree.structure(opt_state) == jax.tree.structure(other)
    assert ev.remat(opt_state, "inputs") is opt_state
    (stack,) = stacks(model)
    assert stack.blocks.attn.keep_bits and stack.blocks.ff.keep_bits
    (plain,) = stacks(ev.remat(model, "all"))
    assert not plain.blocks.attn.keep_bits and not plain.blocks.ff.keep_bits
    (again,) = stacks(ev.remat(ev.remat(model, "all"), "linear"))
    assert again.blocks.attn.keep_bits and again.blocks.ff.fc1.keep_bits
