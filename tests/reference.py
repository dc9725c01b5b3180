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
import numpy as np
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


def check_parity(
    model: eqx.Module,
    torch_model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch: int = 2,
    seed: int = 0,
    tol: float = 1e-4,
    grad_tol: float = 1e-3,
    call: Callable[[Any, Any], Any] | None = None,
    torch_call: Callable[[Any, Any], Any] | None = None,
) -> eqx.Module:
    """Load `torch_model`'s weights into `model` and compare outputs and gradients.

    Outputs in inference mode must agree to `tol` relative max error; the gradients of
    `sum(out * w)` (fixed random `w`) with respect to the input and to every parameter
    must agree to `grad_tol`, leaf by leaf. Returns the loaded model.
    """
    perturb_(torch_model, seed)
    torch_model.eval()
    model = eqx.nn.inference_mode(ev.from_vit_pytorch(model, torch_model.state_dict()))
    call = call or (lambda m, x: jax.vmap(m)(x))
    torch_call = torch_call or (lambda m, x: m(x))

    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn((batch, *input_shape), generator=gen, requires_grad=True)
    out_t = torch_call(torch_model, x_t)
    w_t = torch.randn(out_t.shape, generator=gen)
    (out_t * w_t).sum().backward()

    x = jnp.asarray(x_t.detach().numpy())
    w = jnp.asarray(w_t.numpy())
    out = call(model, x)
    err = rel_err(out, out_t.detach().numpy())
    assert err <= tol, f"output relative error {err:.2e} > {tol:.0e}"

    def loss(m, x):
        return jnp.sum(call(m, x) * w)

    grad_model, grad_x = _grads(loss, model, x)
    err = rel_err(grad_x, x_t.grad.numpy())  # pyright: ignore[reportOptionalMemberAccess]
    assert err <= grad_tol, f"input-gradient relative error {err:.2e} > {grad_tol:.0e}"

    torch_grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p))
        for name, p in torch_model.named_parameters()
    }
    state_dict = torch_model.state_dict()
    torch_grads.update({n: b for n, b in torch_model.named_buffers() if n in state_dict})
    expected = ev.from_vit_pytorch(model, torch_grads)
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(grad_model, eqx.is_inexact_array))[0]
    expected_leaves = jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array))
    assert len(leaves) == len(expected_leaves)
    for (path, g), e in zip(leaves, expected_leaves, strict=True):
        err = rel_err(g, e)
        assert err <= grad_tol, (
            f"gradient of {jax.tree_util.keystr(path)}: relative error {err:.2e} > {grad_tol:.0e}"
        )
    return model


def _grads(loss: Callable[[Any, Any], Any], model: Any, x: Any) -> tuple[Any, Any]:
    return eqx.filter_grad(lambda mx: loss(*mx))((model, x))
