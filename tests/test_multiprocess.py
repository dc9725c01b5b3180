"""Training across processes: 2 local processes of 2 host devices each (CPU collectives
through gloo) against 1 process of 4 host devices, on the embedded digits."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "multiprocess_run.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(out: str, nproc: int, devices: int, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [
        subprocess.Popen(
            [sys.executable, SCRIPT, out, str(i), str(nproc), str(port), str(devices), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(nproc)
    ]


def wait(processes: list[subprocess.Popen], timeout: float = 600) -> None:
    logs = [p.communicate(timeout=timeout)[0] for p in processes]
    for p, log in zip(processes, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = str(tmp_path_factory.mktemp("one")), str(tmp_path_factory.mktemp("two"))
    wait(launch(one, 1, 4))
    wait(launch(two, 2, 2))
    return one, two


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    wait(launch(out, 2, 2, "fsdp"))
    return out


def load(folder: str, pid: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(folder, f"process{pid}.npz")) as f:
        return dict(f)


def test_two_processes_train_as_one_process_of_as_many_devices(runs):
    one, two = runs
    single = load(one, 0)
    assert int(single["devices"]) == 4
    params = sorted(k for k in single if k.startswith("p"))
    for pid in (0, 1):
        multi = load(two, pid)
        assert int(multi["devices"]) == 4
        assert len(multi["losses"]) == len(single["losses"]) > 10
        np.testing.assert_allclose(multi["losses"], single["losses"], rtol=0, atol=1e-5)
        assert float(multi["test_accuracy"]) == pytest.approx(float(single["test_accuracy"]))
        for k in params:
            np.testing.assert_allclose(multi[k], single[k], rtol=0, atol=1e-5)


def test_fsdp_over_two_processes_trains_as_one_process(runs, fsdp_run):
    """Parameters and optimizer state sharded over both processes' devices: the same
    losses and parameters, each process saving its shards of the training checkpoint
    (restored within the epoch) and gathering the export for process 0."""
    single = load(runs[0], 0)
    params = sorted(k for k in single if k.startswith("p"))
    for pid in (0, 1):
        multi = load(fsdp_run, pid)
        np.testing.assert_allclose(multi["losses"], single["losses"], rtol=0, atol=1e-5)
        for k in params:
            np.testing.assert_allclose(multi[k], single[k], rtol=0, atol=1e-5)
    assert os.path.isfile(os.path.join(fsdp_run, "run", "last.safetensors"))


def test_a_mesh_of_local_devices_only_is_an_error(runs):
    _, two = runs
    for pid in (0, 1):
        refused = list(load(two, pid)["refused"])
        assert len(refused) == 2, refused
        assert "mesh covers the devices of processes" in refused[0]
        assert "give `parallel`" in refused[1]


def test_only_process_0_writes_the_run(runs):
    _, two = runs
    files = sorted(os.listdir(os.path.join(two, "run")))
    assert files == ["checkpoints", "config.json", "curves.png", "last.safetensors",
                     "metrics.jsonl"]  # fmt: skip
    with open(os.path.join(two, "run", "metrics.jsonl")) as f:
        assert len(f.read().splitlines()) == 1


def test_the_command_over_two_processes(tmp_path):
    """`eqx-vision train --coordinator ... --num-processes 2 --process-id I`: process 0
    prints the run and writes it, process 1 prints nothing of it; both end well."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    out = str(tmp_path / "run")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eqx_vision.cli",
                "train",
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--epochs",
                "1",
                "--out",
                out,
                "--no-progress",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    first, second = results[0][0], results[1][0]
    assert "4 device(s)" in first and first.rstrip().splitlines()[-1].startswith("test accuracy")
    # (gloo's own connection lines aside, which its C++ library prints)
    assert [line for line in second.splitlines() if not line.startswith("[Gloo]")] == []
    assert os.path.isfile(os.path.join(out, "last.safetensors"))
