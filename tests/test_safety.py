"""Loading never runs code: hostile checkpoints and weights files are refused; stored plugin names are not run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semiseg.cli import cli
from semiseg.engine import checkpoint as ckpt_io
from semiseg.errors import CheckpointError


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do (with worse code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "hostile.pt"
    torch.save({"format": ckpt_io.FORMAT, "meta": {"dim": 2}, "model": {}, "payload": Payload(marker)}, path)
    return path, marker


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_hostile_checkpoint_is_refused_everywhere_and_never_runs(hostile, tmp_path):
    path, marker = hostile
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(path.read_bytes())
    results = {
        "predict": invoke("predict", str(path), str(img), "--out", str(tmp_path / "pred")),
        "eval": invoke("eval", str(path)),
        "resume": invoke("train", "--algo", "supervised", "--data-opt", "size=32,32", "--patch-size", "32,32",
                         "--iterations", "1", "--out", str(run), "--resume", "--quiet"),
        "weights": invoke("train", "--backbone", "smp", "--arch", "Unet", "--encoder", "resnet18",
                          "--weights", str(path), "--data-opt", "size=32,32", "--patch-size", "32,32",
                          "--iterations", "1", "--out", str(tmp_path / "w"), "--quiet"),
    }
    for what, r in results.items():
        assert r.exit_code == 2, (what, r.output)
        named = "last.pt" if what == "resume" else path.name
        assert "could run code" in r.output and named in r.output, (what, r.output)
        assert "Traceback" not in r.output
    assert not marker.exists()


def test_own_checkpoints_still_load_and_safetensors_weights_are_read(tmp_path):
    state = {"format": ckpt_io.FORMAT, "meta": {"dim": 2}, "iteration": 3, "best": {"dice": 0.5},
             "model": {"w": torch.ones(2)}, "rng": {"torch": torch.get_rng_state(), "cuda": None}}
    ckpt_io.save_atomic(state, tmp_path / "ok.pt")
    assert ckpt_io.load(tmp_path / "ok.pt")["best"] == {"dice": 0.5}
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(ckpt_io.safe_load(tmp_path / "w.safetensors")["w"], torch.arange(3.0))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt_io.safe_load(tmp_path / "bad.safetensors")


def test_a_stored_config_that_names_plugins_is_reported_not_run(tmp_path):
    marker = tmp_path / "RAN"
    plugin = tmp_path / "evil_plugin.py"
    plugin.write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"algo: supervised\nplugins: [{plugin}]\niterations: 1\n")
    r = invoke("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet")
    assert r.exit_code == 2 and "does not load on its own" in r.output and "--plugin" in r.output
    assert not marker.exists()


def test_a_second_training_into_a_live_run_directory_stops_and_a_stale_lock_is_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from semiseg.engine.lock import run_lock
    from semiseg.errors import TrainingError

    run = tmp_path / "run"
    with run_lock(run):
        assert (run / ".lock").read_text() == str(os.getpid())
        # another process holding the lock: a live one refuses, in one sentence naming it
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (run / ".lock").write_text(str(holder.pid))
            with pytest.raises(TrainingError, match=f"being written by another training \\(process {holder.pid}\\)"):
                with run_lock(run):
                    pass
        finally:
            holder.kill()
            holder.wait()
        # the holder is gone: its lock is stale and taken over
        with run_lock(run):
            assert (run / ".lock").read_text() == str(os.getpid())
    assert not (run / ".lock").exists()


def test_a_run_directory_without_checkpoint_is_not_reused_and_out_may_not_be_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    r = invoke("train", "--iterations", "1", "--out", str(run), "--quiet")
    assert r.exit_code == 2 and "already holds a run (metrics.jsonl)" in r.output
    f = tmp_path / "file"
    f.write_text("x")
    r = invoke("train", "--iterations", "1", "--out", str(f), "--quiet")
    assert r.exit_code == 2 and "is an existing file" in r.output


def test_a_nan_unlabeled_image_stops_the_run_with_its_name_after_saving(tmp_path):
    from collections.abc import Sequence

    from semiseg.engine.config import TrainConfig
    from semiseg.engine.trainer import Trainer
    from semiseg.errors import DataError

    cfg = TrainConfig(algo="fixmatch", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 2, "n_train": 12, "n_val": 1, "size": [32, 32]}, patch_size=[32, 32],
                      labeled=4, iterations=6, batch_size=2, val_every=6, out=str(tmp_path / "run"))
    t = Trainer(cfg, quiet=True)
    real = t.data.unlabeled

    class TurnsBad(Sequence):
        """The 7th image read holds a NaN (as a corrupt file found mid-run would)."""

        keys = ["case_a", "case_b", "case_c", "case_d", "case_e", "case_f", "case_g", "case_h"]
        reads = 0

        def __len__(self):
            return len(real)

        def __getitem__(self, i):
            TurnsBad.reads += 1
            img = np.array(real[i], copy=True)
            if TurnsBad.reads == 7:
                img[0, 0, 0] = np.nan
            return img

    t.data.unlabeled = TurnsBad()
    with pytest.raises(DataError, match=r"Unlabeled item 'case_\w' contains 1 NaN or Inf values"):
        t.fit()
    saved = ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["iteration"] == t.iteration >= 1  # the steps before the bad image are kept


def test_resume_continues_the_stored_config_and_refuses_contradicting_flags(tmp_path):
    import yaml

    run = tmp_path / "run"
    base = ["train", "--algo", "supervised", "--data-opt", "n_train=8", "--data-opt", "n_val=1", "--data-opt",
            "size=32,32", "--patch-size", "32,32", "--width", "0.25", "--batch-size", "2", "--val-every", "2",
            "--quiet", "--out", str(run)]
    assert invoke(*base, "--iterations", "2").exit_code == 0
    stored = (run / "config.yaml").read_text()
    r = invoke(*base, "--iterations", "2", "--lr", "0.5", "--resume")
    assert r.exit_code == 2 and "changes lr 0.5 (the run has 0.01)" in " ".join(r.output.split())
    r = invoke(*base[:1], "--data-opt", "n_train=9", "--out", str(run), "--resume", "--quiet")
    assert r.exit_code == 2 and "data_options" in r.output
    assert (run / "config.yaml").read_text() == stored  # refused before anything was written
    # without flags, --resume takes everything from the run (its data included)
    r = invoke("train", "--out", str(run), "--resume", "--quiet")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(stored)


def test_a_bad_validation_label_is_found_before_training(tmp_path):
    from semiseg.engine.config import TrainConfig
    from semiseg.engine.trainer import Trainer, build_data
    from semiseg.errors import DataError

    cfg = TrainConfig(data="synthetic", data_options={"dim": 2, "n_train": 8, "n_val": 2, "size": [32, 32]},
                      patch_size=[32, 32], labeled=4, iterations=1, out=str(tmp_path / "run"))
    data = build_data(cfg)
    bad = data.cases("val")
    bad[1].label[0, 0] = 9
    data.splits["val"] = bad
    with pytest.raises(DataError, match="validation case val_0001' contains value 9"):
        Trainer(cfg, quiet=True, data=data)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_labeled_fraction_that_rounds_to_none_is_said():
    from semiseg.data.splits import resolve_count

    with pytest.warns(UserWarning, match="labeled=0.1 of 8 samples rounds to none; using 1 labeled sample"):
        assert resolve_count(0.1, 8, "samples") == 1
