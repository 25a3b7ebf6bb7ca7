"""A property-based fuzz test: random corruptions of real inputs (h5, NIfTI, PNG) and of checkpoints, fed to the
CLI. Each time: exit code 2, one line on standard error, no traceback, no file outside the output folder changed.

Bounded for CI (a few seconds per property); raise FUZZ_EXAMPLES to search longer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semiseg.cli import cli

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained 2D run and one valid file of each input kind (from the real data where it is present)."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    r = CliRunner().invoke(cli, ["train", "--data-opt", "n_train=8", "--data-opt", "n_val=1", "--data-opt",
                                 "size=32,32", "--patch-size", "32,32", "--width", "0.25", "--iterations", "1",
                                 "--batch-size", "2", "--quiet", "--out", str(run)])
    assert r.exit_code == 0, r.output
    rng = np.random.default_rng(0)
    inputs = root / "inputs"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(inputs / "slice.png")
    nib.save(nib.Nifti1Image(rng.random((32, 32, 3)).astype(np.float32), np.eye(4)), str(inputs / "vol.nii.gz"))
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc" / "data" / "patient001_frame01.h5"
    if real.is_file():
        shutil.copy(real, inputs / "case.h5")
    else:
        with h5py.File(inputs / "case.h5", "w") as f:
            f["image"] = rng.random((4, 32, 32)).astype(np.float32)
    return root, run, inputs


def corrupt(data: bytes, how: str, cut: float, seed: int) -> bytes:
    """Truncated at a fraction of the file, or replaced by garbage of a random length."""
    if how == "truncate":
        return data[: int(len(data) * cut)]
    return np.random.default_rng(seed).integers(0, 256, max(1, int(len(data) * cut)), dtype=np.uint8).tobytes()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def check_refused(result, root: Path, before: dict[str, str], out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    after = {k: v for k, v in snapshot(root).items() if not (root / k).is_relative_to(out)}
    assert after == before


@FUZZ
@given(kind=st.sampled_from(["slice.png", "vol.nii.gz", "case.h5"]), how=st.sampled_from(["truncate", "garbage"]),
       cut=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_corrupted_inputs_to_predict(world, kind, how, cut, seed):
    root, run, inputs = world
    bad = root / "bad" / kind
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(corrupt((inputs / kind).read_bytes(), how, cut, seed))
    out = root / "out"
    before = {k: v for k, v in snapshot(root).items() if not (root / k).is_relative_to(out)}
    result = CliRunner().invoke(cli, ["predict", str(run), str(bad), "--out", str(out), "--overwrite"])
    check_refused(result, root, before, out)


@FUZZ
@given(how=st.sampled_from(["truncate", "garbage"]), cut=st.floats(0.0, 0.95), seed=st.integers(0, 2**16),
       command=st.sampled_from(["predict", "eval"]))
def test_corrupted_checkpoints(world, how, cut, seed, command):
    root, run, inputs = world
    bad = root / "badckpt" / "model.pt"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(corrupt((run / "checkpoints" / "last.pt").read_bytes(), how, cut, seed))
    out = root / "out2"
    before = {k: v for k, v in snapshot(root).items() if not (root / k).is_relative_to(out)}
    args = ["predict", str(bad), str(inputs / "slice.png"), "--out", str(out), "--overwrite"] \
        if command == "predict" else ["eval", str(bad), "--out", str(out), "--save-pred", "none"]
    result = CliRunner().invoke(cli, args)
    check_refused(result, root, before, out)
