import gc
import os
import re

from compilation import suite_flags


# Four CPU devices for the data-parallel tests and fast compilation (see compilation.py);
# set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = suite_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> str:
    """For the command-line tests: 96 training and 40 test digits (8x8), a data set a tiny
    model trains on in seconds."""
    from eqx_vision import data

    raw = data.load_digits()
    train, test = np.asarray(raw.train_images), np.asarray(raw.test_images)
    path = tmp_path_factory.mktemp("data") / "digits-small.npz"
    np.savez(
        path,
        images=(train[:96, 0] * 255).astype(np.uint8),
        labels=raw.train_labels[:96],
        test_images=(test[:40, 0] * 255).astype(np.uint8),
        test_labels=raw.test_labels[:40],
    )
    return str(path)


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


@pytest.fixture
def exact_zero_gradients():
    """For a parity test (`reference.check_parity`), the parameters whose exact gradient is
    zero: a shift that a later softmax or normalisation removes whatever its value (a bias
    added to every score of a query, a shift of every channel before a LayerNorm). Both
    sides hold only rounding noise there, of any relative size, and a comparison of noise
    would need a tolerance that lets every other parameter through.

    `stop = exact_zero_gradients(torch_model, theirs, ours)` switches off torch's gradient
    for the parameters whose names match the regular expression `theirs` (their gradient is
    then `None`, compared as zeros) and returns `stop(model)`, the model with
    `jax.lax.stop_gradient` on the leaves whose paths match `ours`, for the `call` passed to
    `check_parity`: both sides are then exactly zero there, and every other parameter is
    compared at the test's relative tolerance with no absolute one. Each pattern must match
    at least one parameter; one that matches too few leaves noise on one side, which fails.
    """
    import equinox as eqx

    def apply(torch_model, theirs: str, ours: str):
        matched = [n for n, p in torch_model.named_parameters() if re.search(theirs, n)]
        assert matched, f"no parameter of the reference matches {theirs!r}"
        for name, param in torch_model.named_parameters():
            if name in matched:
                param.requires_grad_(False)

        def stop(model):
            def leaf(path, x):
                if eqx.is_inexact_array(x) and re.search(ours, jax.tree_util.keystr(path)):
                    found.append(path)
                    return jax.lax.stop_gradient(x)
                return x

            found: list = []
            model = jax.tree_util.tree_map_with_path(leaf, model)
            assert found, f"no leaf of the model matches {ours!r}"
            return model

        return stop

    return apply
