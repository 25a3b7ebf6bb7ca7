"""Benchmark presets: YAML files of the training settings a grid shares plus the grid itself.

A preset file is one mapping. Its keys are :class:`~semiseg.engine.config.TrainConfig` fields common to every
run of the grid (``data``, ``backbone``, ``iterations``, ``lr``...) plus the bench keys below; ``algo``,
``seed``, ``out`` and ``labeled`` as a single value are decided per run by the grid, so they are not allowed::

    description: one line shown by `semiseg list`
    algos: all                 # or a list; "all" = every registered algorithm at run time (plugins included)
    algo_options: {crossmatch: {eta: 0.3}}   # per-algorithm options (each algorithm takes different ones)
    seeds: [0, 1, 2]
    labeled: [3]               # labeled counts (or fractions) of the grid
    eval_split: valtest        # split the final evaluation uses (last checkpoint)
    eval_options: {stride: [18, 18, 4], empty: zero}   # passed to semiseg.evaluation.runs.evaluate_run
    timing: {warmup: 5, iters: 20}
    scaled_options: [rampup_every]     # algo_options counted in iterations of the preset's `iterations`

``scaled_options`` names the algorithm options that are lengths in iterations, set for the preset's own
``iterations`` (a consistency ramp compressed to a short run, say). A grid run of another length (``semiseg
bench --iterations N``) scales them by N / iterations, so a shorter try keeps the same schedule shape.

The built-in presets live in the repository's ``benchmarks/presets`` folder; each file found there is
registered in ``registry.PRESETS`` under its file name. A relative ``data_root`` is resolved against the
repository root for files inside the repository and against the current directory for other files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import semiseg
from semiseg import registry
from semiseg.engine.config import TrainConfig
from semiseg.errors import ConfigError

REPO_ROOT = Path(semiseg.__file__).resolve().parents[1]
PRESET_DIR = REPO_ROOT / "benchmarks" / "presets"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

BENCH_KEYS = ("name", "description", "algos", "algo_options", "seeds", "labeled", "eval_split", "eval_options",
              "timing", "scaled_options")
PER_RUN_KEYS = ("algo", "seed", "out")
EVAL_OPTIONS = ("stride", "empty", "spacing", "max_cases", "montage")


@dataclass
class Preset:
    """A benchmark grid: shared training settings and the algorithms x labeled x seeds to run."""

    name: str
    train: dict[str, Any]  # TrainConfig fields shared by the grid
    algos: list[str] | str = "all"
    algo_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    labeled: list[float] = field(default_factory=list)  # empty: the dataset's default
    eval_split: str = "test"
    eval_options: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, int] = field(default_factory=lambda: {"warmup": 5, "iters": 20})
    description: str = ""
    path: str | None = None
    scaled_options: list[str] = field(default_factory=list)  # algo_options counted in the preset's iterations

    def resolve_algos(self) -> list[str]:
        """The grid's rows: ``all`` (alone or as an entry of the list) stands for every registered algorithm, so
        algorithms added later get their rows from the same preset."""
        names = [self.algos] if isinstance(self.algos, str) else list(self.algos)
        out: list[str] = []
        for n in names:
            out += registry.ALGORITHMS.names() if n == "all" else [n]
        return list(dict.fromkeys(out))

    def config(self, algo: str, labeled: float | None, seed: int, out: str | Path,
               iterations: int | None = None) -> TrainConfig:
        """The TrainConfig of one run of the grid. A row name ``algo@variant`` trains the registered ``algo``
        with the options given for ``algo`` and then for ``algo@variant`` (e.g. ``crossmatch@official`` with
        ``algo_options: {crossmatch@official: {plan: official}}``), so one algorithm can fill several rows.
        ``iterations`` other than the preset's scales the ``scaled_options``."""
        base = algo_name(algo)
        opts = {**self.algo_options.get(base, {}), **(self.algo_options.get(algo, {}) if algo != base else {})}
        d = dict(self.train)
        if iterations is not None and int(iterations) != int(d.get("iterations", iterations)):
            opts = scale_options(opts, self.scaled_options, int(iterations) / int(d["iterations"]))
            d["iterations"] = int(iterations)
        d.update(algo=base, seed=int(seed), out=str(out), algo_options=opts)
        if labeled is not None:
            d["labeled"] = labeled
        return TrainConfig.from_dict(d, source=f"Preset '{self.name}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scale_options(opts: dict[str, Any], names: list[str], factor: float) -> dict[str, Any]:
    """``opts`` with the options in ``names`` multiplied by ``factor``: integers rounded and kept at least 1
    where they were, floats as they come."""
    out = dict(opts)
    for k in names:
        v = out.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = (max(1, round(v * factor)) if v >= 1 else v) if isinstance(v, int) else v * factor
    return out


def algo_name(row: str) -> str:
    """The registered algorithm of a grid row name (``crossmatch@official`` -> ``crossmatch``)."""
    return row.split("@", 1)[0]


def _repo_relative(path: Path) -> bool:
    try:
        path.resolve().relative_to(REPO_ROOT)
        return True
    except ValueError:
        return False


def _as_list(value: Any, key: str, source: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float, str)):
        return [value]
    raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")


def parse_preset(d: dict[str, Any], name: str, source: str, base: Path | None = None) -> Preset:
    """Check a preset mapping and split it into training settings and grid; ``base`` resolves data_root."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values.")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(d) - train_keys - set(BENCH_KEYS))
    if bad:
        raise ConfigError(f"{source} has unknown keys {bad}; use TrainConfig fields and the bench keys "
                          f"{', '.join(BENCH_KEYS)}.")
    per_run = sorted(set(d) & set(PER_RUN_KEYS))
    if per_run:
        raise ConfigError(f"{source} sets {per_run}, which the grid decides per run; use algos / seeds instead "
                          f"and pass --out to `semiseg bench`.")
    train = {k: v for k, v in d.items() if k in train_keys and k != "labeled"}
    if train.get("data_root") is not None and base is not None and not Path(train["data_root"]).is_absolute():
        train["data_root"] = str((base / train["data_root"]).resolve())
    TrainConfig.from_dict({**train, "labeled": None}, source=source).validate()  # fail now, not mid-grid

    algos = d.get("algos", "all")
    if algos != "all":
        algos = [str(a) for a in _as_list(algos, "algos", source)]
    algo_options = d.get("algo_options") or {}
    if not isinstance(algo_options, dict) or not all(isinstance(v, dict) for v in algo_options.values()):
        raise ConfigError(f"{source}: 'algo_options' must map algorithm names to option mappings, "
                          f"e.g. {{crossmatch: {{eta: 0.3}}}}.")
    seeds = [int(s) for s in _as_list(d.get("seeds", [0]), "seeds", source)]
    labeled = [float(x) for x in _as_list(d.get("labeled", []), "labeled", source)]
    eval_options = dict(d.get("eval_options") or {})
    bad_eval = sorted(set(eval_options) - set(EVAL_OPTIONS))
    if bad_eval:
        raise ConfigError(f"{source}: eval_options {bad_eval} are unknown; use {', '.join(EVAL_OPTIONS)}.")
    timing = {"warmup": 5, "iters": 20, **(d.get("timing") or {})}
    if set(timing) != {"warmup", "iters"} or timing["iters"] < 1 or timing["warmup"] < 0:
        raise ConfigError(f"{source}: 'timing' must be {{warmup: N >= 0, iters: N >= 1}}, got {timing}.")
    if not seeds:
        raise ConfigError(f"{source}: 'seeds' is empty; list at least one seed.")
    scaled = [str(k) for k in _as_list(d.get("scaled_options") or [], "scaled_options", source)]
    if scaled and "iterations" not in train:
        raise ConfigError(f"{source}: 'scaled_options' are lengths in iterations of the preset's own run; set "
                          f"'iterations' in the preset too.")
    return Preset(name=str(d.get("name") or name), train=train, algos=algos, algo_options=algo_options,
                  seeds=seeds, labeled=labeled, eval_split=str(d.get("eval_split", "test")),
                  eval_options=eval_options, timing={k: int(v) for k, v in timing.items()},
                  description=str(d.get("description", "")), path=None, scaled_options=scaled)


def load_preset_file(path: str | Path, base: Path | None = None) -> Preset:
    """Read a preset YAML; ``base`` (default: the repository root for files inside it, else the current
    directory) resolves a relative data_root."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Preset file '{p}' does not exist; pass a preset name (see `semiseg list`) or a YAML "
                          f"file.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Preset file '{p}' is not valid YAML ({e}); fix the syntax.") from e
    if base is None:
        base = REPO_ROOT if _repo_relative(p) else Path.cwd()
    preset = parse_preset(d, p.stem, f"Preset file '{p}'", base)
    preset.path = str(p)
    return preset


def _description(path: Path) -> str:
    try:
        d = yaml.safe_load(path.read_text()) or {}
        return str(d.get("description", "")) if isinstance(d, dict) else ""
    except (OSError, yaml.YAMLError):
        return ""


def _loader(path: Path):
    def load() -> Preset:
        return load_preset_file(path)

    load.__doc__ = _description(path) or f"benchmark preset {path.name}"
    load.__name__ = f"preset_{path.stem.replace('-', '_')}"
    return load


def register_builtin_presets(folder: Path = PRESET_DIR) -> list[str]:
    """Register a loader per YAML file in ``folder`` (idempotent); returns the names."""
    names = []
    if not folder.is_dir():
        return names  # an installed wheel without the repository's benchmarks folder has no built-ins
    for path in sorted(folder.glob("*.yaml")):
        if path.stem not in registry.PRESETS._table:
            registry.register_preset(path.stem)(_loader(path))
        names.append(path.stem)
    return names


def get_preset(name_or_path: str) -> Preset:
    """A preset by registered name or by path to a YAML file; an unknown name lists the known ones."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_preset_file(name_or_path)
    register_builtin_presets()
    preset = registry.PRESETS.get(name_or_path)()  # ConfigError naming the known presets when unknown
    if not isinstance(preset, Preset):
        raise ConfigError(f"Preset '{name_or_path}' must return a semiseg.bench.Preset, got "
                          f"{type(preset).__name__}.")
    return preset
