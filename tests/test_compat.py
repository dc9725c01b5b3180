"""Checkpoints written by an earlier release (0.1.0's `eqx-vision train`, kept in
`tests/fixtures/checkpoints/`) still load and give the same results.

The fixtures: `vit-tiny` and `levit-tiny` (with its BatchNorm statistics) trained for two
epochs on the embedded digits, each with the logits of the first 16 test images computed
by that release.
"""

import json
import os

import equinox as eqx
import jax
import numpy as np
import pytest

from eqx_vision import checkpoint
from eqx_vision.cli import main
from eqx_vision.presets import ModelConfig
from eqx_vision.training import is_stateful


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints")
# What `eqx-vision evaluate --checkpoint DIR` printed for each fixture when it was written.
EVALUATED = {
    "vit-tiny": ("test loss: 2.2576", "test accuracy: 0.33"),
    "levit-tiny": ("test loss: 2.2573", "test accuracy: 0.42"),
}


@pytest.mark.parametrize("name", sorted(EVALUATED))
def test_evaluate_gives_the_recorded_result(name, capsys):
    assert main(["evaluate", "--checkpoint", os.path.join(FIXTURES, name)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert tuple(lines[-2:]) == EVALUATED[name]


@pytest.mark.parametrize("name", sorted(EVALUATED))
def test_logits_equal_the_recorded_ones(name):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "config.json")) as f:
        config = ModelConfig.from_json(json.load(f)["model_config"])
    like_model, like_state = config.build_like()
    loaded = checkpoint.load(
        os.path.join(folder, "last.safetensors"), like_model, like_state, model_name=config.model
    )
    expected = np.load(os.path.join(folder, "expected_logits.npz"))
    model = eqx.nn.inference_mode(loaded.model)
    if is_stateful(model):
        forward = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
        logits, _ = forward(expected["images"], loaded.state)
    else:
        logits = jax.vmap(model)(expected["images"])
    # Same machine, same program: equal to the last bit; 1e-5 leaves room for another CPU.
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)
