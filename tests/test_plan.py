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
