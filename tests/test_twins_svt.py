from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


def stages(*rows: tuple[int, int, int, int, int]) -> dict[str, int]:
    """`s{i}_{emb_dim, patch_size, local_patch_size, global_k, depth}` from one row per stage."""
    names = ("emb_dim", "patch_size", "local_patch_size", "global_k", "depth")
    return {
        f"s{i}_{n}": v for i, row in enumerate(rows, 1) for n, v in zip(names, row, strict=True)
    }


CONFIGS: list[tuple[dict[str, Any], tuple[int, int]]] = [
    # A stage without extra blocks, a last stage without patch merging.
    (
        dict(
            num_classes=10,
            **stages((8, 2, 2, 2, 1), (16, 2, 2, 2, 0), (16, 2, 2, 2, 2), (24, 1, 5, 2, 1)),
        ),
        (32, 32),
    ),
    # Rectangular; key/value convolutions that do not tile their maps (12x24 by 5, 6x12 by 4,
    # 6x12 by 3) and drop the last rows and columns; a 5x5 PEG.
    (
        dict(
            num_classes=7,
            peg_kernel_size=5,
            **stages((8, 2, 3, 5, 1), (12, 2, 3, 4, 0), (16, 1, 2, 3, 1), (16, 3, 7, 2, 1)),
        ),
        (24, 48),
    ),
    # 1x1 key/value convolutions (global_k=1), a 1x1 PEG, dropout (off in inference).
    (
        dict(
            num_classes=5,
            peg_kernel_size=1,
            dropout=0.1,
            **stages((8, 4, 4, 1, 0), (16, 2, 2, 2, 1), (16, 2, 2, 2, 1), (8, 2, 3, 1, 1)),
        ),
        (32, 32),
    ),
]

SMALL: dict[str, Any] = CONFIGS[0][0]

# One compilation for the forward pass and one for its gradient.
jitted = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU), per configuration: outputs 1.1e-6, 1.1e-6, 1.2e-6 (relative to the largest
# output); gradients 6.5e-6, 1.2e-5, 6.8e-5 (of the input and of every parameter, each
# relative to its own largest; the last one in a query projection whose gradient is
# 100x smaller than the others). The tolerances are 4-5x over them.
TOLERANCES = [(6e-6, 3e-5), (6e-6, 6e-5), (6e-6, 3e-4)]


@pytest.mark.parametrize(
    "config, size, tol, grad_tol",
    [
        pytest.param(config, size, *tolerances, id=f"config{i}-size{i}")
        for i, ((config, size), tolerances) in enumerate(zip(CONFIGS, TOLERANCES, strict=True))
    ],
)
def test_parity(config, size, tol, grad_tol):
    torch_model = reference("twins_svt").TwinsSVT(**config)
    model = ev.TwinsSVT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (3, *size), call=jitted, tol=tol, grad_tol=grad_tol)


@pytest.mark.parametrize(
    "config, multiple, minimum",
    [(CONFIGS[0][0], 16, 16), (CONFIGS[1][0], 24, 24), (CONFIGS[2][0], 32, 32)],
)
def test_supported_sizes(config, multiple, minimum):
    model = ev.TwinsSVT(**config, key=jax.random.key(0))
    assert (model.size_multiple, model.min_size) == (multiple, minimum)


def test_supported_sizes_match_the_reference(no_typecheck):
    torch_model = reference("twins_svt").TwinsSVT(**SMALL)
    torch_model.eval()
    model = eqx.nn.inference_mode(
        ev.from_vit_pytorch(ev.TwinsSVT(**SMALL, key=jax.random.key(0)), torch_model.state_dict())
    )
    call = eqx.filter_jit(lambda m, x: m(x))
    # Multiples of 16: run, and agree with the reference.
    x = jax.random.normal(jax.random.key(1), (3, 48, 16))
    with torch.no_grad():
        expected = torch_model(torch.tensor(np.array(x))[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(call(model, x)), expected, rtol=1e-4, atol=1e-4)
    # Not a multiple of 16: the reference fails in a window rearrangement, this one up front.
    for shape in ((3, 40, 32), (3, 32, 24)):
        with pytest.raises(Exception):  # noqa: B017 (einops raises its own error type)
            torch_model(torch.zeros((1, *shape)))
        with pytest.raises(ValueError, match=rf"multiples of 16.*{shape[1]}, {shape[2]}"):
            model(jnp.zeros(shape))


def test_local_attention_has_no_probability_dropout():
    model = ev.TwinsSVT(**SMALL, dropout=0.5, key=jax.random.key(0))
    first = model.stages[0].first
    assert first.local_attn is not None and first.local_attn.attn_dropout is None
    assert first.global_attn.attn_dropout is not None
    last = model.stages[3].first
    assert last.local_attn is None and last.local_ff is None


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(peg_kernel_size=4), "peg_kernel_size"),
        (dict(peg_kernel_size=0), "peg_kernel_size"),
        (dict(s1_patch_size=0), "s1_patch_size"),
        (dict(s2_local_patch_size=0), "s2_local_patch_size"),
        (dict(s3_global_k=0), "s3_global_k"),
        (dict(s4_emb_dim=0), "s4_emb_dim"),
        (dict(s3_depth=-1), "s3_depth"),
        (dict(s1_depth=1.5), "s1_depth"),
        (dict(num_classes=-1), "num_classes"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(change, name, no_typecheck):
    with pytest.raises(ValueError, match=name):
        ev.TwinsSVT(**{**SMALL, **change}, key=jax.random.key(0))
