"""What a run leaves behind for people: plain progress lines off a terminal, train.log, the run record."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from semiseg.cli import cli
from semiseg.engine.trainer import Trainer

TINY = ["--algo", "fixmatch", "--data-opt", "n_train=8", "--data-opt", "n_val=2", "--data-opt", "size=32,32",
        "--patch-size", "32,32", "--width", "0.25", "--batch-size", "2"]


def train(out, *extra: str):
    return CliRunner().invoke(cli, ["train", *TINY, "--out", str(out), *extra])


def test_plain_progress_lines_when_output_is_not_a_terminal(tmp_path):
    r = train(tmp_path / "run", "--iterations", "4", "--log-every", "2", "--val-every", "2")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"]
    for part in ("loss ", "lr ", " it/s", "elapsed ", "ETA "):
        assert part in lines[0]
    assert "val dice" in lines[1]  # the validation at step 2 is known by step 4
    assert not any(len(ln) > 0 and ln.endswith("…") for ln in r.output.splitlines())
    log = (tmp_path / "run" / "train.log").read_text()
    assert lines[0] in log and "done: last val dice" in log


def test_train_log_keeps_the_traceback_of_a_failed_run(tmp_path, monkeypatch):
    def boom(self, batch, it):
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(Trainer, "train_step", boom)
    r = train(tmp_path / "run", "--iterations", "2")
    assert r.exit_code != 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: a bug in a step" in log


def test_train_log_keeps_the_error_sentence_and_warnings(tmp_path, monkeypatch):
    import warnings

    from semiseg.errors import TrainingError

    def warn_then_fail(self, batch, it):
        warnings.warn("a warning from inside a step", UserWarning, stacklevel=1)
        raise TrainingError("Loss is not finite at step 1 (a made-up failure for this test).")

    monkeypatch.setattr(Trainer, "train_step", warn_then_fail)
    r = train(tmp_path / "run", "--iterations", "2")
    log = (tmp_path / "run" / "train.log").read_text()
    assert r.exit_code == 2
    assert "error: Loss is not finite at step 1" in log
    assert "a warning from inside a step" in log


def test_run_record_and_resolved_config_rerun(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--iterations", "2", "--val-every", "2").exit_code == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # what the run decided is written out
    assert cfg["backbone"] == "unet" and cfg["lr"] == 0.01 and cfg["unlabeled_batch_size"] == 2
    assert cfg["device"] == "cpu" and cfg["workers"] == 0 and isinstance(cfg["channels_last"], bool)
    assert cfg["val_split"] == "val" and cfg["poly_total"] == 2 and cfg["nproc"] == 1
    assert cfg["labeled"] == pytest.approx(0.1) and cfg["patch_size"] == [32, 32] and cfg["policy"] == "medical2d"
    rec = json.loads((run / "run.json").read_text())
    for key in ("semiseg", "git_commit", "python", "torch", "cuda", "cudnn", "device", "processes", "command",
                "labeled_ids"):
        assert key in rec
    assert rec["processes"] == 1 and rec["config"] == cfg and len(rec["labeled_ids"]) == 1
    assert rec["command"]  # sys.argv as typed (here the test runner's)
    # the README's advice: rerun the config into a new directory
    again = CliRunner().invoke(cli, ["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == {**cfg, "out": str(tmp_path / "b")}
