"""One training per run directory: ``RUN/.lock`` holds the writing process's id while it trains.

A second training started into the same directory stops at once with one sentence; a lock left by a process
that no longer exists (a killed run) is taken over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from semiseg.errors import ConfigError, TrainingError

RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl")


def check_run_dir(out: Path, resume: bool, flag: str = "--resume") -> None:
    """A run directory is reused only to resume it: one that already holds a run is refused otherwise."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is an existing file; choose a directory.")
    used = [n for n in RUN_FILES if (out / n).exists()]
    if used and not resume:
        raise ConfigError(f"Run directory '{out}' already holds a run ({', '.join(used)}); pass {flag} to continue "
                          f"it or choose another --out.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    path = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise TrainingError(f"Run directory '{run_dir}' is being written by another training (process "
                                    f"{owner}); wait for it to finish or choose another --out.") from None
            path.unlink(missing_ok=True)  # a stale lock of a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
