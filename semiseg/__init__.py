"""semiseg: semi-supervised medical image segmentation, one trainer for every algorithm.

``semiseg.train(...)``, ``semiseg.load(...)`` and ``semiseg.arrays(...)`` are the Python API (see
``semiseg.api``); they are imported on first use, so that ``semiseg --version`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {"train": "semiseg.api", "load": "semiseg.api", "Run": "semiseg.api", "Model": "semiseg.api",
        "arrays": "semiseg.data.arrays"}
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'semiseg' has no attribute {name!r}")
