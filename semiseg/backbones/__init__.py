"""Segmentation backbones. Importing this package registers unet, vnet, unet3d and smp."""

from semiseg.backbones import smp, unet, unet3d, vnet  # noqa: F401  (imports run the registrations)
from semiseg.backbones.base import SegBackbone, scaled

__all__ = ["SegBackbone", "scaled"]
