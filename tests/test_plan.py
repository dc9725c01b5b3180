"""`eqx_vision.plan` and `eqx-vision plan`: parameters, FLOPs and the training step's memory
from abstract shapes, checked against the built model and an analytic count."""

import json

import jax
import pytest

from eqx_vision import cli, presets, training
from eqx_vision.plan import plan_training


VIT = {"model": "ViT", "image_size": 32, "patch_size": 8, "dim": 32, "depth": 4, "heads": 2,
       "dim_head": 16, "mlp_dim": 64}  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "vit.json"
    path.write_text(json.dumps(VIT))
    return presets.resolve_model(str(path), num_classes=10, data_channels=3)


def vit_dot_flops(classes: int = 10) -> int:
    """The FLOPs of the matrix products of one image's forward pass (2 per multiply-add)."""
    d, p, heads, dh, m = (
        VIT["dim"],
        VIT["patch_size"],
        VIT["heads"],
        VIT["dim_head"],
        VIT["mlp_dim"],
    )
    n = (VIT["image_size"] // p) ** 2 + 1
    inner = heads * dh
    block = 2 * n * d * 3 * inner + 2 * 2 * heads * n * n * dh + 2 * n * inner * d
    block += 2 * 2 * n * d * m
    return 2 * (n - 1) * p * p * 3 * d + VIT["depth"] * block + 2 * d * classes


@pytest.fixture(scope="module")
def plan(config):
    return plan_training(config, 8, precisions=("float32", "bfloat16"), remats=("inputs", "all"))


def test_parameters_are_those_of_the_built_model(config, plan):
    model, _ = config.build(jax.random.key(0))
    assert plan.params == training.count_params(model)
    assert plan.state_values == 0


def test_forward_flops_are_the_matrix_products_of_every_block(plan):
    """The count of the products, every block of the scanned stack included."""
    assert plan.forward_flops == vit_dot_flops()
    # A training step is about three forward passes (forward, two products per backward).
    assert 2.5 * plan.forward_flops <= plan.train_flops <= 4 * plan.forward_flops


def test_memory_by_policy_and_precision(plan):
    rows = {(m.precision, m.remat): m for m in plan.memory}
    assert len(rows) == 4
    for m in plan.memory:
        # Parameters and AdamW's two moments in float32, at least.
        assert m.arguments >= 3 * 4 * plan.params
        assert m.total >= m.arguments + m.temporaries - m.aliased
    # Keeping only each block's input uses less memory and recomputes more.
    assert rows["float32", "inputs"].temporaries < rows["float32", "all"].temporaries
    assert rows["float32", "inputs"].flops > rows["float32", "all"].flops
    assert rows["bfloat16", "all"].temporaries < rows["float32", "all"].temporaries


def test_bad_arguments_are_errors(config):
    with pytest.raises(ValueError, match="batch_size"):
        plan_training(config, 0)
    with pytest.raises(ValueError, match="precision"):
        plan_training(config, 2, precisions=("float16",))
    with pytest.raises(ValueError, match="remat"):
        plan_training(config, 2, remats=("some",))


def test_the_command_prints_and_saves_the_plan(config, tmp_path, capsys):
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(VIT))
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--model", str(path), "--batch-size", "8", "--num-classes", "10",
                     "--precision", "float32", "--remat", "all", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "parameters" in printed and "GFLOPs per image" in printed
    saved = json.loads(out.read_text())
    assert saved["params"] == training.count_params(
        config.build(__import__("jax").random.key(0))[0]
    )
    assert [(r["precision"], r["remat"]) for r in saved["memory"]] == [("float32", "all")]
    assert saved["memory"][0]["total"] > 0
    code = cli.main(["plan", "--model", "nope", "--batch-size", "8"])
    assert code == 2 and "unknown model" in capsys.readouterr().err


# ---- FSDP: the parameters and optimizer state sharded over several devices --------------

# Wide enough that its large arrays pass `DataParallel`'s default `min_shard_bytes` (1 MiB):
# 6.4 M parameters, 96% of them in arrays that are sharded.
WIDE = {"model": "ViT", "image_size": 32, "patch_size": 8, "dim": 512, "depth": 2, "heads": 8,
        "dim_head": 64, "mlp_dim": 2048}  # fmt: skip


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "wide.json"
    path.write_text(json.dumps(WIDE))
    return presets.resolve_model(str(path), num_classes=10, data_channels=3)


@pytest.fixture(scope="module")
def wide_plans(wide):
    """One device, and FSDP over 4 and 8 devices (8: more than the 4 of the test process,
    each compiled for one device standing for all)."""
    args = dict(precisions=("float32",), remats=("all",))
    return {n: plan_training(wide, 4, fsdp=n, **args) for n in (None, 4, 8)}


def test_fsdp_divides_the_parameters_and_optimizer_state(wide_plans):
    one, four, eight = wide_plans[None], wide_plans[4], wide_plans[8]
    assert (one.devices, one.fsdp) == (1, False)
    assert (four.devices, four.fsdp, eight.devices) == (4, True, 8)
    # AdamW: the parameters and two moments, float32, and its step counts.
    assert 0 <= one.param_bytes - 3 * 4 * one.params <= 64
    # Measured: 73.4 / 19.4 / 10.4 MiB; all but the small arrays (4%) divided.
    assert 1 / 4 < four.param_bytes / one.param_bytes < 0.3
    assert 1 / 8 < eight.param_bytes / one.param_bytes < 0.16
    (m1,), (m4,), (m8,) = one.memory, four.memory, eight.memory
    # The step's inputs are those arrays and the batch of one device, as XLA counts them.
    for plan, m in ((one, m1), (four, m4), (eight, m8)):
        batch = 4 * (4 * 3 * 32 * 32 + 4)  # images and labels, 4 per device
        assert plan.param_bytes + batch <= m.arguments <= plan.param_bytes + batch + 1024
        assert m.flops == m1.flops
    # Fewer gradients to keep: fewer temporaries (measured 68.7 / 29.2 / 23.6 MiB).
    assert m8.temporaries < m4.temporaries < m1.temporaries
    assert m8.total < m4.total < 0.5 * m1.total


def test_fsdp_plan_is_the_step_compiled_for_devices(wide, wide_plans, monkeypatch):
    """The plan of an abstract mesh is that of the step compiled over 4 real devices, and
    the same compiled for one device standing for the four."""
    from eqx_vision import plan as plan_module

    args = (wide, 4, ("float32",), ("all",))
    real = plan_module._plan(*args, training.DataParallel.create(4, fsdp=True))
    assert real.memory == wide_plans[4].memory
    monkeypatch.setattr(plan_module, "_device_assignment", lambda n: (jax.devices()[0],) * n)
    stand_in = plan_training(wide, 4, fsdp=4, precisions=("float32",), remats=("all",))
    assert stand_in.memory == wide_plans[4].memory
    with pytest.raises(ValueError, match="fsdp"):
        plan_training(wide, 4, fsdp=0)


def test_the_command_plans_fsdp(tmp_path, capsys):
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(VIT))
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--model", str(path), "--batch-size", "8", "--num-classes", "10",
                     "--precision", "float32", "--remat", "all", "--fsdp", "2",
                     "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "on each of 2 devices" in printed and "sharded over them (FSDP)" in printed
    saved = json.loads(out.read_text())
    assert (saved["devices"], saved["fsdp"]) == (2, True)
    assert 0 < saved["param_bytes"] and saved["memory"][0]["total"] > 0
    code = cli.main(["plan", "--model", str(path), "--batch-size", "8", "--fsdp", "0"])
    assert code == 2 and "--fsdp" in capsys.readouterr().err
