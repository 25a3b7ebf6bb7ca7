"""Experiment trackers (``--logger tensorboard|wandb|mlflow``, several may be given; ``pip install
"semiseg[tracking]"``). Each receives the resolved config once and then every row the run logs: the loss, each
edge's weighted and raw terms, mask ratios, pseudo-label diagnostics, the learning rate and the validation
metrics, at their step.

* tensorboard: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``);
* wandb: project ``$WANDB_PROJECT`` (default ``semiseg``), files under ``RUN/wandb``; ``WANDB_MODE=offline``
  works without an account and ``wandb sync`` uploads later; a resumed run continues the same W&B run;
* mlflow: experiment ``semiseg`` at ``$MLFLOW_TRACKING_URI``, or a file store in ``RUN/mlruns``; metric names
  use ``.`` where the others use ``/`` (``val.dice``), since MLflow's file store makes every metric a file.
"""

from __future__ import annotations

import math
import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from semiseg.errors import ConfigError

LOGGERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "iter" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker(ABC):
    @abstractmethod
    def log(self, step: int, row: dict[str, Any]) -> None:
        """One logged row (numeric values only are sent)."""

    def close(self) -> None:  # noqa: B027 - most trackers flush on close, none must
        """Flush and finish."""


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(config).items()))

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / ".wandb-id"  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        (run_dir / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "semiseg"), dir=str(run_dir), id=run_id,
                              name=run_dir.name, config=config, resume="allow", reinit=True)

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # a store of the run's own, no server needed; MLflow 3 asks for this opt-in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "semiseg"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        # MLflow caps parameter values at a few hundred characters
        mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def log(self, step: int, row: dict[str, Any]) -> None:
        # MLflow's file store makes a metric a file, so 'loss' and 'loss/sup' cannot both exist: '/' -> '.'
        # (and '->' of default edge names is not a valid metric character)
        self.mlflow.log_metrics({mlflow_name(k): v for k, v in _scalars(row).items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def mlflow_name(key: str) -> str:
    """A row key as an MLflow metric name: ``val/dice`` -> ``val.dice``, ``loss/P_w->P_s`` -> ``loss.P_w-P_s``."""
    return key.replace("/", ".").replace(">", "")


def check_loggers(names: list[str]) -> None:
    """Unknown names and missing packages, in one sentence each, before any work."""
    import importlib.util

    for n in names:
        if n not in LOGGERS:
            raise ConfigError(f"--logger '{n}' is unknown; use one of {', '.join(LOGGERS)}.")
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise ConfigError(f"--logger {n} needs the {PACKAGES[n]} package; install it with "
                              f"pip install \"semiseg[tracking]\".")


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    check_loggers(names)
    kinds = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    return [kinds[n](run_dir, config) for n in dict.fromkeys(names)]
