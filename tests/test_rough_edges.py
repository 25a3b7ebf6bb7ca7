"""Rough edges a new user meets first: each gives one sentence, or just works."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from semiseg.cli import cli
from semiseg.engine.config import parse_options

TINY = ["--data-opt", "n_train=8", "--data-opt", "n_val=2", "--iterations", "1", "--batch-size", "2",
        "--val-every", "1", "--quiet"]


def train(tmp_path, *args: str):
    return CliRunner().invoke(cli, ["train", *args, *TINY, "--out", str(tmp_path / "run")])


def test_patch_size_that_the_unet_cannot_take_is_one_sentence(tmp_path):
    r = train(tmp_path, "--patch-size", "60,60", "--data-opt", "size=64,64")
    assert r.exit_code == 2
    assert "needs every side to be a multiple of 16; use e.g. --patch-size 64,64." in " ".join(r.output.split())
    assert "Traceback" not in r.output


def test_comma_separated_option_values_are_lists():
    assert parse_options(["size=64,64", "spacing=1.5,1.5,3", "name=a", "flag=true"], "--data-opt") == {
        "size": [64, 64], "spacing": [1.5, 1.5, 3], "name": "a", "flag": True}
    assert parse_options(["size=[32, 32]"], "--data-opt") == {"size": [32, 32]}


PLAIN = """
from torch import nn
from semiseg.registry import register_backbone

@register_backbone("plain")
def plain(in_channels=1, num_classes=2, **kw):
    net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
    net.dim = 2
    return net
"""


@pytest.fixture
def plain_plugin(tmp_path, clean_registry):
    path = tmp_path / "plain_backbone.py"
    path.write_text(textwrap.dedent(PLAIN))
    return str(path)


def test_backbone_without_encode_decode_trains_algorithms_that_do_not_perturb_features(tmp_path, plain_plugin):
    for algo in ("supervised", "fixmatch"):
        r = CliRunner().invoke(cli, ["--plugin", plain_plugin, "train", "--algo", algo, "--backbone", "plain",
                                     "--data-opt", "size=32,32", "--patch-size", "32,32", *TINY,
                                     "--out", str(tmp_path / algo)])
        assert r.exit_code == 0, r.output


def test_backbone_without_encode_decode_under_feature_perturbation_is_one_sentence(tmp_path, plain_plugin):
    r = CliRunner().invoke(cli, ["--plugin", plain_plugin, "train", "--algo", "unimatch", "--backbone", "plain",
                                 "--data-opt", "size=32,32", "--patch-size", "32,32", *TINY,
                                 "--out", str(tmp_path / "um")])
    assert r.exit_code == 2
    assert "perturbs features between encoder and decoder" in r.output and "Traceback" not in r.output
