"""Data parallelism over the devices of one or several processes, with the parameters
and optimizer state replicated or sharded (FSDP)."""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


# The default size from which `DataParallel(fsdp=True)` shards an array (1 MiB): smaller
# ones (biases, norms, the optimizer's counts) stay replicated, their gathers not worth it.
FSDP_MIN_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """A leaf of a tree, and how many of its leading axes are the depth of a stack."""

    value: Any
    stacked: int


_HOLE = object()  # the blocks of a stack while its other fields are marked


def _blocks(stack: Any) -> Any:
    return stack.blocks


def _is_none(x: Any) -> bool:
    return x is None


def fsdp_axis(shape: Sequence[int], num_devices: int) -> int | None:
    """The axis the FSDP rule shards an array of `shape` along over `num_devices`: the
    largest axis whose size is a multiple of `num_devices`, the later of two of one size
    (as big_vision's `fsdp` rule orders them); `None` if no axis divides (or for one
    device)."""
    if num_devices < 2:
        return None
    divisible = [(size, i) for i, size in enumerate(shape) if size % num_devices == 0]
    return max(divisible)[1] if divisible else None


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

    With `fsdp`, the parameters and the optimizer state are sharded over the same `"data"`
    axis instead of replicated (fully sharded data parallelism): each array of at least
    `min_shard_bytes` is split along its largest axis that the number of devices divides
    (see [`param_sharding`][eqx_vision.training.DataParallel.param_sharding]); smaller or
    indivisible ones stay replicated. Each device then holds about `1/num_devices` of them;
    inside the compiled step XLA's partitioner gathers each parameter where it is used (a
    scanned stack's one block at a time) and reduces each gradient to its shard. The
    model's state (BatchNorm statistics) stays replicated, the batch is split as without
    it, and the results are those of the replicated run, to rounding. The steps and
    `fit` place the model and optimizer state with
    [`shard_params`][eqx_vision.training.DataParallel.shard_params] (replicated without
    `fsdp`). Across several processes each process writes its shards of the training
    checkpoints, and `fit` gathers the arrays for process 0's `last.safetensors`.

    Create it with [`DataParallel.create`][eqx_vision.training.DataParallel.create]. (Its
    mesh may be a `jax.sharding.AbstractMesh`, to compile a step for devices that are not
    there, as [`plan_training`][eqx_vision.plan.plan_training] does.)
    """

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    fsdp: bool = False
    min_shard_bytes: int = FSDP_MIN_BYTES

    def __post_init__(self):
        bytes_ = self.min_shard_bytes
        if isinstance(bytes_, bool) or not isinstance(bytes_, int) or bytes_ < 0:
            raise ValueError(
                f"min_shard_bytes must be a non-negative integer; got {self.min_shard_bytes!r}"
            )
        processes = jax.process_count()
        if processes > 1 and isinstance(self.mesh, jax.sharding.Mesh):
            covered = {d.process_index for d in self.mesh.devices.flat}
            if covered != set(range(processes)):
                raise ValueError(
                    f"the mesh covers the devices of processes {sorted(covered)} of "
                    f"{processes}: a run over several processes needs a mesh of every "
                    "process's devices (DataParallel.create() builds one), else each "
                    "process would train its own copy of the model"
                )

    @classmethod
    def create(
        cls,
        num_devices: int | None = None,
        *,
        fsdp: bool = False,
        min_shard_bytes: int = FSDP_MIN_BYTES,
    ) -> "DataParallel":
        """**Arguments:**

        - `num_devices`: how many of `jax.local_devices()` to use; all of them by default.
          Across several processes the mesh covers all devices of all processes
          (`jax.devices()`), and `num_devices` must be `None` or their number.
        - `fsdp`: shard the parameters and the optimizer state over the devices instead of
          replicating them.
        - `min_shard_bytes`: with `fsdp`, the arrays smaller than this stay replicated.

        **Returns:** a `DataParallel` over the first `num_devices` local devices, or over
        every device of every process.
        """
        options: dict[str, Any] = dict(fsdp=fsdp, min_shard_bytes=min_shard_bytes)
        if jax.process_count() > 1:
            devices = jax.devices()
            if num_devices is not None and num_devices != len(devices):
                raise ValueError(
                    f"across {jax.process_count()} processes the mesh covers all "
                    f"{len(devices)} devices; got num_devices={num_devices}."
                )
            return cls(jax.sharding.Mesh(np.array(devices), ("data",)), **options)
        devices = jax.local_devices()
        n = len(devices) if num_devices is None else num_devices
        if not 1 <= n <= len(devices):
            raise ValueError(
                f"num_devices must be between 1 and {len(devices)} (the number of local "
                f"devices); got {n}."
            )
        return cls(jax.sharding.Mesh(np.array(devices[:n]), ("data",)), **options)

    @property
    def num_devices(self) -> int:
        """The number of devices of the mesh."""
        return self.mesh.size

    @property
    def data_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding of a batch: split along axis 0 over the `"data"` axis."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        """A full copy on every device: the sharding of the model's state, and of the
        parameters and optimizer state without `fsdp`."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def param_sharding(self, x: Any, stacked: int = 0) -> jax.sharding.NamedSharding:
        """The sharding of one parameter or optimizer-state array `x` (an array or a
        `jax.ShapeDtypeStruct`).

        Without `fsdp`, replicated. With it, if `x` holds at least `min_shard_bytes`,
        split over `"data"` along its largest axis whose size the number of devices divides
        (the later of two axes of one size, as big_vision's `fsdp` rule orders them),
        leaving out its first `stacked` axes; replicated otherwise (small, or no axis
        divides).

        `stacked` is the number of leading axes that are the depth of a scanned
        [`Stack`][eqx_vision.layers.Stack] (1, or 2 for a stack within the blocks of
        another): [`param_shardings`][eqx_vision.training.DataParallel.param_shardings]
        finds them. A stack sharded along its depth would be gathered whole before the
        loop; sharded along another axis, each iteration gathers its one block.
        """
        shape = tuple(x.shape)
        size = math.prod(shape) * np.dtype(x.dtype).itemsize
        axis = fsdp_axis(shape[stacked:], self.num_devices) if self.fsdp else None
        if axis is None or size < self.min_shard_bytes:
            return self.replicated
        spec = (None,) * (stacked + axis) + ("data",)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def param_shardings(self, tree: PyTree) -> PyTree:
        """[`param_sharding`][eqx_vision.training.DataParallel.param_sharding] of every
        array of `tree` (a model, its optimizer state, or their abstract shapes), `None` at
        the leaves that are not arrays. The leaves of the blocks of a
        [`Stack`][eqx_vision.layers.Stack] (also in the optimizer state, which holds
        the model's structure) are never sharded along their depth."""
        from ..layers import Stack

        def mark(node: Any, stacked: int) -> Any:
            # Each leaf as `_Stacked(leaf, the depth axes of the stacks around it)`.
            def visit(x: Any) -> Any:
                if not isinstance(x, Stack):
                    return _Stacked(x, stacked)
                blocks = mark(x.blocks, stacked + 1)
                outer = mark(eqx.tree_at(_blocks, x, _HOLE, is_leaf=_is_none), stacked)
                return eqx.tree_at(_blocks, outer, blocks)

            return jax.tree.map(
                visit, node, is_leaf=lambda x: x is not node and isinstance(x, Stack)
            )

        def sharding(leaf: _Stacked) -> Any:
            x = leaf.value
            is_array = eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
            return self.param_sharding(x, leaf.stacked) if is_array else None

        marked = mark(tree, 0)
        return jax.tree.map(sharding, marked, is_leaf=lambda x: isinstance(x, _Stacked))

    def shard_params(self, tree: PyTree) -> PyTree:
        """Place (outside jit) or constrain (inside jit) every array of `tree` (the model,
        the optimizer state) with its
        [`param_sharding`][eqx_vision.training.DataParallel.param_sharding]: sharded with
        `fsdp`, replicated without."""
        if not self.fsdp:
            return self.replicate(tree)
        return eqx.filter_shard(tree, self.param_shardings(tree))

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
