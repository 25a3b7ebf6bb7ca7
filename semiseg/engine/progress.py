"""metrics.jsonl, the rich progress bar (loss, lr, it/s, ETA) and curves.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from semiseg.engine.runlog import is_terminal, log_only, terminal


class ProgressLog:
    """metrics.jsonl rows, and progress for people: a live bar on a terminal, else one plain line per logged
    step (step/total, loss, lr, it/s, elapsed, ETA, last validation Dice). train.log gets the plain lines
    either way."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool = True, quiet: bool = False,
                 trackers: list[Any] | None = None) -> None:
        self.path, self.total, self.start, self.enabled = path, total, start, enabled
        self.trackers = list(trackers or [])  # experiment trackers get every row metrics.jsonl gets
        self.show = enabled and not quiet
        self.plain = self.show and not is_terminal()
        self.progress: Progress | None = None
        self.task = None
        self._f = None
        self._t0 = time.perf_counter()
        self._val: float | None = None

    def __enter__(self) -> ProgressLog:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")
        self._t0 = time.perf_counter()
        if self.show and not self.plain:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[its]:.2f} it/s"),
                TextColumn("{task.fields[val]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=terminal()),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, loss=0.0,
                                               lr=0.0, its=0.0, val="")
        return self

    def __exit__(self, *exc) -> None:
        for t in self.trackers:
            t.close()
        if self.progress is not None:
            self.progress.stop()
        if self._f is not None:
            self._f.close()

    def step(self, iteration: int, row: dict[str, Any], log_row: bool) -> None:
        if not self.enabled:
            return
        if log_row:
            self.record({"iter": iteration, **row})
            line = self.line(iteration, row)
            if self.plain:
                print(line, flush=True)
            elif self.enabled:
                log_only(line)
        if self.progress is not None:
            its = 1000.0 / max(row.get("step_ms", 0) + row.get("data_ms", 0), 1e-6)
            self.progress.update(self.task, completed=iteration, loss=row["loss"], lr=row["lr"], its=its)

    def line(self, iteration: int, row: dict[str, Any]) -> str:
        """``step 40/200  loss 0.4123  lr 9.1e-03  3.21 it/s  elapsed 0:00:12  ETA 0:00:50  val dice 0.512``"""
        elapsed = time.perf_counter() - self._t0
        done = max(iteration - self.start, 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        val = f"  val dice {self._val:.4f}" if self._val is not None else ""
        return (f"step {iteration}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {rate:.2f} it/s  "
                f"elapsed {_hms(elapsed)}  ETA {_hms(eta)}{val}")

    def record(self, row: dict[str, Any]) -> None:
        if "val/dice" in row:
            self._val = float(row["val/dice"])
        if self._f is None:
            return
        for t in self.trackers:
            t.log(int(row.get("iter", 0)), row)
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()
        if self.progress is not None and "val/dice" in row:
            self.progress.update(self.task, val=f"val dice {row['val/dice']:.4f}")


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    tr = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["iter"], r["val/dice"]) for r in rows if "val/dice" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if tr:
        axes[0].plot(*zip(*tr))
    axes[0].set(title="training loss", xlabel="iteration")
    if va:
        axes[1].plot(*zip(*va), marker="o")
    axes[1].set(title="validation Dice", xlabel="iteration", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
