"""One module per architecture."""

from .cait import CaiT as CaiT
from .deepvit import DeepViT as DeepViT
from .parallel_vit import ParallelViT as ParallelViT
from .patch_merger import PatchMerger as PatchMerger, ViTWithPatchMerger as ViTWithPatchMerger
from .simple_vit import SimpleViT as SimpleViT
from .vit import ViT as ViT
