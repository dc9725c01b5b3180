"""Checks of the backbone API shared by the tests of every model.

`check_backbone` checks what every model must do (the contract of
`forward_features`/`forward_head`/`forward_intermediates`, `feature_info`,
`set_image_size`, `reset_head`); `torch_outputs` captures a torch module's intermediate
outputs with forward hooks, for the parity of `forward_intermediates`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev


def assert_close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding between differently compiled programs (eager against
    `jit`): the largest difference relative to the largest magnitude of `expected`
    (two-branch models give tuples of arrays: each leaf is compared)."""
    actual_leaves, expected_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(float(np.abs(e).max()), 1e-6)
        assert float(np.abs(a - e).max()) <= tol * scale


def _call(model: Any, method: str, x: Any, state: Any, **kwargs: Any) -> Any:
    fn = getattr(model, method)
    if state is None:
        return fn(x, **kwargs)
    return fn(x, state, **kwargs)[0]


def check_backbone(
    model: Any,
    image_size: tuple[int, int],
    *,
    state: Any = None,
    channels: int = 3,
    new_size: tuple[int, int] | None = None,
    bad_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> None:
    """The backbone contract on one model (in inference mode), one image of `image_size`.

    - `model(x) == forward_head(forward_features(x))` exactly, under `jit`;
    - `forward_intermediates`: the final output equals `forward_features`, one output per
      `feature_info` entry whose shape the entry predicts (channels, image size over the
      reduction), `indices` as an int, a sequence (negative too) and the errors for out of
      range and duplicate indices;
    - `reset_head(model, 0)` returns `forward_head(..., pre_logits=True)`, a new head of 7
      classes gives 7 logits, the body unchanged;
    - `set_image_size` to the same size returns the model; to `new_size` a model that runs
      on that size (and whose feature maps have the size `feature_info` predicts);
      `bad_size` is a `ValueError` at the call.
    """
    model = eqx.nn.inference_mode(model)
    x = jr.normal(jr.key(seed), (channels, *image_size))

    @eqx.filter_jit
    def both(m, x, state):
        if state is None:
            feats = m.forward_features(x)
            return m(x), m.forward_head(feats), feats
        feats, s = m.forward_features(x, state)
        return m(x, state)[0], m.forward_head(feats, s)[0], feats

    out, composed, feats = both(model, x, state)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(composed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    info = model.feature_info
    assert len(info) >= 1 and [i.index for i in info] == list(range(len(info)))
    result = _call(model, "forward_intermediates", x, state)
    final, outputs = result
    assert_close(final, feats)
    assert len(outputs) == len(info)
    for entry, y in zip(info, outputs, strict=True):
        y = y[0] if isinstance(y, tuple) else y
        expected = (
            entry.channels,
            image_size[0] // entry.reduction[0],
            image_size[1] // entry.reduction[1],
        )
        assert y.shape == expected, f"{entry}: output {y.shape}, expected {expected}"
    last = _call(model, "forward_intermediates", x, state, indices=1, intermediates_only=True)
    assert len(last) == 1
    assert_close(last[0], outputs[-1])
    n = len(info)
    if n >= 2:
        picked = _call(model, "forward_intermediates", x, state, indices=[-1, 0])[1]
        assert_close(picked[0], outputs[-1])
        assert_close(picked[1], outputs[0])
    with pytest.raises(ValueError, match=rf"0 to {n - 1}"):
        _call(model, "forward_intermediates", x, state, indices=[n])
    with pytest.raises(ValueError, match="twice"):
        _call(model, "forward_intermediates", x, state, indices=[0, -n])

    headless = ev.reset_head(model, 0)
    pooled = _call(headless, "__call__", x, state)
    if state is None:
        pre = model.forward_head(feats, pre_logits=True)
    else:
        pre = model.forward_head(feats, state, pre_logits=True)[0]
    assert_close(pooled, pre)
    if state is None:
        seven = ev.reset_head(model, 7, key=jr.key(1))
        assert seven(x).shape == (7,)
    else:
        seven, seven_state = ev.reset_head(model, 7, key=jr.key(1), state=state)
        assert seven(x, seven_state)[0].shape == (7,)

    assert ev.set_image_size(model, image_size) is model
    if new_size is not None:
        resized = ev.set_image_size(model, new_size)
        z = jnp.zeros((channels, *new_size))
        assert _call(resized, "__call__", z, state).shape == out.shape
        for entry, y in zip(
            resized.feature_info, _call(resized, "forward_intermediates", z, state)[1], strict=True
        ):
            y = y[0] if isinstance(y, tuple) else y
            assert y.shape[1:] == (
                new_size[0] // entry.reduction[0],
                new_size[1] // entry.reduction[1],
            ), entry
    if bad_size is not None:
        with pytest.raises(ValueError):
            ev.set_image_size(model, bad_size)


def torch_outputs(
    torch_model: torch.nn.Module,
    modules: Sequence[str],
    x: torch.Tensor,
    transform: Callable[[Any], Any] | None = None,
    *,
    residual: bool = False,
) -> list[np.ndarray]:
    """The outputs of the named submodules of `torch_model` (`"transformer.layers.3"`) on
    `x`, captured with forward hooks in the order of `modules`, as NumPy arrays
    (`transform` applied to each captured output first; a module run several times keeps
    its last output). With `residual`, each capture is `output + input`: the residual
    stream after a branch (vit-pytorch's `x = ff(x) + x`)."""
    captured: dict[str, Any] = {}
    handles = []
    named = dict(torch_model.named_modules())
    for name in modules:
        if name not in named:
            raise KeyError(f"{type(torch_model).__name__} has no module {name!r}")

        def hook(_module: Any, inputs: Any, output: Any, name: str = name) -> None:
            if residual:
                output = output + inputs[0]
            captured[name] = output if transform is None else transform(output)

        handles.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch_model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[name].detach().numpy() for name in modules]
