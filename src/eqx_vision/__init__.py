"""eqx_vision: vision transformers in JAX + Equinox, numerically equal to vit-pytorch."""

from . import layers as layers
from .interop import (
    CheckpointError as CheckpointError,
    DataConfig as DataConfig,
    from_timm as from_timm,
    from_vit_pytorch as from_vit_pytorch,
    pretrained as pretrained,
)
from .layers import checkpoint_blocks as checkpoint_blocks, remat as remat
from .models import (
    LSA as LSA,
    SPT as SPT,
    CaiT as CaiT,
    CrossFormer as CrossFormer,
    CrossViT as CrossViT,
    CvT as CvT,
    DeepViT as DeepViT,
    FeatureInfo as FeatureInfo,
    LeViT as LeViT,
    NesT as NesT,
    ParallelViT as ParallelViT,
    PatchMerger as PatchMerger,
    PiT as PiT,
    RegionViT as RegionViT,
    ScalableViT as ScalableViT,
    SimpleViT as SimpleViT,
    SmallDatasetViT as SmallDatasetViT,
    T2TViT as T2TViT,
    TimmCrossViT as TimmCrossViT,
    TimmLeViT as TimmLeViT,
    TwinsSVT as TwinsSVT,
    ViT as ViT,
    ViTWithPatchMerger as ViTWithPatchMerger,
    reset_head as reset_head,
    set_image_size as set_image_size,
)
from .precision import Precision as Precision


__version__ = "0.1.0"
