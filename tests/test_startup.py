"""`semiseg --version` and `--help` start fast: no torch until a command needs it."""

from __future__ import annotations

import subprocess
import sys
import time


def run(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "semiseg", *args], capture_output=True, text=True, timeout=60)
    return time.perf_counter() - t0, p


def test_version_and_help_return_in_under_a_second_without_torch():
    for args in (["--version"], ["--help"]):
        seconds, p = run(*args)
        assert p.returncode == 0, p.stderr
        assert seconds < 1.0, f"semiseg {' '.join(args)} took {seconds:.2f} s"
    _, p = run("--help")
    commands = p.stdout.split("Commands:")[1]
    assert "bench" in commands and "..." not in commands  # the lazy command is listed, descriptions whole
    probe = "import sys, semiseg.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
