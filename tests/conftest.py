import gc
import os

from compilation import suite_flags


# Four CPU devices for the data-parallel tests and fast compilation (see compilation.py);
# set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = suite_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def no_typecheck():
    """Switch the jaxtyping hook off, to see the errors a user without it gets."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every compiled program keeps a few memory mappings for its code, and a test process
    compiles thousands of them (each eager operation on a new shape is one): without this,
    a long-lived test worker reaches the kernel's limit on mappings (`vm.max_map_count`,
    65530 by default) and crashes in the compiler with a segmentation fault.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _seed_torch():
    """Seed torch's global generator before every test, so that a reference module built
    in a test starts from the same weights whatever ran before it in the same process
    (the parity checks then perturb them with their own seeded generator)."""
    import torch

    torch.manual_seed(0)
