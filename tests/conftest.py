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


def full_and_resumed(make_cfg, stop_at: int, monkeypatch):
    """Two trainers: a run trained without a break, and the same run interrupted before step ``stop_at`` (as
    Ctrl-C does, between steps) and then resumed from its last.pt. ``make_cfg(name)`` gives each run's config."""
    from semiseg.engine.trainer import Trainer

    full = Trainer(make_cfg("full"), quiet=True)
    full.fit()
    part = Trainer(make_cfg("part"), quiet=True)
    real = part.train_step

    def stop(batch, it):
        if it == stop_at:
            raise KeyboardInterrupt
        return real(batch, it)

    monkeypatch.setattr(part, "train_step", stop)
    assert part.fit()["iteration"] == stop_at
    monkeypatch.setattr(part, "train_step", real)
    resumed = Trainer(make_cfg("part"), quiet=True)
    resumed.fit(resume=True)
    return full, resumed


def assert_same_networks(a, b, optimizer: bool = True) -> None:
    """Every network of two trainers (student, teachers, second networks) equal, tensor by tensor, and the
    optimizer's state too."""
    import torch

    assert a.networks.modules.keys() == b.networks.modules.keys()
    for name in a.networks.modules:
        sa, sb = a.networks.modules[name].state_dict(), b.networks.modules[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    if optimizer:
        oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        assert oa.keys() == ob.keys()
        for i in oa:
            for k, v in oa[i].items():
                assert torch.equal(v, ob[i][k]) if torch.is_tensor(v) else v == ob[i][k], f"optimizer {i}.{k}"
