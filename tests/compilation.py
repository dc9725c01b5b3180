"""How the test suite compiles.

Almost every program the tests compile is a tiny model run on one or two images: XLA spends
seconds compiling it and microseconds running it. The suite therefore compiles with LLVM's
optimisations off and XLA:CPU's older elemental emitters instead of its fusion emitters,
which makes compilation 2-3x faster (a tiny Twins-SVT gradient: 8.7 s -> 2.5 s) and gives
the same numbers within the tests' tolerances. The tests whose programs do real work
compile them fully optimised: the default training run (in a subprocess, `optimized_env`)
and the full-size Twins-SVT snippet (`compile_optimized`), the only ones that ran markedly
slower unoptimised (the other full-size snippets ran within a few seconds of their time).
"""

import os
from typing import Any


FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# Four CPU devices for the data-parallel tests.
DEVICE_FLAGS = ("--xla_force_host_platform_device_count=4",)
# XLA's defaults, as per-compilation options (which take precedence over XLA_FLAGS).
OPTIMIZED = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def suite_flags(flags: str) -> str:
    """`flags` (a user's XLA_FLAGS) with the suite's own flags added where not set there."""
    given = flags.split()
    names = {f.split("=")[0] for f in given}
    extra = [f for f in (*DEVICE_FLAGS, *FAST_COMPILE_FLAGS) if f.split("=")[0] not in names]
    return " ".join([*given, *extra])


def optimized_env() -> dict[str, str]:
    """The environment for a subprocess that compiles as a user's program does."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_FLAGS]
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def compile_optimized(fn: Any, *args: Any) -> Any:
    """`eqx.filter_jit(fn)` compiled for `args` with XLA's full optimisations."""
    import equinox as eqx  # not at import time: conftest sets XLA_FLAGS first

    jitted: Any = eqx.filter_jit(fn)
    return jitted.lower(*args).compile(OPTIMIZED)
