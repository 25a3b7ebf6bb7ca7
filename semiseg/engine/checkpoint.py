"""Checkpoints written atomically, and read without running code.

Writing: a temp file in the same directory, flushed to disk, then renamed. A crash (or kill -9) mid-write
leaves at most a stray ``*.tmp``; ``last.pt`` is always the previous good one.

Reading: checkpoints are what people share, and a pickle can run any code when it is loaded. Every checkpoint
and weights file is read with ``torch.load(weights_only=True)``, which accepts only tensors and plain values
(what semiseg writes), or from ``.safetensors``; a file holding anything else is refused in one sentence before
any of it runs.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from semiseg.errors import CheckpointError

FORMAT = 1
# Fields that must agree between a checkpoint and the run that loads it.
IDENTITY = ("algo", "backbone", "backbone_options", "num_classes", "in_channels", "dim")


def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str | Path, what: str = "Checkpoint") -> Any:
    """``path`` read without executing code: safetensors, or torch's weights-only unpickler."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any malformed file
            raise CheckpointError(f"{what} '{path}' is not a valid safetensors file ({type(e).__name__}).") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} '{path}' holds Python objects other than tensors and plain values, so semiseg does not load "
            f"it (unpickling it could run code); use a checkpoint written by semiseg or a .safetensors file."
        ) from e
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise CheckpointError(
            f"{what} '{path}' cannot be read ({type(e).__name__}); it is truncated or not a semiseg "
            f"checkpoint, use another one (checkpoints/best.pt or last.pt)."
        ) from e


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist; pass a run directory or a .pt file.")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "meta" not in ckpt:
        raise CheckpointError(f"Checkpoint '{path}' is not a semiseg checkpoint (format {FORMAT}).")
    return ckpt


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint made by another backbone, class count or algorithm, naming the difference."""
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {expected.get(k)!r}"
             for k in IDENTITY if k in expected and meta.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointError(
            f"Checkpoint '{path}' does not fit this run ({'; '.join(diffs)}); use a new --out directory "
            f"or the same settings as the checkpoint."
        )


def resolve(path: str | Path, prefer: str = "last") -> Path:
    """A run directory -> its checkpoints/<prefer>.pt; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        for name in (prefer, "best" if prefer == "last" else "last"):
            c = p / "checkpoints" / f"{name}.pt"
            if c.is_file():
                return c
        raise CheckpointError(f"Run directory '{p}' has no checkpoints/last.pt or best.pt; train it first.")
    return p
