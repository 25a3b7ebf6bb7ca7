"""Segmentation backbones. Importing this package registers unet, vnet, unet3d, smp and monai
(MONAI itself is imported only when a monai network is built)."""

from semiseg.backbones import monai, smp, unet, unet3d, vnet  # noqa: F401  (imports run the registrations)
from semiseg.backbones.base import SegBackbone, scaled

__all__ = ["SegBackbone", "scaled"]
