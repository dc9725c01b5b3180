"""The `eqx-vision` command line, called in-process through `main(argv)` (and once as the
installed console script)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from compilation import optimized_env
from eqx_vision import checkpoint, data
from eqx_vision.cli import main
from eqx_vision.presets import resolve_model


DETERMINISTIC = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "learning_rate")
TINY = ["--model", "vit-tiny", "--image-size", "8", "--batch-size", "16", "--seed", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> str:
    """96 training and 40 test digits (8x8): a data set a tiny model trains on in seconds."""
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_npz) -> str:
    """A tiny ViT trained for 3 epochs; shared by the tests that only read it."""
    out = str(tmp_path_factory.mktemp("run") / "vit")
    assert main(["train", *TINY, "--data", small_npz, "--epochs", "3", "--out", out]) == 0
    return out


def console_script() -> str:
    """The installed `eqx-vision`."""
    script = shutil.which("eqx-vision") or os.path.join(
        os.path.dirname(sys.executable), "eqx-vision"
    )
    assert os.path.exists(script), "the console script is installed with the package"
    return script


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: r[k] for k in DETERMINISTIC} for r in map(json.loads, f)]


def tensors(out: str) -> dict[str, np.ndarray]:
    import safetensors.numpy as st

    return st.load_file(os.path.join(out, "last.safetensors"))


def snapshot(folder: str) -> dict[str, str] | None:
    if not os.path.exists(folder):
        return None
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return result


def test_train_writes_its_outputs(trained, capsys):
    files = set(os.listdir(trained))
    assert {"config.json", "last.safetensors", "metrics.jsonl", "curves.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    records = metrics(trained)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [6, 12, 18]  # 96 images, batch 16
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    with open(os.path.join(trained, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    assert config["model_config"]["model"] == "ViT"
    assert config["model_config"]["kwargs"]["image_size"] == 8
    assert config["settings"]["epochs"] == 3


def test_train_last_line_is_test_accuracy(tmp_path, small_npz, capsys):
    out = str(tmp_path / "run")
    code, stdout, err = run(capsys, "train", *TINY, "--data", small_npz, "--epochs", "1",
                            "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    accuracy = metrics(out)[-1]["test_accuracy"]
    assert last == f"test accuracy: {accuracy:.2f}"
    assert "summary" in stdout and "images/s" in stdout


def test_evaluate(trained, capsys):
    code, out, err = run(capsys, "evaluate", "--checkpoint", trained)
    assert code == 0, err
    accuracy = metrics(trained)[-1]["test_accuracy"]
    assert out.strip().splitlines()[-1] == f"test accuracy: {accuracy:.2f}"


def test_predict(trained, tmp_path, capsys):
    from PIL import Image

    test_images = np.asarray(data.load_digits().test_images)
    paths = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((test_images[i, 0] * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    code, out, err = run(capsys, "predict", "--checkpoint", trained, "--top-k", "3", *paths)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == paths[0] and lines[4] == paths[1]
    probs = [float(line.split()[-1]) for line in lines[1:4]]
    classes = [line.split()[0] for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(c in [str(d) for d in range(10)] for c in classes)


def test_resume_equals_uninterrupted(trained, tmp_path, small_npz, capsys):
    out = str(tmp_path / "resumed")
    args = ["train", *TINY, "--data", small_npz, "--epochs", "3", "--out", out]
    # Stop in the middle of epoch 2, as if killed: the checkpoint holds epoch 1.
    code, stdout, err = run(capsys, *args, "--stop-after-steps", "9")
    assert code == 0, err
    assert "stopped after step 9" in stdout
    assert [r["epoch"] for r in metrics(out)] == [1]
    code, _, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 0, err
    assert metrics(out) == metrics(trained)
    a, b = tensors(out), tensors(trained)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_remat_changes_memory_not_results(trained, tmp_path, small_npz, capsys):
    out = str(tmp_path / "remat")
    code, _, err = run(capsys, "train", *TINY, "--data", small_npz, "--epochs", "3", "--out", out,
                       "--remat", "inputs")  # fmt: skip
    assert code == 0, err
    for a, b in zip(metrics(out), metrics(trained), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)


def test_console_script_killed_then_resumed(trained, tmp_path, small_npz, capsys):
    """The installed `eqx-vision`, killed with SIGKILL after its first checkpoint, leaves
    a loadable checkpoint, and the resumed run ends as the uninterrupted one."""
    script = console_script()
    out = str(tmp_path / "killed")
    argv = ["train", *TINY, "--data", small_npz, "--epochs", "3", "--out", out, "--no-progress"]
    proc = subprocess.Popen(
        [script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(out, "last.safetensors")):  # after epoch 1
                break
            time.sleep(0.05)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
    finally:
        stdout, stderr = proc.communicate(timeout=60)
    assert finished or proc.returncode == -signal.SIGKILL, stderr
    assert "Traceback" not in stderr
    code, _, err = run(capsys, "evaluate", "--checkpoint", out)  # the checkpoint is whole
    assert code == 0, err
    code, _, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 0, err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert metrics(out) == metrics(trained)
    a, b = tensors(out), tensors(trained)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("model", ["vit-tiny", "cvt-tiny"])
def test_devices_4_equals_devices_1(tmp_path, small_npz, capsys, model):
    curves = {}
    for devices in (1, 4):
        out = str(tmp_path / f"d{devices}")
        size = ["--image-size", "16"] if model == "cvt-tiny" else ["--image-size", "8"]
        code, _, err = run(capsys, "train", "--model", model, *size, "--batch-size", "16",
                           "--data", small_npz, "--epochs", "2", "--devices", str(devices),
                           "--out", out)  # fmt: skip
        assert code == 0, err
        curves[devices] = metrics(out)
    for a, b in zip(curves[4], curves[1], strict=True):
        for key in ("train_loss", "test_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_config_file_and_image_folder(tmp_path, capsys):
    """A JSON model config and a folder of PNGs in class sub-folders."""
    from PIL import Image

    raw = data.load_digits()
    root = tmp_path / "images"
    for label in (0, 1, 7):
        (root / f"class{label}").mkdir(parents=True)
        idx = np.flatnonzero(raw.train_labels == label)[:10]
        for i in idx:
            pixels = (np.asarray(raw.train_images)[i, 0] * 255).astype(np.uint8)
            img = Image.fromarray(pixels).convert("RGB")
            img.save(root / f"class{label}" / f"{i}.png")
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model": "SimpleViT", "image_size": 8, "patch_size": 4,
                                  "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16,
                                  "dim_head": 8}))  # fmt: skip
    out = str(tmp_path / "run")
    code, stdout, err = run(capsys, "train", "--model", str(config), "--data", str(root),
                            "--epochs", "1", "--batch-size", "8", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "3 classes, input 3x8x8" in stdout
    code, stdout, err = run(capsys, "predict", "--checkpoint", out,
                            str(root / "class7" / os.listdir(root / "class7")[0]))  # fmt: skip
    assert code == 0, err
    assert {line.split()[0] for line in stdout.splitlines()[1:]} == {"class0", "class1", "class7"}


def test_presets_command(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert "default" in names and "vit-tiny" in names and len(names) == 52


# ---- bad input: one line on stderr, exit code 2, no traceback, nothing overwritten -------


def _bad_cases(tmp_path, trained: str, small_npz: str) -> dict[str, tuple[list[str], str, str]]:
    """name -> (argv, the --out folder to watch, a fragment of the message)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "b").mkdir()
    broken = tmp_path / "broken"
    for c in ("a", "b"):
        (broken / c).mkdir(parents=True)
        (broken / c / "x.png").write_bytes(b"not a png")
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG garbage")
    fresh = str(tmp_path / "fresh")
    # A copy of the trained run whose checkpoint is replaced by one of another architecture.
    swapped = str(tmp_path / "swapped")
    shutil.copytree(trained, swapped)
    cvt = resolve_model("cvt-tiny", num_classes=10, data_channels=1)
    model, state = cvt.build(jax.random.key(0))
    checkpoint.save(os.path.join(swapped, "last.safetensors"), model, state,
                    model_config=cvt.to_json(), training={"epoch": 1, "step": 6})  # fmt: skip
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    data_args = ["--data", small_npz]
    return {
        "unknown model": (["train", "--model", "vit-huge", *data_args, "--out", fresh], fresh,
                          "unknown model 'vit-huge'"),
        "missing data folder": (["train", "--data", str(tmp_path / "nope"), "--out", fresh],
                                fresh, "data folder not found"),
        "empty data folder": (["train", "--data", str(empty), "--out", fresh], fresh,
                              "no class sub-folders"),
        "folder without images": (["train", "--data", str(no_images), "--out", fresh], fresh,
                                  "no images found"),
        "unreadable image in data": (["train", "--data", str(broken), "--out", fresh], fresh,
                                     "cannot read image"),
        "unsupported image size": (["train", "--model", "vit-tiny", "--image-size", "18",
                                    *data_args, "--out", fresh], fresh, "divisible"),
        "bad remat": (["train", *TINY, *data_args, "--remat", "dots", "--out", fresh], fresh,
                      "--remat must be linear or inputs or all; got 'dots'"),
        "too many devices": (["train", "--model", "vit-tiny", *data_args, "--devices", "64",
                              "--out", fresh], fresh, "--devices"),
        "out holds a run": (["train", *TINY, *data_args, "--out", copy], copy,
                            "already holds a run"),
        "resume another architecture": (["train", "--resume", "--out", copy, "--model",
                                         "cvt-tiny"], copy, "another architecture"),
        "checkpoint of another architecture": (["train", "--resume", "--out", swapped],
                                               swapped, "another architecture"),
        "resume with nothing": (["train", "--resume", "--out", fresh], fresh,
                                "nothing to resume"),
        "evaluate missing checkpoint": (["evaluate", "--checkpoint", fresh], fresh,
                                        "checkpoint not found"),
        "predict unreadable image": (["predict", "--checkpoint", copy, str(bad_png)], copy,
                                     "cannot read image"),
        "predict missing image": (["predict", "--checkpoint", copy, str(tmp_path / "x.png")],
                                  copy, "image not found"),
    }  # fmt: skip


def test_bad_input(tmp_path, trained, small_npz, capsys):
    cases = _bad_cases(tmp_path, trained, small_npz)
    capsys.readouterr()
    for name, (argv, watched, fragment) in cases.items():
        before = snapshot(watched)
        code, out, err = run(capsys, *argv)
        assert code == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("eqx-vision: error: ") and fragment in lines[0], (name, err)
        assert "Traceback" not in err + out, name
        assert snapshot(watched) == before, f"{name}: {watched} changed"


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    code, _, err = run(capsys, "train")
    assert code == 2
    assert err.strip() == (
        "eqx-vision: error: eqx-vision train needs tqdm, which is not installed: "
        'pip install "eqx_vision[train]"'
    )


@pytest.mark.slow
def test_default_train_reaches_95_percent(tmp_path):
    """The main job, as the installed console script runs it (compiled fully optimised:
    it trains for real)."""
    start = time.perf_counter()
    result = subprocess.run(
        [console_script(), "train", "--out", str(tmp_path / "default"), "--no-progress"],
        capture_output=True, text=True, env=optimized_env(), timeout=900,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ")
    assert float(last.split(": ")[1]) >= 0.95, out
    print(f"default train: {elapsed:.0f}s")
