"""Datasets: importing this package registers every built-in dataset factory.

``synthetic`` (default, no files), ``acdc`` (SSL4MIS h5 volumes, 2D slices), ``la`` (UA-MT h5 volumes, 3D),
``nifti`` (MSD / nnU-Net folders, 2D or 3D) and ``folder2d`` (PNG/JPG/TIFF images with masks). The modules are
imported (not their factories) so that ``semiseg.data.acdc`` stays the module; get factories through the
registry (``create_dataset("acdc", ...)``) or from their modules.
"""

from semiseg.data import acdc, folder2d, la, nifti, synthetic  # noqa: F401  (registers the factories)
from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.checks import check_backbone_dim

__all__ = ["Case", "LazyItems", "SegData", "check_backbone_dim"]
