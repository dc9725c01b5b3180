from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest
import torch

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


# (config, input shape).
CONFIGS: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    # Key and value dims differing per stage, a windowed and a whole-map stage.
    (
        dict(
            num_classes=10,
            dim=16,
            depth=(2, 1),
            heads=(2, 1),
            reduction_factor=(2, 1),
            window_size=(4, None),
            ssa_dim_key=8,
            ssa_dim_value=(8, 12),
            iwsa_dim_key=(8, 4),
            iwsa_dim_value=8,
            ff_expansion_factor=2,
        ),
        (3, 32, 32),
    ),
    # Three stages, one head, no windows, rectangular odd-sized input (the stem and the
    # downsampling round up), one channel.
    (
        dict(
            num_classes=7,
            dim=8,
            depth=(1, 1, 2),
            heads=1,
            reduction_factor=1,
            ssa_dim_key=8,
            ssa_dim_value=8,
            iwsa_dim_key=8,
            iwsa_dim_value=4,
            ff_expansion_factor=1,
            channels=1,
        ),
        (1, 30, 45),
    ),
    # One stage (no stage norm, no downsampling), three blocks (PEG + a stack of two), a
    # reduction that does not divide the map (floored), dropout (off in inference).
    (
        dict(
            num_classes=4,
            dim=12,
            depth=(3,),
            heads=(3,),
            reduction_factor=3,
            window_size=2,
            ssa_dim_key=4,
            ssa_dim_value=4,
            iwsa_dim_key=4,
            iwsa_dim_value=4,
            dropout=0.1,
        ),
        (3, 29, 29),
    ),
]

SMALL: dict[str, Any] = CONFIGS[0][0]

# One compilation for the forward pass and one for its gradient.
jitted = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 8.8e-7 (relative to the largest output), gradients 3.4e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 4.5x and
# 5.9x over them.
TOL, GRAD_TOL = 4e-6, 2e-5


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_parity(config, shape):
    torch_model = reference("scalable_vit").ScalableViT(**config)
    model = ev.ScalableViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, shape, call=jitted, tol=TOL, grad_tol=GRAD_TOL)


def test_parity_with_attention_in_chunks(monkeypatch):
    """Attention over long sequences runs in chunks of queries (`MAX_SCORES`, lowered
    here so that the tiny model's windows and whole-map attention are chunked): still the
    reference's values and gradients."""
    from eqx_vision.layers import _attention

    monkeypatch.setattr(_attention, "MAX_SCORES", 50)
    config, shape = CONFIGS[0]
    torch_model = reference("scalable_vit").ScalableViT(**config)
    model = ev.ScalableViT(**config, key=jax.random.key(0))
    check_parity(
        model,
        torch_model,
        shape,
        call=eqx.filter_jit(lambda m, x: jax.vmap(m)(x)),
        tol=TOL,
        grad_tol=GRAD_TOL,
    )


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_accepted_sizes_match_reference(config, shape):
    """The sides the model accepts are exactly those the reference runs on."""
    torch_model = reference("scalable_vit").ScalableViT(**config).eval()
    model = eqx.filter_eval_shape(lambda: ev.ScalableViT(**config, key=jax.random.key(0)))
    with torch.no_grad():
        for side in range(1, 70):
            try:
                torch_model(torch.zeros(1, shape[0], side, side))
                runs = True
            except Exception:
                runs = False
            assert runs == (model._fit(side) is None), side


def test_block_order_reproduces_reference():
    """Each block runs SSA → FF → PEG → FF → IWSA, with `layers.j.3` a feed-forward."""
    torch_model = reference("scalable_vit").ScalableViT(**SMALL)
    block = torch_model.layers[0][0].layers[0]
    assert [type(m).__name__ for m in block] == [
        "ScalableSelfAttention",
        "FeedForward",
        "PEG",
        "FeedForward",
        "InteractiveWindowedSelfAttention",
    ]
    model = ev.ScalableViT(**SMALL, key=jax.random.key(0))
    model = ev.from_vit_pytorch(model, torch_model.state_dict())
    first = model.stages[0].first
    assert first is not None and first.peg is not None
    assert model.stages[0].rest is not None and model.stages[0].rest[0].peg is None
    sd = torch_model.state_dict()
    np.testing.assert_array_equal(
        np.asarray(first.ff2.ff.fc1.weight), sd["layers.0.0.layers.0.3.net.1.weight"][..., 0, 0]
    )
    np.testing.assert_array_equal(
        np.asarray(first.iwsa.to_q.weight), sd["layers.0.0.layers.0.4.to_q.weight"][..., 0, 0]
    )


def test_size_multiple():
    model = eqx.filter_eval_shape(lambda: ev.ScalableViT(**SMALL, key=jax.random.key(0)))
    assert model.size_multiple == 16 and model.smallest_size == 13
    readme = eqx.filter_eval_shape(
        lambda: ev.ScalableViT(
            num_classes=1000,
            dim=64,
            heads=(2, 4, 8, 16),
            depth=(2, 2, 20, 2),
            ssa_dim_key=(40, 40, 40, 32),
            reduction_factor=(8, 4, 2, 1),
            window_size=(64, 32, None, None),
            key=jax.random.key(0),
        )
    )
    assert readme.size_multiple == 256
    # The stem and the downsampling round up, so a few pixels fewer also work.
    assert [s for s in range(1, 600) if readme._fit(s) is None] == [
        253,
        254,
        255,
        256,
        509,
        510,
        511,
        512,
    ]


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(depth=()), "depth"),
        (dict(depth=(2, -1)), "depth"),
        (dict(heads=(2, 1, 1)), "heads"),
        (dict(heads=0), "heads"),
        (dict(reduction_factor=(2,)), "reduction_factor"),
        (dict(window_size=(4, 0)), "window_size"),
        (dict(window_size=(4, None, None)), "window_size"),
        (dict(ssa_dim_key=0), "ssa_dim_key"),
        (dict(ssa_dim_value=(8, 0)), "ssa_dim_value"),
        (dict(iwsa_dim_key=-1), "iwsa_dim_key"),
        (dict(iwsa_dim_value=(1, 2, 3)), "iwsa_dim_value"),
        (dict(dim=0), "dim"),
        (dict(ff_expansion_factor=0), "ff_expansion_factor"),
        (dict(channels=0), "channels"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        ev.ScalableViT(**{**SMALL, **change}, key=jax.random.key(0))


def test_depth_must_be_a_sequence(no_typecheck):
    with pytest.raises(ValueError, match="depth must be a sequence of ints; got 2"):
        ev.ScalableViT(**{**SMALL, "depth": 2}, key=jax.random.key(0))
