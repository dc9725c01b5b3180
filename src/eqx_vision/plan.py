"""Plan a training run before anything is allocated: a model's parameters, its FLOPs per
image, and the memory per device of its compiled training step for each
gradient-checkpointing policy and precision, so that the largest batch that fits can be
chosen.

Nothing is computed on arrays: the model is built abstractly (`eqx.filter_eval_shape`),
the training step (the one `training.fit` runs: AdamW, clipping, the warm-up and cosine
schedule) is traced and compiled for abstract inputs; FLOPs are counted on the traced
program (`jaxpr_flops`), memory read from XLA's analysis of the compiled one
(`memory_analysis`). With `fsdp`, the step is compiled for a mesh of that many devices
(a `jax.sharding.AbstractMesh`: the devices need not exist) with the parameters and the
optimizer state sharded over it, and the analysis is that of one device's program.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .layers import REMAT, remat
from .precision import COMPUTE_DTYPES
from .presets import ModelConfig
from .training import DataParallel, apply_model, init_optimizer, make_optimizer
from .training._fit import _fit_step


__all__ = ["Plan", "StepMemory", "jaxpr_flops", "plan_training"]


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The memory of one compiled training step on one device, in bytes, as XLA's
    `memory_analysis` reports it.

    - `arguments`: the inputs: parameters, model state, optimizer state, the batch, key.
    - `outputs`: the results (the new parameters, state and optimizer state, the loss).
    - `aliased`: outputs written over donated inputs (counted once in `total`).
    - `temporaries`: everything else alive during the step: activations kept for the
      backward pass, gradients, workspace (with `fsdp`, the parameters gathered for a
      block and the collectives' buffers).
    - `flops`: the step's FLOPs per image (`jaxpr_flops`: forward, backward and the
      recomputation the policy asks for).
    - `generated_code`: the compiled program's code, where the backend reports it (0 on
      CPU).
    """

    precision: str
    remat: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    flops: float
    generated_code: int = 0

    @property
    def total(self) -> int:
        """The step's peak: `arguments + outputs - aliased + temporaries`."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass(frozen=True)
class Plan:
    """What [`plan_training`][eqx_vision.plan.plan_training] found.

    - `params`: the trainable values (floating-point leaves) of the model.
    - `state_values`: the values of its `eqx.nn.State` (BatchNorm statistics).
    - `forward_flops`: the FLOPs of one image's forward pass (inference mode; see
      [`jaxpr_flops`][eqx_vision.plan.jaxpr_flops]).
    - `memory`: one `StepMemory` per precision and checkpointing policy, on one device.
    - `devices`: the devices of the step, each with `batch_size` images.
    - `fsdp`: whether the parameters and the optimizer state are sharded over them
      (replicated if not).
    - `param_bytes`: the bytes of the parameters and the optimizer state on one device.
    """

    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int
    params: int
    state_values: int
    forward_flops: float
    memory: tuple[StepMemory, ...]
    devices: int = 1
    fsdp: bool = False
    param_bytes: int = 0

    @property
    def train_flops(self) -> float:
        """The training step's FLOPs per image without recomputation (`remat="all"`, in
        float32 if planned), else those of the first step planned."""
        rows = sorted(self.memory, key=lambda m: (m.remat != "all", m.precision != "float32"))
        return rows[0].flops if rows else float("nan")


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x)


def _count(tree: Any, floating: bool) -> int:
    leaves = [x for x in jax.tree.leaves(tree) if _is_leaf_array(x)]
    return sum(
        math.prod(x.shape) for x in leaves if not floating or jnp.issubdtype(x.dtype, jnp.floating)
    )


def _sub_jaxprs(value: Any) -> list[Any]:
    """The jaxprs held by a parameter of an equation (a jaxpr, a closed one, or a tuple)."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, list | tuple):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: Any) -> float:
    """The FLOPs of the matrix products and convolutions of a jaxpr (2 per multiply-add),
    the bodies of `scan`s counted once per iteration, the costliest branch of a `cond`.

    XLA's own `cost_analysis` counts a loop's body once, whatever its trip count, so it
    undercounts models whose blocks run in a `scan`. Element-wise work (norms, softmax,
    activations) is left out, as the usual FLOP counts of vision models leave it out."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            k = math.prod(lhs.shape[d] for d in contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            per_output = kernel[spec[1]] * math.prod(kernel[d] for d in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        else:
            subs = {key: _sub_jaxprs(v) for key, v in eqn.params.items()}
            if name == "cond":
                total += max((jaxpr_flops(j) for j in subs.get("branches", [])), default=0.0)
                continue
            times = eqn.params.get("length", 1) if name == "scan" else 1
            total += times * sum(jaxpr_flops(j) for js in subs.values() for j in js)
    return total


def _flops(fn: Any, *args: Any) -> float:
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _compile(fn: Any, dynamic: Any, *args: Any, donate: bool, parallel: Any = None) -> Any:
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    if parallel is None or isinstance(parallel.mesh, jax.sharding.Mesh):
        return jitted.lower(dynamic, *args).compile()
    # An abstract mesh: lowered for the default platform and compiled for devices of it.
    devices = _device_assignment(parallel.num_devices)
    lowered = jitted.trace(dynamic, *args).lower(lowering_platforms=(devices[0].platform,))
    return lowered.compile(device_assignment=devices)


def _device_assignment(n: int) -> tuple[Any, ...]:
    """The devices to compile a program of `n` devices for: the first `n`, or, when there
    are fewer, the first standing for each of them (the program is compiled, never run;
    XLA partitions it the same way, and its memory analysis is that of one device)."""
    devices = jax.devices()
    return tuple(devices[:n]) if len(devices) >= n else (devices[0],) * n


def _placed(tree: Any, shardings: Any) -> Any:
    """The `jax.ShapeDtypeStruct` leaves of `tree` with their `shardings` (a tree of
    them, or one for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _bytes_per_device(tree: Any) -> int:
    """The bytes of the `jax.ShapeDtypeStruct` leaves of `tree` on one device: a leaf whose
    sharding splits it over the `"data"` axis counts its share."""
    total = 0
    for x in jax.tree.leaves(tree):
        size = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        sharding = x.sharding
        if sharding is not None and "data" in tuple(sharding.spec):
            size //= sharding.mesh.size
        total += size
    return total


def plan_training(
    config: ModelConfig,
    batch_size: int,
    *,
    precisions: Sequence[str] = tuple(COMPUTE_DTYPES),
    remats: Sequence[str] = tuple(REMAT),
    fsdp: int | None = None,
) -> Plan:
    """Parameters, FLOPs and the training step's memory of the model `config` describes,
    for a batch of `batch_size` images on one device.

    **Arguments:**

    - `config`: the model (e.g. from `presets.resolve_model`).
    - `batch_size`: the images of one training step on the device (with `fsdp`, on each
      device: the step's whole batch is `fsdp * batch_size`).
    - `precisions`: the compute dtypes to plan for (`"float32"`, `"bfloat16"`).
    - `remats`: the checkpointing policies to plan for (`"linear"`, `"inputs"`, `"all"`;
      see [`remat`][eqx_vision.remat]).
    - `fsdp`: plan the step of `DataParallel.create(fsdp, fsdp=True)` (see
      [`DataParallel`][eqx_vision.training.DataParallel]): the parameters and optimizer
      state sharded over `fsdp` devices, each with `batch_size` images. The devices need
      not exist: the step is compiled for an abstract mesh, so this plans 8 devices from a
      one-device process. `None` (the default) plans one device.

    **Returns:** a [`Plan`][eqx_vision.plan.Plan]. Each (precision, policy) is one
    compilation of the training step: seconds for small models, a minute or more for
    large ones on a CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    for p in precisions:
        if p not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {tuple(COMPUTE_DTYPES)}; got {p!r}")
    for r in remats:
        if r not in REMAT:
            raise ValueError(f"remat must be one of {tuple(REMAT)}; got {r!r}")
    if fsdp is not None and (isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1):
        raise ValueError(f"fsdp must be a positive number of devices or None; got {fsdp!r}")
    parallel = None if fsdp is None else _abstract_parallel(fsdp, fsdp=True)
    return _plan(config, batch_size, precisions, remats, parallel)


def _abstract_parallel(num_devices: int, *, fsdp: bool) -> DataParallel:
    """A [`DataParallel`][eqx_vision.training.DataParallel] over an abstract mesh of
    `num_devices` devices, for which a step is compiled (never run) whether or not the
    devices exist."""
    return DataParallel(jax.sharding.AbstractMesh((num_devices,), ("data",)), fsdp=fsdp)


def _plan(
    config: ModelConfig,
    batch_size: int,
    precisions: Sequence[str],
    remats: Sequence[str],
    parallel: DataParallel | None,
) -> Plan:
    """`plan_training` for a step over `parallel` (a `DataParallel` over real devices, or
    over an abstract mesh from `_abstract_parallel`), each device with `batch_size`
    images; on one device if `None`."""
    model, state = config.build_like()
    optimizer = make_optimizer(1e-3, warmup_steps=1, total_steps=2)
    shape = (config.channels, *config.image_size)
    num_devices = 1 if parallel is None else parallel.num_devices
    images = jax.ShapeDtypeStruct((num_devices * batch_size, *shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((num_devices * batch_size,), jnp.int32)
    key = jax.eval_shape(lambda: jr.key(0))
    if parallel is not None:
        images, labels = _placed((images, labels), (parallel.data_sharding,) * 2)
        key = _placed(key, parallel.replicated)

    def forward(dynamic: Any, x: Any) -> Any:
        m, s = eqx.combine(dynamic, static_model)
        return apply_model(eqx.nn.inference_mode(m), s, x)[0]

    dynamic_model, static_model = eqx.partition((model, state), _is_leaf_array)
    one = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    forward_flops = _flops(forward, dynamic_model, one)

    memory = []
    param_bytes = 0
    for precision in precisions:
        for policy in remats:
            m = remat(model, policy)
            opt_state = eqx.filter_eval_shape(init_optimizer, optimizer, m)
            dynamic, static = eqx.partition((m, state, opt_state), _is_leaf_array)
            d_model, d_state, d_opt = dynamic
            if parallel is not None:
                d_model, d_opt = _placed(
                    (d_model, d_opt), parallel.param_shardings((d_model, d_opt))
                )
                dynamic = (d_model, _placed(d_state, parallel.replicated), d_opt)
            param_bytes = _bytes_per_device((d_model, d_opt))

            def step(dynamic: Any, x: Any, y: Any, k: Any, static=static, precision=precision):
                m_, s_, o_ = eqx.combine(dynamic, static)
                out = _fit_step(m_, s_, o_, x, y, k, optimizer=optimizer, parallel=parallel,
                                precision=precision)  # fmt: skip
                return eqx.filter(out, eqx.is_array)

            compiled = _compile(step, dynamic, images, labels, key, donate=True,
                                parallel=parallel)  # fmt: skip
            analysis = compiled.memory_analysis()
            memory.append(
                StepMemory(
                    precision,
                    policy,
                    int(analysis.argument_size_in_bytes),
                    int(analysis.output_size_in_bytes),
                    int(analysis.alias_size_in_bytes),
                    int(analysis.temp_size_in_bytes),
                    _flops(step, dynamic, images, labels, key) / (num_devices * batch_size),
                    int(analysis.generated_code_size_in_bytes),
                )
            )
    return Plan(
        model=config.preset or config.model,
        input_shape=(config.channels, *config.image_size),
        num_classes=config.num_classes,
        batch_size=batch_size,
        params=_count(model, floating=True),
        state_values=_count(state, floating=False),
        forward_flops=forward_flops,
        memory=tuple(memory),
        devices=num_devices,
        fsdp=parallel is not None and parallel.fsdp,
        param_bytes=param_bytes,
    )


def format_bytes(n: int | float) -> str:
    """`n` bytes in MiB or GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `eqx-vision plan` prints."""
    shape = "x".join(map(str, plan.input_shape))
    lines = [
        f"model    {plan.model}: {plan.params:,} parameters"
        + (f", {plan.state_values:,} state values" if plan.state_values else "")
        + f", input {shape}, {plan.num_classes} classes",
        f"flops    {plan.forward_flops / 1e9:.3g} GFLOPs per image forward, "
        f"{plan.train_flops / 1e9:.3g} GFLOPs per image in a training step",
        f"memory   of the compiled training step (AdamW), batch {plan.batch_size} "
        + ("on one device:" if plan.devices == 1 else f"on each of {plan.devices} devices,"),
        f"  {'precision':<9}  {'remat':<6}  {'inputs':>10}  {'temporaries':>11}  "
        f"{'total':>10}  {'GFLOPs/image':>12}",
    ]
    if plan.devices > 1:
        how = "sharded over them (FSDP)" if plan.fsdp else "replicated"
        lines.insert(-1, f"         parameters and optimizer state {how}: "
                         f"{format_bytes(plan.param_bytes)} a device")  # fmt: skip
    for m in plan.memory:
        lines.append(
            f"  {m.precision:<9}  {m.remat:<6}  {format_bytes(m.arguments):>10}  "
            f"{format_bytes(m.temporaries):>11}  {format_bytes(m.total):>10}  "
            f"{m.flops / 1e9:>12.3g}"
        )
    return "\n".join(lines)
