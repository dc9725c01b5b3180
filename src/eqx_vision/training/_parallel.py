"""Data parallelism over the devices of one or several processes."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data-parallel training over the local devices with `jax.sharding`.

    A one-axis `Mesh` named `"data"`; each batch is split along its first axis over the
    devices (`NamedSharding(mesh, P("data"))`), and the model, its state and the optimizer
    state are replicated (`NamedSharding(mesh, P())`). BatchNorm statistics, computed over
    the vmapped axis `"batch"`, are then taken over the whole global batch, as on one device.

    Across several processes (after `jax.distributed.initialize`), the mesh covers the
    devices of every process: each process passes its own rows of each global batch to
    [`shard_batch`][eqx_vision.training.DataParallel.shard_batch], which assembles the
    global batch with `jax.make_array_from_process_local_data`. A mesh that leaves out a
    process's devices is an error (the processes' parameters would drift apart).

    Create it with [`DataParallel.create`][eqx_vision.training.DataParallel.create].
    """

    mesh: jax.sharding.Mesh

    def __post_init__(self):
        processes = jax.process_count()
        if processes > 1:
            covered = {d.process_index for d in self.mesh.devices.flat}
            if covered != set(range(processes)):
                raise ValueError(
                    f"the mesh covers the devices of processes {sorted(covered)} of "
                    f"{processes}: a run over several processes needs a mesh of every "
                    "process's devices (DataParallel.create() builds one), else each "
                    "process would train its own copy of the model"
                )

    @classmethod
    def create(cls, num_devices: int | None = None) -> "DataParallel":
        """**Arguments:**

        - `num_devices`: how many of `jax.local_devices()` to use; all of them by default.
          Across several processes the mesh covers all devices of all processes
          (`jax.devices()`), and `num_devices` must be `None` or their number.

        **Returns:** a `DataParallel` over the first `num_devices` local devices, or over
        every device of every process.
        """
        if jax.process_count() > 1:
            devices = jax.devices()
            if num_devices is not None and num_devices != len(devices):
                raise ValueError(
                    f"across {jax.process_count()} processes the mesh covers all "
                    f"{len(devices)} devices; got num_devices={num_devices}."
                )
            return cls(jax.sharding.Mesh(np.array(devices), ("data",)))
        devices = jax.local_devices()
        n = len(devices) if num_devices is None else num_devices
        if not 1 <= n <= len(devices):
            raise ValueError(
                f"num_devices must be between 1 and {len(devices)} (the number of local "
                f"devices); got {n}."
            )
        return cls(jax.sharding.Mesh(np.array(devices[:n]), ("data",)))

    @property
    def num_devices(self) -> int:
        """The number of devices of the mesh."""
        return self.mesh.devices.size

    @property
    def data_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding of a batch: split along axis 0 over the `"data"` axis."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        """The sharding of parameters and states: a full copy on every device."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def shard_batch(self, batch: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `batch` split along
        its first axis, whose size must be a multiple of `num_devices`. Across several
        processes, outside jit, `batch` is this process's rows of the global batch (of
        the same size in every process; NumPy arrays), from which the global batch is
        assembled."""
        leaves = jax.tree.leaves(batch)
        processes = jax.process_count()
        local = processes > 1 and all(isinstance(x, np.ndarray | np.generic) for x in leaves)
        for leaf in leaves:
            size = leaf.shape[0] * (processes if local else 1) if hasattr(leaf, "shape") else 0
            if hasattr(leaf, "shape") and leaf.shape and size % self.num_devices:
                raise ValueError(
                    f"the batch size ({size}) must be a multiple of the number of "
                    f"devices ({self.num_devices})."
                )
        if local:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
                batch,
            )
        return eqx.filter_shard(batch, self.data_sharding)

    def replicate(self, tree: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `tree` on all
        devices."""
        return eqx.filter_shard(tree, self.replicated)
