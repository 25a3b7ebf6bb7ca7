"""Benchmarks: algorithm x labeled split x seed grids at an equal budget, timed as the CrossMatch paper's
Table III, written as CSV, Markdown and PNG (``semiseg bench``)."""

from semiseg.bench.presets import PRESET_DIR, Preset, get_preset, load_preset_file, register_builtin_presets
from semiseg.bench.results import aggregate, markdown_table, mean_std, read_rows
from semiseg.bench.runner import BenchResult, RunSpec, plan, run_bench, time_grid
from semiseg.bench.timing import backbone_stats, count_flops, machine_info, time_config, time_iterations, time_trainer

__all__ = [
    "PRESET_DIR", "BenchResult", "Preset", "RunSpec", "aggregate", "backbone_stats", "count_flops", "get_preset",
    "load_preset_file", "machine_info", "markdown_table", "mean_std", "plan", "read_rows", "register_builtin_presets",
    "run_bench", "time_config", "time_grid", "time_iterations", "time_trainer",
]
