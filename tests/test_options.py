"""Every option checked before any work: one sentence naming the option, the value and what is accepted,
through the CLI, a config file and the Python API alike."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import semiseg
from semiseg.cli import cli
from semiseg.engine.config import TrainConfig
from semiseg.errors import ConfigError

BAD = [  # (flag, value, expected words in the sentence)
    ("--val-every", "0", "--val-every 0 is out of range; it must be at least 1"),
    ("--log-every", "0", "--log-every 0 is out of range; it must be at least 1"),
    ("--workers", "-1", "--workers -1 is out of range; it must be 0 or more"),
    ("--unlabeled-batch-size", "-2", "--unlabeled-batch-size -2 is out of range"),
    ("--warmup", "-3", "--warmup -3 is out of range; it must be 0 or more"),
    ("--clip-grad", "-1", "--clip-grad -1.0 is out of range; it must be a positive norm"),
    ("--poly-total", "0", "--poly-total 0 is out of range"),
    ("--ema-decay", "5", "--ema-decay 5.0 is out of range; it must be in [0, 1]"),
    ("--width", "0", "--width 0.0 is out of range; it must be a positive multiplier"),
    ("--width", "-1", "--width -1.0 is out of range"),
    ("--nproc", "0", "--nproc must be at least 1"),
    ("--iterations", "0", "--iterations must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--lr", "-1", "--lr must be positive"),
]


@pytest.mark.parametrize("flag, value, words", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_each_option_with_a_bad_value_is_one_sentence(tmp_path, flag, value, words):
    r = CliRunner().invoke(cli, ["train", flag, value, "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("yaml_line, words", [
    ("iterations: abc", "'iterations' must be int, got 'abc'"),
    ("batch_size: 2.5", "'batch_size' must be int, got 2.5"),
    ('nesterov: "no"', "'nesterov' must be bool, got 'no'"),
    ("patch_size: [64, sixty]", "'patch_size' must be list[int] or None"),
])
def test_values_of_the_wrong_type_in_a_config_file(tmp_path, yaml_line, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_line + "\n")
    r = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output


def test_algorithm_options_of_the_wrong_type(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--algo", "crossmatch", "--opt", "threshold=high",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2
    assert "algorithm 'crossmatch': 'threshold' must be float or None, got 'high'" in " ".join(r.output.split())


def test_ema_decay_for_an_algorithm_without_an_ema_network_is_refused(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--algo", "fixmatch", "--ema-decay", "0.9", "--iterations", "1",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "--ema-decay 0.9 has nothing to act on: fixmatch keeps no EMA network" in " ".join(r.output.split())


def test_the_python_api_checks_the_same_way(tmp_path):
    with pytest.raises(ConfigError, match="--val-every 0 is out of range"):
        semiseg.train(val_every=0, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="'iterations' must be int"):
        TrainConfig(iterations="10").validate()


def test_markup_in_a_path_is_printed_literally(tmp_path):
    out = tmp_path / "a[/]b[bold]"
    r = CliRunner().invoke(cli, ["train", "--data-opt", "n_train=8", "--data-opt", "n_val=2", "--data-opt",
                                 "size=32,32", "--patch-size", "32,32", "--width", "0.25", "--iterations", "1",
                                 "--batch-size", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert str(out) in r.output
