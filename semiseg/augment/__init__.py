"""Augmentation policies (registered on import: ``medical2d``, ``medical3d``) and batched mixing ops."""

from semiseg.augment.base import Policy
from semiseg.augment.mixing import bcp_mask, copy_paste, cutmix, cutmix_target
from semiseg.augment.policies2d import Medical2D, sample_cutmix_box
from semiseg.augment.policies3d import Medical3D

__all__ = [
    "Medical2D",
    "Medical3D",
    "Policy",
    "bcp_mask",
    "copy_paste",
    "cutmix",
    "cutmix_target",
    "sample_cutmix_box",
]
