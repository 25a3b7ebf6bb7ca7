"""``train.log``: everything a run prints (standard output and error, warnings, a traceback if it fails),
written into the run directory next to what goes to the terminal.

:func:`run_log` tees ``sys.stdout`` and ``sys.stderr`` into the file for as long as it is active; nested uses
are no-ops, so the CLI can open it before building the trainer and the trainer again around ``fit``. Live
terminal displays (the progress bar) write to :func:`terminal`, the real standard output, and stay out of the
file.
"""

from __future__ import annotations

import io
import re
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_active: list[Path] = []
_terminal: list[TextIO] = []
_logs: list[TextIO] = []


class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal stream and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.log.write(ANSI.sub("", s))  # colours for the terminal, plain text for the file
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def terminal() -> TextIO:
    """The real standard output, for live displays that must not go into train.log."""
    return _terminal[-1] if _terminal else sys.stdout


def log_only(text: str) -> None:
    """A line for train.log alone (the terminal shows the same information as a live bar)."""
    if _logs:
        _logs[-1].write(text.rstrip("\n") + "\n")


def is_terminal() -> bool:
    try:
        return terminal().isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def run_log(path: Path, enabled: bool = True) -> Iterator[None]:
    """Tee standard output and error into ``path`` (appended); a failure's traceback goes into it too."""
    if not enabled or _active:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1)
    except OSError:  # an unwritable run directory is reported by the trainer's own check, in one sentence
        yield
        return
    with log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        out, err = sys.stdout, sys.stderr
        _active.append(path)
        _terminal.append(out)
        _logs.append(log)
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
            # into the log whoever displays warnings (a test runner may record them instead of printing)
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
            shown(message, category, filename, lineno, err if file is None else file, line)

        warnings.showwarning = show
        try:
            yield
        except BaseException as e:
            if not isinstance(e, SystemExit) or e.code not in (0, None):
                log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out, err
            warnings.showwarning = shown
            _active.pop()
            _terminal.pop()
            _logs.pop()
