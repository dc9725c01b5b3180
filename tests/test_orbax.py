"""Training checkpoints (orbax) and step metrics: a run stopped within an epoch and
resumed equals the uninterrupted run step for step; the keep policy; the restored
shardings; `eqx-vision export`; metrics every N steps and the TensorBoard log."""

import contextlib
import io
import json
import os

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest

from eqx_vision import checkpoint, data, presets, training
from eqx_vision.cli import main


EPOCHS, BATCH = 2, 32
TIMING = ("images_per_second", "epoch_seconds")


@pytest.fixture(scope="module")
def digits():
    config = presets.resolve_model("vit-tiny", num_classes=10, data_channels=1, image_size=8)
    raw = data.load_digits()
    ds = data.prepare(raw, channels=1, image_size=config.image_size)
    small = data.Dataset(
        ds.train_images[:256], ds.train_labels[:256], ds.test_images[:64], ds.test_labels[:64],
        class_names=ds.class_names, source="digits (256 train / 64 test)",
    )  # fmt: skip
    return config, small


class StopAt(training.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, info):
        return info.step >= self.step


def run(config, ds, out, *, callback=None, resume=False, parallel=None, **options):
    model, state = config.build_like() if resume else config.build(jr.key(0))
    return training.fit(
        model, state, ds, training.TrainConfig(epochs=EPOCHS, batch_size=BATCH), out=out,
        resume=resume, parallel=parallel, callback=callback, model_config=config.to_json(),
        **options,
    )  # fmt: skip


def lines(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in f]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    config, ds = digits
    out = str(tmp_path_factory.mktemp("orbax") / "uninterrupted")
    return out, run(config, ds, out, checkpoint_every=3, log_every=2)


def test_stopped_within_an_epoch_and_resumed_equals_the_uninterrupted_run(
    digits, uninterrupted, tmp_path
):
    config, ds = digits
    expected_out, expected = uninterrupted
    out = str(tmp_path / "stopped")
    # 8 steps an epoch: stopped after step 11 (checkpoint at step 9), in the second epoch
    stopped = run(config, ds, out, callback=StopAt(11), checkpoint_every=3, log_every=2)
    assert stopped.stopped and training.checkpoint_steps(out)[-1] == 9
    resumed = run(config, ds, out, resume=True, checkpoint_every=3, log_every=2)
    for a, b in zip(leaves((resumed.model, resumed.opt_state)),
                    leaves((expected.model, expected.opt_state)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert lines(out) == lines(expected_out)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]


def test_step_records(uninterrupted):
    out, result = uninterrupted
    records = lines(out)
    steps = [r for r in records if "test_accuracy" not in r]
    assert [r["step"] for r in steps] == list(range(2, 17, 2))
    epochs = [r for r in records if "test_accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [8, 16]
    # the mean of two step records of an epoch's window is the epoch's mean loss
    first = [r["train_loss"] for r in steps if r["step"] <= 8]
    assert np.isclose(np.mean(first), epochs[0]["train_loss"], rtol=1e-12)
    assert result.metrics == [r | {k: result.metrics[i][k] for k in TIMING}
                              for i, r in enumerate(epochs)]  # fmt: skip


def test_keep_policy_keeps_the_last_and_the_best(digits, tmp_path):
    config, ds = digits
    out = str(tmp_path / "keep")
    run(config, ds, out, checkpoint_every=2, keep_checkpoints=1)
    saved = training.TrainingCheckpoints(out, read_only=True)
    try:
        accuracy = {s: saved.metadata(s).get("test_accuracy") for s in saved.steps()}
    finally:
        saved.close()
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        epochs = [json.loads(x) for x in f]
    best = max(epochs, key=lambda r: r["test_accuracy"])["step"]
    assert sorted({16, best}) == sorted(accuracy)
    assert all(accuracy[s] is not None for s in accuracy)


def test_restored_into_the_mesh_sharding(digits, tmp_path):
    config, ds = digits
    parallel = training.DataParallel.create(4)
    out = str(tmp_path / "mesh")
    run(config, ds, out, callback=StopAt(3), checkpoint_every=3, parallel=parallel)
    resumed = run(config, ds, out, resume=True, callback=StopAt(4), parallel=parallel)
    for x in jax.tree.leaves(eqx.filter(resumed.model, eqx.is_array)):
        assert x.sharding.mesh.shape == {"data": 4}


def test_export_writes_what_evaluate_reads(digits, uninterrupted, tmp_path):
    out, result = uninterrupted
    file = str(tmp_path / "best.safetensors")
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        assert main(["export", "--checkpoint", out, "--best", file]) == 0, stderr.getvalue()
    best = max(result.metrics, key=lambda r: (r["test_accuracy"], r["step"]))
    header = checkpoint.read_header(file)
    assert header["training"]["step"] == best["step"]
    assert header["training"]["test_accuracy"] == best["test_accuracy"]
    config, _ = digits
    like, like_state = config.build_like()
    loaded = checkpoint.load(file, like, like_state, model_name=config.model)
    if best["step"] == result.step:
        for a, b in zip(leaves(loaded.model), leaves(result.model), strict=True):
            np.testing.assert_array_equal(a, b)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["export", "--checkpoint", out, "--step", "5", file])
    assert code == 2 and "no checkpoint of step 5; it holds steps" in stderr.getvalue()


def test_tensorboard_log(digits, tmp_path):
    config, ds = digits
    out = str(tmp_path / "tb")
    run(config, ds, out, log_every=4, callback=StopAt(9), tensorboard=True)
    folder = os.path.join(out, training.TENSORBOARD)
    events = [n for n in os.listdir(folder) if n.startswith("events.")]
    assert events and os.path.getsize(os.path.join(folder, events[0])) > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1; got 0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be an int >= 1; got 0"),
        ({"log_every": -1}, "log_every must be an int >= 1; got -1"),
    ],
)
def test_bad_options(digits, tmp_path, options, message):
    config, ds = digits
    with pytest.raises(ValueError, match=message):
        run(config, ds, str(tmp_path / "bad"), **options)


def _change_image_size(out: str) -> dict:
    path = os.path.join(out, "config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    saved["model_config"]["image_size"] = [16, 16]
    saved["model_config"]["kwargs"]["image_size"] = 16
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    return saved["model_config"]


def test_resuming_another_configuration_is_a_clear_error(digits, uninterrupted, tmp_path,
                                                         small_npz):  # fmt: skip
    """A run folder whose training checkpoints do not fit the model (here a config.json
    changed by hand to another image size): an error naming the array, before any array
    is read; one line from the command line."""
    import shutil

    out = str(tmp_path / "changed")
    shutil.copytree(uninterrupted[0], out)
    config = presets.ModelConfig.from_json(_change_image_size(out))
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"pos_embedding is float32"):
        run(config, digits[1], out, resume=True)

    cli_run = str(tmp_path / "cli")
    argv = ["train", "--model", "vit-tiny", "--image-size", "8", "--batch-size", "16",
            "--data", small_npz, "--epochs", "1", "--no-progress", "--out", cli_run]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    _change_image_size(cli_run)
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["train", "--resume", "--out", cli_run, "--no-progress"])
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "a checkpoint of another configuration" in lines[0], lines
