"""Pretrained timm weights from the Hugging Face Hub: download (or read from the local
cache), build from the checkpoint's own configuration, load with NumPy."""

import dataclasses
import json
import os
from typing import Any

from jaxtyping import PRNGKeyArray

from .._state_dict import CheckpointError
from ._common import TimmConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How a pretrained model's inputs are prepared, as timm's `pretrained_cfg` says.

    - `input_size`: `(channels, height, width)`.
    - `mean`, `std`: per-channel normalisation of pixels scaled to `[0, 1]`.
    - `crop_pct`: the crop fraction: the shorter side is resized to
      `floor(size / crop_pct)`, then the centre `size` is cropped.
    - `crop_mode`: `"center"` (resize the shorter side, keep the aspect ratio) or
      `"squash"` (resize both sides), then the centre crop.
    - `interpolation`: `"bicubic"`, `"bilinear"` or `"nearest"`.
    - `num_classes`: the classifier's outputs; `label_set`: `"imagenet-1k"` when they are
      the ImageNet-1k classes, else `None`.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    num_classes: int = 1000
    label_set: str | None = None

    @classmethod
    def from_timm(cls, cfg: dict[str, Any], num_classes: int) -> "DataConfig":
        """From a timm `pretrained_cfg` (a `config.json`'s or `models.json`'s)."""
        try:
            input_size = tuple(int(v) for v in cfg["input_size"])
            mean = tuple(float(v) for v in cfg["mean"])
            std = tuple(float(v) for v in cfg["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"the pretrained configuration lacks a valid input_size, mean or std: {e}"
            ) from e
        if len(input_size) != 3:
            raise CheckpointError(f"input_size must be (c, h, w); got {cfg['input_size']}.")
        return cls(
            input_size=input_size,  # type: ignore[arg-type]
            mean=mean,
            std=std,
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            crop_mode=str(cfg.get("crop_mode") or "center"),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
            num_classes=num_classes,
            label_set="imagenet-1k" if num_classes == 1000 else None,
        )


_DOWNLOAD_HINT = (
    "To use it on a machine without network, download it where there is network "
    "(`hf download timm/{name} config.json model.safetensors`, or "
    "`python -c \"import eqx_vision as ev; ev.pretrained('timm/{name}')\"`) and copy the "
    "Hugging Face cache directory ({cache}) to the same place, or point HF_HUB_CACHE at it."
)


def _download(repo_id: str, filename: str, name: str, cache_dir: str | None) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError as e:
        raise ImportError(
            "downloading pretrained weights needs huggingface_hub and safetensors: "
            "pip install 'eqx_vision[pretrained]'"
        ) from e
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir)
    except errors.RepositoryNotFoundError as e:
        raise TimmConfigError(f"the Hugging Face Hub has no repository {repo_id}.") from e
    except errors.EntryNotFoundError as e:
        if isinstance(e, errors.LocalEntryNotFoundError):
            cache = cache_dir or constants.HF_HUB_CACHE
            raise ConnectionError(
                f"{repo_id}/{filename} is not in the local cache and could not be "
                f"downloaded (no network, or HF_HUB_OFFLINE is set). "
                + _DOWNLOAD_HINT.format(name=name, cache=cache)
            ) from e
        raise CheckpointError(f"{repo_id} has no file {filename}.") from e
    except (errors.HfHubHTTPError, OSError) as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ConnectionError(
            f"could not download {repo_id}/{filename}: {e}. "
            + _DOWNLOAD_HINT.format(name=name, cache=cache)
        ) from e


def pretrained(
    name: str,
    *,
    num_classes: int | None = None,
    key: PRNGKeyArray | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, DataConfig]:
    """A pretrained timm model and its data configuration, without torch.

    **Arguments:**

    - `name`: `"timm/<model>.<tag>"` (or without `timm/`; a name without a tag means its
      default tag), e.g. `"timm/vit_small_patch16_224.augreg_in21k_ft_in1k"`.
    - `num_classes`: a new classifier of this many outputs (see `from_timm`); `0` removes it.
    - `key`: a `jax.random.key` for a new classifier.
    - `cache_dir`: the Hugging Face cache to use (default: huggingface_hub's,
      `HF_HUB_CACHE`).

    `config.json` and `model.safetensors` are downloaded from the Hugging Face Hub (or read
    from the local cache; set `HF_HUB_OFFLINE=1` to never try the network), the model is
    built from the configuration (its `architecture`, `num_classes` and `model_args`) and
    the weights are read with NumPy.

    **Returns:** `(model, data_config)`, or `((model, state), data_config)` for models with
    BatchNorm (LeViT).

    **Raises:** `TimmConfigError` for an unknown name or one whose family eqx_vision does not
    support; `ConnectionError` when the files are neither cached nor downloadable (saying
    how to pre-download them); `CheckpointError` for a corrupted or mismatched file;
    `ImportError` without the `pretrained` extra.
    """
    from . import _entry, check, from_timm

    bare = name.removeprefix("timm/")
    entry = _entry(bare)  # unknown names fail here, before any download
    check(bare)  # so do unsupported families and options
    repo_id = entry.get("data_config", {}).get("hf_hub_id")
    if not repo_id:
        raise TimmConfigError(f"timm publishes no pretrained weights for {bare}.")
    cache = None if cache_dir is None else os.fspath(cache_dir)
    config_path = _download(repo_id, "config.json", repo_id.removeprefix("timm/"), cache)
    try:
        with open(config_path) as f:
            config = json.load(f)
        architecture = config["architecture"]
        model_args = dict(config.get("model_args") or {})
        ckpt_classes = int(config.get("num_classes", entry["kwargs"].get("num_classes", 1000)))
        cfg = config.get("pretrained_cfg") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path} is not a valid timm config.json: {e}") from e
    weights = _download(repo_id, "model.safetensors", repo_id.removeprefix("timm/"), cache)
    model_args.pop("num_classes", None)
    # the checkpoint's classifier is kept when it has `classes` outputs, else replaced
    classes = ckpt_classes if num_classes is None else num_classes
    loaded = from_timm(architecture, weights, num_classes=classes, key=key, **model_args)
    data = DataConfig.from_timm({**entry.get("data_config", {}), **cfg}, classes)
    return loaded, data
