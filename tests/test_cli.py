"""The `eqx-vision` command line, called in-process through `main(argv)` (and once as the
installed console script)."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import numpy as np
import pytest

from compilation import optimized_env
from eqx_vision import checkpoint, data
from eqx_vision.cli import main
from eqx_vision.presets import ModelConfig, resolve_model


DETERMINISTIC = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "learning_rate")
TINY = ["--model", "vit-tiny", "--image-size", "8", "--batch-size", "16", "--seed", "1"]
# The settings of the `trained` run: the tiny ViT learns the small digits in 8 epochs.
LEARN = ["--lr", "1e-2", "--warmup-epochs", "1", "--epochs", "8"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_npz) -> str:
    """A tiny ViT trained for 8 epochs, well above chance (~0.7 test accuracy); shared by
    the tests that only read it."""
    out = str(tmp_path_factory.mktemp("run") / "vit")
    assert main(["train", *TINY, *LEARN, "--data", small_npz, "--out", out]) == 0
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


def stopped_and_resumed_vs_whole(capsys, tmp_path, argv) -> tuple[dict, dict]:
    """Train `argv` whole, and stopped after 9 steps then resumed; assert equal metrics and
    return the two checkpoints' tensors (resumed, whole)."""
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert run(capsys, *argv, "--out", whole)[0] == 0
    assert run(capsys, *argv, "--out", parts, "--stop-after-steps", "9")[0] == 0
    code, _, err = run(capsys, "train", "--out", parts, "--resume", "--no-progress")
    assert code == 0, err
    assert metrics(parts) == metrics(whole)
    return tensors(parts), tensors(whole)


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


def test_train_writes_its_outputs(trained, small_npz, capsys):
    files = set(os.listdir(trained))
    assert {"config.json", "last.safetensors", "metrics.jsonl", "curves.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    records = metrics(trained)
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records] == list(range(6, 49, 6))  # 96 images, batch 16
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] >= 0.5  # it learns: chance is 0.1
    with open(os.path.join(trained, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    assert config["model_config"]["model"] == "ViT"
    assert config["model_config"]["kwargs"]["image_size"] == 8
    assert config["settings"]["epochs"] == 8
    assert config["data"] == {"source": os.path.abspath(small_npz), "channels": 1,
                              "class_names": list("0123456789"), "num_train": 96,
                              "num_test": 40, "mean": [0.5], "std": [0.5]}  # fmt: skip


def test_train_last_line_is_test_accuracy(tmp_path, small_npz, capsys):
    out = str(tmp_path / "run")
    code, stdout, err = run(capsys, "train", *TINY, "--data", small_npz, "--epochs", "1",
                            "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    accuracy = metrics(out)[-1]["test_accuracy"]
    assert last == f"test accuracy: {accuracy:.2f}"
    assert "summary" in stdout and "images/s" in stdout


def own_logits(folder: str, pixels: np.ndarray) -> np.ndarray:
    """The logits of the model saved in `folder` for uint8 images `(N, 8, 8)`, computed
    here without the command line or the data pipeline: the checkpoint loaded into the
    model its config.json describes, the pixels scaled to -1..1 by hand."""
    with open(os.path.join(folder, "config.json")) as f:
        config = ModelConfig.from_json(json.load(f)["model_config"])
    like_model, like_state = config.build_like()
    ckpt = checkpoint.load(os.path.join(folder, "last.safetensors"), like_model, like_state)
    x = (pixels.astype(np.float32) / 255 - 0.5) / 0.5
    return np.asarray(jax.vmap(eqx.nn.inference_mode(ckpt.model))(x[:, None]))


def test_evaluate(trained, small_npz, capsys):
    code, out, err = run(capsys, "evaluate", "--checkpoint", trained)
    assert code == 0, err
    with np.load(small_npz) as f:
        pixels, labels = f["test_images"], f["test_labels"]
    logits = own_logits(trained, pixels).astype(np.float64)
    accuracy = float(np.mean(logits.argmax(-1) == labels))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    assert accuracy >= 0.5  # the model learnt: a wrong evaluation cannot match by chance
    loss_line, accuracy_line = out.strip().splitlines()[-2:]
    assert loss_line.startswith("test loss: ") and accuracy_line.startswith("test accuracy: ")
    # Printed to 4 and 2 decimals (one image is 0.025 of the accuracy).
    assert float(loss_line.split(": ")[1]) == pytest.approx(loss, abs=5e-5 + 1e-6)
    assert float(accuracy_line.split(": ")[1]) == pytest.approx(accuracy, abs=0.005 + 1e-9)


def test_predict(trained, small_npz, tmp_path, capsys):
    """The 40 test digits as PNG files: predict prints, for each, the model's own top 3
    classes and probabilities, mostly the right ones."""
    from PIL import Image

    with np.load(small_npz) as f:
        pixels, labels = f["test_images"], f["test_labels"]  # all 40
    paths = []
    for i, image in enumerate(pixels):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    code, out, err = run(capsys, "predict", "--checkpoint", trained, "--top-k", "3", *paths)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 * len(paths)
    logits = own_logits(trained, pixels)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for i, path in enumerate(paths):
        assert lines[4 * i] == path
        rows = [line.split() for line in lines[4 * i + 1 : 4 * i + 4]]
        expected = np.argsort(-probs[i], kind="stable")[:3]
        assert [r[0] for r in rows] == [str(c) for c in expected]
        assert [r[1] for r in rows] == [f"{probs[i, c]:.4f}" for c in expected]
    top = [int(lines[4 * i + 1].split()[0]) for i in range(len(paths))]
    assert sum(t == y for t, y in zip(top, labels, strict=True)) >= 24, (top, labels)  # 60%


def test_resume_equals_uninterrupted(trained, tmp_path, small_npz, capsys):
    out = str(tmp_path / "resumed")
    args = ["train", *TINY, *LEARN, "--data", small_npz, "--out", out]
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
    code, _, err = run(capsys, "train", *TINY, *LEARN, "--data", small_npz, "--out", out,
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
    argv = ["train", *TINY, *LEARN, "--data", small_npz, "--out", out, "--no-progress"]
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


def edited_checkpoint(run_folder: str, path: str, edit) -> str:
    """A copy at `path` of the checkpoint of `run_folder`, whose header metadata
    `edit(model_config, training)` changes in place."""
    import safetensors.numpy as st

    source = os.path.join(run_folder, "last.safetensors")
    header = checkpoint.read_header(source)
    model_config, training = header["model_config"], header["training"]
    edit(model_config, training)
    metadata = {"format": checkpoint.FORMAT, "model_config": json.dumps(model_config),
                "training": json.dumps(training)}  # fmt: skip
    st.save_file(st.load_file(source), path, metadata=metadata)
    return path


def edited_run(run_folder: str, folder: str, edit_config=None, edit_checkpoint=None) -> str:
    """A copy at `folder` of a run folder, its config.json changed in place by
    `edit_config(config)` and its checkpoint's header by `edit_checkpoint`."""
    shutil.copytree(run_folder, folder)
    if edit_config is not None:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        edit_config(config)
        with open(path, "w") as f:
            json.dump(config, f)
    if edit_checkpoint is not None:
        path = os.path.join(folder, "last.safetensors")
        edited_checkpoint(folder, path + ".new", edit_checkpoint)
        os.replace(path + ".new", path)
    return folder


def small_npz_variant(small_npz: str, path: str, **changes) -> str:
    """A copy of the small digits with some arrays changed."""
    with np.load(small_npz) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(path, **{**arrays, **changes})
    return path


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
        for name in ("x.png", "y.png"):  # two a class: the folder has a test split
            (broken / c / name).write_bytes(b"not a png")
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
    # Run folders and checkpoints with a malformed or changed part.
    headers = tmp_path / "headers"
    headers.mkdir()

    def header(name: str, edit) -> str:
        return edited_checkpoint(trained, str(headers / f"{name}.safetensors"), edit)

    def set_in(where: str, key: str, value):
        return lambda model_config, training: {"model_config": model_config, "training": training}[
            where
        ].update({key: value})

    def set_kwarg(key: str, value):
        return lambda model_config, training: model_config["kwargs"].update({key: value})

    def set_data(key: str, value):
        return lambda model_config, training: training["data"].update({key: value})

    no_heads = header("heads0", set_kwarg("heads", 0))
    list_config = str(headers / "list-config.safetensors")
    text_training = str(headers / "text-training.safetensors")
    import safetensors.numpy as st

    tensors = st.load_file(os.path.join(trained, "last.safetensors"))
    for path, meta in (
        (list_config, {"model_config": "[1, 2]", "training": "{}"}),
        (text_training, {"model_config": "{}", "training": '"epoch 3"'}),
    ):
        st.save_file(tensors, path, metadata={"format": checkpoint.FORMAT, **meta})
    data_list = header("data-list", set_in("training", "data", ["digits"]))
    settings_text = header("settings-text", set_in("training", "settings", "float32"))
    names_numbers = header("names-numbers", set_data("class_names", list(range(10))))
    bad_batch = edited_run(
        trained, str(tmp_path / "bad-batch"), lambda c: c["settings"].update(batch_size=-5)
    )
    bad_heads = edited_run(
        trained, str(tmp_path / "bad-heads"), lambda c: c["model_config"]["kwargs"].update(heads=0)
    )
    bad_train_config = edited_run(
        trained, str(tmp_path / "bad-train-config"), lambda c: c["train_config"].update(seed=7)
    )
    changed_data = edited_run(
        trained, str(tmp_path / "changed-data"), edit_checkpoint=set_data("num_train", 90)
    )
    renamed = small_npz_variant(
        small_npz,
        str(tmp_path / "renamed.npz"),
        class_names=np.array([f"digit {i}" for i in range(10)]),
    )
    with np.load(small_npz) as f:
        rgb = np.repeat(f["test_images"][:, None], 3, axis=1)
        rgb_train = np.repeat(f["images"][:, None], 3, axis=1)
    coloured = small_npz_variant(
        small_npz, str(tmp_path / "rgb.npz"), images=rgb_train, test_images=rgb
    )
    # The config.json of a run stopped before its first checkpoint, and nothing else.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(trained, "config.json"), unfinished)
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
        "negative seed": (["train", *TINY, *data_args, "--seed", "-1", "--out", fresh], fresh,
                          "--seed: expected an integer from 0 to 4294967295; got '-1'"),
        "seed beyond 32 bits": (["train", *TINY, *data_args, "--seed", "9" * 23, "--out",
                                 fresh], fresh, "expected an integer from 0 to 4294967295"),
        "learning rate beyond float32": (["train", *TINY, *data_args, "--lr", "1e39", "--out",
                                          fresh], fresh, "--lr must be at most 3.403e+38"),
        "unknown option": (["train", "--learning-rate", "3", "--out", fresh], fresh,
                           "unrecognized arguments: --learning-rate 3"),
        "changed data flag without resume": (["train", *TINY, *data_args, "--out", fresh,
                                              "--allow-changed-data"], fresh,
                                             "--allow-changed-data goes with --resume"),
        "resume: a saved batch size of -5": (["train", "--resume", "--out", bad_batch],
                                             bad_batch,
                                             "settings.batch_size must be a positive integer; "
                                             "got -5"),
        "resume: heads=0 in config.json": (["train", "--resume", "--out", bad_heads], bad_heads,
                                           "heads must be an int >= 1; got 0"),
        "resume: train_config against settings": (["train", "--resume", "--out",
                                                   bad_train_config], bad_train_config,
                                                  "train_config disagrees with its settings "
                                                  "(seed=7, not 1)"),
        "resume on changed data": (["train", "--resume", "--out", changed_data], changed_data,
                                   "the data changed since"),
        "restart with other settings": (["train", *TINY, *LEARN, *data_args, "--lr", "0.5",
                                         "--out", str(unfinished)], str(unfinished),
                                        "stopped before its first checkpoint, with other "
                                        "settings (settings.lr: 0.01, not 0.5"),
        "evaluate: heads=0 in the header": (["evaluate", "--checkpoint", no_heads], str(headers),
                                            "heads must be an int >= 1; got 0"),
        "predict: heads=0 in the header": (["predict", "--checkpoint", no_heads, str(bad_png)],
                                           str(headers), "heads must be an int >= 1; got 0"),
        "evaluate: model_config a list": (["evaluate", "--checkpoint", list_config],
                                          str(headers), "model_config must be a JSON object"),
        "predict: training a string": (["predict", "--checkpoint", text_training,
                                        str(bad_png)], str(headers),
                                       "training must be a JSON object"),
        "evaluate: data a list": (["evaluate", "--checkpoint", data_list], str(headers),
                                  "'data' must be a JSON object"),
        "evaluate: settings a string": (["evaluate", "--checkpoint", settings_text],
                                        str(headers), "'settings' must be a JSON object"),
        "predict: class names of numbers": (["predict", "--checkpoint", names_numbers,
                                             str(bad_png)], str(headers),
                                            "class names must be a list of strings"),
        "evaluate on other class names": (["evaluate", "--checkpoint", copy, "--data", renamed],
                                          copy, "class 0 is 'digit 0' in the data, '0' in the "
                                          "checkpoint"),
        "evaluate on other channels": (["evaluate", "--checkpoint", copy, "--data", coloured],
                                       copy, "has 3-channel images; " + os.path.join(copy,
                                       "last.safetensors") + " was trained on 1-channel"),
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


# ---- divergence: exit 1, the last good checkpoint kept -----------------------------------


def assert_one_line_error(err: str, fragment: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqx-vision: error: "), err
    assert fragment in lines[0], err
    return lines[0]


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, small_npz, capsys):
    """A learning rate that makes the loss NaN in epoch 2: exit 1, one line, and the
    checkpoint and metrics of epoch 1 stay, whole and finite."""
    out = str(tmp_path / "diverged")
    argv = ["train", *TINY, "--data", small_npz, "--lr", "1e3", "--warmup-epochs", "2",
            "--epochs", "2", "--out", out, "--no-progress"]  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 1, err
    ckpt = os.path.join(out, "last.safetensors")
    assert_one_line_error(err, f"(epoch 2): training stopped; {ckpt} keeps epoch 1")
    assert [r["epoch"] for r in metrics(out)] == [1]
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "curves.png",
                                       "last.safetensors", "metrics.jsonl"]  # fmt: skip
    assert checkpoint.read_header(ckpt)["training"]["epoch"] == 1
    for name, value in tensors(out).items():
        assert np.isfinite(value).all() if value.dtype.kind == "f" else True, name


def test_divergence_before_the_first_checkpoint_runs_again(tmp_path, small_npz, capsys):
    """A run that diverges in its first epoch leaves its config.json and empty metrics;
    the same command runs again (and diverges again) instead of finding a run in the
    way."""
    out = str(tmp_path / "diverged")
    argv = ["train", *TINY, "--data", small_npz, "--lr", "1e6", "--epochs", "3", "--out", out,
            "--no-progress"]  # fmt: skip
    for _ in range(2):
        code, _, err = run(capsys, *argv)
        assert code == 1, err
        assert_one_line_error(err, "(epoch 1): training stopped before its first checkpoint")
        assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]
        assert metrics(out) == []


def test_non_finite_parameters_are_never_saved(tmp_path, small_npz, capsys, monkeypatch):
    """An update that makes a parameter infinite at the last step of an epoch, whose loss
    (computed before the update) is finite: the epoch is neither recorded nor saved."""
    from eqx_vision.training import _fit as training

    real_step, steps = training._donating_fit_step, []

    def poisoned_step(model, *args, **kwargs):
        model, *rest = real_step(model, *args, **kwargs)
        steps.append(1)
        if len(steps) == 12:  # the last step of epoch 2
            model = eqx.tree_at(lambda m: m.pos_embedding, model,
                                model.pos_embedding.at[0, 0].set(np.inf))  # fmt: skip
        return (model, *rest)

    monkeypatch.setattr(training, "_donating_fit_step", poisoned_step)
    out = str(tmp_path / "poisoned")
    code, _, err = run(capsys, "train", *TINY, "--data", small_npz, "--epochs", "2", "--out",
                       out, "--no-progress")  # fmt: skip
    assert code == 1, err
    ckpt = os.path.join(out, "last.safetensors")
    assert_one_line_error(
        err, f"model.pos_embedding holds a NaN or an infinity after step 12 (epoch 2): "
        f"training stopped; {ckpt} keeps epoch 1"
    )  # fmt: skip
    assert [r["epoch"] for r in metrics(out)] == [1]
    assert checkpoint.read_header(ckpt)["training"]["epoch"] == 1
    assert np.isfinite(tensors(out)["model.pos_embedding"]).all()


@pytest.fixture
def nan_pixel(monkeypatch):
    """Every data set loaded by the command line has a NaN pixel in training image 5."""
    real = data.load_dataset

    def load_dataset(spec, **options):
        raw = real(spec, **options)
        images = np.array(raw.train_images, np.float32, copy=True)
        images[5, 0, 0, 0] = np.nan
        return dataclasses.replace(raw, train_images=images)

    monkeypatch.setattr(data, "load_dataset", load_dataset)


def test_skip_non_finite(tmp_path, small_npz, capsys, nan_pixel):
    """A batch with a NaN: without the option the run stops (exit 1); with
    `--skip-non-finite 1` its step is skipped, counted and reported, and nothing non-finite
    reaches the checkpoint."""
    argv = ["train", *TINY, "--data", small_npz, "--epochs", "2", "--no-progress"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "stops"))
    assert code == 1, err
    assert_one_line_error(err, "the training loss is nan at step")
    out = str(tmp_path / "skips")
    code, stdout, err = run(capsys, *argv, "--out", out, "--skip-non-finite", "1")
    assert code == 0, err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped_steps"] for r in records] == [1, 1]  # one batch a epoch holds image 5
    assert all(np.isfinite(r["train_loss"]) for r in records)
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert all(line.endswith("skipped 1 non-finite step(s)") for line in epoch_lines)
    assert "  skipped        2 steps with non-finite gradients" in stdout.splitlines()
    for name, value in tensors(out).items():  # (checkpoint.load refuses NaNs too)
        assert np.isfinite(value).all() if value.dtype.kind == "f" else True, name
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["settings"]["skip_non_finite"] == 1


@pytest.mark.slow
def test_skip_non_finite_resume_equals_uninterrupted(tmp_path, small_npz, capsys, nan_pixel):
    """The skipped-step counters are in the checkpoint: a resumed run skips as the
    uninterrupted one (fast sibling: `test_skip_non_finite`)."""
    argv = ["train", *TINY, "--data", small_npz, "--epochs", "3", "--skip-non-finite", "1",
            "--no-progress"]  # fmt: skip
    a, b = stopped_and_resumed_vs_whole(capsys, tmp_path, argv)
    assert a.keys() == b.keys() and "opt_state.total_notfinite" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_old_run_resumes(tmp_path, capsys):
    """A run folder written by 0.1.0 (no skip_non_finite, no train_config) resumes: the
    optimizer state has the structure it had."""
    out = str(tmp_path / "old")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints",
                                 "vit-tiny"), out)  # fmt: skip
    code, stdout, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert code == 0, err
    assert "resuming after epoch 2 (step 44)" in stdout
    assert stdout.strip().splitlines()[-1] == "test accuracy: 0.33"


# ---- a run stopped or killed before its first checkpoint ---------------------------------


def test_run_stopped_before_its_first_checkpoint(tmp_path, small_npz, capsys):
    """Stopped during its first epoch, a run leaves only its config.json and an empty
    metrics.jsonl (and, killed while writing, temporary files of its own); the same
    command starts it again, and so does --resume; either way only the run's own
    temporary files are removed. The absurd warm-up (1e308 epochs) is a warm-up over the
    whole run."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    argv = ["train", *TINY, "--warmup-epochs", "1e308", "--data", small_npz, "--epochs", "1",
            "--no-progress"]  # fmt: skip
    code, _, err = run(capsys, *argv, "--out", first, "--stop-after-steps", "3")
    assert code == 0, err
    assert sorted(os.listdir(first)) == ["config.json", "metrics.jsonl"]
    assert metrics(first) == []
    own = [".last.safetensors.ab12cd34.tmp", ".config.json.k3x9q2ab.tmp", ".curves.png.x_1.tmp"]
    users = [".important.tmp", ".last.safetensors.tmp", "notes.tmp", ".metrics.jsonl.a.b.tmp"]
    for name in own + users:
        with open(os.path.join(first, name), "w") as f:
            f.write("kept?")
    shutil.copytree(first, second)

    code, stdout, err = run(capsys, *argv, "--out", first)  # the same command again
    assert code == 0, err
    assert sorted(os.listdir(first)) == sorted(
        ["checkpoints", "config.json", "curves.png", "last.safetensors", "metrics.jsonl", *users]
    )
    code, stdout, err = run(capsys, "train", "--out", second, "--resume", "--no-progress")
    assert code == 0, err
    assert "stopped before its first checkpoint: starting it again from the beginning" in stdout
    assert sorted(os.listdir(second)) == sorted(os.listdir(first))
    assert metrics(first) == metrics(second) and [r["epoch"] for r in metrics(first)] == [1]
    assert metrics(first)[0]["learning_rate"] > 0 and np.isfinite(metrics(first)[0]["test_loss"])
    a, b = tensors(first), tensors(second)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_folder_in_use_is_refused(tmp_path, small_npz, capsys):
    """Two runs never write into one folder: the second is refused before writing."""
    import fcntl  # POSIX, where the lock is taken (the suite runs there)

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `train --out busy`
        code, _, err = run(capsys, "train", *TINY, "--data", small_npz, "--out", str(out))
    finally:
        os.close(fd)
    assert code == 2
    assert_one_line_error(err, f"{out} is in use by another training run")
    assert os.listdir(out) == []


# ---- resume on changed data; what predict prints ----------------------------------------


def test_resume_on_changed_data(trained, tmp_path, capsys):
    """Images added since the checkpoint: refused, naming the change, unless
    --allow-changed-data."""
    out = edited_run(trained, str(tmp_path / "changed"),
                     edit_checkpoint=lambda m, t: t["data"].update(num_train=90))  # fmt: skip
    code, _, err = run(capsys, "train", "--resume", "--out", out)
    assert code == 2
    assert_one_line_error(
        err, f"the data changed since {os.path.join(out, 'last.safetensors')} was saved "
        "(num_train 90 -> 96): pass --allow-changed-data to continue with the data as it is now"
    )  # fmt: skip
    code, stdout, err = run(capsys, "train", "--resume", "--out", out, "--allow-changed-data",
                            "--no-progress")  # fmt: skip
    assert code == 0, err  # (the run had ended: it is evaluated again)
    assert stdout.strip().splitlines()[-1].startswith("test accuracy: ")


def test_predict_escapes_class_names(trained, tmp_path, capsys):
    """Class names with a newline or an escape code (saved by an older release) are
    printed escaped, one per line."""
    from PIL import Image

    names = ["zero\nline", "one\x1b[31m", *(f"d\t{i}" for i in range(2, 10))]
    ckpt = edited_checkpoint(trained, str(tmp_path / "names.safetensors"),
                             lambda m, t: t["data"].update(class_names=names))  # fmt: skip
    image = tmp_path / "new\nline.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    code, out, err = run(capsys, "predict", "--checkpoint", ckpt, "--top-k", "10", str(image))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 11 and lines[0] == str(image).replace("\n", "\\n")
    shown = sorted(line.split()[0] for line in lines[1:])
    assert shown == sorted(["zero\\nline", "one\\x1b[31m", *(f"d\\t{i}" for i in range(2, 10))])


@pytest.mark.slow
def test_dropout_resume_equals_uninterrupted(tmp_path, small_npz, capsys):
    """With dropout, a resumed run draws the same dropout masks as an uninterrupted one
    (each step's key comes from the seed and the step number); fast sibling:
    `test_resume_equals_uninterrupted`."""
    config = tmp_path / "dropout.json"
    config.write_text(json.dumps({"model": "ViT", "image_size": 8, "patch_size": 4, "dim": 16,
                                  "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32,
                                  "dropout": 0.2, "emb_dropout": 0.2}))  # fmt: skip
    argv = ["train", "--model", str(config), "--batch-size", "16", "--seed", "1", "--data",
            small_npz, "--epochs", "2", "--no-progress"]  # fmt: skip
    a, b = stopped_and_resumed_vs_whole(capsys, tmp_path, argv)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


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


def test_keep_empty_classes(tmp_path, capsys):
    """A class folder without images is an error naming it and the option that keeps it;
    with the option, one warning line names it and the run goes on."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "data" / name).mkdir(parents=True)
    for name in ("a", "b"):
        for i in range(6):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    argv = ["train", "--model", "vit-tiny", "--image-size", "8", "--epochs", "1",
            "--batch-size", "4", "--data", str(tmp_path / "data"), "--no-progress"]  # fmt: skip
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "refused"))
    assert code == 2
    assert err.strip() == (
        f"eqx-vision: error: {tmp_path / 'data'}: 1 of 3 classes have no training image: "
        "'c' (pass --keep-empty-classes to keep them)"
    )
    assert not (tmp_path / "refused").exists()
    out = str(tmp_path / "kept")
    code, stdout, err = run(capsys, *argv, "--out", out, "--keep-empty-classes")
    assert code == 0, err
    assert err.splitlines() == [
        f"eqx-vision: warning: {tmp_path / 'data'}: 1 of 3 classes have no training image: 'c'"
    ]
    assert "3 classes" in stdout
    code, _, err = run(capsys, "evaluate", "--checkpoint", out)
    assert code == 2 and "--keep-empty-classes" in err
    code, _, err = run(capsys, "evaluate", "--checkpoint", out, "--keep-empty-classes")
    assert code == 0, err
