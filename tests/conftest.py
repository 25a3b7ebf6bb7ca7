"""Shared test helpers: where the read-only real data lives, and a fixture that needs it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def restored_registry() -> Iterator[None]:
    """Undo whatever the body registers in the global tables or records as loaded plugins."""
    from semiseg import registry

    registry.ALGORITHMS.names()  # built-ins first, so they are part of the snapshot
    saved = {name: (dict(t._table), dict(t._origin)) for name, t in registry.TABLES.items()}
    plugins = list(registry._loaded_plugins)
    modules = set(sys.modules)
    try:
        yield
    finally:
        for name, t in registry.TABLES.items():
            t._table.clear()
            t._table.update(saved[name][0])
            t._origin.clear()
            t._origin.update(saved[name][1])
        registry._loaded_plugins[:] = plugins
        registry._current_origin.current = None
        for m in set(sys.modules) - modules:
            if m.startswith(("semiseg_plugin_", "fake_semiseg_ep_")):
                del sys.modules[m]


@pytest.fixture
def clean_registry():
    """The registry as it was before the test (plugins a test loads do not leak into the next)."""
    with restored_registry():
        yield
