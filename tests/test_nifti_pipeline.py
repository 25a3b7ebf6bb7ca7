"""NIfTI in and out on real geometry: LA volumes written with anisotropic spacings and a non-canonical affine
(and as nnU-Net two-channel files), trained on, evaluated and predicted; every output must open on its input's
grid, with its input's affine, and a structure must land where the label file has it in world coordinates."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from semiseg.data import preprocessing as pp
from semiseg.data.nifti import nifti
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer
from semiseg.errors import DataError
from semiseg.evaluation import predict, runs
from tests.conftest import shared_data_dir

CROP = (48, 40, 24)
# per case: in-plane and through-plane spacing (mm); z is over 3x the in-plane spacing, so resampling takes
# nnU-Net's separate-axis path, and the spacings differ, so the plan's median resamples most cases
SPACINGS = [(1.25, 4.0), (1.0, 4.0), (1.25, 5.0), (1.0, 4.0), (1.25, 4.0), (1.0, 5.0)]


def la_volumes(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    root = shared_data_dir() / "la-half"
    if not root.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data folder {root} is absent; CI must provide it")
        pytest.skip(f"shared data folder {root} is absent")
    ids = (root / "train.list").read_text().split()[:n]
    out = []
    for case in ids:
        with h5py.File(root / case / "mri_norm2.h5", "r") as f:
            image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"], np.uint8)
        c = [int(round(m)) for m in np.argwhere(label > 0).mean(0)]  # crop around the atrium
        lo = [min(max(0, m - s // 2), d - s) for m, s, d in zip(c, CROP, image.shape)]
        window = tuple(slice(a, a + s) for a, s in zip(lo, CROP))
        out.append((image[window], label[window]))
    return out


def file_affine(shape: tuple[int, int, int], inplane: float, z: float) -> np.ndarray:
    """The affine of an array stored as ``to_file(a)``: axes (Z flipped, X flipped, Y), i.e. 'ILA'."""
    x, _, zz = shape
    aff = np.zeros((4, 4))
    aff[:3, 0] = [0, 0, -z]
    aff[:3, 1] = [-inplane, 0, 0]
    aff[:3, 2] = [0, inplane, 0]
    aff[:3, 3] = [-30.0 + inplane * (x - 1), 12.0, 40.0 + z * (zz - 1)]
    aff[3, 3] = 1
    return aff


def to_file(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.flip(np.transpose(a, (2, 0, 1)), axis=(0, 1)))


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_dataset(root: Path, channels: int = 1, labels_json: bool = True, n_test: int = 2) -> Path:
    vols = la_volumes(len(SPACINGS))
    for i, ((image, label), (inplane, z)) in enumerate(zip(vols, SPACINGS)):
        aff = file_affine(image.shape, inplane, z)
        test = i >= len(SPACINGS) - n_test
        name = f"la_{i:03d}"
        folder = root / ("imagesTs" if test else "imagesTr")
        for c in range(channels):  # a second channel: a different contrast of the same scan
            ch = image if c == 0 else np.sqrt(np.abs(image)) * 3 + 1
            if channels == 1:
                save(folder / f"{name}.nii.gz", to_file(ch), aff)
            else:
                save(folder / f"{name}_{c:04d}.nii.gz", to_file(ch), aff)
        save(root / ("labelsTs" if test else "labelsTr") / f"{name}.nii.gz", to_file(label), aff)
    meta = {"channel_names": {str(c): ["MRI", "T2"][c] for c in range(channels)}}
    if labels_json:
        meta["labels"] = {"background": 0, "left atrium": 1}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def la_nifti(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("la_nifti"))


@pytest.fixture(scope="module")
def run(la_nifti, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "la"
    cfg = TrainConfig(algo="crossmatch", data="nifti", data_root=str(la_nifti),
                      data_options={"n_val": 1}, labeled=2, backbone="vnet", backbone_options={"width": 0.25},
                      patch_size=[32, 32, 16], iterations=3, val_every=3, batch_size=2, out=str(out))
    Trainer(cfg, quiet=True).fit()
    return out


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (np.asarray(affine) @ [*np.argwhere(mask).mean(0), 1.0])[:3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# -- the plan ----------------------------------------------------------------------------------------------------
def test_plan_reorients_resamples_and_maps_back_to_the_same_world_points(la_nifti):
    d = nifti(root=str(la_nifti), dim=3, labeled=2, n_val=1)
    plan = d.info["preprocessing"]
    # median of the training spacings (in RAS axes), z anisotropic but not 3x fewer voxels: kept at the median
    assert plan["target_spacing"] == pytest.approx([1.25, 1.25, 4.0])
    assert [c["scheme"] for c in plan["channels"]] == ["zscore"] and plan["label_values"] == [0, 1]
    assert d.class_names == ["background", "left atrium"]
    assert d.policy_options == {"foreground": pytest.approx(1 / 3)}
    f = la_nifti / "imagesTr" / "la_001.nii.gz"  # 1.0 x 1.0 x 4.0 mm, stored as 'ILA'
    img = nib.load(str(f))
    assert nib.aff2axcodes(img.affine) == ("I", "L", "A")
    geo = pp.geometry(img.shape, img.header.get_zooms(), img.affine, plan)
    assert geo["canonical_shape"] == [48, 40, 24] and geo["axis"] == 2  # z resampled on its own
    assert geo["preprocessed_shape"] == [38, 32, 24]  # 48 * 1.0 / 1.25, 40 * 1.0 / 1.25
    image, label = d.labeled[1]
    assert image.shape == (1, 38, 32, 24) and label.shape == (38, 32, 24)
    # the label through the plan and back, as a prediction would go, lands on the file's own voxels
    lab = np.asarray(nib.load(str(la_nifti / "labelsTr" / "la_001.nii.gz")).dataobj).astype(np.int64)
    back = pp.Restore(geo)(np.eye(2, dtype=np.float32)[label].transpose(3, 0, 1, 2)).argmax(0)
    assert back.shape == lab.shape and dice(back == 1, lab == 1) > 0.9
    np.testing.assert_allclose(world_centroid(back == 1, img.affine), world_centroid(lab == 1, img.affine), atol=0.5)


# -- train, eval, predict -------------------------------------------------------------------------------------------
def test_the_plan_is_stored_with_the_run_and_replayed_by_eval(run, la_nifti, monkeypatch):
    plan = json.loads((run / "plan.json").read_text())
    ck = ckpt_io.load(run / "checkpoints" / "last.pt")
    assert ck["meta"]["preprocessing"] == plan and ck["meta"]["class_names"] == ["background", "left atrium"]

    def no_new_plan(*a, **k):
        raise AssertionError("eval must replay the stored plan, not compute a new one")

    monkeypatch.setattr("semiseg.data.nifti._plan", no_new_plan)
    s = runs.evaluate_run(run, split="test", save_pred="nifti", montage=1)
    assert s["num_cases"] == 2 and 0.0 <= s["mean_dice"] <= 1.0
    for name in ("la_004", "la_005"):  # scored and saved on each test file's own grid, with its affine
        lab = nib.load(str(la_nifti / "labelsTs" / f"{name}.nii.gz"))
        pred = nib.load(str(Path(s["out_dir"]) / "pred" / f"{name}.nii.gz"))
        assert pred.shape == lab.shape
        np.testing.assert_allclose(pred.affine, lab.affine, atol=1e-5)
    assert (Path(s["out_dir"]) / "montage.png").is_file()


class Threshold(nn.Module):
    """An oracle net: class 1 wherever the first input channel is above its z-scored zero (the inputs below
    are label masks), so the output of predict can be compared voxel by voxel with the label file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), 10 * x[:, :1]], 1)


def test_predict_a_folder_writes_on_each_inputs_grid_and_world_position(run, la_nifti, tmp_path, monkeypatch):
    # the scans themselves, with the trained model: shapes, affines, names, probabilities
    out = tmp_path / "pred"
    written = predict.predict_files(run, [str(la_nifti / "imagesTs")], out, save_prob=True)
    assert sorted(p.name for p in written) == ["la_004.nii.gz", "la_004_prob.nii.gz", "la_005.nii.gz",
                                               "la_005_prob.nii.gz"]
    for name in ("la_004", "la_005"):
        src = nib.load(str(la_nifti / "imagesTs" / f"{name}.nii.gz"))
        pred, prob = nib.load(str(out / f"{name}.nii.gz")), nib.load(str(out / f"{name}_prob.nii.gz"))
        assert pred.shape == src.shape and prob.shape == (*src.shape, 2)
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        p = prob.get_fdata()
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(pred.dataobj), p.argmax(-1))
    # the label masks as inputs and an oracle net: the structure lands where the label file has it
    masks = tmp_path / "masks"
    for name in ("la_004", "la_005"):
        lab = nib.load(str(la_nifti / "labelsTs" / f"{name}.nii.gz"))
        save(masks / f"{name}.nii.gz", np.asarray(lab.dataobj).astype(np.float32), lab.affine)
    monkeypatch.setattr(predict, "load_model", lambda ck, dev: Threshold())
    for tta in (False, True):
        got = tmp_path / f"oracle-{tta}"
        predict.predict_files(run, [str(masks)], got, tta=tta)
        for name in ("la_004", "la_005"):
            lab = nib.load(str(la_nifti / "labelsTs" / f"{name}.nii.gz"))
            truth = np.asarray(lab.dataobj) == 1
            pred = np.asarray(nib.load(str(got / f"{name}.nii.gz")).dataobj) == 1
            assert dice(pred, truth) > 0.9
            np.testing.assert_allclose(world_centroid(pred, lab.affine), world_centroid(truth, lab.affine),
                                       atol=0.5)


def test_two_channel_files_train_and_predict_as_one_case(tmp_path):
    root = write_dataset(tmp_path / "two", channels=2)
    out = tmp_path / "run2"
    cfg = TrainConfig(algo="supervised", data="nifti", data_root=str(root), data_options={"n_val": 1},
                      labeled=2, backbone="vnet", backbone_options={"width": 0.25}, patch_size=[32, 32, 16],
                      iterations=2, val_every=2, batch_size=2, out=str(out))
    Trainer(cfg, quiet=True).fit()
    plan = json.loads((out / "plan.json").read_text())
    assert [c["name"] for c in plan["channels"]] == ["MRI", "T2"]
    written = predict.predict_files(out, [str(root / "imagesTs")], tmp_path / "p2")
    assert sorted(p.name for p in written) == ["la_004.nii.gz", "la_005.nii.gz"]  # _0000/_0001 -> one case
    src = nib.load(str(root / "imagesTs" / "la_004_0000.nii.gz"))
    assert nib.load(str(written[0])).shape == src.shape
    with pytest.raises(DataError, match="has 1 channel.s. but the model takes 2"):
        predict.predict_files(out, [str(root / "imagesTs" / "la_004_0000.nii.gz")], tmp_path / "p3")
    with pytest.raises(DataError, match="has channel files .1. but no 'la_004_0000'"):
        predict.predict_files(out, [str(root / "imagesTs" / "la_004_0001.nii.gz")], tmp_path / "p3")


# -- refusals and notes --------------------------------------------------------------------------------------------
def test_a_label_whose_affine_disagrees_with_its_image_is_refused(tmp_path):
    root = write_dataset(tmp_path / "shifted")
    path = root / "labelsTr" / "la_002.nii.gz"
    lab = nib.load(str(path))
    moved = lab.affine.copy()
    moved[0, 3] += 2.5
    save(path, np.asarray(lab.dataobj), moved)
    with pytest.raises(DataError, match="affines of .*la_002.nii.gz' and .*la_002.nii.gz' disagree .by up to 2.5 mm"):
        nifti(root=str(root), labeled=2)


def test_0_255_masks_without_dataset_json_are_two_classes_written_back_as_0_255(tmp_path):
    root = write_dataset(tmp_path / "masks255", labels_json=False)
    for folder in ("labelsTr", "labelsTs"):
        for f in (root / folder).iterdir():
            lab = nib.load(str(f))
            save(f, (np.asarray(lab.dataobj) * 255).astype(np.uint8), lab.affine)
    with pytest.warns(UserWarning, match=r"values \[0, 255\].*classes 0..1"):
        d = nifti(root=str(root), labeled=2)
    assert d.num_classes == 2 and d.info["preprocessing"]["label_values"] == [0, 255]
    _, label = d.labeled[0]
    assert set(np.unique(label)) <= {0, 1}
    out = tmp_path / "run255"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Trainer(TrainConfig(algo="supervised", data="nifti", data_root=str(root), labeled=2, backbone="vnet",
                            backbone_options={"width": 0.25}, patch_size=[32, 32, 16], iterations=1, val_every=1,
                            batch_size=2, out=str(out)), quiet=True).fit()
        written = predict.predict_files(out, [str(root / "imagesTs" / "la_004.nii.gz")], tmp_path / "p255")
    assert set(np.unique(np.asarray(nib.load(str(written[0])).dataobj))) <= {0, 255}


def test_wrong_dimensionality_and_channels_are_refused(run, tmp_path):
    flat = tmp_path / "flat.nii.gz"
    save(flat, np.zeros((40, 40, 1), np.float32), np.eye(4))
    with pytest.raises(DataError, match="is a 2D image .shape .40, 40, 1.. but the model is 3D"):
        predict.predict_files(run, [str(flat)], tmp_path / "o")
    two = tmp_path / "two.nii.gz"
    save(two, np.zeros((40, 40, 20, 2), np.float32), np.eye(4))
    with pytest.raises(DataError, match="has 2 channel.s. but the model takes 1"):
        predict.predict_files(run, [str(two)], tmp_path / "o")


def test_ct_channels_are_clipped_and_scaled_with_the_foreground_statistics(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "ct")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))
    sampled = nifti(root=str(root), labeled=2, n_val=1).info["preprocessing"]
    assert nifti(root=str(root), labeled=2, n_val=1).info["preprocessing"] == sampled  # a function of the data
    monkeypatch.setattr(pp, "FG_SAMPLES", 10**9)  # every foreground voxel, to compare with numpy on all of them
    d = nifti(root=str(root), labeled=2, n_val=1)
    (ch,) = d.info["preprocessing"]["channels"]
    fg = []
    for name in ("la_000", "la_001"):  # the labeled cases only (unlabeled cases' labels are never read)
        img = np.asarray(nib.load(str(root / "imagesTr" / f"{name}.nii.gz")).dataobj, np.float64)
        lab = np.asarray(nib.load(str(root / "labelsTr" / f"{name}.nii.gz")).dataobj)
        fg.append(img[lab > 0])
    v = np.concatenate(fg)
    assert ch["scheme"] == "ct"
    assert ch["clip"] == pytest.approx([np.percentile(v, 0.5), np.percentile(v, 99.5)], rel=1e-5)
    assert (ch["mean"], ch["std"]) == pytest.approx((v.mean(), v.std()), rel=1e-5)
    image, _ = d.labeled[0]
    lo, hi = (np.array(ch["clip"]) - ch["mean"]) / ch["std"]
    assert image.min() >= lo - 1e-4 and image.max() <= hi + 1e-4


def test_cli_target_spacing_and_foreground_share(la_nifti, tmp_path):
    import yaml
    from click.testing import CliRunner

    from semiseg.cli import cli

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["train", "--algo", "supervised", "--data", "nifti", "--data-root", str(la_nifti),
                                 "--data-opt", "target_spacing=1.5,1.5,4", "--policy-opt", "foreground=0.5",
                                 "--labeled", "2", "--backbone", "vnet", "--width", "0.25", "--patch-size",
                                 "32,32,16", "--iterations", "1", "--val-every", "1", "--batch-size", "2", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "plan.json").read_text())["target_spacing"] == [1.5, 1.5, 4.0]
    assert yaml.safe_load((out / "config.yaml").read_text())["policy_options"] == {"foreground": 0.5}


def test_export_carries_the_plan(run, tmp_path):
    """The exported network's sidecar holds the stored plan, so another runtime can replay the preprocessing."""
    pytest.importorskip("safetensors")
    from semiseg.export import export_model

    r = export_model(run, "safetensors", tmp_path / "la.safetensors")
    sidecar = json.loads(Path(r["sidecar"]).read_text())
    assert sidecar["preprocessing"] == json.loads((run / "plan.json").read_text())
    assert sidecar["class_names"] == ["background", "left atrium"] and sidecar["in_channels"] == 1


def test_resume_refuses_a_plan_that_changed_with_the_files(tmp_path):
    from semiseg.errors import CheckpointError

    root = write_dataset(tmp_path / "changing")

    def make() -> TrainConfig:
        return TrainConfig(algo="supervised", data="nifti", data_root=str(root), data_options={"n_val": 1},
                           labeled=2, backbone="vnet", backbone_options={"width": 0.25}, patch_size=[32, 32, 16],
                           iterations=1, val_every=1, batch_size=2, out=str(tmp_path / "run"))

    Trainer(make(), quiet=True).fit()
    for f in (root / "imagesTr").iterdir():  # every training image now says 2 mm in-plane
        img = nib.load(str(f))
        aff = img.affine.copy()
        aff[:3, 1:3] *= 2.0
        save(f, np.asarray(img.dataobj), aff)
        lab = root / "labelsTr" / f.name
        save(lab, np.asarray(nib.load(str(lab)).dataobj), aff)
    cfg = make()
    cfg.iterations = 2
    with pytest.raises(CheckpointError, match="another preprocessing plan"):
        Trainer(cfg, quiet=True).fit(resume=True)
