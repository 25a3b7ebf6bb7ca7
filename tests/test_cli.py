"""The command line end to end: version, list, short real trainings (2D, smp, 3D CrossMatch), config reruns,
resume, and the one-line errors (exit 2, no traceback) for bad flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from semiseg import __version__
from semiseg.cli import cli

# Tiny synthetic 2D run: 12 training images of 32x32 (4 labeled), 2 validation images, a quarter-width U-Net.
TINY_2D = [
    "--backbone", "unet", "--width", "0.25", "--patch-size", "32,32", "--data-opt", "size=[32,32]",
    "--data-opt", "n_train=12", "--data-opt", "n_val=2", "--labeled", "4", "--batch-size", "2", "--quiet",
]


def flat(text: str) -> str:
    """Console output with its soft line breaks undone, for substring checks."""
    return " ".join(text.split())


def err(res) -> str:
    """The error message of a failed command, from 'error:' on (a plugin warning may come before it)."""
    text = flat(res.stderr)
    return text[text.index("error: "):] if "error: " in text else text


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ckpt_iteration(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["iteration"])


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch, tmp_path):
    """No SEMISEG_DEBUG from the environment, and default run folders in tmp_path."""
    monkeypatch.setenv("SEMISEG_DEBUG", "")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    """One real 4-iteration training from the CLI, shared by the tests that rerun or resume it."""
    run = tmp_path_factory.mktemp("cli") / "run"
    res = invoke("train", *TINY_2D, "--iterations", 4, "--val-every", 4, "--out", run)
    assert res.exit_code == 0, res.output
    return run, res


# -- basics -------------------------------------------------------------------------------------------------------
def test_version():
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"semiseg, version {__version__}"


def test_help_lists_the_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("train", "eval", "predict", "list"):
        assert cmd in res.stdout


def test_list_shows_every_table():
    res = invoke("list")
    assert res.exit_code == 0, res.output
    out = res.stdout
    for title in ("algorithms", "backbones", "datasets", "perturbations", "policies", "presets"):
        assert title in out

    def names_in(section: str, next_section: str) -> str:
        return out.split(section, 1)[1].split(next_section, 1)[0]

    algos = names_in("algorithms", "backbones")
    for name in ("supervised", "fixmatch", "unimatch", "crossmatch", "meanteacher", "uamt", "bcp", "em", "ict",
                 "cps", "cct", "urpc", "abd", "admt"):
        assert f"│ {name} " in algos
    backbones = names_in("backbones", "datasets")
    for name in ("unet", "vnet", "unet3d", "smp"):
        assert f"│ {name} " in backbones
    datasets = names_in("datasets", "perturbations")
    for name in ("synthetic", "acdc", "la", "nifti", "folder2d"):
        assert f"│ {name} " in datasets
    assert "medical2d" in names_in("policies", "presets") and "medical3d" in names_in("policies", "presets")
    assert "│ semiseg" in out  # the origin column
    assert "plugins loaded:" in out


# -- training -----------------------------------------------------------------------------------------------------
def test_train_writes_config_metrics_and_checkpoints(run2d):
    run, res = run2d
    assert "semiseg supervised on synthetic (2D, 4 classes, 4 labeled / 8 unlabeled)" in flat(res.stderr)
    assert "done: last val dice" in flat(res.stderr)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["iterations"] == 4 and cfg["labeled"] == 4 and cfg["patch_size"] == [32, 32]
    assert cfg["backbone"] == "unet" and cfg["backbone_options"] == {"width": 0.25}
    assert cfg["data_options"] == {"size": [32, 32], "n_train": 12, "n_val": 2, "dim": 2}
    assert cfg["out"] == str(run)
    rows = metrics(run)
    assert [r["iter"] for r in rows if "loss" in r] == [4]  # log every 10, and the last step
    val = [r for r in rows if "val/dice" in r]
    assert [r["iter"] for r in val] == [4]
    assert set(val[0]) >= {"val/dice_crescent", "val/dice_wall", "val/dice_core"}
    assert ckpt_iteration(run / "checkpoints" / "last.pt") == 4
    assert (run / "checkpoints" / "best.pt").is_file()
    assert (run / "summary.json").is_file() and (run / "curves.png").is_file()


def test_rerun_from_config_with_overrides(run2d, tmp_path):
    run, _ = run2d
    other = tmp_path / "other"
    res = invoke("train", "--config", run / "config.yaml", "--iterations", 6, "--val-every", 3, "--out", other,
                 "--quiet")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    assert cfg["iterations"] == 6 and cfg["val_every"] == 3 and cfg["out"] == str(other)  # the flags win
    orig = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("labeled", "patch_size", "backbone", "backbone_options", "data_options", "batch_size", "seed"):
        assert cfg[key] == orig[key], key  # everything else comes from the file
    assert [r["iter"] for r in metrics(other) if "val/dice" in r] == [3, 6]
    assert ckpt_iteration(other / "checkpoints" / "last.pt") == 6


def test_rerun_into_an_existing_run_is_refused(run2d):
    run, _ = run2d
    before = (run / "metrics.jsonl").read_text()
    res = invoke("train", "--config", run / "config.yaml")  # the config's out is the run itself
    assert res.exit_code == 2
    msg = err(res)
    assert f"error: Run directory '{run}' already holds a run (checkpoints, config.yaml, metrics.jsonl); pass " \
           f"--resume to continue it or choose another --out." == msg
    res = invoke("train", *TINY_2D, "--iterations", 4, "--out", run)
    assert res.exit_code == 2 and "already holds a run" in flat(res.stderr)
    assert (run / "metrics.jsonl").read_text() == before  # nothing was touched


def test_resume_continues_the_run(run2d, tmp_path):
    src, _ = run2d
    run = tmp_path / "resumed"
    shutil.copytree(src, run)
    res = invoke("train", "--config", run / "config.yaml", "--out", run, "--iterations", 6, "--val-every", 2,
                 "--resume")
    assert res.exit_code == 0, res.output
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step 4" in res.stdout
    rows = metrics(run)
    assert [r["iter"] for r in rows if "val/dice" in r] == [4, 6]  # the old row kept, one new validation
    assert ckpt_iteration(run / "checkpoints" / "last.pt") == 6
    # resuming a finished run is a no-op, not a retraining
    res = invoke("train", "--config", run / "config.yaml", "--out", run, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert len(metrics(run)) == len(rows)


def test_train_smp_backbone(tmp_path):
    run = tmp_path / "smp"
    res = invoke("train", "--backbone", "smp", "--arch", "Unet", "--encoder", "resnet18", "--patch-size", "64,64",
                 "--data-opt", "size=[64,64]", "--data-opt", "n_train=4", "--data-opt", "n_val=1", "--labeled", 2,
                 "--batch-size", 2, "--iterations", 2, "--quiet", "--out", run)
    assert res.exit_code == 0, res.output
    assert "backbone smp" in flat(res.stderr)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["backbone_options"] == {"arch": "Unet", "encoder": "resnet18"}
    assert ckpt_iteration(run / "checkpoints" / "last.pt") == 2


def test_train_crossmatch_vnet_3d(tmp_path):
    run = tmp_path / "cm3d"
    res = invoke("train", "--algo", "crossmatch", "--backbone", "vnet", "--width", 0.25,
                 "--patch-size", "32,32,32", "--data-opt", "size=[32,32,32]", "--data-opt", "n_train=4",
                 "--data-opt", "n_val=1", "--labeled", 2, "--batch-size", 1, "--iterations", 2, "--quiet",
                 "--out", run)
    assert res.exit_code == 0, res.output
    assert "crossmatch on synthetic (3D, 4 classes, 2 labeled / 2 unlabeled), backbone vnet" in flat(res.stderr)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data_options"]["dim"] == 3  # chosen from the 3D backbone
    rows = metrics(run)
    assert rows[-1]["iter"] == 2 and 0.0 <= rows[-1]["val/dice"] <= 1.0
    assert {"loss/sup"} <= set(next(r for r in rows if "loss" in r))
    assert ckpt_iteration(run / "checkpoints" / "last.pt") == 2


# -- errors: one line on stderr, exit 2, no traceback -----------------------------------------------------------
BASE = ["train", *TINY_2D, "--iterations", "1"]
SMP_64 = ["--backbone", "smp", "--patch-size", "64,64", "--data-opt", "size=[64,64]"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--algo", "crossmach"], "Unknown algorithm 'crossmach'. Did you mean 'crossmatch'"),
        (["--algo", "fixmatch", "--opt", "tresh=0.9"],
         "algorithm 'fixmatch' does not take option 'tresh' (did you mean 'threshold'?)"),
        (["--opt", "eta"], "--opt expects key=value, got 'eta'; e.g. --opt eta=0.3."),
        (["--data-opt", "n_val"], "--data-opt expects key=value, got 'n_val'"),
        (["--patch-size", "abc"], "Size 'abc' is not a list of integers; write e.g. 128,128 or 64x64x32."),
        (["--iterations", "0"], "--iterations must be at least 1, got 0."),
        (["--backbone", "unett"], "Unknown backbone 'unett'. Did you mean 'unet'"),
        (["--backbone", "unet", "--backbone-opt", "widht=0.5"],
         "backbone 'unet' does not take option 'widht' (did you mean 'width'?)"),
        (["--data-opt", "nval=3"], "dataset 'synthetic' does not take option 'nval' (did you mean 'n_val'?)"),
        (["--data", "synthetc"], "Unknown dataset 'synthetc'. Did you mean 'synthetic'"),
        (["--labeled", "0"], "--labeled must be a positive count or a fraction in (0, 1), got 0.0."),
        (["--config", "missing.yaml"], "Config file 'missing.yaml' does not exist"),
        (["--backbone", "vnet", "--dim", "2"], "Backbone 'vnet' is 3D but dataset 'synthetic' is 2D"),
    ],
)
def test_bad_flags_give_one_line_errors(args, expected, tmp_path):
    res = invoke(*BASE, *args, "--out", tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    msg = err(res)
    assert msg.startswith("error: ") and expected in msg
    assert msg.count("error:") == 1
    assert len([line for line in res.stderr.splitlines() if not line.startswith("warning: plugin")]) == 1
    assert "Traceback" not in res.output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_device_cuda_without_gpu(tmp_path):
    res = invoke(*BASE, "--device", "cuda", "--out", tmp_path / "run")
    assert res.exit_code == 2
    assert err(res) == ("error: --device cuda was asked for but no CUDA GPU is visible; use --device cpu "
                                "or auto.")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--encoder", "resnet19"], "Unknown smp encoder 'resnet19'. Did you mean 'resnet18'"),
        (["--encoder", "tu-resnet10q"], "Unknown timm encoder 'tu-resnet10q'. Did you mean"),
        (["--arch", "Unett", "--encoder", "resnet18"], "Unknown smp architecture 'Unett'. Did you mean 'Unet'"),
        (["--width", "0.5"], "backbone 'smp' does not take option 'width'"),
    ],
)
def test_bad_smp_flags(args, expected, tmp_path):
    res = invoke(*[a for a in BASE if a not in ("--width", "0.25")], *SMP_64, *args, "--out", tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert expected in flat(res.stderr)
    assert "Traceback" not in res.output


def test_click_usage_errors_exit_2():
    res = invoke("train", "--optimizer", "adam")
    assert res.exit_code == 2
    assert "Invalid value for '--optimizer'" in res.stderr
    res = invoke("train", "--no-such-flag")
    assert res.exit_code == 2 and "No such option '--no-such-flag'" in res.stderr


def test_debug_raises_instead_of_summarizing(tmp_path):
    res = invoke("--debug", *BASE, "--algo", "crossmach", "--out", tmp_path / "run")
    assert res.exit_code == 1
    assert type(res.exception).__name__ == "ConfigError"
    assert "Unknown algorithm 'crossmach'" in str(res.exception)
    assert res.exc_info[2] is not None


def test_debug_shows_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "semiseg", "--debug", "train", "--algo", "crossmach", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SEMISEG_DEBUG": ""})
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert "semiseg.errors.ConfigError: Unknown algorithm 'crossmach'" in res.stderr


def test_error_is_one_physical_line(tmp_path):
    """No wrapping at the console width, even for a long message going to a pipe or a file."""
    res = invoke(*BASE, "--algo", "crossmach", "--out", tmp_path / "run")
    assert res.exit_code == 2
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("warning: plugin")]
    assert len(lines) == 1 and len(lines[0]) > 100, res.stderr


def test_error_text_is_not_taken_as_markup(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("iterations: 2\nfoo: 1\n'[bold]': 2\n")
    res = invoke("train", "--config", cfg)
    assert res.exit_code == 2
    assert f"error: Config file '{cfg}' has unknown keys ['[bold]', 'foo']; known keys are: " in err(res)
