"""Every integer argument of every model's constructor is validated before anything is built.

The models and their tiny configurations come from the presets API; the integer arguments
are read from the constructors' annotations (plain, optional, pair and per-stage ints). Each
is given 0, -1, 1.5 and True, and construction must raise a `ValueError` that names the
model and the argument. An argument whose annotation allows only a sequence (PiT's and
ScalableViT's `depth`, T2T-ViT's `t2t_layers`, CrossFormer's `cross_embed_kernel_sizes`)
gets the bad value as its first int.
"""

import collections.abc
import inspect
import types
import typing
from typing import Any

import equinox as eqx
import jax
import pytest

from eqx_vision import presets


BAD_VALUES = (0, -1, 1.5, True)

# Arguments for which 0 is a valid value: ViT with `num_classes=0` returns the pooled features
# instead of logits (CaiT and PiT the normalised class token, NesT and TwinsSVT the pooled
# features), a stage (or level) may have no blocks in CrossFormer, NesT, ScalableViT and
# Twins-SVT, and ViT may have no register tokens.
ZERO_IS_VALID = {
    ("ViT", "num_classes"),
    ("ViT", "num_registers"),
    ("PiT", "num_classes"),
    ("CaiT", "num_classes"),
    ("SimpleViT", "num_classes"),
    ("DeepViT", "num_classes"),
    ("ParallelViT", "num_classes"),
    ("SmallDatasetViT", "num_classes"),
    ("ViTWithPatchMerger", "num_classes"),
    ("CvT", "num_classes"),
    ("LeViT", "num_classes"),
    ("CrossFormer", "depth"),
    ("CrossFormer", "num_classes"),
    ("T2TViT", "num_classes"),
    ("RegionViT", "num_classes"),
    ("CrossViT", "num_classes"),
    ("NesT", "block_repeats"),
    ("NesT", "num_classes"),
    ("ScalableViT", "depth"),
    ("ScalableViT", "num_classes"),
    *(("TwinsSVT", f"s{i}_depth") for i in range(1, 5)),
    ("TwinsSVT", "num_classes"),
}


def _tiny_configs() -> list[presets.ModelConfig]:
    names = [p.name for p in presets.list_presets() if p.name.endswith("-tiny")]
    return [presets.resolve_model(name, num_classes=3, data_channels=3) for name in names]


def _mentions_int(hint: Any) -> bool:
    if hint is int:
        return True
    if typing.get_origin(hint) is typing.Literal:
        return False
    return any(_mentions_int(arg) for arg in typing.get_args(hint))


def _takes_bare_int(hint: Any) -> bool:
    if hint is int:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_bare_int(arg) for arg in typing.get_args(hint))
    return False


def _int_arguments(cls: Any) -> list[tuple[str, bool]]:
    """The integer arguments of `cls.__init__`, each with whether it takes a bare int."""
    hints = typing.get_type_hints(cls.__init__)
    names = inspect.signature(cls.__init__).parameters
    return [
        (name, _takes_bare_int(hints[name]))
        for name in names
        if name in hints and name != "key" and _mentions_int(hints[name])
    ]


def _with_first_int(value: Any, bad: Any) -> Any:
    """`value`, a nested sequence, with its first int replaced by `bad`."""
    done = False

    def replace(v: Any) -> Any:
        nonlocal done
        if isinstance(v, int) and not isinstance(v, bool) and not done:
            done = True
            return bad
        if isinstance(v, collections.abc.Sequence) and not isinstance(v, str):
            return type(v)(replace(x) for x in v) if isinstance(v, list) else tuple(map(replace, v))
        return v

    return replace(value)


def _cases() -> list[Any]:
    cases = []
    for config in _tiny_configs():
        cls = config.cls
        defaults = {
            name: p.default
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        for name, bare in _int_arguments(cls):
            for bad in BAD_VALUES:
                if type(bad) is int and bad == 0 and (cls.__name__, name) in ZERO_IS_VALID:
                    continue
                if bare:
                    value = bad
                else:
                    value = _with_first_int(config.kwargs.get(name, defaults.get(name)), bad)
                cases.append(
                    pytest.param(config, name, value, id=f"{cls.__name__}-{name}-{value!r}")
                )
    return cases


@pytest.mark.parametrize("config, name, value", _cases())
def test_bad_int_argument(config: presets.ModelConfig, name: str, value: Any):
    cls = config.cls
    kwargs = {**config.kwargs, name: value}
    # The error comes before anything is built; should it not, the model is only traced.
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {name} must be"):
        eqx.filter_eval_shape(lambda: eqx.nn.make_with_state(cls)(**kwargs, key=jax.random.key(0)))


def test_every_model_has_int_arguments():
    configs = _tiny_configs()
    assert len({c.model for c in configs}) == 17
    for config in configs:
        assert _int_arguments(config.cls), config.model
