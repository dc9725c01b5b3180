"""Helpers for checking eqx_vision models against the vit-pytorch reference.

`vit_pytorch/__init__.py` imports torchvision (for its DINO module); the architectures we
compare against need only torch and einops, so their modules are loaded under a bare
package entry that skips that `__init__`. A missing vit-pytorch is an error, never a skip.
"""

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch

import eqx_vision as ev


torch.set_num_threads(2)


def reference(module: str) -> types.ModuleType:
    """Import `vit_pytorch.<module>` without running the package `__init__`."""
    if "vit_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("vit_pytorch")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(
                "vit-pytorch 1.26.11 is required for the parity tests: "
                "pip install --no-deps vit-pytorch==1.26.11"
            )
        package = types.ModuleType("vit_pytorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["vit_pytorch"] = package
    return importlib.import_module(f"vit_pytorch.{module}")


def raises_value_error(fn: Callable[[], Any], match: str, monkeypatch: Any) -> None:
    """`fn()` fails with the type checks on (jaxtyping's error or ours), and without them
    with our ValueError naming what is wrong (`match`)."""
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        fn()
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match=match):
        fn()


def perturb_(torch_model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Add noise to every parameter, so that LayerNorm weights of exactly one, zero biases
    and identical initial values cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected|."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != reference shape {e.shape}"
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-12))


def count_params(model: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def torch_param_count(torch_model: torch.nn.Module) -> int:
    return sum(p.numel() for p in torch_model.parameters())


def randomize_batchnorm_(
    torch_model: torch.nn.Module, seed: int = 0, input_shape: tuple[int, ...] | None = None
) -> None:
    """Random running statistics and counts in every BatchNorm (2-d, and 1-d as in timm's
    LeViT), so that the loaded state is actually checked (and LeViT's output, constant at
    initialisation, depends on its input).

    With `input_shape`, the statistics are first measured on two random batches in train
    mode, so that the normalised activations have about unit scale (statistics far from the
    activations' own make the attention softmax saturate, leaving gradients of pure
    rounding noise), then perturbed.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    norms = [m for m in torch_model.modules() if isinstance(m, kinds)]
    if input_shape is not None:
        training, momenta = torch_model.training, [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches
        torch_model.train()
        with torch.no_grad():
            for _ in range(2):
                torch_model(torch.randn((4, *input_shape), generator=gen))
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        torch_model.train(training)
    with torch.no_grad():
        for bn in norms:
            assert bn.running_mean is not None and bn.running_var is not None
            shape = bn.running_mean.shape
            if input_shape is None:
                bn.running_mean.copy_(0.5 * torch.randn(shape, generator=gen))
                bn.running_var.copy_(0.5 + torch.rand(shape, generator=gen))
            else:
                std = bn.running_var.sqrt()
                bn.running_mean.add_(0.2 * std * torch.randn(shape, generator=gen))
                bn.running_var.mul_(0.5 + torch.rand(shape, generator=gen))
            bn.num_batches_tracked = torch.randint(1, 100, (), generator=gen)


def batch_call(model: Any, x: Any, state: Any, *, key: Any = None) -> tuple[Any, Any]:
    """A stateful model over a batch, with BatchNorm statistics over the mapped axis."""
    in_axes = (0, None) if key is None else (0, None, 0)
    args = (x, state) if key is None else (x, state, jax.random.split(key, x.shape[0]))
    return jax.vmap(
        lambda x, s, *k: model(x, s, key=k[0] if k else None),
        axis_name="batch",
        in_axes=in_axes,
        out_axes=(0, None),
    )(*args)


def check_parity(
    model: eqx.Module,
    torch_model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch: int = 2,
    seed: int = 0,
    tol: float = 1e-4,
    grad_tol: float = 1e-3,
    grad_atol: float = 0.0,
    call: Callable[..., Any] | None = None,
    torch_call: Callable[[Any, Any], Any] | None = None,
    state: Any = None,
    load: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """Load `torch_model`'s weights into `model` and compare outputs and gradients.

    Outputs in inference mode must agree to `tol` relative max error; the gradients of
    `sum(out * w)` (fixed random `w`) with respect to the input and to every parameter
    must agree to `grad_tol`, leaf by leaf. A parameter leaf also passes when its gradients
    differ by at most `grad_atol` (for parameters whose exact gradient is zero, where both
    sides hold rounding noise). Returns the loaded model.

    For a model with BatchNorm, pass its `state`: the torch BatchNorm statistics are
    randomised too and loaded into it, `call(m, x, state)` (by default `batch_call`) runs
    the model, and `(model, state)` is returned.

    `load(state_dict, state)` loads a torch state dict (the weights, then the gradients)
    into `model`: by default `ev.from_vit_pytorch(model, state_dict, state=state)`.
    """
    perturb_(torch_model, seed)
    if state is not None:
        randomize_batchnorm_(torch_model, seed, input_shape)
    torch_model.eval()
    if load is None:
        template = model
        load = lambda sd, state: ev.from_vit_pytorch(template, sd, state=state)  # noqa: E731
    if state is None:
        model = eqx.nn.inference_mode(load(torch_model.state_dict(), None))
        call = call or (lambda m, x: jax.vmap(m)(x))
    else:
        model, state = load(torch_model.state_dict(), state)
        model = eqx.nn.inference_mode(model)
        stateful_call = call or (lambda m, x, s: batch_call(m, x, s)[0])
        call = lambda m, x: stateful_call(m, x, state)
    torch_call = torch_call or (lambda m, x: m(x))

    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn((batch, *input_shape), generator=gen, requires_grad=True)
    out_t = torch_call(torch_model, x_t)
    w_t = torch.randn(out_t.shape, generator=gen)
    (out_t * w_t).sum().backward()

    x = jnp.asarray(x_t.detach().numpy())
    w = jnp.asarray(w_t.numpy())

    def loss(m, x):
        out = call(m, x)
        return jnp.sum(out * w), out

    (grad_model, grad_x), out = _grads(loss, model, x)
    err = rel_err(out, out_t.detach().numpy())
    assert err <= tol, f"output relative error {err:.2e} > {tol:.1e}"
    err = rel_err(grad_x, x_t.grad.numpy())  # pyright: ignore[reportOptionalMemberAccess]
    assert err <= grad_tol, f"input-gradient relative error {err:.2e} > {grad_tol:.1e}"

    torch_grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p))
        for name, p in torch_model.named_parameters()
    }
    state_dict = torch_model.state_dict()
    torch_grads.update({n: b for n, b in torch_model.named_buffers() if n in state_dict})
    expected = load(torch_grads, state)
    if state is not None:
        expected = expected[0]
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(grad_model, eqx.is_inexact_array))[0]
    expected_leaves = jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array))
    assert len(leaves) == len(expected_leaves)
    for (path, g), e in zip(leaves, expected_leaves, strict=True):
        err = rel_err(g, e)
        if grad_atol and np.max(np.abs(np.asarray(g) - np.asarray(e)), initial=0.0) <= grad_atol:
            continue
        assert err <= grad_tol, (
            f"gradient of {jax.tree_util.keystr(path)}: relative error {err:.2e} > {grad_tol:.1e}"
        )
    return model if state is None else (model, state)


def _grads(
    loss: Callable[[Any, Any], tuple[Any, Any]], model: Any, x: Any
) -> tuple[tuple[Any, Any], Any]:
    """The gradients of `loss(model, x)[0]` with respect to `model` and `x`, and the output
    `loss(model, x)[1]`: one compiled program for the forward and the backward pass."""
    grad = eqx.filter_grad(lambda mx: loss(*mx), has_aux=True)
    return eqx.filter_jit(grad)((model, x))
