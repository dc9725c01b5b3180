"""One module per architecture."""

from ._backbone import (
    FeatureInfo as FeatureInfo,
    reset_head as reset_head,
    set_image_size as set_image_size,
)
from .cait import CaiT as CaiT
from .cross_vit import CrossViT as CrossViT, TimmCrossViT as TimmCrossViT
from .crossformer import CrossFormer as CrossFormer
from .cvt import CvT as CvT
from .deepvit import DeepViT as DeepViT
from .levit import LeViT as LeViT, TimmLeViT as TimmLeViT
from .nest import NesT as NesT
from .parallel_vit import ParallelViT as ParallelViT
from .patch_merger import PatchMerger as PatchMerger, ViTWithPatchMerger as ViTWithPatchMerger
from .pit import PiT as PiT
from .regionvit import RegionViT as RegionViT
from .scalable_vit import ScalableViT as ScalableViT
from .simple_vit import SimpleViT as SimpleViT
from .small_dataset_vit import LSA as LSA, SPT as SPT, SmallDatasetViT as SmallDatasetViT
from .t2t import T2TViT as T2TViT
from .twins_svt import TwinsSVT as TwinsSVT
from .vit import ViT as ViT
