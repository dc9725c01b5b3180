"""eqx_vision: vision transformers in JAX + Equinox, numerically equal to vit-pytorch."""

from . import layers as layers
from .interop import CheckpointError as CheckpointError, from_vit_pytorch as from_vit_pytorch
from .models import (
    CaiT as CaiT,
    DeepViT as DeepViT,
    ParallelViT as ParallelViT,
    PatchMerger as PatchMerger,
    SimpleViT as SimpleViT,
    ViT as ViT,
    ViTWithPatchMerger as ViTWithPatchMerger,
)


__version__ = "0.1.0"
