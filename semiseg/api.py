"""The Python API: ``semiseg.train(...)`` with the command line's options as keyword arguments, and
``semiseg.load(run_or_checkpoint).predict(array)``.

    import semiseg
    run = semiseg.train(algo="crossmatch", iterations=200, out="runs/cm")
    model = semiseg.load(run.dir)                  # or a checkpoint file
    labels = model.predict(image)                  # (H, W) / (C, H, W) in 2D, (X, Y, Z) / (C, X, Y, Z) in 3D

    data = semiseg.arrays(images, labels, unlabeled=more_images)   # in-memory arrays, no files
    run = semiseg.train(algo="fixmatch", data=data, iterations=300, out="runs/mine")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.engine.config import BACKBONE_SHORTCUTS, TrainConfig, default_synthetic_dim
from semiseg.errors import DataError


@dataclass
class Run:
    """A finished (or interrupted) training run: its directory, summary and resolved config."""

    dir: Path
    summary: dict[str, Any]
    config: TrainConfig
    notes: list[str] = field(default_factory=list)

    def load(self, checkpoint: str = "last") -> Model:
        return load(self.dir, checkpoint=checkpoint)


def train(algo: str = "supervised", *, data: Any = None, out: str | Path | None = None, resume: bool = False,
          quiet: bool = True, plugins: tuple[str, ...] | list[str] = (), **options: Any) -> Run:
    """Train ``algo`` like ``semiseg train``; ``options`` are its flags as keyword arguments (``iterations=200``,
    ``batch_size=4``, ``algo_options={"eta": 0.3}``, ``width=0.5``, ``dim=3``, ``patch_size=(64, 64)``...).
    ``data`` is a dataset name (``"acdc"``, with ``data_root=...``) or an in-memory :func:`semiseg.arrays`."""
    from semiseg import registry
    from semiseg.data.base import SegData
    from semiseg.engine.lock import check_run_dir
    from semiseg.engine.record import resolved_config
    from semiseg.engine.trainer import Trainer

    for p in plugins:
        registry.load_plugin(p)
    d: dict[str, Any] = {"algo": algo, "plugins": list(plugins)}
    backbone_options = dict(options.pop("backbone_options", {}) or {})
    for k in BACKBONE_SHORTCUTS:
        if k in options:
            backbone_options[k] = options.pop(k)
    data_options = dict(options.pop("data_options", {}) or {})
    if "dim" in options:
        data_options["dim"] = int(options.pop("dim"))
    if isinstance(options.get("patch_size"), str):
        options["patch_size"] = [int(p) for p in options["patch_size"].replace("x", ",").split(",") if p]
    memory = data if isinstance(data, SegData) else None
    if memory is not None:
        d["data"], d["patch_size"] = memory.name, list(memory.patch_size)
    elif data is not None:
        d["data"] = data
    d.update(options, backbone_options=backbone_options, data_options=data_options)
    if d.get("data_root") is not None:
        d["data_root"] = str(Path(d["data_root"]).expanduser().resolve())
    d["out"] = str(out) if out is not None else f"runs/{algo}-{d.get('data', 'synthetic')}-s{d.get('seed', 0)}"
    cfg = TrainConfig.from_dict(d, source="semiseg.train()")
    default_synthetic_dim(cfg)
    check_run_dir(Path(cfg.out), resume, flag="resume=True")
    trainer = Trainer(cfg, quiet=quiet, explicit=set(d) - {"out", "plugins"}, data=memory)
    summary = trainer.fit(resume=resume)
    return Run(Path(cfg.out), summary, resolved_config(trainer), list(trainer.notes))


class Model:
    """A trained network with the evaluation protocol of its run: ``predict(image) -> label map``."""

    def __init__(self, network: Any, meta: dict[str, Any], device: Any, checkpoint: Path) -> None:
        self.network, self.meta, self.device, self.checkpoint = network, meta, device, checkpoint
        self.dim, self.in_channels = int(meta["dim"]), int(meta["in_channels"])

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Labels of one image: 2D ``(H, W)`` or ``(C, H, W)``; 3D ``(X, Y, Z)`` or ``(C, X, Y, Z)``."""
        from semiseg.evaluation.protocol import predictor

        a = np.asarray(image, dtype=np.float32)
        if a.ndim == self.dim:
            a = a[None]
        layout = "(H, W) or (C, H, W)" if self.dim == 2 else "(X, Y, Z) or (C, X, Y, Z)"
        if a.ndim != self.dim + 1 or a.shape[0] != self.in_channels:
            raise DataError(f"This {self.dim}D model with {self.in_channels} input channel(s) takes {layout} "
                            f"images; got shape {np.shape(image)}.")
        if not np.isfinite(a).all():
            raise DataError("The image holds NaN or infinite values; clean it before predicting.")
        predict = predictor(self.network, self.dim, tuple(self.meta["patch_size"]), int(self.meta["num_classes"]),
                            self.device, mode="test")
        return predict(a)


def load(path: str | Path, checkpoint: str = "last", device: str = "auto", network: str | None = None) -> Model:
    """A trained model from a run directory (its ``last`` or ``best`` checkpoint) or a checkpoint file;
    ``network`` picks one of an algorithm's networks (default: the one the run evaluates; ``a+b``: ensemble)."""
    from semiseg.engine import checkpoint as ckpt_io
    from semiseg.engine.trainer import pick_device
    from semiseg.evaluation.runs import load_model

    ck_path = ckpt_io.resolve(path, prefer=checkpoint)
    ck = ckpt_io.load(ck_path)
    dev = pick_device(device)
    return Model(load_model(ck, dev, network), ck["meta"], dev, ck_path)
