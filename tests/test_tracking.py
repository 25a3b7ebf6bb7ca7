"""--logger tensorboard|wandb|mlflow, each read back offline."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from semiseg.cli import cli
from semiseg.engine.tracking import check_loggers
from semiseg.errors import ConfigError

TINY = ["train", "--algo", "fixmatch", "--data-opt", "n_train=8", "--data-opt", "n_val=2", "--data-opt",
        "size=32,32", "--patch-size", "32,32", "--width", "0.25", "--batch-size", "2", "--iterations", "4",
        "--log-every", "2", "--val-every", "2", "--quiet"]


def train(out, *loggers: str):
    args = [*TINY, "--out", str(out)]
    for name in loggers:
        args += ["--logger", name]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return out


def test_tensorboard_events_hold_losses_edges_lr_and_validation(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val/dice"} <= tags
    assert any(t.startswith("loss/") for t in tags) and any(t.startswith("mask/") for t in tags)
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text


def test_mlflow_file_store_holds_metrics_and_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reading client below uses the file store too
    run = train(tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("semiseg")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.params["algo"] == "fixmatch" and r.data.params["backbone"] == "unet"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [2, 4]
    assert "val.dice" in r.data.metrics and any(k.startswith("loss.") for k in r.data.metrics)
    mlflow.set_tracking_uri(None)


def test_wandb_offline_run_holds_config_and_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(tmp_path / "run", "wandb", "tensorboard")  # several loggers at once
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    (history,) = offline[0].glob("run-*.wandb")  # the run's records (config, history), for `wandb sync`
    data = history.read_bytes()  # protobuf records keep strings as they are
    assert b"fixmatch" in data and b"val/dice" in data and b"loss/sup" in data
    assert (run / "tensorboard").is_dir()


def test_unknown_or_missing_logger_is_one_sentence(monkeypatch):
    with pytest.raises(ConfigError, match="--logger 'neptune' is unknown"):
        check_loggers(["neptune"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match='pip install "semiseg\\[tracking\\]"'):
        check_loggers(["wandb"])
