"""The throughput benchmark's saved results: written atomically, merged into one table."""

import importlib.util
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import pytest

import eqx_vision as ev
from eqx_vision.layers import pair
from eqx_vision.layers._random import active_rates


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module
    spec.loader.exec_module(module)
    return module


def _run(precision: str, systems: list[str], cpu: str = "Test CPU") -> dict:
    rows = [{"system": s, "params": 1e6, "infer_ratio": 1.0, "train_ratio": 0.5} for s in systems]
    return {
        "cpu": {"model": cpu, "cores": 2, "isa": ["avx512f"]},
        "batch": 16,
        "reps": 5,
        "precision": precision,
        "matmul_gflops": {"torch": 150.0, "jax": 160.0},
        "rows": rows,
    }


def test_cpu_description_names_the_cpu(throughput):
    cpu = throughput.cpu_description()
    assert cpu["model"] and cpu["cores"] >= 1
    assert set(cpu["isa"]) <= set(throughput.ISA_FLAGS)


def test_write_json_replaces_whole_files(throughput, tmp_path):
    path = tmp_path / "out.json"
    throughput.write_json(path, _run("float32", ["ViT"]))
    throughput.write_json(path, _run("float32", ["ViT", "CaiT"]))
    assert [r["system"] for r in json.loads(path.read_text())["rows"]] == ["ViT", "CaiT"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(TypeError):  # not serialisable: the saved file is untouched
        throughput.write_json(path, {"rows": [object()]})
    assert len(json.loads(path.read_text())["rows"]) == 2


def test_merge_saved_joins_runs_of_one_precision(throughput, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run("float32", ["ViT", "CaiT"], cpu="CPU A")))
    b.write_text(json.dumps(_run("float32", ["CvT"], cpu="CPU B")))
    precision, lines, rows = throughput.merge_saved([str(a), str(b)])
    assert precision == "float32"
    assert [r["system"] for r in rows] == ["ViT", "CaiT", "CvT"]
    assert "CPU A, 2 cores (avx512f)" in lines[0] and "CPU B" in lines[1]
    assert "torch 150, jax 160" in lines[0]


def test_merge_saved_rejects_mixed_or_foreign_files(throughput, tmp_path):
    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    a.write_text(json.dumps(_run("float32", ["ViT"])))
    b.write_text(json.dumps(_run("bfloat16", ["ViT"])))
    other.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match=r"mix precisions \['bfloat16', 'float32'\]"):
        throughput.merge_saved([str(a), str(b)])
    with pytest.raises(ValueError, match="holds no results of this benchmark"):
        throughput.merge_saved([str(other)])
    with pytest.raises(ValueError, match="cannot read results from"):
        throughput.merge_saved([str(tmp_path / "missing.json")])


TINY = dict(
    image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
    dim_head=16,
)  # fmt: skip


def test_train_step_memory_under_each_policy(throughput):
    config = throughput.Config("ViT", "vit", "ViT", TINY, image_size=(32, 32))
    row = throughput.train_step_memory(config, throughput.REMAT)
    mib = {mode: row[f"temp_mib_{mode}"] for mode in throughput.REMAT}
    assert mib["all"] > mib["linear"] > mib["inputs"] > 0


def test_every_configuration_builds_without_dropout(throughput):
    # The README configurations come from the presets, at 128 px and without dropout.
    assert len({config.name for config in throughput.CONFIGS}) == 17
    for config in throughput.CONFIGS:
        cls = getattr(ev, config.name)
        model, _ = eqx.filter_eval_shape(
            lambda cls=cls, config=config: eqx.nn.make_with_state(cls)(
                **config.kwargs, key=jax.random.key(0)
            )
        )
        assert not active_rates(model), config.name
        if "image_size" in config.kwargs:
            assert pair(config.kwargs["image_size"], "image_size") == config.image_size
    readme = throughput.readme("cross-vit-reference", image_size=128)
    assert readme["image_size"] == 128 and readme["num_classes"] == 1000
    assert readme["dropout"] == readme["emb_dropout"] == 0.0


@pytest.mark.parametrize("donate", [False, True])
def test_one_row_with_and_without_donation(throughput, donate):
    config = throughput.Config("ViT", "vit", "ViT", TINY, image_size=(32, 32))
    row = throughput.bench_config(config, 1, 0.0, "linear", "float32", donate)
    assert row["donated"] is donate and row["rel_err"] < 1e-5
    for task in ("infer", "train"):
        assert row[f"{task}_eqx"] > 0 and row[f"{task}_torch"] > 0
        assert row[f"{task}_ratio"] == pytest.approx(row[f"{task}_eqx"] / row[f"{task}_torch"])
    run = {**_run("float32", ["ViT"]), "donate": donate}
    assert ("training step donated" in throughput.describe(run)) is donate
