"""metrics.jsonl, the rich progress bar (loss, lr, it/s, ETA) and curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressLog:
    def __init__(self, path: Path, total: int, start: int, enabled: bool = True, quiet: bool = False) -> None:
        self.path, self.total, self.start, self.enabled = path, total, start, enabled
        self.show = enabled and not quiet
        self.progress: Progress | None = None
        self.task = None
        self._f = None

    def __enter__(self) -> ProgressLog:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")
        if self.show:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[its]:.2f} it/s"),
                TextColumn("{task.fields[val]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, loss=0.0,
                                               lr=0.0, its=0.0, val="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self._f is not None:
            self._f.close()

    def step(self, iteration: int, row: dict[str, Any], log_row: bool) -> None:
        if not self.enabled:
            return
        if log_row:
            self.record({"iter": iteration, **row})
        if self.progress is not None:
            its = 1000.0 / max(row.get("step_ms", 0) + row.get("data_ms", 0), 1e-6)
            self.progress.update(self.task, completed=iteration, loss=row["loss"], lr=row["lr"], its=its)

    def record(self, row: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()
        if self.progress is not None and "val/dice" in row:
            self.progress.update(self.task, val=f"val dice {row['val/dice']:.4f}")


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
