"""One process of a training run on the embedded digits, for tests/test_multiprocess.py.

    python multiprocess_run.py OUT PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS [fsdp]

Trains the default ViT for one epoch with `DataParallel.create()` (after
`jax.distributed.initialize` when there are several processes), stopped after step 10
and resumed from its training checkpoint of step 10, and writes, from every process,
`OUT/process<i>.npz`: the losses read and the final parameters. With `fsdp`, the
parameters and optimizer state are sharded over all devices.
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
        def __init__(self, stop: int | None = None):
            self.stop = stop

        def on_step(self, info: training.StepInfo) -> bool:
            if info.loss is not None:
                losses.append(info.loss)
            return self.stop is not None and info.step >= self.stop

    fsdp = sys.argv[6:] == ["fsdp"]
    # The tiny model's arrays are all small: shard any array FSDP can.
    parallel = training.DataParallel.create(fsdp=fsdp, min_shard_bytes=0 if fsdp else 2**20)
    settings = training.TrainConfig(epochs=1, batch_size=64)
    run = os.path.join(out, "run")
    stopped = training.fit(model, state, ds, settings, parallel=parallel, callback=Record(10),
                           out=run, checkpoint_every=5)  # fmt: skip
    assert stopped.stopped and training.checkpoint_steps(run)[-1] == 10
    like_model, like_state = config.build_like()
    result = training.fit(like_model, like_state, ds, settings, parallel=parallel,
                          callback=Record(), out=run, resume=True)  # fmt: skip
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
    params = jax.tree.leaves(eqx.filter(result.model, eqx.is_array))
    if fsdp:  # sharded over both processes' devices: gather them whole
        from jax.experimental import multihost_utils

        assert not all(p.is_fully_addressable for p in params)
        params = multihost_utils.process_allgather(params, tiled=True)
    params = [np.asarray(x) for x in params]
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
