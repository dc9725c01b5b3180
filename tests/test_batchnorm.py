"""Training with BatchNorm (CvT, LeViT) against torch's train mode, batched and sharded."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_vision as ev
from reference import batch_call, perturb_, randomize_batchnorm_, reference, rel_err


CASES: dict[str, tuple[str, type, dict[str, Any], tuple[int, int, int]]] = {
    "cvt": (
        "cvt",
        ev.CvT,
        dict(
            num_classes=5,
            s1_emb_dim=8,
            s1_depth=2,
            s2_emb_dim=8,
            s2_heads=1,
            s2_depth=1,
            s3_emb_dim=12,
            s3_heads=2,
            s3_depth=2,
            s3_mlp_mult=2,
            channels=2,
        ),
        (2, 32, 24),
    ),
    "levit": (
        "levit",
        ev.LeViT,
        dict(
            image_size=48,
            num_classes=5,
            dim=(8, 12),
            depth=2,
            heads=(1, 2),
            mlp_mult=2,
            stages=2,
            dim_key=4,
            dim_value=8,
        ),
        (3, 48, 48),
    ),
}


def loaded(name: str) -> tuple[torch.nn.Module, Any, eqx.nn.State]:
    """A torch model with random weights and BatchNorm statistics, and our copy of it."""
    module, cls, config, shape = CASES[name]
    torch.manual_seed(0)
    torch_model = getattr(reference(module), cls.__name__)(**config)
    perturb_(torch_model, seed=0, scale=0.1)
    randomize_batchnorm_(torch_model, seed=0, input_shape=shape)
    model, state = eqx.nn.make_with_state(cls)(**config, key=jax.random.key(0))
    model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    return torch_model, model, state


def assert_trees_close(actual: Any, expected: Any, tol: float, atol: float = 0.0) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    expected_leaves = jax.tree.leaves(expected)
    assert len(leaves) == len(expected_leaves)
    for (path, a), e in zip(leaves, expected_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))
            continue
        if atol and np.max(np.abs(a - e), initial=0.0) <= atol:
            continue  # an exact zero on both sides, up to rounding (a bias before a BatchNorm)
        err = rel_err(a, e)
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("name", ["cvt", "levit"])
def test_train_mode_matches_torch(name):
    """Outputs and gradients of train-mode batches, then every BatchNorm's running
    statistics and batch count after them, equal torch's."""
    torch_model, model, state = loaded(name)
    torch_model.train()
    shape = CASES[name][3]
    gen = torch.Generator().manual_seed(1)

    # First batch: outputs and gradients (through the batch statistics).
    x_t = torch.randn((3, *shape), generator=gen, requires_grad=True)
    out_t = torch_model(x_t)
    w_t = torch.randn(out_t.shape, generator=gen)
    (out_t * w_t).sum().backward()
    w = jnp.asarray(w_t.numpy())

    def loss(model_and_x, state):
        model, x = model_and_x
        out, state = batch_call(model, x, state)
        return jnp.sum(out * w), (out, state)

    grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (_, (out, state)), (grad_model, grad_x) = grad_fn(
        (model, jnp.asarray(x_t.detach().numpy())), state
    )
    assert rel_err(out, out_t.detach().numpy()) <= 1e-4
    assert rel_err(grad_x, x_t.grad.numpy()) <= 1e-3  # pyright: ignore[reportOptionalMemberAccess]
    torch_grads: dict[str, Any] = {n: p.grad for n, p in torch_model.named_parameters()}
    torch_grads.update({n: b for n, b in torch_model.state_dict().items() if n not in torch_grads})
    expected, _ = ev.from_vit_pytorch(model, torch_grads, state=state)
    assert_trees_close(
        eqx.filter(grad_model, eqx.is_inexact_array),
        eqx.filter(expected, eqx.is_inexact_array),
        tol=1e-3,
        atol=1e-5,
    )

    # Further batches: outputs, and the state they leave behind.
    step = eqx.filter_jit(batch_call)
    for _ in range(3):
        x_t = torch.randn((3, *shape), generator=gen)
        with torch.no_grad():
            out_t = torch_model(x_t)
        out, state = step(model, jnp.asarray(x_t.numpy()), state)
        assert rel_err(out, out_t.numpy()) <= 1e-4
    _, expected_state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    assert_trees_close(state, expected_state, tol=1e-5)
    # Every BatchNorm of the reference has its count (stacked blocks share a leaf).
    counts = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.integer)]
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
    assert sum(c.size for c in counts) == num_bn

    # Inference mode afterwards uses the running statistics, as torch's eval mode does.
    torch_model.eval()
    with torch.no_grad():
        out_t = torch_model(x_t)
    out, _ = step(eqx.nn.inference_mode(model), jnp.asarray(x_t.numpy()), state)
    assert rel_err(out, out_t.numpy()) <= 1e-4


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def train_step(model: Any, state: eqx.nn.State, x: jax.Array, y: jax.Array) -> Any:
    def loss_fn(model, state):
        logits, state = batch_call(model, x, state)
        return cross_entropy(logits, y), state

    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.05 * g, grads))
    return loss, grads, model, state


@pytest.mark.parametrize("name", ["cvt", "levit"])
def test_data_parallel_train_step(name):
    """A jitted train step with the batch sharded over 4 devices gives the loss, gradients,
    parameters and (global-batch) BatchNorm statistics of the single-device step."""
    assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    _, model, state = loaded(name)
    shape = CASES[name][3]
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 5)

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    @eqx.filter_jit
    def sharded_step(model, state, x, y):
        model, state = eqx.filter_shard((model, state), replicated)
        x, y = eqx.filter_shard((x, y), data)
        return eqx.filter_shard(train_step(model, state, x, y), replicated)

    single_step = eqx.filter_jit(train_step)
    model_1, state_1 = model, state
    model_4, state_4 = eqx.filter_shard((model, state), replicated)
    xs, ys = eqx.filter_shard((x, y), data)
    assert len(xs.sharding.device_set) == 4
    assert xs.addressable_shards[0].data.shape == (2, *shape)
    for _ in range(2):
        loss_1, grads_1, model_1, state_1 = single_step(model_1, state_1, x, y)
        loss_4, grads_4, model_4, state_4 = sharded_step(model_4, state_4, xs, ys)
        assert abs(float(loss_1) - float(loss_4)) <= 1e-5 * max(1.0, abs(float(loss_1)))
        assert_trees_close(
            eqx.filter(grads_4, eqx.is_inexact_array),
            eqx.filter(grads_1, eqx.is_inexact_array),
            # The sharded step sums the batch in another order: CvT's gradients differ by up
            # to 1.4e-5 (relative) from the single-device ones after two steps.
            tol=3e-5,
            atol=1e-7,
        )
        assert_trees_close(
            eqx.filter(model_4, eqx.is_array), eqx.filter(model_1, eqx.is_array), tol=1e-5
        )
        assert_trees_close(state_4, state_1, tol=1e-5)
    for leaf in jax.tree.leaves((eqx.filter(model_4, eqx.is_array), state_4)):
        assert leaf.sharding.is_fully_replicated
