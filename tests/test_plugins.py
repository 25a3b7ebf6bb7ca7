"""The plugin interface, end to end: the example package in ``examples/semiseg-plugin-example`` installed
through its entry point and loaded as a bare file with ``--plugin``, and the errors a broken plugin gives.

Everything that loads the example plugin runs ``semiseg`` in a subprocess, so the registries of the test
process never see ``mutual`` or ``gauss`` and other tests are unaffected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from semiseg import cli as cli_mod
from semiseg.errors import SemisegError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "semiseg-plugin-example"
PLUGIN_FILE = EXAMPLE / "semiseg_plugin_example" / "plugin.py"
DIST = "semiseg-plugin-example"

TINY = ["--data", "synthetic", "--backbone", "unet", "--width", "0.25", "--patch-size", "32,32",
        "--data-opt", "size=[32,32]", "--data-opt", "n_train=12", "--data-opt", "n_val=2", "--labeled", "4",
        "--iterations", "4", "--val-every", "4", "--batch-size", "2", "--quiet"]


def env() -> dict[str, str]:
    """A wide, colourless terminal (so rich does not wrap lines) and one thread per process (2 shared cores)."""
    e = dict(os.environ, COLUMNS="250", NO_COLOR="1", OMP_NUM_THREADS="1", PIP_NO_INDEX="1",
             PIP_DISABLE_PIP_VERSION_CHECK="1")
    e.pop("SEMISEG_DEBUG", None)
    return e


def semiseg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semiseg", *args], capture_output=True, text=True, env=env(),
                          cwd=REPO_ROOT, timeout=timeout)


def installed() -> bool:
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return False
    return True


def rows(listing: str, name: str) -> list[str]:
    """The table rows of `semiseg list` whose first cell is ``name``."""
    return [line for line in listing.splitlines() if line.strip("│ ").split(" ")[0] == name]


def check_trained(run: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iteration"] == 4 and summary["last"] is not None
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_step = [r for r in logged if "loss" in r][-1]
    # both networks' edges ran and were finite
    assert {"sup_a", "sup_b", "kl_a_to_b", "kl_b_to_a"} <= set(last_step)
    assert all(torch.isfinite(torch.tensor(last_step[k])) for k in ("kl_a_to_b", "kl_b_to_a"))
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["meta"]["algo"] == "mutual" and ck["iteration"] == 4
    # the plugin's second network is trained, saved and evaluated by the unchanged engine
    assert set(ck["networks"]) == {"partner"} and ck["meta"]["eval_network"] == "model+partner"
    assert not all(torch.equal(ck["model"][k], ck["networks"]["partner"][k]) for k in ck["model"])
    assert [g["network"] for g in ck["optimizer"]["param_groups"]] == ["model", "partner"]


# --------------------------------------------------------------------------- installed through the entry point


@pytest.fixture
def example_installed():
    """``pip install -e`` the example (offline, no dependencies), and always uninstall it afterwards."""
    if installed():
        pytest.skip(f"{DIST} is already installed in this environment; not touching someone else's install")
    pip = [sys.executable, "-m", "pip"]
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE)],
                          capture_output=True, text=True, env=env(), timeout=180)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", DIST], capture_output=True, text=True, env=env(), timeout=120)
        assert not installed()


def test_installed_plugin_lists_and_trains(example_installed, tmp_path):
    listing = semiseg("list")
    assert listing.returncode == 0, listing.stderr
    (mutual,), (gauss,) = rows(listing.stdout, "mutual"), rows(listing.stdout, "gauss")
    assert f"plugin:{DIST}" in mutual and "Deep mutual learning" in mutual
    assert f"plugin:{DIST}" in gauss and "per-channel std" in gauss
    assert "semiseg_plugin_example.plugin" in listing.stdout.splitlines()[-1]  # "plugins loaded: ..."
    run = tmp_path / "run"
    check_trained(run, semiseg("train", "--algo", "mutual", *TINY, "--out", str(run)))


# --------------------------------------------------------------------------- the same file through --plugin


def test_plugin_file_lists_and_trains(tmp_path):
    if installed():
        pytest.skip(f"{DIST} is installed: --plugin would register its names a second time")
    listing = semiseg("--plugin", str(PLUGIN_FILE), "list")
    assert listing.returncode == 0, listing.stderr
    (mutual,), (gauss,) = rows(listing.stdout, "mutual"), rows(listing.stdout, "gauss")
    assert "plugin:plugin.py" in mutual and "plugin:plugin.py" in gauss
    run = tmp_path / "run"
    proc = semiseg("train", "--plugin", str(PLUGIN_FILE), "--algo", "mutual", *TINY, "--out", str(run))
    check_trained(run, proc)
    # evaluated from the CLI: the ensemble by default, one network on request, an unknown one refused
    for extra, network in (((), "model+partner"), (("--eval-net", "partner"), "partner")):
        ev = semiseg("--plugin", str(PLUGIN_FILE), "eval", str(run), "--split", "val", "--save-pred", "none",
                     *extra)
        assert ev.returncode == 0, ev.stderr
        report = sorted((run / "eval").glob("val-last*/summary.json"))[-1]
        assert json.loads(report.read_text())["network"] == network
    ev = semiseg("--plugin", str(PLUGIN_FILE), "eval", str(run), "--split", "val", "--eval-net", "teacher")
    assert ev.returncode == 2 and "names no network of this algorithm" in ev.stderr
    assert str(PLUGIN_FILE) in (run / "config.yaml").read_text()  # the run records what it needs to rerun


# --------------------------------------------------------------------------- the plugin's parts, unregistered


@pytest.fixture
def plugin_module(monkeypatch):
    """plugin.py executed with no-op register decorators, so this process's registries stay as they are."""
    import importlib.util

    from semiseg import registry

    registry.ALGORITHMS.names()  # load the built-ins first: they must register for real
    keep = lambda name=None, **kw: (lambda obj: obj)  # noqa: E731
    monkeypatch.setattr(registry, "register_algorithm", keep)
    monkeypatch.setattr(registry, "register_perturbation", keep)
    spec = importlib.util.spec_from_file_location("_semiseg_example_plugin_under_test", PLUGIN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gauss_is_noise_scaled_by_the_channel_std(plugin_module):
    gauss = plugin_module.std_scaled_gaussian_noise
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 8, 8) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1), torch.randn(2, 5, 1, 1)]
    out = gauss(0.3)(feats, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for f, o in zip(feats, out):
        std = f.std(dim=(2, 3), keepdim=True, correction=0)
        expected = f + torch.randn(f.shape, generator=g) * 0.3 * std
        torch.testing.assert_close(o, expected)
    assert torch.equal(out[1], feats[1])  # a 1x1 map has std 0: unchanged, not NaN
    rel = [((o - f).std(dim=(0, 2, 3)) / f.std(dim=(0, 2, 3))) for f, o in zip(feats[:1], out[:1])][0]
    assert torch.allclose(rel, torch.full((3,), 0.3), rtol=0.35)  # equally strong on every channel's scale
    assert all(torch.equal(a, b) for a, b in zip(gauss(0.0)(feats), feats))
    with pytest.raises(SemisegError, match="non-negative"):
        gauss(-0.1)


def test_mutual_graph(plugin_module):
    algo = plugin_module.MutualLearning(partner_perturb="noise:0.1", partner_width=0.5)  # 'gauss' unregistered
    assert algo.needs == ("labeled", "unlabeled")
    assert [(s.name, s.view, s.perturb, s.group, s.network) for s in algo.streams] == [
        ("A_x", "x", "none", "a", "model"), ("A_u", "u_w", "none", "a", "model"),
        ("B_x", "x", "none", "b", "partner"), ("B_u", "u_w", "noise:0.1", "b", "partner")]
    assert [(e.student, e.teacher, e.loss, e.weight) for e in algo.edges] == [
        ("A_x", "y", "sup", 1.0), ("B_x", "y", "sup", 1.0), ("A_u", "B_u", "kl", 1.0), ("B_u", "A_u", "kl", 1.0)]
    nets = algo.networks()
    assert list(nets) == ["model", "partner"] and nets["partner"].backbone_options == {"width": 0.5}
    with pytest.raises(SemisegError, match="kl_weight"):
        plugin_module.MutualLearning(kl_weight=-1, partner_perturb="noise:0.1")
    with pytest.raises(SemisegError, match="partner_width"):
        plugin_module.MutualLearning(partner_width=0, partner_perturb="noise:0.1")


# --------------------------------------------------------------------------- errors (in-process: nothing loads)


@pytest.fixture
def invoke(monkeypatch):
    """Run the CLI in this process; the error console is made wide so a sentence stays on one line."""
    monkeypatch.setattr(cli_mod, "console", Console(stderr=True, width=1000, no_color=True))
    monkeypatch.delenv("SEMISEG_DEBUG", raising=False)

    def run(*args: str):
        return CliRunner().invoke(cli_mod.cli, list(args), env={"SEMISEG_DEBUG": None})

    return run


def one_error_line(result) -> str:
    """The exit code is 2 and the output is one ``error:`` sentence, without a traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_plugin_file_or_module(invoke, tmp_path):
    missing = tmp_path / "nowhere" / "plugin.py"
    line = one_error_line(invoke("--plugin", str(missing), "list"))
    assert f"Plugin file '{missing}' does not exist" in line
    line = one_error_line(invoke("train", "--plugin", str(missing), "--algo", "mutual"))
    assert "does not exist" in line
    line = one_error_line(invoke("--plugin", "semiseg_no_such_plugin_module", "list"))
    assert "Plugin module 'semiseg_no_such_plugin_module' cannot be imported" in line
    assert "No module named 'semiseg_no_such_plugin_module'" in line


def test_plugin_that_fails_to_import(invoke, tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import semiseg_dependency_that_is_not_installed\n")
    line = one_error_line(invoke("--plugin", str(broken), "list"))
    assert str(broken) in line and "semiseg_dependency_that_is_not_installed" in line


def test_debug_shows_the_exception(invoke, tmp_path):
    missing = tmp_path / "plugin.py"
    result = invoke("--debug", "--plugin", str(missing), "list")
    assert isinstance(result.exception, SemisegError)  # raised, not printed: Python shows the traceback
    assert result.exc_info is not None and result.exc_info[2] is not None


def test_unknown_algorithm_lists_close_matches(invoke, tmp_path):
    line = one_error_line(invoke("train", "--algo", "unimach", *TINY, "--out", str(tmp_path / "run")))
    assert "Unknown algorithm 'unimach'. Did you mean 'unimatch'" in line
    assert "(see `semiseg list`)" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

