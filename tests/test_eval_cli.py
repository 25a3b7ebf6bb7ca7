"""`semiseg eval` and `semiseg predict` end to end: the report files, Dice recomputed from the saved predictions,
checkpoints, 3D sliding window, errors, and short runs on the real ACDC and LA data."""

from __future__ import annotations

import csv
import json
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from semiseg import registry
from semiseg.cli import cli
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import build_data
from semiseg.evaluation.metrics import dice

TINY_2D = [
    "--backbone", "unet", "--width", "0.25", "--patch-size", "32,32", "--data-opt", "size=[32,32]",
    "--data-opt", "n_train=12", "--data-opt", "n_val=3", "--labeled", "4", "--batch-size", "2", "--quiet",
]


def flat(text: str) -> str:
    return " ".join(text.split())


def err(res) -> str:
    """The error message of a failed command, from 'error:' on (a plugin warning may come before it)."""
    text = flat(res.stderr)
    return text[text.index("error: "):] if "error: " in text else text


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMISEG_DEBUG", "")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    """A 4-iteration synthetic 2D run (validated at 2 and 4), plus a copy of its last checkpoint whose network is
    re-initialised at random so that predictions hold every class (a 4-step network predicts mostly background,
    which would make the Dice checks trivial)."""
    root = tmp_path_factory.mktemp("eval2d")
    run = root / "run"
    res = invoke("train", *TINY_2D, "--iterations", 4, "--val-every", 2, "--out", run)
    assert res.exit_code == 0, res.output
    ck = load_ckpt(run / "checkpoints" / "last.pt")
    torch.manual_seed(1)
    net = registry.create_backbone("unet", width=0.25, in_channels=1, num_classes=4, dropout=False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    ck["model"] = net.state_dict()
    ck["meta"]["backbone_options"] = {"width": 0.25, "dropout": False}
    rand = root / "random" / "rand.pt"
    rand.parent.mkdir()
    torch.save(ck, rand)
    return run, rand


def val_cases(run):
    return build_data(TrainConfig.load(run / "config.yaml")).cases("val")


# -- the report -----------------------------------------------------------------------------------------------------
def test_eval_writes_the_report(run2d):
    run, _ = run2d
    res = invoke("eval", run, "--split", "val")
    assert res.exit_code == 0, res.output
    out = run / "eval" / "val-last"  # named by split and checkpoint
    assert f"report: {out}" in flat(res.stderr)
    assert "split 'val', last checkpoint (step 4, " in flat(res.stdout) and "last.pt): 3 cases" in flat(res.stdout)
    table = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in table] in (["1", "2", "3", "mean"],
                                                           ["crescent", "wall", "core", "mean"])

    rows = read_csv(out / "cases.csv")
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert [(r["case"], r["class"]) for r in rows] == [
        (f"val_{i:04d}", str(c)) for i in range(3) for c in (1, 2, 3)]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["jaccard"]) <= 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 3
    assert set(summary["per_class"]) == {"1", "2", "3"}
    for c in ("1", "2", "3"):
        for m in ("dice", "jaccard", "hd95", "asd"):
            assert {"mean", "std", "n", "missing"} <= set(summary["per_class"][c][m])
        values = [float(r["dice"]) for r in rows if r["class"] == c]
        assert summary["per_class"][c]["dice"]["mean"] == pytest.approx(np.mean(values))
        assert summary["per_class"][c]["dice"]["std"] == pytest.approx(np.std(values))
    assert set(summary["overall"]) == {"dice", "jaccard", "hd95", "asd"}
    assert summary["class_names"] == ["crescent", "wall", "core"]
    assert summary["spacing_mode"] == "voxel" and summary["empty_policy"] == "nan"

    preds = sorted(p.name for p in (out / "pred").iterdir())
    assert preds == ["val_0000.nii.gz", "val_0001.nii.gz", "val_0002.nii.gz"]
    assert nib.load(str(out / "pred" / preds[0])).shape == (32, 32)
    with Image.open(out / "montage.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_dice_in_summary_matches_the_saved_predictions(run2d, tmp_path):
    run, rand = run2d
    res = invoke("eval", rand, "--split", "val", "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    rows = read_csv(tmp_path / "rep" / "cases.csv")
    per_class = {c: [] for c in (1, 2, 3)}
    for case in val_cases(run):
        pred = np.asarray(nib.load(str(tmp_path / "rep" / "pred" / f"{case.name}.nii.gz")).dataobj)
        assert pred.shape == case.label.shape
        for c in per_class:
            d = dice(pred == c, case.label == c)
            per_class[c].append(d)
            row = next(r for r in rows if r["case"] == case.name and r["class"] == str(c))
            assert float(row["dice"]) == pytest.approx(d, abs=1e-12)
    assert any(v > 0 for vals in per_class.values() for v in vals), "predictions should overlap the labels"
    for c, vals in per_class.items():
        assert summary["per_class"][str(c)]["dice"]["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert summary["overall"]["dice"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in per_class.values()]))
    assert summary["mean_dice"] == summary["overall"]["dice"]["mean"]
    # the report of a checkpoint file goes beside it by default
    res = invoke("eval", rand, "--split", "val", "--save-pred", "none")
    assert res.exit_code == 0, res.output
    rep = rand.parent / "eval" / "val-rand"
    assert (rep / "summary.json").is_file() and not (rep / "pred").exists()


def test_eval_best_checkpoint_and_h5_predictions(run2d, tmp_path):
    run, _ = run2d
    best = load_ckpt(run / "checkpoints" / "best.pt")["iteration"]
    assert best in (2, 4)
    res = invoke("eval", run, "--split", "test", "--checkpoint", "best", "--save-pred", "h5", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert f"split 'test', best checkpoint (step {best}, " in flat(res.stdout)
    assert "best.pt): 3 cases" in flat(res.stdout)
    files = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert files == ["test_0000.h5", "test_0001.h5", "test_0002.h5"]
    with h5py.File(tmp_path / "pred" / files[0], "r") as f:
        pred = f["prediction"][()]
    assert pred.shape == (32, 32) and pred.max() < 4
    assert [r["case"] for r in read_csv(tmp_path / "cases.csv")][::3] == ["test_0000", "test_0001", "test_0002"]


def test_eval_empty_policy_zero_scores_every_value(run2d, tmp_path):
    run, _ = run2d
    res = invoke("eval", run, "--split", "val", "--empty", "zero", "--save-pred", "none", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    for r in read_csv(tmp_path / "cases.csv"):
        assert all(math.isfinite(float(r[m])) for m in ("dice", "jaccard", "hd95", "asd"))


# -- predict ------------------------------------------------------------------------------------------------------
def test_predict_png_nifti_and_h5(run2d, tmp_path):
    _, rand = run2d
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "a.png")
    vol = rng.random((40, 48, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 5.0, 1.0])), str(tmp_path / "b.nii.gz"))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["image"] = rng.random((5, 36, 30)).astype(np.float32)  # (D, H, W), as the ACDC files
    out = tmp_path / "pred"
    res = invoke("predict", rand, tmp_path / "a.png", tmp_path / "b.nii.gz", tmp_path / "c.h5", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.nii.gz", "c.nii.gz"]
    for name in ("a.png", "b.nii.gz", "c.nii.gz"):
        assert f"wrote {out / name}" in flat(res.stderr)
    png = np.asarray(Image.open(out / "a.png"))
    assert png.shape == (40, 48) and png.dtype == np.uint8 and png.max() <= 3  # 4 classes: class indices
    b = nib.load(str(out / "b.nii.gz"))
    assert b.shape == (40, 48, 3)
    np.testing.assert_allclose(b.affine, np.diag([1.5, 1.5, 5.0, 1.0]))
    c = np.asarray(nib.load(str(out / "c.nii.gz")).dataobj)
    assert c.shape == (5, 36, 30) and set(np.unique(c)) <= {0, 1, 2, 3}
    # --format h5 for every input; a run directory works like its best checkpoint
    res = invoke("predict", rand, tmp_path / "a.png", "--out", tmp_path / "h5", "--format", "h5")
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "h5" / "a.h5", "r") as f:
        assert f["prediction"].shape == (40, 48)


def test_predict_errors(run2d, tmp_path):
    run, _ = run2d
    res = invoke("predict", run, tmp_path / "missing.png", "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert err(res) == f"error: Input '{tmp_path / 'missing.png'}' does not exist; pass existing image files."
    (tmp_path / "x.txt").write_text("hello")
    res = invoke("predict", run, tmp_path / "x.txt", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "has an unknown type" in flat(res.stderr)


# -- errors -------------------------------------------------------------------------------------------------------
def test_eval_of_a_missing_path(tmp_path):
    res = invoke("eval", tmp_path / "nope")
    assert res.exit_code == 2
    assert err(res) == (f"error: Checkpoint '{tmp_path / 'nope'}' does not exist; pass a run directory or "
                                f"a .pt file.")
    (tmp_path / "empty_run").mkdir()
    res = invoke("eval", tmp_path / "empty_run")
    assert res.exit_code == 2 and "has no checkpoints/last.pt or best.pt; train it first." in flat(res.stderr)


def test_eval_of_a_truncated_checkpoint(run2d, tmp_path):
    run, _ = run2d
    data = (run / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    res = invoke("eval", bad)
    assert res.exit_code == 2
    msg = err(res)
    assert msg.startswith(f"error: Checkpoint '{bad}' cannot be read (")
    assert "it is truncated or not a semiseg checkpoint" in msg
    assert "Traceback" not in res.output
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    res = invoke("eval", other)
    assert res.exit_code == 2 and "is not a semiseg checkpoint" in flat(res.stderr)


def test_eval_unknown_split(run2d, tmp_path):
    run, _ = run2d
    res = invoke("eval", run, "--split", "tset", "--out", tmp_path)
    assert res.exit_code == 2
    assert "tset" in res.stderr and "Traceback" not in res.output


# -- 3D -----------------------------------------------------------------------------------------------------------
def test_eval_3d_sliding_window(tmp_path):
    run = tmp_path / "run3d"
    res = invoke("train", "--backbone", "vnet", "--width", 0.25, "--patch-size", "32,32,32",
                 "--data-opt", "size=[48,40,32]", "--data-opt", "n_train=3", "--data-opt", "n_val=2",
                 "--data-opt", "num_classes=2", "--labeled", 3, "--batch-size", 1, "--iterations", 1, "--quiet",
                 "--out", run)
    assert res.exit_code == 0, res.output
    res = invoke("eval", run, "--split", "val", "--stride", "16,8,16", "--empty", "zero")
    assert res.exit_code == 0, res.output
    rep = run / "eval" / "val-last"
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["per_class"]) == {"1"}
    assert summary["class_names"] == ["organ"]
    assert nib.load(str(rep / "pred" / "val_0000.nii.gz")).shape == (48, 40, 32)
    assert len(read_csv(rep / "cases.csv")) == 2
    assert (rep / "montage.png").is_file()


# -- real data ----------------------------------------------------------------------------------------------------
def _real_run(tmp_path, data: str, root, patch: str, extra: list[str]):
    """A 2-iteration run on real data, validated on one case (val_max_cases is a config key, not a flag)."""
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump({"val_max_cases": 1}))
    run = tmp_path / f"{data}-run"
    res = invoke("train", "--config", cfg, "--data", data, "--data-root", root, "--patch-size", patch,
                 "--width", 0.25, "--iterations", 2, "--val-every", 2, "--quiet", "--out", run, *extra)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run / "config.yaml").read_text())["val_max_cases"] == 1
    return run


def _check_real_report(out, n_classes: int, class_names: list[str]):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["class_names"] == class_names
    rows = read_csv(out / "cases.csv")
    assert len(rows) == 2 * n_classes
    for m in ("hd95", "asd"):
        values = [float(r[m]) for r in rows]
        # NaN only where a mask is empty (a 2-step network may predict no voxel of a class)
        finite = [v for v in values if math.isfinite(v)]
        assert all(v >= 0 for v in finite)
        assert summary["overall"][m]["missing"] == len(values) - len(finite)
    return summary, rows


def test_acdc_train_and_eval(shared_data, tmp_path):
    run = _real_run(tmp_path, "acdc", shared_data / "acdc", "64,64",
                    ["--labeled", 3, "--batch-size", 2, "--val-split", "val"])
    assert [r["iter"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/dice" in r] == [2]
    res = invoke("eval", run, "--split", "test", "--max-cases", 2, "--empty", "zero")
    assert res.exit_code == 0, res.output
    _, rows = _check_real_report(run / "eval" / "test-last", 3, ["RV", "Myo", "LV"])
    assert all(math.isfinite(float(r[m])) for r in rows for m in ("hd95", "asd"))  # empty scored 0
    first = rows[0]["case"]
    pred = nib.load(str(run / "eval" / "test-last" / "pred" / f"{first}.nii.gz"))
    assert pred.ndim == 3  # a whole (D, H, W) volume, predicted slice by slice
    res = invoke("eval", run, "--split", "test", "--max-cases", 2, "--save-pred", "none", "--out", tmp_path / "n")
    assert res.exit_code == 0, res.output
    _check_real_report(tmp_path / "n", 3, ["RV", "Myo", "LV"])


def test_la_train_and_eval(shared_data, tmp_path):
    run = _real_run(tmp_path, "la", shared_data / "la-half", "32,32,32", ["--labeled", 4, "--batch-size", 1])
    res = invoke("eval", run, "--split", "test", "--max-cases", 2, "--stride", "32,32,16", "--save-pred", "none")
    assert res.exit_code == 0, res.output
    summary, _ = _check_real_report(run / "eval" / "test-last", 1, ["left atrium"])
    assert summary["spacing_mode"] == "voxel"


def test_reports_of_different_splits_and_checkpoints_are_all_kept(run2d):
    run, _ = run2d
    for args in (["--split", "val"], ["--split", "test", "--checkpoint", "best"]):
        assert invoke("eval", run, *args, "--save-pred", "none").exit_code == 0
    assert (run / "eval" / "val-last" / "summary.json").is_file()
    assert (run / "eval" / "test-best" / "summary.json").is_file()
