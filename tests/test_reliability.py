"""What happens when things go wrong: a killed run resumes to the same numbers, a diverging loss stops with a
sentence and keeps the last good checkpoint, a foreign checkpoint is refused, an unwritable or full output
directory fails before training, and every bad input stops with one sentence (a traceback only with --debug).

Runs that must behave like a user's command line (kill -9, exit codes, tracebacks) run ``python -m semiseg`` in
a subprocess; the rest call the click command in this process, which is much faster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from semiseg import cli as cli_mod
from semiseg.errors import CheckpointError, ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parent.parent

# 32x32 phantoms, a quarter-width U-Net, batch 2: one step is tens of milliseconds on a CPU core
TINY = ["--data", "synthetic", "--backbone", "unet", "--width", "0.25", "--patch-size", "32,32",
        "--data-opt", "size=[32,32]", "--data-opt", "n_train=12", "--data-opt", "n_val=2", "--labeled", "4",
        "--batch-size", "2", "--quiet"]


def env() -> dict[str, str]:
    """A wide, colourless terminal (rich does not wrap the error line) and one thread (deterministic, fair)."""
    e = dict(os.environ, COLUMNS="1000", NO_COLOR="1", OMP_NUM_THREADS="1")
    e.pop("SEMISEG_DEBUG", None)
    return e


def semiseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "semiseg", *args]


def run_semiseg(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(semiseg_cmd(*args), capture_output=True, text=True, env=env(), cwd=REPO_ROOT,
                          timeout=timeout)


def only_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def logged(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def last_logged_step(run: Path) -> int:
    try:
        return max((r["iter"] for r in logged(run) if "loss" in r), default=0)
    except (json.JSONDecodeError, OSError):  # a line caught half-written
        return 0


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_not_trained(run: Path) -> None:
    assert not (run / "checkpoints").exists()
    assert not logged(run)


@pytest.fixture
def one_thread():
    """In-process training on one thread: the shared cores are not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def invoke(monkeypatch, one_thread):
    """Call the CLI in this process. The error console is wide so a sentence stays on one line."""
    monkeypatch.setattr(cli_mod, "console", Console(stderr=True, width=10_000, no_color=True))
    monkeypatch.delenv("SEMISEG_DEBUG", raising=False)

    def run(*args: str):
        # --debug sets SEMISEG_DEBUG in os.environ; listing it here makes the runner restore it afterwards
        return CliRunner().invoke(cli_mod.cli, [str(a) for a in args], env={"SEMISEG_DEBUG": None})

    return run


def error_line(result) -> str:
    """Exit code 2, no traceback, and the output ends with one ``error:`` sentence on one line (a run that got
    as far as printing its banner shows that line above it); returns the sentence."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    return lines[-1][len("error: "):]


# --------------------------------------------------------------------------- kill -9, then --resume


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    """UniMatch (strong views, CutMix partner, random channel dropout on the features): a run killed with
    SIGKILL and resumed from checkpoints/last.pt ends with the same model, bit for bit, and the same metrics as
    a run that was never interrupted. The steps after the last checkpoint are recomputed on resume."""
    iterations, val_every, kill_after = 30, 5, 12
    # binary phantoms and AdamW: the validation Dice moves (0 -> about 0.6), so "same metrics" means something
    args = ["train", "--algo", "unimatch", *TINY, "--data-opt", "num_classes=2", "--optimizer", "adamw", "--lr",
            "0.01", "--iterations", str(iterations), "--val-every", str(val_every), "--log-every", "1"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    reference = subprocess.Popen(semiseg_cmd(*args, "--out", str(ref_dir)), env=env(), cwd=REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(semiseg_cmd(*args, "--out", str(run_dir)), env=env(), cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        seen: set[tuple[int, int]] = set()
        while victim.poll() is None and time.monotonic() < deadline:
            try:
                st = last.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino, st.st_mtime_ns) not in seen:
                # every version of last.pt is whole when it appears (a temp file renamed into place)
                assert load_ckpt(last)["iteration"] % val_every == 0
                seen.add((st.st_ino, st.st_mtime_ns))
            if last.exists() and last_logged_step(run_dir) >= kill_after:
                break
            time.sleep(0.05)
        assert victim.poll() is None, f"the run ended before it could be killed: {victim.stderr.read()}"
        assert last_logged_step(run_dir) >= kill_after, "the run made no progress in 240 s"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert seen
    killed_at = last_logged_step(run_dir)
    assert not (run_dir / "summary.json").exists()
    saved = load_ckpt(last)  # never a corrupt last.pt, not even right after the kill
    assert 0 < saved["iteration"] <= killed_at and saved["iteration"] % val_every == 0

    resumed = run_semiseg(*args, "--out", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    reference.stderr.close()
    victim.stderr.close()

    a = json.loads((ref_dir / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["iteration"] == a["iteration"] == iterations and not b["interrupted"]
    assert b["last"] == a["last"] and b["best"] == a["best"]
    assert a["last"]["dice"] > 0
    ma, mb = load_ckpt(ref_dir / "checkpoints" / "last.pt"), load_ckpt(last)
    assert mb["iteration"] == iterations
    assert ma["model"].keys() == mb["model"].keys()
    for k in ma["model"]:
        assert torch.equal(ma["model"][k], mb["model"][k]), k  # weights and BatchNorm statistics
    # the steps recomputed after the resume, and every later one, have the reference's losses exactly
    ref_loss = {r["iter"]: r["loss"] for r in logged(ref_dir) if "loss" in r}
    after = [r for r in logged(run_dir) if "loss" in r][killed_at:]
    assert after and after[0]["iter"] == saved["iteration"] + 1
    assert [r["loss"] for r in after] == [ref_loss[r["iter"]] for r in after]


# --------------------------------------------------------------------------- a loss that turns NaN

NAN_PLUGIN = '''
"""Supervised, except that the loss turns NaN from a chosen step on (a test fixture)."""
from semiseg.algorithms.supervised import Supervised
from semiseg.registry import register_algorithm


@register_algorithm("nan_from")
class NanFrom(Supervised):
    """The supervised baseline whose loss gets a NaN term from step ``step`` (1-based) on."""

    name = "nan_from"

    def __init__(self, step: int = 7) -> None:
        super().__init__()
        self.bad_step = step

    def step(self, model, batch, ctx):
        result = super().step(model, batch, ctx)
        if ctx.iteration + 1 >= self.bad_step:
            result.losses["blowup"] = result.losses["sup"] * float("nan")
        return result
'''


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(NAN_PLUGIN)
    run = tmp_path / "run"
    proc = run_semiseg("train", "--plugin", str(plugin), "--algo", "nan_from", "--opt", "step=7", *TINY,
                       "--iterations", "20", "--val-every", "3", "--out", str(run))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    line = only_line(proc.stderr[proc.stderr.index("error:"):])
    assert line.startswith("error: Loss is not finite at step 7 (sup=")
    assert "blowup=nan" in line and "lower --lr" in line
    assert f"the last good checkpoint is kept in {run / 'checkpoints'}" in line
    ck = load_ckpt(run / "checkpoints" / "last.pt")
    assert ck["iteration"] == 6 and ck["meta"]["algo"] == "nan_from"
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()
    assert max(r["iter"] for r in logged(run)) == 6  # nothing was logged for the bad step


# --------------------------------------------------------------------------- a checkpoint of another run


def test_foreign_checkpoint_is_refused_naming_the_difference(invoke, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--algo", "supervised", *TINY, "--iterations", "2", "--val-every", "2", "--out", run]
    first = invoke(*base)
    assert first.exit_code == 0, first.output
    last = run / "checkpoints" / "last.pt"
    before = (last.read_bytes(), (run / "config.yaml").read_text())

    cases = [
        (["--width", "0.5"], "backbone_options {'width': 0.5} (the run has {'width': 0.25})",
         "backbone_options: checkpoint has {'width': 0.25}, this run has {'width': 0.5}"),
        (["--data-opt", "num_classes=2"], "data_options", "num_classes: checkpoint has 4, this run has 2"),
        (["--algo", "fixmatch"], "algo 'fixmatch' (the run has 'supervised')",
         "algo: checkpoint has 'supervised', this run has 'fixmatch'"),
    ]
    for extra, clash, _ in cases:
        # the stored config names the contradiction first
        msg = error_line(invoke(*base, *extra, "--resume"))
        assert msg.startswith(f"--resume continues the run stored in '{run / 'config.yaml'}'"), msg
        assert clash in msg, msg
        assert (last.read_bytes(), (run / "config.yaml").read_text()) == before
    # without the stored config the checkpoint itself refuses, naming the difference
    stored = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    for extra, _, difference in cases:
        result = invoke(*base, *extra, "--resume")
        msg = error_line(result)
        assert msg.startswith(f"Checkpoint '{last}' does not fit this run ("), msg
        assert difference in msg, msg
        assert "use a new --out directory or the same settings" in msg
        debug = invoke("--debug", *base, *extra, "--resume")
        assert isinstance(debug.exception, CheckpointError)
        assert last.read_bytes() == before[0] and not (run / "config.yaml").exists()
    (run / "config.yaml").write_text(stored)
    # and without --resume the run directory is protected too
    assert "already holds a run (checkpoints, config.yaml, metrics.jsonl); pass --resume" in error_line(invoke(*base))


# --------------------------------------------------------------------------- unwritable or full output directory


def test_unwritable_output_fails_before_training(invoke, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # mkdir below a regular file fails, even for root
    msg = error_line(invoke("train", *TINY, "--iterations", "2", "--out", out))
    assert msg.startswith(f"Output directory '{out}' is not writable (") and "choose another --out" in msg
    assert not out.exists() and blocker.read_text() == "not a folder"


def test_full_disk_fails_before_training(invoke, tmp_path, monkeypatch):
    import semiseg.engine.trainer as trainer_mod

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(trainer_mod.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 10 * 2**20, 10 * 2**20))
    out = tmp_path / "run"
    msg = error_line(invoke("train", *TINY, "--iterations", "2", "--out", out))
    assert msg.startswith(f"Output directory '{out}' has only 10 MiB free (need 200 MiB"), msg
    assert "free some space or choose another --out" in msg
    assert_not_trained(out)
    assert not (out / "config.yaml").exists()


# --------------------------------------------------------------------------- bad inputs through the CLI


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
    return path


SHAPE = (20, 18, 12)


def make_la(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    """A tiny dataset in the UA-MT LA layout: <case>/mri_norm2.h5, train.list, test.list."""
    rng = np.random.default_rng(0)
    ids = [f"CASE{i:02d}" for i in range(n_train + n_test)]
    for c in ids:
        write_h5(root / c / "mri_norm2.h5", rng.normal(size=SHAPE).astype(np.float32),
                 (rng.random(SHAPE) > 0.7).astype(np.uint8))
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "test.list").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def truncated(root: Path) -> Path:
    path = root / "CASE01" / "mri_norm2.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_image(root: Path) -> Path:
    image = np.ones(SHAPE, np.float32)
    image[3, 4, 5] = np.nan
    return write_h5(root / "CASE00" / "mri_norm2.h5", image, np.zeros(SHAPE, np.uint8))


def label_seven(root: Path) -> Path:
    label = np.zeros(SHAPE, np.uint8)
    label[1, 2, 3] = 7
    return write_h5(root / "CASE00" / "mri_norm2.h5", np.zeros(SHAPE, np.float32), label)


def shape_mismatch(root: Path) -> Path:
    return write_h5(root / "CASE03" / "mri_norm2.h5", np.zeros(SHAPE, np.float32), np.zeros((20, 18, 11), np.uint8))


def empty_train_list(root: Path) -> Path:
    (root / "train.list").write_text("")
    return root / "train.list"


def overlapping_lists(root: Path) -> Path:
    (root / "test.list").write_text("CASE04\nCASE00\n")
    return root / "test.list"


LA_CASES = {
    # name: (break the dataset -> the path the sentence names, the sentence after that path, error class)
    "truncated h5": (truncated, " cannot be read (", "it is probably truncated or corrupt", DataError),
    "NaN image": (nan_image, " contains 1 NaN or Inf values; fix or remove the file.", "", DataError),
    "label 7 of 2 classes": (label_seven, " contains value 7 but the dataset has 2 classes (0..1)", "", DataError),
    "shape mismatch": (shape_mismatch, " ((20, 18, 12) vs (20, 18, 11)); re-export the label", "", DataError),
    "empty split": (empty_train_list, ".", "The train split of dataset 'la' is empty", DataError),
    "overlapping splits": (overlapping_lists, " overlap ('CASE00'); remove the shared entries", "", DataError),
}


@pytest.mark.parametrize("case", list(LA_CASES))
def test_bad_la_input_is_one_sentence(invoke, tmp_path, case):
    breaker, after, also, error = LA_CASES[case]
    root = make_la(tmp_path / "la")
    named = breaker(root)
    out = tmp_path / "run"
    args = ["train", "--data", "la", "--data-root", root, "--labeled", "2", "--iterations", "2", "--out", out,
            "--quiet"]
    msg = error_line(invoke(*args))
    assert f"'{named}'{after}" in msg or f"{named}{after}" in msg, msg
    assert also in msg
    assert msg.endswith(".")
    assert_not_trained(out)
    debug = invoke("--debug", *args)
    assert isinstance(debug.exception, error), debug.output


FLAG_CASES = {
    # name: (extra arguments, a part of the sentence, error class)
    "missing data root": (lambda tmp: ["--data", "la", "--data-root", tmp / "nowhere"],
                          "The la root '{tmp}/nowhere' does not exist or is not a folder; pass --data-root PATH",
                          DataError),
    "no data root": (lambda tmp: ["--data", "la"], "Dataset 'la' needs a root folder; pass --data-root PATH",
                     ConfigError),
    "labeled 0": (lambda tmp: [*TINY, "--labeled", "0"],
                  "--labeled must be a positive count or a fraction in (0, 1), got 0.0.", ConfigError),
    "more labeled than images": (lambda tmp: [*TINY, "--labeled", "13"],
                                 "asks for 13 labeled samples but synthetic n_train has only 12", ConfigError),
    "all labeled, nothing unlabeled": (lambda tmp: [*TINY, "--labeled", "12", "--algo", "unimatch"],
                                       "Algorithm 'unimatch' needs unlabeled data but dataset 'synthetic' has "
                                       "none; lower --labeled or use --algo supervised.", ConfigError),
    "2D backbone on 3D data": (lambda tmp: ["--backbone", "unet", "--data", "synthetic", "--dim", "3",
                                            "--data-opt", "n_train=4", "--data-opt", "n_val=1", "--labeled", "2"],
                               "Backbone 'unet' is 2D but dataset 'synthetic' is 3D; use --backbone vnet, unet3d or "
                               "monai.",
                               ConfigError),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_or_split_is_one_sentence(invoke, tmp_path, case):
    extra, sentence, error = FLAG_CASES[case]
    out = tmp_path / "run"
    args = ["train", *extra(tmp_path), "--iterations", "2", "--out", out]
    msg = error_line(invoke(*args))
    assert sentence.format(tmp=tmp_path) in msg, msg
    assert_not_trained(out)
    debug = invoke("--debug", *args)
    assert isinstance(debug.exception, error), debug.output


def test_debug_shows_the_traceback_from_the_shell(tmp_path):
    """The real command line with --debug: Python's traceback ending in the same sentence, exit code 1. (Without
    --debug the same error is one sentence and exit code 2: the in-process tests above, and the NaN test, which
    checks it on the real command line.)"""
    root = make_la(tmp_path / "la")
    bad = truncated(root)
    args = ["train", "--data", "la", "--data-root", str(root), "--labeled", "2", "--out", str(tmp_path / "run")]
    debug = run_semiseg("--debug", *args)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert f"semiseg.errors.DataError: The file '{bad}' cannot be read" in debug.stderr

