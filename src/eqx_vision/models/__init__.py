"""One module per architecture."""

from .vit import ViT as ViT
