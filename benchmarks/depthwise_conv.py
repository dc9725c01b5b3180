# ruff: noqa: B023  (every closure below is called within its own loop iteration)
"""Depthwise 3x3 convolution on CPU: XLA's grouped convolution against the shifted
multiply-add formulation of `eqx_vision.layers.DepthwiseConv2d`, and torch for scale.

    python benchmarks/depthwise_conv.py [--json out.json]

Median milliseconds of forward and forward+backward on a (16, 192, 32, 32) batch, measured
side by side in one process after warm-up.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from eqx_vision.layers import DepthwiseConv2d


def median_ms(fn: Callable[[], object], reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n, c, size = 16, 192, 32
    x = np.random.default_rng(0).standard_normal((n, c, size, size), dtype=np.float32)
    rows = []
    for stride in (1, 2):
        layer = DepthwiseConv2d(c, 3, stride=stride, padding=1, key=jax.random.key(0))
        weight, bias = layer.weight, jnp.asarray(layer.bias)

        def grouped(w, x, stride=stride):
            y = jax.lax.conv_general_dilated(
                x, w, (stride, stride), ((1, 1), (1, 1)), feature_group_count=c
            )
            return y + bias[None, :, None, None]

        shifted = jax.vmap(layer)
        xj = jnp.asarray(x)
        fwd = {
            "lax grouped conv": jax.jit(lambda x: grouped(weight, x)),
            "DepthwiseConv2d": eqx.filter_jit(shifted),
        }
        bwd = {
            "lax grouped conv": jax.jit(jax.grad(lambda w, x: grouped(w, x).sum(), (0, 1))),
            "DepthwiseConv2d": eqx.filter_jit(eqx.filter_grad(lambda m, x: jax.vmap(m)(x).sum())),
        }
        np.testing.assert_allclose(fwd["lax grouped conv"](xj), fwd["DepthwiseConv2d"](xj),
                                   atol=1e-4)  # fmt: skip
        tconv = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c)
        xt = torch.from_numpy(x).requires_grad_(True)

        def torch_fwd():
            with torch.no_grad():
                tconv(xt)

        def torch_bwd():
            tconv(xt).sum().backward()

        results = {
            "lax grouped conv": (
                median_ms(lambda: fwd["lax grouped conv"](xj).block_until_ready()),
                median_ms(lambda: jax.block_until_ready(bwd["lax grouped conv"](weight, xj))),
            ),
            "DepthwiseConv2d": (
                median_ms(lambda: fwd["DepthwiseConv2d"](xj).block_until_ready()),
                median_ms(lambda: jax.block_until_ready(bwd["DepthwiseConv2d"](layer, xj))),
            ),
            "torch (NCHW)": (median_ms(torch_fwd), median_ms(torch_bwd)),
        }
        for name, (f, b) in results.items():
            rows.append({"stride": stride, "formulation": name, "fwd_ms": f, "fwd_bwd_ms": b})
    print(f"{'stride':>6}  {'formulation':<20}{'fwd (ms)':>10}{'fwd+bwd (ms)':>14}")
    for r in rows:
        print(
            f"{r['stride']:>6}  {r['formulation']:<20}{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>14.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
