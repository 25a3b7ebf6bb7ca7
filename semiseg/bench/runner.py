"""Run a benchmark grid: algorithms x labeled splits x seeds at one iteration budget, everything else fixed.

Each run trains with the engine's :class:`~semiseg.engine.trainer.Trainer`, is timed as in the CrossMatch
paper's Table III (:mod:`semiseg.bench.timing`), is evaluated with the evaluation protocol on the preset's split
(last checkpoint), and becomes one row of ``results.csv``; the Markdown summary and the plots are regenerated
after every run. Finished runs are skipped on a rerun: their key (preset, algo, labeled, seed, iterations) is
in the output ``results.csv`` or in the committed ``benchmarks/results/<preset>/results.csv``. A run stopped
half-way resumes from its last checkpoint.
"""

from __future__ import annotations

import gc
import json
import math
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from semiseg import registry
from semiseg.bench import results as res
from semiseg.bench.presets import RESULTS_DIR, Preset, algo_name, get_preset
from semiseg.bench.timing import time_config, time_trainer
from semiseg.engine.config import TrainConfig
from semiseg.engine.recipes import resolved
from semiseg.errors import ConfigError


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    algo: str
    labeled: float | None
    seed: int
    iterations: int

    def key(self, preset: str) -> tuple[str, ...]:
        return (preset, self.algo, res.fmt_labeled(self.labeled), str(self.seed), str(self.iterations))

    @property
    def dirname(self) -> str:
        return f"{self.algo}-l{res.fmt_labeled(self.labeled)}-s{self.seed}-it{self.iterations}"


@dataclass
class BenchResult:
    out: Path
    rows: list[dict[str, Any]]  # every row of the output results.csv after the bench
    ran: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)  # already in results.csv
    copied: list[RunSpec] = field(default_factory=list)  # taken over from the committed results.csv
    interrupted: bool = False


# -- the grid ---------------------------------------------------------------------------------------------------
def plan(preset: Preset, algos: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
         labeled: Sequence[float] | None = None, iterations: int | None = None,
         data_root: str | None = None) -> list[RunSpec]:
    """The runs of the grid, labeled split outermost, then seed, then algorithm (so a partial grid already
    compares every algorithm on the first split and seed)."""
    names = list(algos) if algos else preset.resolve_algos()
    known = registry.ALGORITHMS.names()
    for a in names:
        if algo_name(a) not in known:
            registry.ALGORITHMS.get(algo_name(a))  # raises the ConfigError with close matches and the known names
    if not names:
        raise ConfigError("The grid has no algorithms; pass --algos or list some in the preset.")
    iters = int(iterations if iterations is not None else preset.train.get("iterations", TrainConfig.iterations))
    if iters < 1:
        raise ConfigError(f"--iterations must be at least 1, got {iters}.")
    labs: list[float | None] = list(labeled) if labeled else (list(preset.labeled) or [None])
    lengths = {(a, lab): iters for a in names for lab in labs}
    if preset.train.get("recipe", "default") != "default" and iterations is None and "iterations" not in preset.train:
        # each algorithm's official length (which may count epochs of the labeled split's unlabeled set)
        # an algorithm that "all" brought in but that has no official code for this data (ABD is 2D only) is
        # left out with a note; one named in the preset or on the command line still refuses
        listed = set(algos or ([] if isinstance(preset.algos, str) else [n for n in preset.algos if n != "all"]))
        for a, lab in list(lengths):
            cfg = preset.config(a, lab, 0, "unused")
            if data_root is not None:
                cfg.data_root = data_root
            try:
                lengths[a, lab] = resolved(cfg, set(preset.train)).iterations
            except ConfigError as e:
                if a in listed or "no official" not in str(e):
                    raise
                print(f"note: {e} It is left out of this grid.", file=sys.stderr)
                del lengths[a, lab]
        names = [a for a in names if any((a, lab) in lengths for lab in labs)]
        return [RunSpec(a, lab, int(s), lengths[a, lab]) for lab in labs for s in (seeds or preset.seeds)
                for a in names if (a, lab) in lengths]
    return [RunSpec(a, lab, int(s), lengths[a, lab]) for lab in labs for s in (seeds or preset.seeds) for a in names]


def committed_results(preset: Preset) -> Path:
    return RESULTS_DIR / preset.name / "results.csv"


def default_command(argv: Sequence[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["semiseg", *args])


# -- progress ---------------------------------------------------------------------------------------------------
class _View:
    """A rich progress view: one task for the grid, one for the current run's status and iterations."""

    def __init__(self, total: int, quiet: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, disable=quiet)
        self.grid = self.progress.add_task("[bold]grid", total=total)
        self.run = self.progress.add_task("", total=1, visible=False)

    def __enter__(self) -> _View:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def status(self, text: str, completed: int = 0, total: int = 1) -> None:
        self.progress.update(self.run, description=text, completed=completed, total=total, visible=True)

    def advance(self) -> None:
        self.progress.advance(self.grid)

    def log(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text, highlight=False)

    @contextmanager
    def follow(self, text: str, trainer: Any) -> Iterator[None]:
        """Mirror ``trainer.iteration`` into the run task while the trainer trains (it runs quiet)."""
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.5):
                self.status(text, trainer.iteration, trainer.total)

        self.status(text, trainer.iteration, trainer.total)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            self.status(text, trainer.iteration, trainer.total)


# -- one run --------------------------------------------------------------------------------------------------
def _val_curve(metrics: Path) -> list[tuple[int, float]]:
    """Validation Dice per iteration from a run's metrics.jsonl (the last entry wins after a resume)."""
    points: dict[int, float] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "val/dice" in r:
                    points[int(r["iter"])] = float(r["val/dice"])
    return sorted(points.items())


def diagnostic_curve(metrics: Path, window: int) -> list[dict[str, Any]]:
    """Each pseudo-label edge's diagnostics during training from a run's metrics.jsonl: the logged values averaged
    over windows of ``window`` iterations, each point at its window's end (a resumed run's last entry per
    iteration wins)."""
    from semiseg.engine.progress import read_metrics

    logged = {int(r["iter"]): r for r in read_metrics(metrics) if "loss" in r and "iter" in r}
    sums: dict[tuple[int, str], dict[str, list[float]]] = {}
    for it, r in logged.items():
        end = -(-it // window) * window
        for k, v in r.items():
            if k.startswith("diag/") and v is not None and math.isfinite(float(v)):
                _, edge, metric = k.split("/", 2)
                sums.setdefault((end, edge), {}).setdefault(metric, []).append(float(v))
    return [{"iter": end, "edge": edge, **{m: sum(v) / len(v) for m, v in ms.items()}}
            for (end, edge), ms in sorted(sums.items())]


def _diagnostic_window(cfg: TrainConfig) -> int:
    # one point per validation, so the pseudo-label curves line up with the validation Dice curves
    return int(cfg.val_every) if cfg.val_every else max(1, int(cfg.iterations) // 10)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(name).lower()).strip("_") or "class"


def run_config(preset: Preset, spec: RunSpec, run_dir: Path, data_root: str | None = None,
               device: str | None = None, plugins: Sequence[str] = ()) -> TrainConfig:
    cfg = preset.config(spec.algo, spec.labeled, spec.seed, run_dir, iterations=spec.iterations)
    if data_root is not None:
        cfg.data_root = data_root
    if device is not None:
        cfg.device = device
    cfg.plugins = sorted(set(cfg.plugins) | set(plugins))
    if "diagnostics" not in preset.train:
        cfg.diagnostics = True  # pseudo-label diagnostics are on in a bench unless the preset says otherwise
    # the preset's keys and the grid's length win over the algorithm's official recipe
    return resolved(cfg, set(preset.train) | {"iterations"})


TIMING_COLUMNS = ("ms_per_iter", "ms_per_iter_std", "timing_iters", "peak_mem_mb", "params_m", "gflops", "gmacs",
                  "flops_input", "machine", "device", "torch")


def train_cell(preset: Preset, spec: RunSpec, run_dir: Path, view: _View, command: str,
               data_root: str | None = None, device: str | None = None,
               plugins: Sequence[str] = ()) -> dict[str, Any] | None:
    """Train (or finish) and evaluate one cell: its results row without the timing columns, or None when
    training was interrupted. The row keeps its validation curve under ``_curve``."""
    from semiseg.engine.trainer import Trainer
    from semiseg.evaluation.runs import evaluate_run

    t_start = time.perf_counter()
    cfg = run_config(preset, spec, run_dir, data_root, device, plugins)
    label = f"{spec.algo} l={res.fmt_labeled(spec.labeled)} s={spec.seed}"
    view.status(f"{label}: building")
    resumed = (run_dir / "checkpoints" / "last.pt").is_file()
    trainer = Trainer(cfg, quiet=True, explicit=TrainConfig.field_names())
    t0 = time.perf_counter()
    with view.follow(f"{label}: training", trainer):
        summary = trainer.fit(resume=True)
    # the run's whole training time, also when this call only finished it (None: an old checkpoint without it)
    train_s = summary.get("train_seconds")
    if train_s is None:
        train_s = time.perf_counter() - t0
    del trainer
    gc.collect()
    if summary["interrupted"]:
        return None
    best = summary.get("best") or {}

    view.status(f"{label}: evaluating on {preset.eval_split}")
    t1 = time.perf_counter()
    opts = dict(preset.eval_options)
    if opts.get("stride") is not None:
        opts["stride"] = tuple(int(s) for s in opts["stride"])
    ev = evaluate_run(run_dir, split=preset.eval_split, which="last", save_pred=None,
                      out=run_dir / "eval" / f"{preset.eval_split}-last",
                      device=cfg.device, **opts)
    eval_s = time.perf_counter() - t1
    curve = _val_curve(run_dir / "metrics.jsonl")

    row: dict[str, Any] = dict(zip(res.KEY, spec.key(preset.name)))
    row.update(eval_split=preset.eval_split, eval_checkpoint="last", eval_empty=ev["empty_policy"],
               mean_dice=ev["mean_dice"], mean_jaccard=ev["mean_jaccard"], mean_hd95=ev["mean_hd95"],
               mean_asd=ev["mean_asd"], hd95_missing=ev["overall"]["hd95"]["missing"],
               asd_missing=ev["overall"]["asd"]["missing"])
    names = ev.get("class_names") or []
    for c, st in sorted(ev["per_class"].items(), key=lambda kv: int(kv[0])):
        k = int(c) - 1  # per_class is keyed by class index 1..C-1; class_names lists the foreground classes
        row[f"dice_{_slug(names[k] if 0 <= k < len(names) else c)}"] = st["dice"]["mean"]
    row.update(
        val_last_dice=curve[-1][1] if curve else None,
        val_best_dice=best.get("dice") if best.get("iteration", -1) >= 0 else None,
        val_best_iter=best.get("iteration") if best.get("iteration", -1) >= 0 else None,
        train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t_start, resumed=resumed,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
    )
    row["_curve"] = curve
    row["_diagnostics"] = final_diagnostics(run_dir / "metrics.jsonl")
    row["_diagnostic_curve"] = diagnostic_curve(run_dir / "metrics.jsonl", _diagnostic_window(cfg))
    return row


def time_cell(preset: Preset, spec: RunSpec, run_dir: Path, data_root: str | None = None,
              device: str | None = None, plugins: Sequence[str] = (), timing: dict[str, int] | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """The timing columns of a trained cell, measured in a fresh process from its last checkpoint (see
    :func:`semiseg.bench.timing.time_config`: the only way a CPU peak-memory figure is comparable)."""
    tm = timing or preset.timing
    cfg = run_config(preset, spec, run_dir, data_root, device, plugins)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the timing process needs the GPU memory this one no longer uses
    # the trained weights where the run directory is still there; a step costs the same from a fresh init
    trained = (run_dir / "checkpoints" / "last.pt").is_file()
    return _timing_columns(time_config(cfg.to_dict(), warmup=tm["warmup"], iters=tm["iters"], threads=threads,
                                       resume=trained))


def _timing_columns(timed: dict[str, Any]) -> dict[str, Any]:
    return dict(ms_per_iter=timed["ms_per_iter"], ms_per_iter_std=timed["std"], timing_iters=timed["iters"],
                peak_mem_mb=timed["peak_mem_mb"], params_m=timed["params_m"], gflops=timed["gflops"],
                gmacs=timed["gmacs"], flops_input=timed["flops_input"],
                **{k: timed[k] for k in ("machine", "device", "torch")})


def run_one(preset: Preset, spec: RunSpec, run_dir: Path, view: _View, command: str,
            data_root: str | None = None, device: str | None = None, plugins: Sequence[str] = (),
            timing: dict[str, int] | None = None, threads: int | None = None,
            fresh_process: bool = True) -> dict[str, Any] | None:
    """Train, evaluate and time one run; returns its results row, or None when training was interrupted.

    The timing runs in a fresh process by default (:func:`time_cell`); ``fresh_process=False`` times the
    trained model in this process, which saves the start-up of a Python process per run (tests, quick tries)."""
    row = train_cell(preset, spec, run_dir, view, command, data_root, device, plugins)
    if row is None:
        return None
    tm = timing or preset.timing
    label = f"{spec.algo} l={res.fmt_labeled(spec.labeled)} s={spec.seed}"
    view.status(f"{label}: timing ({tm['warmup']} + {tm['iters']} iterations)")
    if fresh_process:
        row.update(time_cell(preset, spec, run_dir, data_root, device, plugins, tm, threads))
    else:
        from semiseg.engine.trainer import Trainer

        trainer = Trainer(run_config(preset, spec, run_dir, data_root, device, plugins), quiet=True,
                          explicit=TrainConfig.field_names())
        trainer.resume()
        row.update(_timing_columns(time_trainer(trainer, warmup=tm["warmup"], iters=tm["iters"])))
        del trainer
        gc.collect()
    view.status(f"{label}: done", 1, 1)
    return row


def final_diagnostics(metrics: Path, share: float = 0.2) -> dict[str, float]:
    """Each pseudo-label diagnostic averaged over the last ``share`` of the logged training steps (a resumed
    run's last entry per iteration wins, so a window logged twice counts once)."""
    from semiseg.engine.progress import read_metrics

    by_iter: dict[Any, dict[str, Any]] = {}
    for i, r in enumerate(read_metrics(metrics)):
        if "loss" in r:
            key = r.get("iter", ("line", i))
            by_iter.pop(key, None)  # re-inserted, so the order is the latest logging order
            by_iter[key] = r
    rows = list(by_iter.values())
    rows = rows[-max(1, int(round(len(rows) * share))):] if rows else []
    sums: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("diag/") and v is not None and math.isfinite(float(v)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


# -- outputs --------------------------------------------------------------------------------------------------
def class_names_of(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {c: c[len("dice_"):] for c in res.class_columns(rows)}


def write_reports(out: Path, title: str, notes: Sequence[str] = ()) -> list[dict[str, str]]:
    """Regenerate results.md and the two plots from results.csv and curves.csv."""
    rows = res.read_rows(out / "results.csv")
    res.write_markdown(out / "results.md", rows, title, notes, class_names_of(rows),
                       res.read_rows(out / "diagnostics.csv"))
    if rows:
        curves = res.read_rows(out / "curves.csv")
        res.plot_dice_vs_iter(out / "dice_vs_iter.png", curves, rows)
        res.plot_dice_vs_time(out / "dice_vs_time.png", curves, rows)
        res.plot_ms_per_iter(out / "ms_per_iter.png", rows)
        diag_curves = res.read_rows(out / "diagnostic_curves.csv")
        if diag_curves:
            res.plot_pseudo_labels(out / "pseudo_labels.png", diag_curves, rows)
    return rows


def preset_notes(preset: Preset) -> list[str]:
    t = preset.train
    batch = t.get("batch_size", TrainConfig.batch_size)
    ub = t.get("unlabeled_batch_size") or batch
    parts = [f"data {t.get('data', 'synthetic')}", f"backbone {t.get('backbone', 'auto')}"
             + (f" {t['backbone_options']}" if t.get("backbone_options") else "")]
    if t.get("data_options"):
        parts.append(f"data options {t['data_options']}")
    if t.get("patch_size"):
        parts.append("patch " + "x".join(str(p) for p in t["patch_size"]))
    if t.get("recipe", "default") != "default":
        parts.append("each algorithm's official recipe (optimizer, schedule, length, batch sizes; "
                     "docs/algorithms.md)")
    else:
        parts.append(f"batch {batch} labeled + {ub} unlabeled")
        opt = t.get("optimizer", "sgd")
        lr = t.get("lr") or ("0.01" if opt == "sgd" else "1e-3")
        nesterov = " nesterov" if t.get("nesterov") else ""
        parts.append(f"{opt}{nesterov} lr {lr} {t.get('schedule', 'poly')}"
                     + (f" over {t['poly_total']}" if t.get("poly_total") else ""))
    parts.append(f"eval split {preset.eval_split}" + (f" {preset.eval_options}" if preset.eval_options else ""))
    parts.append(f"timing {preset.timing['warmup']} warm-up + {preset.timing['iters']} timed iterations")
    src = f" ({Path(preset.path).name})" if preset.path else ""
    lines = [f"Preset `{preset.name}`{src}: " + ", ".join(parts) + "."]
    if preset.description:
        lines.insert(0, preset.description)
    return lines


def _take_over_committed(preset: Preset, specs: Sequence[RunSpec], out: Path,
                         done: set[tuple[str, ...]]) -> list[RunSpec]:
    """Copy rows (and curves) of planned runs found only in the committed results into the output."""
    src = committed_results(preset)
    if not src.is_file() or src.resolve() == (out / "results.csv").resolve():
        return []
    wanted = {s.key(preset.name): s for s in specs}
    rows = [r for r in res.read_rows(src) if res.row_key(r) in wanted and res.row_key(r) not in done]
    if not rows:
        return []
    res.upsert_rows(out / "results.csv", rows)
    keys = {res.row_key(r) for r in rows}
    for k in keys:
        pts = [(int(float(c["iter"])), float(c["val_dice"])) for c in res.read_rows(src.parent / "curves.csv")
               if res.row_key(c) == k]
        res.replace_curve(out / "curves.csv", k, pts)
    return [wanted[k] for k in keys]


def _git_ignore(out: Path, entries: Sequence[str]) -> None:
    """Add ``entries`` to the results folder's .gitignore (results.* and *.png are the record to commit)."""
    gi = out / ".gitignore"
    text = gi.read_text() if gi.exists() else ("# scratch of `semiseg bench`; results.* and *.png are the "
                                               "record\n")
    missing = [e for e in entries if e not in text.splitlines()]
    if missing:
        gi.parent.mkdir(parents=True, exist_ok=True)
        gi.write_text(text + "".join(f"{e}\n" for e in missing))


def _ignore_runs(out: Path, runs_dir: Path) -> None:
    """Keep the (large) run directories out of version control when they sit inside the results folder."""
    try:
        rel = runs_dir.resolve().relative_to(out.resolve())
    except ValueError:
        return
    if rel.parts:
        _git_ignore(out, [f"{rel.parts[0]}/", ".*.tmp"])


# -- the bench --------------------------------------------------------------------------------------------------
def run_bench(preset: Preset | str, out: str | Path | None = None, algos: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, labeled: Sequence[float] | None = None,
              iterations: int | None = None, data_root: str | None = None, device: str | None = None,
              runs_dir: str | Path | None = None, plugins: Sequence[str] = (), quiet: bool = False,
              timing: dict[str, int] | None = None, command: str | None = None, threads: int | None = None,
              fresh_process: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None,
              jobs: int = 1, reuse: bool = False) -> BenchResult:
    """Run (or finish) the grid of ``preset`` into ``out`` (default ``bench/<preset>``) and write the reports.

    ``algos`` / ``seeds`` / ``labeled`` / ``iterations`` override the preset's grid (``iterations`` changes the
    run key, so quick tries never mix with full runs). Run directories go to ``runs_dir`` (default
    ``out/runs``). ``timing`` overrides the preset's ``{warmup, iters}``. ``threads`` sets torch's CPU threads
    for training, timing and evaluation (on a shared or oversubscribed CPU, 1 is often faster than 2);
    ``fresh_process`` times each run in a new process (see :func:`run_one`). ``jobs`` > 1 trains that many
    cells at once in worker processes, dividing the threads among them (one GPU each where there are several),
    then times the new cells one at a time. Rows of the committed results (``benchmarks/results/<preset>``)
    are taken over only with ``reuse`` (or when ``out`` is that folder).
    """
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_bench(preset, out, algos, seeds, labeled, iterations, data_root, device, runs_dir, plugins,
                          quiet, timing, command, threads, fresh_process, on_row, jobs, reuse)
    finally:
        torch.set_num_threads(prev_threads)


def _run_bench(preset: Preset | str, out: str | Path | None, algos: Sequence[str] | None,
               seeds: Sequence[int] | None, labeled: Sequence[float] | None, iterations: int | None,
               data_root: str | None, device: str | None, runs_dir: str | Path | None, plugins: Sequence[str],
               quiet: bool, timing: dict[str, int] | None, command: str | None, threads: int | None,
               fresh_process: bool, on_row: Callable[[dict[str, Any]], None] | None, jobs: int = 1,
               reuse: bool = False) -> BenchResult:
    for p in plugins:
        registry.load_plugin(p)
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out) if out is not None else Path("bench") / preset.name
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    specs = plan(preset, algos, seeds, labeled, iterations, data_root)
    command = command or default_command()
    out.mkdir(parents=True, exist_ok=True)
    _ignore_runs(out, runs)

    done = {res.row_key(r) for r in res.read_rows(out / "results.csv")}
    skipped = [s for s in specs if s.key(preset.name) in done]
    # committed rows count only where asked: a fresh --out runs the user's own grid on the user's machine
    copied = _take_over_committed(preset, specs, out, done) if reuse else []
    todo = [s for s in specs if s not in skipped and s not in copied]
    _backfill_diagnostic_curves(preset, skipped, out, runs, data_root, device, plugins)
    title = f"Benchmark `{preset.name}`"
    notes = preset_notes(preset)
    given = {"iterations": iterations, "data root": data_root, "device": device, "threads": threads,
             "concurrent jobs": jobs if jobs > 1 else None,
             "timing": timing if timing and timing != preset.timing else None}
    used = [f"{k} {v}" for k, v in given.items() if v is not None]
    if used:
        # the latest invocation only: a results folder can hold rows of several (each row keeps its command)
        notes.append("The latest `semiseg bench` gave, over the preset: " + ", ".join(used)
                     + ". The commands of all rows are listed at the end; the Iterations column tells blocks apart.")
    write_reports(out, title, notes)
    result = BenchResult(out=out, rows=[], skipped=skipped, copied=copied)

    with _View(len(specs), quiet) as view:
        for _ in skipped + copied:
            view.advance()
        if skipped or copied:
            view.log(f"{len(skipped) + len(copied)} of {len(specs)} runs already done "
                     f"({len(copied)} from {committed_results(preset)}); {len(todo)} to run")

        def finish(spec: RunSpec, row: dict[str, Any]) -> None:
            curve, diag = row.pop("_curve"), row.pop("_diagnostics", {})
            diag_curve = row.pop("_diagnostic_curve", [])
            res.upsert_rows(out / "results.csv", [row])
            res.replace_curve(out / "curves.csv", spec.key(preset.name), curve)
            res.replace_diagnostics(out / "diagnostics.csv", spec.key(preset.name), diag)
            res.replace_diagnostic_curve(out / "diagnostic_curves.csv", spec.key(preset.name), diag_curve)
            write_reports(out, title, notes)
            result.ran.append(spec)
            view.advance()
            timed = f", {row['ms_per_iter']:.1f} ms/iter" if row.get("ms_per_iter") is not None else ""
            view.log(f"done {spec.dirname}: Dice {100 * res.to_float(row['mean_dice']):.2f} %{timed}, "
                     f"{row['wall_s']:.0f} s")
            if on_row is not None:
                on_row(row)

        if jobs <= 1:
            for spec in todo:
                row = run_one(preset, spec, runs / spec.dirname, view, command, data_root, device, plugins,
                              timing, threads, fresh_process)
                if row is None:
                    result.interrupted = True
                    view.log(f"interrupted during {spec.dirname}; rerun the same command to resume it")
                    break
                finish(spec, row)
        else:
            result.interrupted = _run_parallel(preset, todo, runs, view, command, data_root, device, plugins,
                                               threads, jobs, finish)
        # cells trained concurrently (now or by an earlier --jobs run) are timed one at a time, alone on
        # the machine, so that their ms/iter and memory mean what they mean for a sequential grid
        if not result.interrupted:
            wanted = {s.key(preset.name): s for s in specs}
            pending = [r for r in res.read_rows(out / "results.csv")
                       if res.row_key(r) in wanted and not r.get("ms_per_iter")]
            for r in pending:
                spec = wanted[res.row_key(r)]
                view.status(f"{spec.dirname}: timing alone")
                r.update(time_cell(preset, spec, runs / spec.dirname, data_root, device, plugins, timing, threads))
                res.upsert_rows(out / "results.csv", [r])
                write_reports(out, title, notes)
    result.rows = res.read_rows(out / "results.csv")
    return result


def _backfill_diagnostic_curves(preset: Preset, specs: Sequence[RunSpec], out: Path, runs: Path,
                                data_root: str | None, device: str | None, plugins: Sequence[str]) -> None:
    """Diagnostic curves of finished rows that lack them (recorded before the curves were, or trained by a
    scheduler from --print-commands), read from their run directories where those still exist."""
    have = {res.row_key(r) for r in res.read_rows(out / "diagnostic_curves.csv")}
    for spec in specs:
        metrics = runs / spec.dirname / "metrics.jsonl"
        if spec.key(preset.name) in have or not metrics.is_file():
            continue
        window = _diagnostic_window(run_config(preset, spec, runs / spec.dirname, data_root, device, plugins))
        res.replace_diagnostic_curve(out / "diagnostic_curves.csv", spec.key(preset.name),
                                     diagnostic_curve(metrics, window))


def grid_commands(preset: Preset | str, out: str | Path | None = None, algos: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, labeled: Sequence[float] | None = None,
                  iterations: int | None = None, data_root: str | None = None, device: str | None = None,
                  runs_dir: str | Path | None = None, plugins: Sequence[str] = (), reuse: bool = False) -> list[str]:
    """One ``semiseg train`` command per cell not yet in ``out``'s results, for a scheduler (a SLURM array, say).

    Each cell's resolved config is written to ``out/configs/<cell>.yaml``; the command trains it into the run
    directory the bench uses, so rerunning the same ``semiseg bench`` afterwards evaluates, times and records the
    finished runs (and resumes any a scheduler stopped)."""
    for p in plugins:
        registry.load_plugin(p)
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out) if out is not None else Path("bench") / preset.name
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    done = {res.row_key(r) for r in res.read_rows(out / "results.csv")}
    if reuse:
        done |= {res.row_key(r) for r in res.read_rows(committed_results(preset))}
    commands = []
    for spec in plan(preset, algos, seeds, labeled, iterations, data_root):
        if spec.key(preset.name) in done:
            continue
        cfg = run_config(preset, spec, runs / spec.dirname, data_root, device, plugins)
        path = out / "configs" / f"{spec.dirname}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(path)
        commands.append(shlex.join(["semiseg", "train", "--config", str(path), "--out", str(runs / spec.dirname),
                                    "--resume", "--quiet"]))
    if commands:  # the configs name this machine's run folders: scheduler input, not a result to commit
        _git_ignore(out, ["configs/"])
    return commands


def default_jobs(device: str | None) -> int:
    """Concurrent cells by default: one per GPU; on a CPU two (each with half the threads), which trained the
    acdc-cpu grid x1.14 faster than one at a time on 2 cores (benchmarks/results/acdc-cpu/README.md)."""
    import os

    if device != "cpu" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _cell_worker(args: tuple) -> tuple[RunSpec, dict[str, Any] | None]:
    """One grid cell in a worker process of ``--jobs``: train and evaluate with this worker's threads."""
    preset, spec, run_dir, command, data_root, device, plugins, threads = args
    torch.set_num_threads(threads)
    for p in plugins:
        registry.load_plugin(p)
    if device is None and _WORKER_DEVICE is not None:
        device = _WORKER_DEVICE
    return spec, train_cell(preset, spec, run_dir, _View(1, quiet=True), command, data_root, device, plugins)


_WORKER_DEVICE: str | None = None


def _init_worker(slots: Any) -> None:
    """Give each worker process one GPU of its own when there are several (a slot id taken once)."""
    global _WORKER_DEVICE
    n = torch.cuda.device_count()
    slot = slots.get()
    if n > 1:
        _WORKER_DEVICE = f"cuda:{slot % n}"


def _run_parallel(preset: Preset, todo: Sequence[RunSpec], runs: Path, view: _View, command: str,
                  data_root: str | None, device: str | None, plugins: Sequence[str], threads: int | None,
                  jobs: int, finish: Callable[[RunSpec, dict[str, Any]], None]) -> bool:
    """Train ``todo`` with ``jobs`` worker processes, each with an equal share of the CPU threads; rows are
    written as cells finish. Returns True when interrupted."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    total = threads or torch.get_num_threads()
    per_job = max(1, total // jobs)
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no torch thread pools inherited by fork
    slots = ctx.Manager().Queue()
    for i in range(jobs):
        slots.put(i)
    view.log(f"{len(todo)} runs on {jobs} concurrent jobs of {per_job} thread(s) each")
    interrupted = False
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots,))
    queue = list(todo)

    def submit() -> Any:
        spec = queue.pop(0)
        return pool.submit(_cell_worker, (preset, spec, runs / spec.dirname, command, data_root, device,
                                          list(plugins), per_job))

    try:
        # never more cells handed out than workers: the pool would otherwise queue cells ahead, and those
        # would still start after an interrupt
        futures = {submit() for _ in range(min(jobs, len(queue)))}
        while futures and not interrupted:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in done:
                spec, row = f.result()
                if row is None:  # Ctrl-C or SIGTERM reached the workers: they saved; start no further cell
                    interrupted = True
                    view.log(f"interrupted during {spec.dirname}; rerun the same command to resume it")
                else:
                    finish(spec, row)
                    if queue:
                        futures.add(submit())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # queued cells are dropped; running ones (interrupted with the same signal) save and return
        pool.shutdown(wait=True, cancel_futures=True)
    return interrupted


def time_grid(preset: Preset | str, algos: Sequence[str] | None = None, labeled: float | None = None,
              seed: int | None = None, iterations: int | None = None, data_root: str | None = None,
              device: str | None = None, plugins: Sequence[str] = (), timing: dict[str, int] | None = None,
              threads: int | None = None) -> list[dict[str, Any]]:
    """Time one configuration per algorithm without training (for budgeting a grid): ms/iter, peak memory,
    params, MACs and the training hours the grid's iteration budget would take at that speed."""
    for p in plugins:
        registry.load_plugin(p)
    preset = get_preset(preset) if isinstance(preset, str) else preset
    lab = labeled if labeled is not None else (preset.labeled[0] if preset.labeled else None)
    specs = plan(preset, algos, [seed if seed is not None else preset.seeds[0]], [lab] if lab is not None else None,
                 iterations, data_root)
    tm = timing or preset.timing
    rows = []
    with tempfile.TemporaryDirectory(prefix="semiseg-time-") as tmp:
        for spec in specs:
            cfg = run_config(preset, spec, Path(tmp) / spec.dirname, data_root, device, plugins)
            t = time_config(cfg.to_dict(), warmup=tm["warmup"], iters=tm["iters"], threads=threads)
            rows.append({**dict(zip(res.KEY, spec.key(preset.name))), "ms_per_iter": t["ms_per_iter"],
                         "ms_per_iter_std": t["std"], "timing_iters": t["iters"], "peak_mem_mb": t["peak_mem_mb"],
                         "params_m": t["params_m"], "gmacs": t["gmacs"], "flops_input": t["flops_input"],
                         "train_h_estimate": t["ms_per_iter"] * spec.iterations / 3.6e6,
                         **{k: t[k] for k in ("machine", "device", "torch")},
                         "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return rows
