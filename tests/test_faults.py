"""Faults: a training run killed at any moment (SIGKILL) leaves only loadable files, and,
resumed or restarted, ends exactly as an uninterrupted run; malformed run folders and
checkpoints given to the command line are one-line errors (exit code 2), never a traceback.

The kills hit the installed console script. A kill at a random moment rarely lands between
writing a file and moving it into place, so two hooks of `eqx_vision.checkpoint` (for
tests only) aim there: `EQX_VISION_FAULT_KILL=<file name>:<n>` kills the process at that
point of its n-th write of the file, `EQX_VISION_FAULT_PAUSE=<seconds>` widens the window.
"""

import contextlib
import copy
import functools
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from eqx_vision import checkpoint, data, training
from eqx_vision.cli import main
from eqx_vision.presets import ModelConfig
from test_cli import console_script


TINY = ["--model", "vit-tiny", "--image-size", "8", "--batch-size", "16", "--seed", "1"]
COMPARED = ("epoch", "step", "train_loss", "test_loss", "test_accuracy")
OWN_FILES = ("config.json", "last.safetensors", "metrics.jsonl", "curves.png")
# Every run of these tests saves the training state every 2 steps (3 a epoch) and records
# the loss every 2 steps, so that kills land within epochs too.
# A training checkpoint's folder while it is written.
ORBAX_TEMPORARY = re.compile(r"\d+\.orbax-checkpoint-tmp.*")
PERIODIC = ["--checkpoint-every", "2", "--log-every", "2"]
# The temporary file of an atomic write of one of them (see `eqx_vision.checkpoint`).
LEFTOVER = re.compile(r"\.(" + "|".join(map(re.escape, OWN_FILES)) + r")\.\w+\.tmp")
PROCESS_TIMEOUT = 600  # seconds: start-up and compilation on two busy cores


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_npz):
    """`reference(epochs)`: the folder of an uninterrupted in-process run (run once)."""

    @functools.cache
    def run(epochs: int) -> str:
        out = str(tmp_path_factory.mktemp("reference") / f"run{epochs}")
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(train_argv(small_npz, out, epochs)) == 0
        return out

    return run


def train_argv(npz: str, out: str, epochs: int) -> list[str]:
    return ["train", *TINY, "--data", npz, "--epochs", str(epochs), "--out", out, "--no-progress",
            *PERIODIC]  # fmt: skip


def metrics(out: str) -> list[dict[str, Any]]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: r[k] for k in COMPARED if k in r} for r in map(json.loads, f)]


def assert_same_run(out: str, expected: str) -> None:
    import safetensors.numpy as st_numpy

    assert metrics(out) == metrics(expected)
    a, b = (st_numpy.load_file(os.path.join(d, "last.safetensors")) for d in (out, expected))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def check_folder(out: str) -> dict[str, Any]:
    """Assert that every file of a run folder is whole: `config.json` parses,
    `last.safetensors` loads (model, state and optimizer state), `metrics.jsonl` holds one
    JSON object per line (but for a torn last line), `curves.png` is a PNG, and anything
    else is a temporary file of one of them. Returns what it found."""
    found: dict[str, Any] = {"leftovers": [], "checkpoint_epoch": None, "metrics_epochs": [],
                             "training_steps": []}  # fmt: skip
    if not os.path.isdir(out):
        return found
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if LEFTOVER.fullmatch(name):
            found["leftovers"].append(name)
        elif name == "config.json":
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            assert isinstance(saved, dict) and {"settings", "model_config"} <= saved.keys()
        elif name == "last.safetensors":
            header = checkpoint.read_header(path)
            config = ModelConfig.from_json(header["model_config"])
            like, like_state = config.build_like()
            like_opt = training.init_optimizer(training.make_optimizer(1e-3, total_steps=1), like)
            ckpt = checkpoint.load(
                path, like, like_state, like_opt_state=like_opt, model_name=config.model
            )
            found["checkpoint_epoch"] = ckpt.training["epoch"]
        elif name == "checkpoints":
            found["training_steps"] = check_training_checkpoints(out, found["leftovers"])
        elif name == "metrics.jsonl":
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            # The last element is "" after a complete last line, else a torn line.
            records = [json.loads(line) for line in lines[:-1]]
            found["metrics_epochs"] = [r["epoch"] for r in records if "test_accuracy" in r]
        elif name == "curves.png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        else:
            raise AssertionError(f"{out} holds an unexpected file {name!r}")
    epochs = found["metrics_epochs"]
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    return found


def check_training_checkpoints(out: str, leftovers: list[str]) -> list[int]:
    """Restore every complete training checkpoint of `out` (the model and its state) and
    check its metadata; a step folder being written when the process was killed counts
    as a leftover. Returns the steps."""
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = ModelConfig.from_json(json.load(f)["model_config"])
    folder = os.path.join(out, training.CHECKPOINTS)
    steps = training.checkpoint_steps(out)
    leftovers += [n for n in os.listdir(folder) if not n.isdigit()]
    if not steps:
        return steps
    saved = training.TrainingCheckpoints(out, read_only=True)
    try:
        for step in steps:
            restored = saved.restore(step, config.build_like())
            assert restored.meta["step"] == step, restored.meta
    finally:
        saved.close()
    return steps


def launch(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [console_script(), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=PROCESS_TIMEOUT)
    return proc.returncode, stdout, stderr


def kill_when(proc: subprocess.Popen, ready) -> tuple[int, str, str]:
    """SIGKILL `proc` as soon as `ready(started)` (polled; `started` the `time.monotonic()`
    of the start) is true, unless it ends first."""
    started = time.monotonic()
    deadline = started + PROCESS_TIMEOUT
    while proc.poll() is None and not ready(started):
        assert time.monotonic() < deadline, "the run neither ended nor reached the moment"
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return finish(proc)


def continue_argv(npz: str, out: str, epochs: int) -> list[list[str]]:
    """How a user carries on a killed run in `out`: `--resume` if anything of it was
    written, else the original command; when the resume is refused (a run killed before
    its first checkpoint), the original command again."""
    resume = ["train", "--out", out, "--resume", "--no-progress", *PERIODIC]
    if os.path.isfile(os.path.join(out, "config.json")):
        return [resume, train_argv(npz, out, epochs)]
    return [train_argv(npz, out, epochs)]


# ---- killed while writing: the fast test --------------------------------------------------


@pytest.mark.parametrize("write", [2, 1], ids=["second-checkpoint", "first-checkpoint"])
def test_killed_while_writing_a_checkpoint(tmp_path, small_npz, reference, write):
    """Killed between writing `last.safetensors`'s temporary file and moving it into place:
    the previous checkpoint (or none) is intact, and the run carries on to the end of the
    uninterrupted one."""
    out = str(tmp_path / "killed")
    proc = launch(train_argv(small_npz, out, 2), EQX_VISION_FAULT_KILL=f"last.safetensors:{write}")
    expected = reference(2)  # in-process, while the other process runs
    code, _, stderr = finish(proc)
    assert code == -signal.SIGKILL, stderr
    found = check_folder(out)
    assert found["checkpoint_epoch"] == (write - 1 or None)
    # The epoch's metrics line may be written before its checkpoint.
    assert found["metrics_epochs"] in ([*range(1, write)], [*range(1, write + 1)])
    # ... and perhaps the training checkpoint being written in the background then.
    own = [n for n in found["leftovers"] if n.startswith(".last.safetensors.")]
    assert len(own) == 1 and all(
        ORBAX_TEMPORARY.fullmatch(n) for n in found["leftovers"] if n not in own
    ), found["leftovers"]

    failures = []
    for argv in continue_argv(small_npz, out, 2):
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(argv)
        if code == 0:
            break
        failures.append(f"{' '.join(argv[:4])} ...: exit {code}: {stderr.getvalue().strip()}")
    else:
        raise AssertionError("the killed run could not be carried on: " + " | ".join(failures))
    assert check_folder(out)["leftovers"] == []
    assert_same_run(out, expected)


# ---- killed at random moments, again and again: the full test -----------------------------


@pytest.mark.slow
def test_killed_again_and_again_then_finished(tmp_path, small_npz):
    """The console script killed again and again on one `--out` (during the first epoch
    before any checkpoint, while writing one, then at random moments), each time resumed or
    restarted, ends as the uninterrupted run; after every kill every file of the folder is
    whole."""
    epochs = 4
    rng = random.Random(20240611)
    pause = {"EQX_VISION_FAULT_PAUSE": "0.3"}  # every write's window held open 0.3 s

    # The uninterrupted run, and its timeline: when config.json, then the first checkpoint
    # appear, and when it ends.
    expected = str(tmp_path / "uninterrupted")
    start = time.monotonic()
    proc = launch(train_argv(small_npz, expected, epochs), **pause)
    times: dict[str, float] = {}
    while proc.poll() is None:
        for name in ("config.json", "last.safetensors"):
            if name not in times and os.path.exists(os.path.join(expected, name)):
                times[name] = time.monotonic() - start
        time.sleep(0.01)
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    epoch_seconds = (time.monotonic() - start - times["last.safetensors"]) / (epochs - 1)
    first_epoch = times["last.safetensors"] - times["config.json"]  # compilation included
    startup = times["last.safetensors"] - epoch_seconds  # start-up and compilation

    out = str(tmp_path / "killed")
    log = []

    def carry_on(ready, **env) -> int:
        """Start the next process on `out` (see `continue_argv`), kill it when ready, check
        the folder; returns the exit code."""
        code, stderr = None, ""
        for argv in continue_argv(small_npz, out, epochs):
            code, _, stderr = kill_when(launch(argv, **pause, **env), ready)
            if code != 2:
                break
            log.append(f"{' '.join(argv[:4])} ... refused: {stderr.strip()}")
        assert code in (0, -signal.SIGKILL), (log, stderr)
        found = check_folder(out)
        log.append(f"exit {code}: {found}")
        return code

    # 1. during the first epoch (compilation included), before any checkpoint
    first: dict[str, float] = {}

    def in_first_epoch(started: float) -> bool:
        if "at" not in first:
            if not os.path.exists(os.path.join(out, "config.json")):
                return False
            first["at"] = time.monotonic() + rng.uniform(0, 0.9 * first_epoch)
        return time.monotonic() >= first["at"]

    carry_on(in_first_epoch)
    # 2. while writing a checkpoint: the first one this process writes
    carry_on(lambda started: False, EQX_VISION_FAULT_KILL="last.safetensors:1")
    # 3. at random moments of what remains of the run, three times
    kills = 0
    while kills < 3:
        done = check_folder(out)["checkpoint_epoch"] or 0
        delay = rng.uniform(0, 0.9 * (startup + (epochs - done) * epoch_seconds))
        code = carry_on(lambda started, delay=delay: time.monotonic() - started >= delay)
        if code == 0:  # it ended before the moment
            break
        kills += 1
    # 4. to the end
    if code != 0:
        carry_on(lambda started: False)
    assert log[-1].startswith("exit 0"), log
    assert check_folder(out)["leftovers"] == [], log
    assert_same_run(out, expected)


# ---- malformed input to the command line: never a traceback -------------------------------


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`main(argv)`'s exit code and stderr; an exception escaping `main` fails the test."""
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


def assert_clean_outcome(argv: list[str], allowed=(0, 2)) -> None:
    code, stderr = run_cli(argv)
    assert code in allowed, (argv, code, stderr)
    if code:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eqx-vision: error: "), (argv, stderr)


def property_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# Small numbers only: a mutated run must not train for long, nor an image be resized to
# gigapixels.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-2, 3)
    | st.floats(-1e3, 1e3)
    | st.sampled_from([float("nan"), float("inf"), -float("inf")])
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj: Any, path: tuple = ()) -> list[tuple]:
    paths = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += _paths(v, (*path, i))
    return paths


@st.composite
def mutated(draw, base: Any) -> Any:
    """`base` with one or two of its values (at any depth) replaced by random JSON, or
    deleted."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(_paths(obj)))
        if not path:
            return draw(json_values)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return obj


def some_json(base: Any):
    """Random JSON, or, three times as often, `base` mutated."""
    return st.integers(0, 3).flatmap(lambda i: json_values if i == 0 else mutated(base))


@pytest.fixture(scope="module")
def run_folder(reference) -> str:
    return reference(2)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "digit.png"
    pixels = (np.asarray(data.load_digits().test_images)[0, 0] * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _config_json(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@given(st.data())
@property_settings(50)
def test_resume_with_malformed_config_json(tmp_path_factory, run_folder, data):
    saved = data.draw(some_json(_config_json(run_folder)), label="config.json")
    out = str(tmp_path_factory.mktemp("resume") / "run")
    shutil.copytree(run_folder, out)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(saved, f)
    # exit 1: a run the mutated settings make diverge
    assert_clean_outcome(["train", "--resume", "--out", out, "--no-progress"], (0, 1, 2))


def _checkpoint_parts(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import safetensors.numpy as st_numpy

    path = os.path.join(folder, "last.safetensors")
    return st_numpy.load_file(path), checkpoint.read_header(path)


@given(st.data())
@property_settings(60)
def test_malformed_checkpoint_metadata(tmp_path_factory, run_folder, image, data):
    import safetensors.numpy as st_numpy

    tensors, header = _checkpoint_parts(run_folder)
    model_config = data.draw(some_json(header["model_config"]), label="model_config")
    training_meta = data.draw(some_json(header["training"]), label="training")
    path = str(tmp_path_factory.mktemp("meta") / "ckpt.safetensors")
    metadata = {"format": checkpoint.FORMAT, "model_config": json.dumps(model_config),
                "training": json.dumps(training_meta)}  # fmt: skip
    st_numpy.save_file(tensors, path, metadata=metadata)
    assert_clean_outcome(["evaluate", "--checkpoint", path])
    assert_clean_outcome(["predict", "--checkpoint", path, image])


@given(st.data())
@property_settings(30)
def test_truncated_or_bit_flipped_checkpoint(tmp_path_factory, run_folder, image, data):
    with open(os.path.join(run_folder, "last.safetensors"), "rb") as f:
        raw = bytearray(f.read())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            region = data.draw(st.sampled_from([(0, 8), (8, header_end), (header_end, len(raw))]))
            position = data.draw(st.integers(region[0], region[1] - 1), label="position")
            raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = str(tmp_path_factory.mktemp("corrupt") / "ckpt.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    assert_clean_outcome(["evaluate", "--checkpoint", path])
    assert_clean_outcome(["predict", "--checkpoint", path, image])


def test_non_finite_checkpoint_is_refused_by_evaluate_and_predict(tmp_path, run_folder, image):
    """A checkpoint with a NaN (written by an older release, or by hand) is a one-line error."""
    import safetensors.numpy as st_numpy

    tensors, header = _checkpoint_parts(run_folder)
    tensors["model.mlp_head.bias"] = np.full_like(tensors["model.mlp_head.bias"], np.nan)
    path = str(tmp_path / "nan.safetensors")
    metadata = {"format": checkpoint.FORMAT, "model_config": json.dumps(header["model_config"]),
                "training": json.dumps(header["training"])}  # fmt: skip
    st_numpy.save_file(tensors, path, metadata=metadata)
    for argv in (["evaluate", "--checkpoint", path], ["predict", "--checkpoint", path, image]):
        code, stderr = run_cli(argv)
        assert code == 2, stderr
        assert stderr.strip() == (
            f"eqx-vision: error: {path}: tensor 'model.mlp_head.bias' has 10 non-finite "
            "value(s) of 10; expected only finite values"
        )
