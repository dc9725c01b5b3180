"""CrossFormer: parity with vit_pytorch.crossformer.CrossFormer,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.models.crossformer import dpb_gather_indices, dpb_offsets
from reference import check_parity, count_params, reference, torch_param_count


# (config, input shape). Heads are dim // 32, so dims of 32, 64, 96 give 1, 2, 3 heads.
CONFIGS: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    (
        dict(
            dim=32,
            depth=(1, 2, 1, 1),
            global_window_size=(4, 2, 2, 1),
            local_window_size=2,
            cross_embed_kernel_sizes=((2, 4), (2,), (2, 4), (2,)),
            cross_embed_strides=2,
            num_classes=10,
        ),
        (3, 32, 32),
    ),
    # Rectangular, one channel, three kernels (channel split 16/8/8), a stage without
    # blocks (its map need not fit any window).
    (
        dict(
            dim=(32, 64, 32, 64),
            depth=(2, 1, 0, 1),
            global_window_size=(2, 1, 1, 1),
            local_window_size=(4, 2, 2, 1),
            cross_embed_kernel_sizes=((4, 8, 16), (2, 4), (2,), (2, 4)),
            cross_embed_strides=(4, 2, 2, 2),
            num_classes=7,
            channels=1,
        ),
        (1, 64, 32),
    ),
    # Odd kernel - stride (padding floors), unsorted kernels, stride 1, 3 heads, a side
    # that is not a multiple of anything, dropout (off in inference).
    (
        dict(
            dim=(32, 32, 96, 32),
            depth=1,
            global_window_size=(3, 1, 2, 1),
            local_window_size=(2, 3, 1, 1),
            cross_embed_kernel_sizes=((5, 3), (3,), (2, 4), (1,)),
            cross_embed_strides=(2, 1, 2, 1),
            num_classes=5,
            attn_dropout=0.1,
            ff_dropout=0.1,
            channels=2,
        ),
        (2, 26, 25),
    ),
]

SMALL: dict[str, Any] = CONFIGS[0][0]

# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 5.2e-7 (relative to the largest output), gradients 8.2e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.8x and
# 4.9x over them.
TOL, GRAD_TOL = 3e-6, 4e-5


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_parity(config, shape, exact_zero_gradients):
    torch_model = reference("crossformer").CrossFormer(**config)
    model = ev.CrossFormer(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    # The last Linear of each position-bias MLP adds one constant to every score, which the
    # softmax removes: its exact bias gradient is zero, and both sides hold rounding noise
    # there (~1e-5 next to gradients of ~1e3).
    stop = exact_zero_gradients(torch_model, r"\.dpb\.9\.bias$", r"\.dpb\.linears\[3\]\.bias$")
    call = eqx.filter_jit(lambda m, x: jax.vmap(stop(m))(x))
    check_parity(model, torch_model, shape, call=call, tol=TOL, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_accepted_sizes_match_reference(config, shape):
    """The sides the model accepts are exactly those the reference runs on."""
    torch_model = reference("crossformer").CrossFormer(**config).eval()
    model = eqx.filter_eval_shape(lambda: ev.CrossFormer(**config, key=jax.random.key(0)))
    with torch.no_grad():
        for side in range(1, 70):
            try:
                torch_model(torch.zeros(1, shape[0], side, side))
                runs = True
            except Exception:
                runs = False
            assert runs == (model._fit(side) is None), side


def test_size_multiple():
    multiple = dict(
        CONFIGS[0][0],
        cross_embed_kernel_sizes=((4, 8), (2,), (2, 4), (2,)),
        cross_embed_strides=(4, 2, 2, 2),
    )
    model = eqx.filter_eval_shape(lambda: ev.CrossFormer(**multiple, key=jax.random.key(0)))
    assert model.size_multiple == 64
    assert all(model._fit(64 * j) is None for j in range(1, 20))
    # Odd kernel - stride: the map is one pixel short at multiples, so no multiple works.
    odd = eqx.filter_eval_shape(lambda: ev.CrossFormer(**CONFIGS[2][0], key=jax.random.key(0)))
    assert odd.size_multiple is None and odd.smallest_size == 25


def test_readme_size_multiple():
    model = eqx.filter_eval_shape(lambda: ev.CrossFormer(num_classes=1000, key=jax.random.key(0)))
    assert model.size_multiple == 224
    accepted = [s for s in range(1, 700) if model._fit(s) is None]
    # Floored strides also take a few pixels more, as the reference does.
    assert accepted == [224, 225, 226, 227, 448, 449, 450, 451, 672, 673, 674, 675]


def test_position_bias_indices_reproduce_reference():
    torch_model = reference("crossformer").CrossFormer(**SMALL)
    for name, buffer in torch_model.named_buffers():
        assert name.endswith("rel_pos_indices")
        window = int(round(buffer.shape[0] ** 0.5))
        np.testing.assert_array_equal(dpb_gather_indices(window), buffer.numpy())
    assert "rel_pos_indices" not in " ".join(torch_model.state_dict())
    # The mismatch: the pair at offset (0, 0) reads the MLP at (-2, 2) for w = 7.
    offsets = dpb_offsets(7)
    np.testing.assert_array_equal(offsets[dpb_gather_indices(7)[0, 0]], [-2.0, 2.0])
    np.testing.assert_array_equal(dpb_offsets(1)[dpb_gather_indices(1)[0, 0]], [-1.0, -1.0])


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(dim=(32, 64)), "dim"),
        (dict(dim=16), "dim"),
        (dict(dim=(32, 32, 0, 32)), "dim"),
        (dict(depth=-1), "depth"),
        (dict(global_window_size=(4, 2, 0, 1)), "global_window_size"),
        (dict(local_window_size=(2, 2, 2)), "local_window_size"),
        (dict(cross_embed_strides=(2, 2, 2, 0)), "cross_embed_strides"),
        (dict(cross_embed_kernel_sizes=(4, 8, 16, 32)), "cross_embed_kernel_sizes"),
        (dict(cross_embed_kernel_sizes=((2, 3), (2,), (2,), (2,))), "cross_embed_kernel_sizes"),
        (dict(cross_embed_kernel_sizes=((1,), (2,), (2,), (2,))), "cross_embed_kernel_sizes"),
        (dict(num_classes=-1), "num_classes"),
        (dict(channels=0), "channels"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(ff_dropout=-0.1), "ff_dropout"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        ev.CrossFormer(**{**SMALL, **change}, key=jax.random.key(0))
