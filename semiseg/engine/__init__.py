"""The training engine: loop, loaders, checkpoints, EMA teachers, distributed, progress.

Names are imported on first use, so that importing ``semiseg.engine.config`` (the CLI does, to parse flags)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "semiseg.engine.config", "Trainer": "semiseg.engine.trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'semiseg.engine' has no attribute {name!r}")
