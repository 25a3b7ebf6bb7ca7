"""Benchmarks: algorithm x labeled split x seed grids at an equal budget, timed as the CrossMatch paper's
Table III, written as CSV, Markdown and PNG (``semiseg bench``).

Names are imported on first use, so that ``semiseg --help`` and preset parsing do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(("PRESET_DIR", "Preset", "get_preset", "load_preset_file", "register_builtin_presets"),
                    "semiseg.bench.presets"),
    **dict.fromkeys(("aggregate", "markdown_table", "mean_std", "read_rows"), "semiseg.bench.results"),
    **dict.fromkeys(("BenchResult", "RunSpec", "plan", "run_bench", "time_grid"), "semiseg.bench.runner"),
    **dict.fromkeys(("backbone_stats", "count_flops", "machine_info", "time_config", "time_iterations",
                     "time_trainer"), "semiseg.bench.timing"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'semiseg.bench' has no attribute {name!r}")
