"""What a run directory records about how it was made.

* ``config.yaml``: the config with every value the run decided written out (backbone, learning rate, unlabeled
  batch, channels_last, workers, validation split, device, poly horizon, EMA decay, processes...), so
  ``semiseg train --config RUN/config.yaml --out NEW`` reruns it, with the same global batch after an
  ``--nproc 2`` run;
* ``run.json``: versions (semiseg and its git commit when run from a checkout, Python, torch, CUDA, cuDNN), the
  device, the number of processes, the exact command line, that resolved config and the labeled cases' ids.
"""

from __future__ import annotations

import copy
import inspect
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import semiseg
from semiseg import registry
from semiseg.engine.config import TrainConfig


def git_commit() -> tuple[str | None, bool | None]:
    """The commit of the semiseg checkout this code runs from, and whether it has local changes; (None, None)
    for an installed package."""
    root = Path(semiseg.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def _factory_default(table: registry.Registry, name: str, param: str) -> Any:
    if name not in table.names():  # in-memory data has no factory
        return None
    fn = table.get(name)
    target = fn.__init__ if inspect.isclass(fn) else fn
    p = inspect.signature(target).parameters.get(param)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def resolved_config(trainer: Any) -> TrainConfig:
    """The trainer's config with every value it decided filled in (nothing left at ``auto`` or None where
    the run chose)."""
    c = TrainConfig.from_dict(copy.deepcopy(trainer.cfg.to_dict()))
    data = trainer.data
    c.backbone = trainer.meta["backbone"]
    c.lr = trainer.base_lr
    c.unlabeled_batch_size = c.unlabeled_batch_size or c.batch_size
    c.channels_last = bool(trainer.channels_last)
    c.workers = c.workers if c.workers is not None else (4 if trainer.device.type == "cuda" else 0)
    c.val_split = trainer.val_split
    c.device = str(trainer.device) if trainer.dist.world == 1 else trainer.device.type
    c.patch_size = [int(p) for p in data.patch_size]
    c.policy = c.policy or data.policy
    if c.labeled is None:
        c.labeled = _factory_default(registry.DATASETS, c.data, "labeled")
    if c.schedule == "poly" and c.poly_total is None:
        c.poly_total = trainer.total
    if trainer.teacher is not None and c.ema_decay is None:
        c.ema_decay = trainer.teacher.decay
    c.nproc = trainer.dist.world  # --batch-size is per process: the same processes keep the global batch
    return c


def labeled_ids(data: Any) -> list[str]:
    keys = getattr(data.labeled, "keys", None)
    if keys is None:
        return [str(i) for i in range(len(data.labeled))]
    return [":".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in keys]


def run_record(trainer: Any) -> dict[str, Any]:
    commit, dirty = git_commit()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "semiseg": semiseg.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else
        platform.processor() or platform.machine(),
        "processes": trainer.dist.world,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved_config(trainer).to_dict(),
        "labeled_ids": labeled_ids(trainer.data),
        "unlabeled_count": len(trainer.data.unlabeled),
    }


def write_record(trainer: Any, out: Path) -> None:
    """config.yaml (resolved) and run.json in ``out``, and plan.json where the data has a preprocessing plan
    (the same plan is in every checkpoint's meta, which is what eval and predict replay)."""
    resolved_config(trainer).save(out / "config.yaml")
    (out / "run.json").write_text(json.dumps(run_record(trainer), indent=2, default=str))
    plan = trainer.meta.get("preprocessing")
    if plan is not None:
        (out / "plan.json").write_text(json.dumps(plan, indent=2))
