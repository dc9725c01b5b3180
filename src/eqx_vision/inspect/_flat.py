"""Attention maps in image coordinates: see `_core.image_attention`."""
