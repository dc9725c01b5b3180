"""timm 1.0.31 as a reference: importing it here, and the table of its model configurations.

timm imports torchvision, whose wheels do not load next to the CPU build of torch; the
models compared here never call it, so inert stand-in modules take its place before timm
is imported. A missing timm is an error, never a skip.

Run as a script (`python tests/timm_reference.py`), this module writes
`src/eqx_vision/interop/timm/models.json`: for every model name of the supported timm
families, with and without its pretrained tags, the timm class and the constructor
arguments that `timm.create_model(name)` passes to it, the names of its classifier layers,
and the data configuration of its weights (of the default tag for a name without one).
`test_timm_configs.py` checks that the committed file is what this writes.
"""

import functools
import importlib
import json
import pkgutil
import sys
import types
import warnings
from pathlib import Path
from typing import Any


TIMM_VERSION = "1.0.31"
FAMILIES = (
    "vit_*",
    "deit_*",
    "deit3_*",
    "cait_*",
    "pit_*",
    "twins_svt_*",
    "nest_*",
    "levit_*",
    "crossvit_*",
)
TABLE = Path(__file__).parents[1] / "src/eqx_vision/interop/timm/models.json"
TORCHVISION_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.datasets",
    "torchvision.io",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.utils",
    "torchvision.models",
    "torchvision.models.feature_extraction",
)


class _InertMeta(type):
    """Every attribute of a placeholder is another placeholder class (one per name), so
    that `InterpolationMode.NEAREST` and the like can be used as dictionary keys."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        children = cls.__dict__.get("_children")
        if children is None:
            children = {}
            type.__setattr__(cls, "_children", children)
        if name not in children:
            children[name] = _InertMeta(name, (cls,), {})
        return children[name]


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def module_getattr(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(_Inert, attr)

    module.__getattr__ = module_getattr  # type: ignore[method-assign]
    return module


def import_timm() -> types.ModuleType:
    """`timm`, imported with torchvision stood in for if it is not importable."""
    try:
        importlib.import_module("torchvision")
    except Exception:
        for name in TORCHVISION_MODULES:
            sys.modules[name] = _stand_in(name)
        for name in TORCHVISION_MODULES[1:]:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        timm = importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            f"timm {TIMM_VERSION} is required for the timm parity tests: "
            f"pip install --no-deps timm=={TIMM_VERSION}"
        ) from e
    if timm.__version__ != TIMM_VERSION:
        raise ImportError(
            f"the tests compare against timm {TIMM_VERSION}; found {timm.__version__}"
        )
    return timm


def _jsonable(value: Any) -> Any:
    """timm's constructor arguments as JSON: tuples become lists, classes and functions
    their qualified names, partials `{"partial": name, "args": [...], "kwargs": {...}}`,
    other objects `{"object": class name}`."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {
            "partial": _jsonable(value.func),
            "args": _jsonable(list(value.args)),
            "kwargs": _jsonable(value.keywords),
        }
    if isinstance(value, type) or isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        return f"{value.__module__}.{value.__qualname__}"
    # an instance, such as the backbone module of a hybrid patch embedding
    return {"object": _jsonable(type(value))}


class _Captured(Exception):
    pass


def constructor_arguments(name: str) -> tuple[str, dict[str, Any]]:
    """The timm class of `timm.create_model(name)` and the keyword arguments it is
    constructed with, captured without building the model."""
    timm = import_timm()
    models = importlib.import_module("timm.models")
    with warnings.catch_warnings():  # timm's deprecated alias modules warn on import
        warnings.simplefilter("ignore", FutureWarning)
        modules = [
            importlib.import_module(f"timm.models.{m.name}")
            for m in pkgutil.iter_modules(models.__path__)
        ]
    modules = [m for m in modules if hasattr(m, "build_model_with_cfg")]
    builder = importlib.import_module("timm.models._builder").build_model_with_cfg
    captured: dict[str, Any] = {}

    def build(model_cls: Any, variant: str, pretrained: bool, **kwargs: Any) -> None:
        def capture(**model_kwargs: Any) -> None:
            captured["class"] = model_cls.__name__
            captured["kwargs"] = model_kwargs
            raise _Captured

        try:
            builder(capture, variant, pretrained, **kwargs)
        except _Captured:
            pass

    saved = {m: m.build_model_with_cfg for m in modules}
    try:
        for m in modules:
            setattr(m, "build_model_with_cfg", build)  # noqa: B010
        timm.create_model(name, pretrained=False)
    except Exception:
        if not captured:
            raise
    finally:
        for m, fn in saved.items():
            setattr(m, "build_model_with_cfg", fn)  # noqa: B010
    return captured["class"], captured["kwargs"]


DATA_CONFIG_KEYS = (
    "input_size",
    "mean",
    "std",
    "crop_pct",
    "crop_mode",
    "interpolation",
    "num_classes",
    "label_names",
    "hf_hub_id",
    "license",
)


def models_table() -> dict[str, Any]:
    """The table written to `models.json`."""
    timm = import_timm()
    with_tags = timm.list_models(list(FAMILIES), pretrained=True)
    bare = timm.list_models(list(FAMILIES))
    names = sorted(set(bare) | {n.split(".")[0] for n in with_tags} | set(with_tags))
    entries: dict[str, Any] = {}
    for name in names:
        cls, kwargs = constructor_arguments(name)
        entry: dict[str, Any] = {"class": cls, "kwargs": _jsonable(kwargs)}
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None:
            cfg = cfg.to_dict()
            classifier = cfg.get("classifier")
            entry["classifier"] = [classifier] if isinstance(classifier, str) else classifier
            entry["data_config"] = {
                k: _jsonable(cfg[k]) for k in DATA_CONFIG_KEYS if cfg.get(k) is not None
            }
        entries[name] = entry
    return {"timm_version": TIMM_VERSION, "families": list(FAMILIES), "models": entries}


def timm_model(name: str, *, seed: int = 0, **overrides: Any) -> Any:
    """`timm.create_model(name, pretrained=False, **overrides)` in eval mode, its
    initialisation seeded."""
    import torch

    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **overrides).eval()


def check_timm_parity(
    name: str,
    input_shape: tuple[int, int, int],
    *,
    tol: float = 1e-4,
    grad_tol: float = 1e-3,
    batch: int = 2,
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """timm's `name` (with the constructor `overrides`, e.g. a smaller `depth`), its
    parameters perturbed (and BatchNorm statistics randomised) and loaded with
    `ev.from_timm(name, state_dict, **overrides)`: outputs to `tol`, gradients of the
    input and every parameter to `grad_tol` (see `reference.check_parity`). Returns the
    loaded model (or `(model, state)`)."""
    import jax.random as jr

    import eqx_vision as ev
    from eqx_vision.interop import timm as ev_timm
    from reference import check_parity

    torch_model = timm_model(name, seed=seed, **overrides)
    built = ev_timm.build(name, key=jr.key(seed), **overrides)
    model, state = built if isinstance(built, tuple) else (built, None)

    def load(state_dict: Any, state: Any) -> Any:
        out = ev.from_timm(name, state_dict, **overrides)
        return out

    return check_parity(
        model,
        torch_model,
        input_shape,
        batch=batch,
        seed=seed,
        tol=tol,
        grad_tol=grad_tol,
        state=state,
        load=load,
    )


SHAPES = Path(__file__).parent / "fixtures" / "timm_shapes.json.gz"


def _signature(entry: dict[str, Any]) -> str:
    return json.dumps([entry["class"], entry["kwargs"]], sort_keys=True)


def state_dict_shapes() -> dict[str, Any]:
    """The state-dict shapes of every distinct configuration in `models.json`, from timm's
    models built on the meta device (no memory): `{"configs": {signature: {key: shape}},
    "names": {name: signature}}`."""
    import torch

    timm = import_timm()
    models = json.loads(TABLE.read_text())["models"]
    configs: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, entry in models.items():
        signature = _signature(entry)
        names[name] = signature
        if signature not in configs:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            configs[signature] = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"timm_version": TIMM_VERSION, "configs": configs, "names": names}


def write_state_dict_shapes() -> None:
    import gzip

    text = json.dumps(state_dict_shapes(), sort_keys=True, separators=(",", ":"))
    SHAPES.write_bytes(gzip.compress(text.encode(), mtime=0))


def check_shapes(name: str, shapes: dict[str, list[int]]) -> None:
    """Build eqx_vision's model of `name` abstractly and convert it from a shape-only state
    dict (`shapes`, timm's keys and shapes): every key used, every shape as expected."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    from eqx_vision.interop import timm as ev_timm
    from eqx_vision.interop._state_dict import StateDict

    family, args = ev_timm._arguments(name, None, {})
    built = ev_timm._placeholders(eqx.filter_eval_shape(lambda: family.build(args, key=jr.key(0))))
    sd = StateDict(
        {
            k: jax.ShapeDtypeStruct(
                tuple(v), jnp.int32 if k.endswith("num_batches_tracked") else np.float32
            )
            for k, v in shapes.items()
        },
        source="timm",
    )
    if isinstance(built, tuple):
        eqx.filter_eval_shape(lambda: family.convert(built[0], sd, built[1]))
    else:
        eqx.filter_eval_shape(lambda: family.convert(built, sd))
    sd.finish()


if __name__ == "__main__":
    TABLE.write_text(json.dumps(models_table(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE}")
    write_state_dict_shapes()
    print(f"wrote {SHAPES}")
