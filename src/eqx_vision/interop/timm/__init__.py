"""Loading timm checkpoints into eqx_vision models, without torch.

`models.json` holds, for every model name of the supported timm families (with and without
its pretrained tags), timm's class, the constructor arguments `timm.create_model(name)`
passes to it, the names of its classifier layers and, for tagged names, the data
configuration of the weights. It is written from timm itself (`tests/timm_reference.py`).
`FAMILIES` maps each timm class to the module that builds its eqx_vision model from those
arguments (`build`) and loads its state dict (`convert`); a new family gets a module and
a line there.
"""

import functools
import importlib
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from .._state_dict import CheckpointError, StateDict, _to_numpy
from ._common import TimmArgs, TimmConfigError
from ._hub import DataConfig, pretrained


FAMILIES: Mapping[str, str] = {
    "VisionTransformer": "vit",
    "VisionTransformerDistilled": "vit",
    "Cait": "cait",
    "PoolingVisionTransformer": "pit",
    "Twins": "twins_svt",
    "Nest": "nest",
    "Levit": "levit",
    "LevitDistilled": "levit",
    "CrossVit": "cross_vit",
}
"""The eqx_vision module (in this package) of each timm class."""

UNSUPPORTED: Mapping[str, str] = {
    "Eva": "EVA-style transformers (rotary position embeddings, SwiGLU MLPs)",
    "VisionTransformerRelPos": "ViTs with relative position biases",
}
"""timm classes that eqx_vision has no counterpart of, with what they are."""


@functools.cache
def _table() -> dict[str, Any]:
    text = resources.files(__name__).joinpath("models.json").read_text()
    return json.loads(text)


def timm_version() -> str:
    """The timm version whose configurations `models.json` holds."""
    return _table()["timm_version"]


def model_names(*, pretrained: bool = False, supported: bool = True) -> list[str]:
    """The timm model names eqx_vision knows: with `pretrained=True` only the tagged
    names (`vit_small_patch16_224.augreg_in21k_ft_in1k`, ...), each of which has weights on
    the Hugging Face Hub; with `supported=False` also those of classes eqx_vision lacks."""
    names = []
    for name, entry in _table()["models"].items():
        if pretrained and "." not in name:
            continue
        if supported and entry["class"] not in FAMILIES:
            continue
        names.append(name)
    return sorted(names)


def _entry(model_name: str) -> dict[str, Any]:
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a timm model name (a str); got {model_name!r}.")
    models = _table()["models"]
    name = model_name.removeprefix("timm/")
    if name in models:
        return models[name]
    arch, _, tag = name.partition(".")
    if tag and arch in models:
        tags = sorted(
            n.partition(".")[2] for n in models if n.partition(".")[0] == arch and "." in n
        )
        raise TimmConfigError(
            f"timm has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags)}."
        )
    import difflib

    close = difflib.get_close_matches(arch, [n for n in models if "." not in n], n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    families = ", ".join(_table()["families"])
    raise TimmConfigError(
        f"unknown timm model name {model_name!r} (eqx_vision knows the timm "
        f"{timm_version()} names of the families {families}).{hint}"
    )


def _family(model_name: str, timm_class: str) -> Any:
    if timm_class in UNSUPPORTED:
        raise TimmConfigError(
            f"{model_name}: timm builds it as {timm_class}, one of the "
            f"{UNSUPPORTED[timm_class]}, which eqx_vision does not implement."
        )
    module = FAMILIES.get(timm_class)
    if module is None:
        raise TimmConfigError(f"{model_name}: timm's class {timm_class} is not supported.")
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{module}":
            raise
        raise TimmConfigError(
            f"{model_name}: timm's {timm_class} is not supported by eqx_vision yet."
        ) from None


def data_config(model_name: str) -> dict[str, Any]:
    """The data configuration of a timm name's weights, as timm's `pretrained_cfg`:
    `input_size` `(c, h, w)`, `mean`, `std`, `crop_pct`, `crop_mode`, `interpolation`,
    `num_classes`, `hf_hub_id` (absent when timm publishes no weights). A name without a
    tag gets its default tag's."""
    return dict(_entry(model_name).get("data_config", {}))


def _arguments(
    model_name: str, num_classes: int | None, overrides: dict[str, Any]
) -> tuple[Any, TimmArgs]:
    entry = _entry(model_name)
    family = _family(model_name, entry["class"])
    kwargs = dict(entry["kwargs"])
    # as in models.json: tuples as lists
    kwargs.update(json.loads(json.dumps(overrides)))
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0; got {num_classes!r}.")
        kwargs["num_classes"] = num_classes
    return family, TimmArgs(model_name.removeprefix("timm/"), entry["class"], kwargs)


def build(
    model_name: str, *, num_classes: int | None = None, key: PRNGKeyArray, **overrides: Any
) -> Any:
    """The eqx_vision model of timm's `model_name`, randomly initialised (with
    `(model, state)` for models with BatchNorm): the architecture of
    `timm.create_model(model_name, num_classes=..., **overrides)`.

    **Raises:** `TimmConfigError` (a `ValueError`) for an unknown name, or a configuration
    eqx_vision cannot build, naming the timm option it lacks.
    """
    family, args = _arguments(model_name, num_classes, overrides)
    return family.build(args, key=key)


def check(model_name: str) -> None:
    """Raise `TimmConfigError` unless eqx_vision can build `model_name` (without building
    it)."""
    family, args = _arguments(model_name, None, {})
    eqx.filter_eval_shape(lambda: family.build(args, key=jr.key(0)))


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of a `.safetensors` file as NumPy arrays (bfloat16 ones as float32)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise ImportError(
            "reading .safetensors files needs the safetensors package: "
            "pip install 'eqx_vision[pretrained]'"
        ) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        out = {}
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from e


def _new_head(
    sd: dict[str, Any], classifier: list[str], num_classes: int, key: PRNGKeyArray
) -> dict[str, Any]:
    """`sd` with each classifier layer of another size than `num_classes` removed
    (`num_classes=0`) or replaced by a new one of `num_classes` outputs, drawn as
    `torch.nn.Linear` initialises (uniform in `±1/sqrt(fan_in)`). A classifier that
    already has `num_classes` outputs (a fine-tuned checkpoint) is kept."""
    sd = dict(sd)
    # timm's configuration of a few distilled names lists only the main head
    distilled = [c.replace("head", "head_dist", 1) for c in classifier if c.startswith("head.")]
    classifier = classifier + [c for c in distilled if f"{c}.weight" in sd and c not in classifier]
    for layer, k in zip(classifier, jr.split(key, len(classifier)), strict=True):
        weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
        if weight_key not in sd:
            if num_classes == 0:
                continue
            raise CheckpointError(
                f"missing key {weight_key!r} (the classifier) in the timm state dict."
            )
        out_features, fan_in = _to_numpy(sd[weight_key]).shape
        if out_features == num_classes:
            continue
        del sd[weight_key]
        has_bias = sd.pop(bias_key, None) is not None
        if num_classes:
            bound = 1 / math.sqrt(fan_in)
            wk, bk = jr.split(k)
            shape = (num_classes, fan_in)
            sd[weight_key] = np.asarray(jr.uniform(wk, shape, minval=-bound, maxval=bound))
            if has_bias:
                bias = jr.uniform(bk, (num_classes,), minval=-bound, maxval=bound)
                sd[bias_key] = np.asarray(bias)
    return sd


def from_timm(
    model_name: str,
    state_dict: Mapping[str, Any] | str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    key: PRNGKeyArray | None = None,
    **overrides: Any,
) -> Any:
    """The eqx_vision model of a timm model, with its weights.

    **Arguments:**

    - `model_name`: a timm model name, with or without a pretrained tag
      (`"vit_small_patch16_224"`, `"vit_small_patch16_224.augreg_in21k_ft_in1k"`); a
      leading `"timm/"` is allowed. The architecture is timm's configuration for that name
      (`eqx_vision.interop.timm.model_names()` lists them).
    - `state_dict`: the weights: a mapping of timm's parameter names to NumPy arrays or
      torch tensors (`timm_model.state_dict()`), or the path of a `.safetensors` file
      (read with NumPy; torch is never needed).
    - `num_classes`: as timm's argument of that name: a classifier of this many outputs
      replaces the checkpoint's if that has another size (drawn at random with `key`, as
      `torch.nn.Linear` initialises); `0` removes it.
    - `key`: a `jax.random.key` for a new classifier (default `jax.random.key(0)`).
    - `**overrides`: other constructor arguments of timm's model, as given to
      `timm.create_model` (`depth=4`, `img_size=384`, ...).

    **Returns:** the model, equal to `timm.create_model(model_name)` in eval mode, or
    `(model, state)` for models with BatchNorm (LeViT).

    **Raises:** `TimmConfigError` (a `ValueError`) for an unknown name or a configuration
    eqx_vision cannot build, naming the timm option it lacks; `CheckpointError` (a
    `ValueError`) on a missing, unexpected or mis-shaped tensor, naming the key and both
    shapes. Nothing is half-loaded.
    """
    family, args = _arguments(model_name, num_classes, overrides)
    if isinstance(state_dict, str | os.PathLike):
        state_dict = load_safetensors(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "from_timm expects a mapping of names to arrays (`timm_model.state_dict()`) or "
            f"the path of a .safetensors file; got {type(state_dict).__name__}."
        )
    entry = _entry(model_name)
    if num_classes is not None and num_classes != entry["kwargs"].get("num_classes"):
        key = jr.key(0) if key is None else key
        state_dict = _new_head(
            dict(state_dict), entry.get("classifier") or ["head"], num_classes, key
        )
    built = _placeholders(eqx.filter_eval_shape(lambda: family.build(args, key=jr.key(0))))
    sd = StateDict(state_dict, source="timm")
    if isinstance(built, tuple):
        out: Any = family.convert(built[0], sd, built[1])
    else:
        out = family.convert(built, sd)
    sd.finish()
    return _fill_constants(
        out, lambda: family.build(_arguments(model_name, num_classes, overrides)[1], key=jr.key(0))
    )


def _placeholders(tree: Any) -> Any:
    """`tree` with each `jax.ShapeDtypeStruct` replaced by a read-only NumPy array of its
    shape and dtype that takes no memory (zero strides): the model's layout for the
    converters, which only read the shapes and dtypes of what they replace."""
    return jax.tree.map(
        lambda x: (
            np.broadcast_to(np.zeros((), x.dtype), x.shape)
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        tree,
    )


def _is_placeholder(x: Any) -> bool:
    return isinstance(x, np.ndarray) and not x.flags.writeable and not any(x.strides)


def _fill_constants(loaded: Any, build_concrete: Any) -> Any:
    """`loaded` with any leaf the checkpoint did not provide (a constant the model computes
    at construction, such as a fixed position table) taken from a concrete build."""
    if not any(_is_placeholder(leaf) for leaf in jax.tree.leaves(loaded)):
        return loaded
    concrete = build_concrete()
    return jax.tree.map(lambda a, c: c if _is_placeholder(a) else a, loaded, concrete)


__all__ = [
    "CheckpointError",
    "DataConfig",
    "FAMILIES",
    "UNSUPPORTED",
    "TimmConfigError",
    "build",
    "check",
    "data_config",
    "from_timm",
    "load_safetensors",
    "model_names",
    "pretrained",
    "timm_version",
]
