"""RegionViT: parity with vit_pytorch.regionvit.RegionViT,
loaded through `reference`; configuration errors. (Input errors: test_behaviour.py;
the full-size reference snippet: test_readme.py.)"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import torch

import eqx_vision as ev
from eqx_vision.models.regionvit import _stage_windows, _supported_sides
from reference import check_parity, count_params, reference, torch_param_count


# One compiled program for the forward pass (and one for its gradient) per config.
_jit_call = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))


CONFIGS: list[tuple[dict[str, Any], tuple[int, int, int]]] = [
    # Windows of 2 at every stage; a stage of depth 2.
    (
        dict(dim=(8, 16, 16, 24), depth=(1, 1, 2, 1), window_size=2, num_classes=5),
        (3, 64, 64),
    ),
    # 3-conv tokenizer and PEGs; rectangular image, so windows of (3, 3), (3, 3), (2, 3) and
    # (1, 2) local tokens; dropout rates (off in inference mode).
    (
        dict(
            dim=(8, 16, 16, 24),
            depth=(1, 2, 1, 1),
            window_size=3,
            num_classes=7,
            tokenize_local_3_conv=True,
            use_peg=True,
            attn_dropout=0.1,
            ff_dropout=0.1,
        ),
        (3, 24, 48),
    ),
    # local_patch_size 2: windows of 2 local tokens in a table built for window_size 4.
    (
        dict(dim=16, depth=1, window_size=4, local_patch_size=2, num_classes=3, use_peg=True),
        (3, 32, 32),
    ),
]

SMALL: dict[str, Any] = dict(dim=8, depth=1, window_size=2, num_classes=3)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs 5.9e-7 (relative to the largest output), gradients 3.0e-6 (of the input
# and of every parameter, each relative to its own largest); the tolerances are 5.1x and
# 6.7x over them.
TOL, GRAD_TOL = 3e-6, 2e-5


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_parity(config, shape):
    torch_model = reference("regionvit").RegionViT(**config)
    model = ev.RegionViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, shape, call=_jit_call, tol=TOL, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("tokenize_local_3_conv", [False, True])
def test_parity_other_channels(tokenize_local_3_conv):
    # The reference's local tokenizer reads 3 channels whatever `channels` says; with its
    # first convolution made to read `channels`, the models agree again.
    config: dict[str, Any] = dict(
        dim=8,
        depth=1,
        window_size=2,
        local_patch_size=2,
        num_classes=4,
        channels=1,
        tokenize_local_3_conv=tokenize_local_3_conv,
    )
    torch_model = reference("regionvit").RegionViT(**config)
    if tokenize_local_3_conv:
        torch_model.local_encoder[0] = torch.nn.Conv2d(1, 8, 3, 2, 1)
    else:
        torch_model.local_encoder = torch.nn.Conv2d(1, 8, 8, 4, 3)
    model = ev.RegionViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (1, 12, 8), call=_jit_call, tol=TOL, grad_tol=GRAD_TOL)


def test_supported_sizes_match_reference():
    config: dict[str, Any] = dict(dim=8, depth=1, num_classes=2)  # window 7, local patch 4
    torch_model = reference("regionvit").RegionViT(**config).eval()
    model = ev.RegionViT(**config, key=jax.random.key(0))
    assert (model.side_multiple, model.extra_sides) == (224, (28, 56, 112, 560))
    sizes = [(s, s) for s in range(28, 281, 28)] + [(30, 30), (560, 560), (56, 112), (224, 84)]
    for size in sizes:
        try:
            with torch.no_grad():
                torch_model(torch.zeros(1, 3, *size))
            runs = True
        except Exception:
            runs = False
        assert model.supports(*size) == runs, size
        if not runs:
            with pytest.raises(ValueError, match=r"28, 56, 112, 560 or any multiple of 224"):
                model(jnp.zeros((3, *size)))
    assert model(jnp.zeros((3, 56, 112))).shape == (2,)


@pytest.mark.parametrize(
    "window_size, local_patch_size, three_conv",
    [
        (7, 4, False),
        (7, 4, True),
        (2, 4, False),
        (3, 4, True),
        (12, 4, False),
        (4, 1, False),
        (2, 2, False),
        (3, 2, False),
        (3, 2, True),
        (5, 3, False),
        (7, 8, False),
        (14, 4, True),
    ],
)
def test_supported_sides_description(window_size, local_patch_size, three_conv):
    multiple, extra = _supported_sides(window_size, local_patch_size, three_conv)
    limit = 40 * (window_size + 1) * local_patch_size * window_size
    for side in range(1, limit):
        fits = _stage_windows(side, window_size, local_patch_size, three_conv) is not None
        described = side in extra or (multiple is not None and side % multiple == 0)
        assert fits == described, side


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(dim=(8, 8, 8)), "dim"),
        (dict(dim=0), "dim"),
        (dict(depth=(1, 1, 0, 1)), "depth"),
        (dict(depth=(1, 1)), "depth"),
        (dict(window_size=0), "window_size"),
        (dict(local_patch_size=0), "local_patch_size"),
        (dict(window_size=7, local_patch_size=8), "local_patch_size"),
        (dict(num_classes=-1), "num_classes"),
        (dict(channels=0), "channels"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(ff_dropout=-0.1), "ff_dropout"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        ev.RegionViT(**{**SMALL, **change}, key=jax.random.key(0))
