"""One process of a training run on the embedded digits, for tests/test_multiprocess.py.

    python multiprocess_run.py OUT PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS

Trains the default ViT for one epoch with `DataParallel.create()` (after
`jax.distributed.initialize` when there are several processes) and writes, from every
process, `OUT/process<i>.npz`: the loss of every step and the final parameters.
"""

import os
import sys


def main() -> None:
    out, pid, nproc, port, devices = sys.argv[1], *map(int, sys.argv[2:6])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    import equinox as eqx
    import jax.random as jr
    import numpy as np

    from eqx_vision import data, presets, training

    raw = data.load_digits()
    config = presets.resolve_model("default", num_classes=10, data_channels=1)
    ds = data.prepare(raw, channels=config.channels, image_size=config.image_size)
    model, state = config.build(jr.key(0))
    losses: list[float] = []

    class Record(training.Callback):
        def on_step(self, info: training.StepInfo) -> None:
            if info.loss is not None:
                losses.append(info.loss)

    parallel = training.DataParallel.create()
    result = training.fit(
        model, state, ds, training.TrainConfig(epochs=1, batch_size=64), parallel=parallel,
        callback=Record(), out=os.path.join(out, "run"),
    )  # fmt: skip
    refused = []  # the set-ups that would let the processes drift apart
    if nproc > 1:
        local = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
        for attempt in (
            lambda: training.DataParallel(local),
            lambda: training.fit(model, state, ds, training.TrainConfig(epochs=1)),
        ):
            try:
                attempt()
            except ValueError as e:
                refused.append(str(e))
    params = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(result.model, eqx.is_array))]
    arrays: dict[str, np.ndarray] = {f"p{i}": p for i, p in enumerate(params)}
    arrays.update(
        losses=np.asarray(losses),
        test_accuracy=np.asarray(result.test_accuracy),
        devices=np.asarray(parallel.num_devices),
        refused=np.asarray(refused, dtype=str),
    )
    np.savez(os.path.join(out, f"process{pid}.npz"), **arrays)  # pyright: ignore[reportArgumentType]


if __name__ == "__main__":
    main()
