"""Shared test helpers: where the read-only real data lives, and a fixture that needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The read-only data folder that sits beside the repository (``../shared/data``)."""
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skipped when absent, except in CI where its absence is a failure."""
    path = shared_data_dir()
    if not path.is_dir():
        reason = f"shared data folder {path} is absent"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must provide it")
        pytest.skip(reason)
    return path
