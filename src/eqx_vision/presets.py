"""Named model configurations for the 17 architectures, and model config files.

A model configuration is an architecture (a public class of `eqx_vision`) with its
constructor arguments. `CATALOGUE` holds them: one `Architecture` block per architecture,
with its class name, the slug of its preset names and three `Variant`s (a one-line
description, the input size, the constructor arguments as a dict), which are the presets
`<slug>-<size>`:

- `-tiny`: one block per stage at 16 or 32 pixels, for tests and quick experiments (the
  test suite builds every architecture from it);
- `-small`: sized for small images (32 pixels), e.g. the embedded digits;
- `-reference`: the full-size configuration of the architecture's usage snippet in the
  reference README (224 or 256 pixels).

```python
Architecture(
    "ViT", "vit",
    tiny=Variant("ViT, 1 block, dim 32", 16, dict(
        image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)),
    small=Variant(...),
    reference=Variant(...),
)
```

`PRESETS` maps every preset name to its `Preset`, in the order of the catalogue.

`default` is the model `eqx-vision train` trains when given no `--model`: a 4-block ViT on
16x16 images, which reaches about 98% test accuracy on the embedded digits in a minute or
two on two CPU cores. An architecture name alone (`ViT`, `vit`, `cvt`, ...) means its
`-small` preset.

A config file (JSON, or YAML if PyYAML is installed) holds the architecture under `model`
and the constructor arguments beside it:

```json
{"model": "ViT", "image_size": 32, "patch_size": 4, "dim": 128, "depth": 6, "heads": 4,
 "mlp_dim": 256}
```

`num_classes` is always taken from the data, and `image_size` / `channels` from the
command line or the data when not given. An architecture without an `image_size`
argument (CvT, CrossFormer, RegionViT, ScalableViT, TwinsSVT) may still name the input
size under `image_size` in a config file.
"""

import dataclasses
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .layers import is_stateful, pair


__all__ = [
    "ARCHITECTURES",
    "CATALOGUE",
    "PRESETS",
    "Architecture",
    "ConfigError",
    "ModelConfig",
    "Preset",
    "Variant",
    "available_architectures",
    "get_class",
    "list_presets",
    "load_config_file",
    "resolve_model",
]


class ConfigError(ValueError):
    """A model name or configuration that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named configuration: `model` (a class name of `eqx_vision`), its constructor
    arguments `kwargs` (without `num_classes`, `channels` and `key`), and the input
    `image_size` it is meant for."""

    name: str
    model: str
    kwargs: Mapping[str, Any]
    image_size: int
    description: str


# The three variants of every architecture, the suffixes of its preset names.
SIZES = ("tiny", "small", "reference")


class Variant(NamedTuple):
    """One configuration of an architecture: a one-line description, the input size it is
    meant for, and the constructor arguments (without `num_classes`, `channels`, `key`)."""

    description: str
    image_size: int
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An architecture of the catalogue: its public class name, the slug of its preset
    names (`<slug>-tiny`, `<slug>-small`, `<slug>-reference`) and the three variants."""

    model: str
    slug: str
    tiny: Variant
    small: Variant
    reference: Variant

    def variants(self) -> dict[str, Variant]:
        """`{"tiny": ..., "small": ..., "reference": ...}`."""
        return {size: getattr(self, size) for size in SIZES}


def _stages(keys: tuple[str, ...], *per_stage: tuple[Any, ...]) -> dict[str, Any]:
    """`s1_<key>`, `s2_<key>`, ... arguments from one row of values per stage."""
    return {
        f"s{i}_{key}": value
        for i, row in enumerate(per_stage, start=1)
        for key, value in zip(keys, row, strict=True)
    }


_TWINS = ("emb_dim", "depth", "patch_size", "local_patch_size", "global_k")

DEFAULT = Variant(
    "ViT, 4 blocks of dim 64 on 16x16 images (patch 4): the digits model", 16,
    dict(image_size=16, patch_size=4, dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128),
)  # fmt: skip

# The catalogue: one block per architecture, in the order of `eqx-vision presets`.
# fmt: off
CATALOGUE: tuple[Architecture, ...] = (
    Architecture(
        "ViT", "vit",
        tiny=Variant("ViT, 1 block, dim 32", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)),
        small=Variant("ViT, 6 blocks, dim 128", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256)),
        reference=Variant(
            "ViT of the reference README (256 px, patch 32, dim 1024, depth 6)", 256, dict(
                image_size=256, patch_size=32, dim=1024, depth=6, heads=16, dim_head=64,
                mlp_dim=2048, dropout=0.1, emb_dropout=0.1)),
    ),
    Architecture(
        "SimpleViT", "simple-vit",
        tiny=Variant("SimpleViT, 1 block", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)),
        small=Variant("SimpleViT, 6 blocks, dim 128", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256)),
        reference=Variant("SimpleViT of the reference README", 256, dict(
            image_size=256, patch_size=32, dim=1024, depth=6, heads=16, dim_head=64,
            mlp_dim=2048)),
    ),
    Architecture(
        "CaiT", "cait",
        tiny=Variant("CaiT, 1 self-attention and 1 class-attention block", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64,
            cls_depth=1)),
        small=Variant("CaiT, 6 + 2 blocks, dim 128", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256,
            cls_depth=2, layer_dropout=0.05)),
        reference=Variant("CaiT of the reference README", 256, dict(
            image_size=256, patch_size=32, dim=1024, depth=12, heads=16, dim_head=64,
            mlp_dim=2048, cls_depth=2, dropout=0.1, emb_dropout=0.1, layer_dropout=0.05)),
    ),
    Architecture(
        "CrossFormer", "crossformer",
        tiny=Variant("CrossFormer, 1 block per stage", 32, dict(
            dim=(32, 32, 32, 32), depth=(1, 1, 1, 1), global_window_size=(2, 2, 1, 1),
            local_window_size=1, cross_embed_kernel_sizes=((2, 4), (2, 4), (2, 4), (2, 4)),
            cross_embed_strides=(2, 2, 2, 2))),
        small=Variant("CrossFormer for 32 px (strides 2)", 32, dict(
            dim=(32, 64, 128, 128), depth=(1, 1, 2, 1), global_window_size=(4, 2, 1, 1),
            local_window_size=2, cross_embed_kernel_sizes=((2, 4), (2, 4), (2, 4), (2, 4)),
            cross_embed_strides=(2, 2, 2, 2))),
        reference=Variant("CrossFormer of the reference README", 224, dict(
            dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
            local_window_size=7)),
    ),
    Architecture(
        "CrossViT", "cross-vit",
        tiny=Variant("CrossViT, 1 multi-scale block", 16, dict(
            image_size=16, depth=1,
            sm_dim=16, sm_patch_size=4, sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=32,
            sm_enc_dim_head=8,
            lg_dim=32, lg_patch_size=8, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=64,
            lg_enc_dim_head=16,
            cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=8,
            dropout=0.0, emb_dropout=0.0)),
        small=Variant("CrossViT, 2 multi-scale blocks, patches 4 and 8", 32, dict(
            image_size=32, depth=2,
            sm_dim=64, sm_patch_size=4, sm_enc_depth=2, sm_enc_heads=4, sm_enc_mlp_dim=128,
            sm_enc_dim_head=16,
            lg_dim=128, lg_patch_size=8, lg_enc_depth=2, lg_enc_heads=4, lg_enc_mlp_dim=256,
            lg_enc_dim_head=32,
            cross_attn_depth=1, cross_attn_heads=4, cross_attn_dim_head=16,
            dropout=0.1, emb_dropout=0.1)),
        reference=Variant("CrossViT of the reference README", 256, dict(
            image_size=256, depth=4,
            sm_dim=192, sm_patch_size=16, sm_enc_depth=2, sm_enc_heads=8, sm_enc_mlp_dim=2048,
            lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8, lg_enc_mlp_dim=2048,
            cross_attn_depth=2, cross_attn_heads=8,
            dropout=0.1, emb_dropout=0.1)),
    ),
    Architecture(
        "CvT", "cvt",
        tiny=Variant("CvT, 1 block per stage", 16, dict(
            s1_emb_dim=16, s1_depth=1, s1_heads=1,
            s2_emb_dim=32, s2_depth=1, s2_heads=2,
            s3_emb_dim=32, s3_depth=1, s3_heads=2,
            s1_emb_stride=4)),
        small=Variant("CvT for 32 px (stage-1 stride 2)", 32, dict(
            s1_emb_dim=32, s1_depth=1, s1_heads=1,
            s2_emb_dim=64, s2_depth=2, s2_heads=2,
            s3_emb_dim=128, s3_depth=4, s3_heads=4,
            s1_emb_stride=2, s1_emb_kernel=3)),
        reference=Variant("CvT of the reference README", 256, dict(
            s1_emb_dim=64, s1_emb_kernel=7, s1_emb_stride=4, s1_proj_kernel=3,
            s1_kv_proj_stride=2, s1_heads=1, s1_depth=1, s1_mlp_mult=4,
            s2_emb_dim=192, s2_emb_kernel=3, s2_emb_stride=2, s2_proj_kernel=3,
            s2_kv_proj_stride=2, s2_heads=3, s2_depth=2, s2_mlp_mult=4,
            s3_emb_dim=384, s3_emb_kernel=3, s3_emb_stride=2, s3_proj_kernel=3,
            s3_kv_proj_stride=2, s3_heads=4, s3_depth=10, s3_mlp_mult=4,
            dropout=0.0)),
    ),
    Architecture(
        "DeepViT", "deepvit",
        tiny=Variant("DeepViT, 1 block", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)),
        small=Variant("DeepViT, 6 blocks, dim 128", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256)),
        reference=Variant("DeepViT of the reference README", 256, dict(
            image_size=256, patch_size=32, dim=1024, depth=6, heads=16, dim_head=64,
            mlp_dim=2048, dropout=0.1, emb_dropout=0.1)),
    ),
    Architecture(
        "LeViT", "levit",
        tiny=Variant("LeViT, 2 stages of 1 block", 32, dict(
            image_size=32, stages=2, dim=(16, 32), depth=1, heads=(1, 2), mlp_mult=2,
            dim_key=8, dim_value=16)),
        small=Variant("LeViT, 2 stages of 2 blocks (64 px: the stem downsamples 16x)", 64, dict(
            image_size=64, stages=2, dim=(64, 128), depth=2, heads=(2, 4), mlp_mult=2,
            dim_key=16, dim_value=32)),
        reference=Variant("LeViT of the reference README", 224, dict(
            image_size=224, stages=3, dim=(256, 384, 512), depth=4, heads=(4, 6, 8),
            mlp_mult=2, dropout=0.1)),
    ),
    Architecture(
        "NesT", "nest",
        tiny=Variant("NesT, 2 hierarchies of 1 block", 16, dict(
            image_size=16, patch_size=2, dim=16, heads=2, num_hierarchies=2,
            block_repeats=(1, 1), dim_head=8)),
        small=Variant("NesT, 3 hierarchies", 32, dict(
            image_size=32, patch_size=2, dim=32, heads=2, num_hierarchies=3,
            block_repeats=(1, 1, 2), dim_head=16)),
        reference=Variant("NesT of the reference README", 224, dict(
            image_size=224, patch_size=4, dim=96, heads=3, num_hierarchies=3,
            block_repeats=(2, 2, 8))),
    ),
    Architecture(
        "ParallelViT", "parallel-vit",
        tiny=Variant("ParallelViT, 1 block of 2 branches", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64,
            num_parallel_branches=2)),
        small=Variant("ParallelViT, 3 blocks of 2 branches", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=3, heads=4, dim_head=32, mlp_dim=256,
            num_parallel_branches=2)),
        reference=Variant("ParallelViT of the reference README", 256, dict(
            image_size=256, patch_size=16, dim=1024, depth=6, heads=8, dim_head=64,
            mlp_dim=2048, num_parallel_branches=2, dropout=0.1, emb_dropout=0.1)),
    ),
    Architecture(
        "ViTWithPatchMerger", "vit-patch-merger",
        tiny=Variant("ViT with a patch merger after block 1 of 2", 16, dict(
            image_size=16, patch_size=4, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
            patch_merge_layer=1, patch_merge_num_tokens=4)),
        small=Variant("ViT with a patch merger (64 -> 16 tokens) after block 3 of 6", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256,
            patch_merge_layer=3, patch_merge_num_tokens=16)),
        reference=Variant("ViT with patch merger of the reference README", 256, dict(
            image_size=256, patch_size=16, dim=1024, depth=12, heads=8, dim_head=64,
            mlp_dim=2048, patch_merge_layer=6, patch_merge_num_tokens=8, dropout=0.1,
            emb_dropout=0.1)),
    ),
    Architecture(
        "PiT", "pit",
        tiny=Variant("PiT, 2 stages of 1 block", 16, dict(
            image_size=16, patch_size=4, dim=16, depth=(1, 1), heads=2, mlp_dim=32,
            dim_head=8)),
        small=Variant("PiT, 3 stages of 2 blocks", 32, dict(
            image_size=32, patch_size=4, dim=64, depth=(2, 2, 2), heads=(2, 4, 8),
            mlp_dim=128, dim_head=16)),
        reference=Variant("PiT of the reference README", 224, dict(
            image_size=224, patch_size=14, dim=256, depth=(3, 3, 3), heads=16, mlp_dim=2048,
            dropout=0.1, emb_dropout=0.1)),
    ),
    Architecture(
        "RegionViT", "regionvit",
        tiny=Variant("RegionViT, 1 block per stage (32 px)", 32, dict(
            dim=(16, 16, 32, 32), depth=(1, 1, 1, 1), window_size=2, local_patch_size=2)),
        small=Variant("RegionViT for 32 px (window 2, local patches 2)", 32, dict(
            dim=(32, 64, 128, 128), depth=(1, 1, 2, 1), window_size=2, local_patch_size=2)),
        reference=Variant("RegionViT of the reference README", 224, dict(
            dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7,
            tokenize_local_3_conv=False, use_peg=False)),
    ),
    Architecture(
        "ScalableViT", "scalable-vit",
        tiny=Variant("ScalableViT, 1 block per stage (32 px)", 32, dict(
            dim=16, heads=(1, 1, 2, 2), depth=(1, 1, 1, 1), reduction_factor=(2, 2, 1, 1),
            window_size=(2, 2, None, None), iwsa_dim_key=8, iwsa_dim_value=8, ssa_dim_key=8,
            ssa_dim_value=8)),
        small=Variant("ScalableViT for 32 px", 32, dict(
            dim=32, heads=(1, 2, 4, 8), depth=(1, 1, 2, 1), reduction_factor=(2, 2, 1, 1),
            window_size=(4, 2, None, None), iwsa_dim_key=16, iwsa_dim_value=16,
            ssa_dim_key=16, ssa_dim_value=16)),
        reference=Variant("ScalableViT of the reference README", 256, dict(
            dim=64, heads=(2, 4, 8, 16), depth=(2, 2, 20, 2), ssa_dim_key=(40, 40, 40, 32),
            reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None), dropout=0.1)),
    ),
    Architecture(
        "T2TViT", "t2t-vit",
        tiny=Variant("T2TViT, 2 token-to-token layers, 1 block", 16, dict(
            image_size=16, dim=32, depth=1, heads=2, mlp_dim=64, dim_head=16,
            t2t_layers=((3, 2), (3, 2)))),
        small=Variant("T2TViT, 4 blocks, dim 128", 32, dict(
            image_size=32, dim=128, depth=4, heads=4, mlp_dim=256, dim_head=32,
            t2t_layers=((3, 2), (3, 2)))),
        reference=Variant("T2TViT of the reference README", 224, dict(
            image_size=224, dim=512, depth=5, heads=8, mlp_dim=512,
            t2t_layers=((7, 4), (3, 2), (3, 2)))),
    ),
    Architecture(
        "TwinsSVT", "twins-svt",
        # one row per stage: emb_dim, depth, patch_size, local_patch_size, global_k
        tiny=Variant("TwinsSVT, 1 block per stage (32 px)", 32, _stages(
            _TWINS, (16, 1, 2, 2, 2), (16, 1, 2, 2, 2), (32, 1, 2, 2, 1), (32, 1, 2, 1, 1))),
        small=Variant("TwinsSVT for 32 px (patch sizes 2)", 32, _stages(
            _TWINS, (32, 1, 2, 4, 2), (64, 1, 2, 2, 2), (128, 2, 2, 2, 1), (128, 1, 2, 1, 1))),
        reference=Variant("TwinsSVT of the reference README", 224, _stages(
            _TWINS, (64, 1, 4, 7, 7), (128, 1, 2, 7, 7), (256, 5, 2, 7, 7), (512, 4, 2, 7, 7),
        ) | dict(peg_kernel_size=3, dropout=0.0)),
    ),
    Architecture(
        "SmallDatasetViT", "small-dataset-vit",
        tiny=Variant(
            "ViT with shifted patch tokens and locality self-attention, 1 block", 16, dict(
                image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16,
                mlp_dim=64)),
        small=Variant("ViT for small data sets (SPT + LSA), 6 blocks, dim 128", 32, dict(
            image_size=32, patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256)),
        reference=Variant("ViT for small data sets of the reference README", 256, dict(
            image_size=256, patch_size=16, dim=1024, depth=6, heads=16, dim_head=64,
            mlp_dim=2048, dropout=0.1, emb_dropout=0.1)),
    ),
)
# fmt: on

# Public class name -> preset slug, for the 17 architectures.
ARCHITECTURES: dict[str, str] = {a.model: a.slug for a in CATALOGUE}


def _presets() -> dict[str, Preset]:
    d = DEFAULT
    presets = {"default": Preset("default", "ViT", d.kwargs, d.image_size, d.description)}
    for a in CATALOGUE:
        for size, v in a.variants().items():
            name = f"{a.slug}-{size}"
            presets[name] = Preset(name, a.model, v.kwargs, v.image_size, v.description)
    return presets


PRESETS: dict[str, Preset] = _presets()


def get_class(model: str) -> Callable[..., Any]:
    """The public class of `eqx_vision` for an architecture name.

    Raises `ConfigError` for a name that is not one of the 17 architectures, or an
    architecture this installation does not provide.
    """
    import eqx_vision

    if model not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {model!r}; the architectures are {', '.join(ARCHITECTURES)}"
        )
    cls = getattr(eqx_vision, model, None)
    if cls is None:
        raise ConfigError(
            f"the architecture {model} is not available in this version of eqx_vision"
        )
    return cls


def available_architectures() -> list[str]:
    """The architectures this installation of `eqx_vision` provides."""
    import eqx_vision

    return [name for name in ARCHITECTURES if hasattr(eqx_vision, name)]


def list_presets(*, available_only: bool = True) -> list[Preset]:
    """The presets, in order; by default only those whose architecture is available."""
    have = set(available_architectures())
    return [p for p in PRESETS.values() if not available_only or p.model in have]


def _tuples(value: Any) -> Any:
    """Lists (from JSON/YAML) to tuples, recursively: constructor arguments are tuples."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def load_config_file(path: str) -> dict[str, Any]:
    """Read a model config file: a JSON or YAML mapping with `model` and constructor
    arguments. YAML needs PyYAML (`pip install pyyaml`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"model config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read model config {path}: {e.strerror}") from None
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path} is YAML, which needs PyYAML: pip install pyyaml (or write the "
                "config as JSON)"
            ) from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(
            f'{path} must hold a mapping with the architecture under "model", e.g. '
            '{"model": "ViT", "patch_size": 4, ...}'
        )
    return config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An architecture and its full constructor arguments (all but `key`), with the input
    shape `(channels, *image_size)` it takes.

    Stored as JSON in `config.json` and in every checkpoint's header (`to_json`).
    """

    model: str
    kwargs: Mapping[str, Any]
    image_size: tuple[int, int]
    channels: int
    preset: str | None = None

    @property
    def cls(self) -> Callable[..., Any]:
        return get_class(self.model)

    @property
    def num_classes(self) -> int:
        return int(self.kwargs["num_classes"])

    def build(self, key: jax.Array) -> tuple[eqx.Module, eqx.nn.State]:
        """The model and its state (`eqx.nn.make_with_state`; empty for stateless models)."""
        return eqx.nn.make_with_state(self.cls)(**self.kwargs, key=key)

    def build_like(self) -> tuple[eqx.Module, eqx.nn.State]:
        """The structure of `build` without computing any array (`eqx.filter_eval_shape`)."""
        return eqx.filter_eval_shape(self.build, jr.key(0))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kwargs": _lists(dict(self.kwargs)),
            "image_size": list(self.image_size),
            "channels": self.channels,
            "preset": self.preset,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ModelConfig":
        try:
            return cls(
                model=str(obj["model"]),
                kwargs=_tuples(dict(obj["kwargs"])),
                image_size=(int(obj["image_size"][0]), int(obj["image_size"][1])),
                channels=int(obj["channels"]),
                preset=obj.get("preset"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"malformed model config ({type(e).__name__}: {e})") from None


def _lookup(spec: str) -> tuple[str, dict[str, Any], int | tuple[int, int] | None, str | None]:
    """(model, kwargs, image size, preset name) for a preset, architecture or file."""
    lowered = spec.lower()
    if lowered in PRESETS:
        p = PRESETS[lowered]
        return p.model, dict(p.kwargs), p.image_size, p.name
    by_name = {k.lower(): k for k in ARCHITECTURES} | {v: k for k, v in ARCHITECTURES.items()}
    if lowered in by_name:
        p = PRESETS[ARCHITECTURES[by_name[lowered]] + "-small"]
        return p.model, dict(p.kwargs), p.image_size, p.name
    if lowered.endswith((".json", ".yaml", ".yml")) or os.path.sep in spec:
        config = load_config_file(spec)
        kwargs = dict(config)
        model = kwargs.pop("model")
        if not isinstance(model, str):
            raise ConfigError(f'{spec}: "model" must be an architecture name; got {model!r}')
        model = {k.lower(): k for k in ARCHITECTURES}.get(model.lower(), model)
        size = kwargs.get("image_size")
        return model, _tuples(kwargs), _tuples(size), None
    raise ConfigError(
        f"unknown model {spec!r}: give a preset (e.g. default, vit-tiny, cvt-small; "
        "see `eqx-vision presets`), an architecture name, or a .json/.yaml config file"
    )


def _pair(value: Any, what: str) -> tuple[int, int]:
    """`layers.pair`, its error a `ConfigError`."""
    try:
        return pair(value, what)
    except ValueError as e:
        raise ConfigError(str(e).removesuffix(".")) from None


def resolve_model(
    spec: str,
    *,
    num_classes: int,
    data_channels: int,
    image_size: int | tuple[int, int] | None = None,
) -> ModelConfig:
    """Turn a `--model` value into a full `ModelConfig` for the data at hand.

    **Arguments:**

    - `spec`: a preset name, an architecture name (its `-small` preset), or the path of a
      JSON/YAML config file.
    - `num_classes`: the number of classes of the data (always used).
    - `data_channels`: the channels of the data (1 or 3), used as the model's `channels`
      where the architecture takes that argument and the config does not set it.
    - `image_size`: the input size, overriding the preset's or config's.

    **Returns:** the `ModelConfig`. Raises `ConfigError` for an unknown name, a class this
    installation lacks, or arguments the constructor does not take.
    """
    model, kwargs, config_size, preset = _lookup(spec)
    cls = get_class(model)
    params = inspect.signature(cls.__init__).parameters
    takes_size = "image_size" in params
    if image_size is not None:
        size = _pair(image_size, "--image-size")
    elif config_size is not None:
        size = _pair(config_size, "image_size")
    else:
        raise ConfigError(f"{spec}: give the input size, as image_size or --image-size")
    if takes_size:
        kwargs["image_size"] = size[0] if size[0] == size[1] else size
    else:
        kwargs.pop("image_size", None)
    kwargs["num_classes"] = num_classes
    if "channels" in params:
        kwargs.setdefault("channels", data_channels)
        channels = int(kwargs["channels"])
    else:
        channels = 3
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        raise ConfigError(f"{model} takes no argument(s) {', '.join(unknown)}")
    return ModelConfig(model, kwargs, size, channels, preset)


def check_input_size(config: ModelConfig) -> eqx.Module:
    """Build `config`'s model abstractly and run one image through it (no arrays are
    computed), so that any constructor or input-size error surfaces as a `ConfigError`
    before training starts. Returns the abstract model."""
    try:
        model, state = config.build_like()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid {config.model} configuration: {e}") from None
    x = jax.ShapeDtypeStruct((config.channels, *config.image_size), jnp.float32)

    def forward(model, state, x):
        model = eqx.nn.inference_mode(model)
        if is_stateful(model):
            return model(x, state)
        return model(x)

    try:
        eqx.filter_eval_shape(forward, model, state, x)
    except Exception as e:  # any failure to trace means the size does not fit
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{config.model} does not take {config.channels}x{config.image_size[0]}x"
            f"{config.image_size[1]} images: {message}"
        ) from None
    return model
