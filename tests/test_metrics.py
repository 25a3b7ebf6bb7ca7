"""Metrics equal medpy's, the empty-mask policy, summaries and the written report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from semiseg.data.base import Case
from semiseg.evaluation import metrics as M
from semiseg.evaluation.report import evaluate_cases

mb = pytest.importorskip("medpy.metric.binary")


def medpy_all(p, g, spacing=None):
    return (mb.dc(p, g), mb.jc(p, g), mb.hd95(p, g, spacing), mb.asd(p, g, spacing))


def ours_all(p, g, spacing=None):
    return (M.dice(p, g), M.jaccard(p, g), M.hd95(p, g, spacing), M.asd(p, g, spacing))


def assert_same(p, g, spacing=None):
    ref = medpy_all(p, g, spacing)
    M._LAST[0] = None  # no cached distances: compute afresh
    got = ours_all(p, g, spacing)
    assert got == ref, (got, ref)  # bit-identical
    one = M.binary_metrics(p, g, spacing)
    assert (one["dice"], one["jaccard"], one["hd95"], one["asd"]) == ref


def blob(rng, shape, density=None):
    a = rng.random(shape) < (density if density is not None else rng.uniform(0.005, 0.2))
    return ndimage.binary_dilation(a, iterations=int(rng.integers(0, 3)))


@pytest.fixture(params=["auto", "kd", "edt"])
def search(request, monkeypatch):
    """Run a test with the automatic nearest-surface search and with each of the two searches forced."""
    if request.param != "auto":

        def forced(sp, sg, sampling):
            if request.param == "edt":
                return M._directed_edt(sp, sg, sampling), M._directed_edt(sg, sp, sampling)
            a, b = np.argwhere(sp), np.argwhere(sg)
            return M._directed_kd(a, b, sampling), M._directed_kd(b, a, sampling)

        monkeypatch.setattr(M, "_both_directions", forced)
    return request.param


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("with_spacing", [False, True])
def test_random_blobs_equal_medpy(ndim, with_spacing, search):
    rng = np.random.default_rng(ndim * 10 + with_spacing)
    done = 0
    while done < 25:
        shape = tuple(int(s) for s in rng.integers(4, 28, size=ndim))
        p, g = blob(rng, shape), blob(rng, shape)
        if not p.any() or not g.any():
            continue
        spacing = tuple(rng.uniform(0.3, 3.0, size=ndim)) if with_spacing else None
        assert_same(p, g, spacing)
        done += 1


def test_spacing_forms():
    rng = np.random.default_rng(3)
    p, g = blob(rng, (20, 18, 9), 0.05), blob(rng, (20, 18, 9), 0.05)
    assert_same(p, g, (0.625, 0.625, 0.625))
    assert_same(p, g, 1.5)  # a scalar spacing applies to every axis, as in medpy
    assert_same(p, g, [1.5, 1.5, 10.0])


def test_border_touching_and_full_masks(search):
    g = np.zeros((12, 10, 8), bool)
    g[:5, :, 2:6] = True  # touches three image borders
    p = np.zeros_like(g)
    p[3:, 4:, :] = True  # touches the far borders
    assert_same(p, g)
    assert_same(p, g, (0.7, 1.3, 2.0))
    full = np.ones((9, 7), bool)  # the whole image: its surface is the image border
    part = np.zeros((9, 7), bool)
    part[2:5, 3:] = True
    assert_same(full, part)
    assert_same(part, full, (2.0, 0.5))
    assert_same(full, full)


def test_single_voxels(search):
    a = np.zeros((15, 11, 9), bool)
    b = np.zeros_like(a)
    a[3, 4, 5] = True
    b[10, 0, 8] = True  # on the border
    assert_same(a, b)
    assert_same(a, b, (1.0, 2.0, 3.0))
    assert_same(a, a)
    c = blob(np.random.default_rng(0), a.shape, 0.02)
    assert_same(a, c)
    assert_same(c, b, (0.5, 0.5, 4.0))
    one_d = np.zeros(10, bool)
    one_d[[2, 7]] = True
    assert_same(one_d, np.roll(one_d, 1))


def test_non_boolean_inputs():
    rng = np.random.default_rng(5)
    p = blob(rng, (16, 16), 0.05).astype(np.uint8) * 3
    g = blob(rng, (16, 16), 0.05).astype(np.float32)
    assert_same(p, g)


def test_cache_is_keyed_on_content():
    rng = np.random.default_rng(6)
    p, g = blob(rng, (20, 20, 10), 0.03), blob(rng, (20, 20, 10), 0.03)
    M.hd95(p, g)
    p[:2] = True  # changed in place: the next call must not reuse the previous distances
    assert M.asd(p, g) == mb.asd(p, g)
    assert M.hd95(p, g, (1.0, 1.0, 2.0)) == mb.hd95(p, g, (1.0, 1.0, 2.0))


def test_real_la_label(shared_data):
    h5py = pytest.importorskip("h5py")
    cases = sorted((shared_data / "la-half").glob("*/mri_norm2.h5"))
    assert cases, "no LA cases found"
    with h5py.File(cases[0], "r") as f:
        gt = f["label"][:] > 0
    pred = np.roll(ndimage.binary_erosion(gt, iterations=2), (2, -1, 1), axis=(0, 1, 2))
    pred[:3, :3, :3] = True  # a false positive island in the corner (touches the border)
    assert_same(pred, gt)
    assert_same(pred, gt, (1.25, 1.25, 1.25))


def test_real_acdc_label(shared_data):
    h5py = pytest.importorskip("h5py")
    with h5py.File(shared_data / "acdc" / "data" / "patient001_frame01.h5", "r") as f:
        gt = f["label"][:]
    pred = np.roll(gt, 2, axis=1)
    pred[ndimage.binary_dilation(gt == 2) & (gt == 0)] = 2
    rows = M.case_metrics(pred, gt, 4)
    for c in (1, 2, 3):
        ref = medpy_all(pred == c, gt == c)
        assert (rows[c]["dice"], rows[c]["jaccard"], rows[c]["hd95"], rows[c]["asd"]) == ref
        assert rows[c]["empty"] == "none"


def test_empty_policies():
    z = np.zeros((6, 6, 6), bool)
    x = z.copy()
    x[2:4, 2:4, 2:4] = True
    # both empty
    assert M.binary_metrics(z, z) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    assert M.binary_metrics(z, z, empty="zero") == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}
    # exactly one empty
    for p, g in ((z, x), (x, z)):
        r = M.binary_metrics(p, g)
        assert r["dice"] == 0.0 and r["jaccard"] == 0.0 and math.isnan(r["hd95"]) and math.isnan(r["asd"])
        assert M.binary_metrics(p, g, empty="zero") == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}
        assert math.isnan(M.hd95(p, g)) and M.asd(p, g, empty="zero") == 0.0
    # dice/jaccard alone: 1.0 when both are empty, as medpy's code intends (jc does; with numpy >= 2 its dc
    # divides numpy integers and returns NaN with a warning instead of catching ZeroDivisionError)
    assert M.dice(z, z) == 1.0 and M.jaccard(z, z) == mb.jc(z, z) == 1.0
    assert M.empty_kind(z, x) == "pred" and M.empty_kind(x, z) == "gt" and M.empty_kind(z, z) == "both"
    with pytest.raises(ValueError):
        M.surface_distances(z, x)
    with pytest.raises(ValueError):
        M.binary_metrics(x, x, empty="skip")


def test_case_metrics_and_summarize():
    gt = np.zeros((10, 12, 12), np.uint8)
    gt[2:8, 2:6, 2:6] = 1
    gt[2:8, 7:11, 7:11] = 2
    pred_a = gt.copy()
    pred_b = gt.copy()
    pred_b[pred_b == 2] = 0  # class 2 missed entirely
    pred_b[0, 0, 0] = 3  # class 3 predicted where the ground truth has none
    ra = M.case_metrics(pred_a, gt, 4)
    rb = M.case_metrics(pred_b, gt, 4)
    assert ra[1]["dice"] == 1.0 and ra[3]["empty"] == "both" and ra[3]["dice"] == 1.0
    assert rb[2]["empty"] == "pred" and math.isnan(rb[2]["hd95"]) and rb[3]["empty"] == "gt"
    s = M.summarize([ra, rb])
    assert s["num_cases"] == 2
    assert s["per_class"]["2"]["dice"]["mean"] == 0.5
    assert s["per_class"]["2"]["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1, "missing": 1}
    assert s["overall"]["hd95"]["missing"] == 2
    assert s["empty"] == {"none": 3, "pred": 1, "gt": 1, "both": 1}
    assert s["mean_dice"] == pytest.approx(np.mean([1.0, 0.5, 0.5]))
    z = M.summarize([M.case_metrics(pred_b, gt, 4, empty="zero")])
    assert z["per_class"]["2"]["hd95"]["missing"] == 0 and z["mean_dice"] == pytest.approx(1 / 3)
    assert math.isnan(M.summarize([])["mean_dice"])


def test_evaluate_cases_writes_report(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        label = np.zeros((16, 14, 10), np.uint8)
        label[3:12, 3:10, 2:8] = 1
        label[5:9, 5:8, 3:6] = 2
        image = (label + rng.normal(0, 0.3, label.shape)).astype(np.float32)[None]
        affine = np.diag([0.5, 0.5, 2.0, 1.0]) if i == 0 else None
        cases.append(
            Case(f"c{i}", image, label, spacing=(0.5, 0.5, 2.0), affine=affine, meta={"axes": "WHD"})
        )
    cases.append(Case("nolabel", cases[0].image, None, spacing=(0.5, 0.5, 2.0)))

    def predict(image):
        pred = np.round(image[0]).clip(0, 2).astype(np.int64)
        if image is cases[2].image:
            pred[pred == 2] = 0  # one case misses class 2
        return pred

    out = tmp_path / "report"
    s = evaluate_cases(predict, cases, 3, spacing_mode="mm", out_dir=out, save_pred="nifti", montage=2)
    with open(out / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert [r["class"] for r in rows] == ["1", "2"] * 3
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert rows[-1]["hd95"] == "nan" and float(rows[-1]["dice"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_class"]["2"]["hd95"]["missing"] == 1 and summary["cases_without_label"] == 1
    assert summary["empty"]["pred"] == 1 and summary["spacing_mode"] == "mm"
    assert s["mean_dice"] == pytest.approx(summary["mean_dice"]) and len(s["rows"]) == 6
    img = nib.load(str(out / "pred" / "c0.nii.gz"))
    np.testing.assert_allclose(img.affine, np.diag([0.5, 0.5, 2.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(img.dataobj), predict(cases[0].image))
    assert (out / "pred" / "nolabel.nii.gz").exists()
    assert (out / "montage.png").stat().st_size > 1000

    h5 = evaluate_cases(predict, cases[:1], 3, out_dir=tmp_path / "h5", save_pred="h5", montage=0)
    assert (tmp_path / "h5" / "pred" / "c0.h5").exists() and not (tmp_path / "h5" / "montage.png").exists()
    assert h5["spacing_mode"] == "voxel" and h5["mean_dice"] > 0.5
    # in memory only, zero policy
    mem = evaluate_cases(predict, cases[:3], 3, empty="zero")
    assert mem["per_class"]["2"]["hd95"]["missing"] == 0
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError):
        evaluate_cases(predict, [Case("x", cases[0].image, cases[0].label)], 3, spacing_mode="mm")
