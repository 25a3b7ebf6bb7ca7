"""Datasets: synthetic phantoms, ACDC and LA on the shared data, NIfTI and image folders on tiny files, and
every bad-input check (each must stop with one sentence naming the offending file)."""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from semiseg.data.acdc import acdc
from semiseg.data.checks import check_backbone_dim
from semiseg.data.folder2d import folder2d
from semiseg.data.la import la
from semiseg.data.nifti import nifti
from semiseg.data.splits import holdout_tail, parse_acdc_slice, resolve_count
from semiseg.data.synthetic import synthetic
from semiseg.errors import ConfigError, DataError
from semiseg.registry import check_kwargs


def _re(path) -> str:
    """A path as a literal regular expression (for ``pytest.raises(match=...)``)."""
    return re.escape(str(path))

# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("dim", [2, 3])
def test_synthetic_deterministic_and_seeded(dim):
    kw = dict(dim=dim, n_train=6, labeled=2, n_val=2)
    a, b, c = synthetic(seed=0, **kw), synthetic(seed=0, **kw), synthetic(seed=1, **kw)
    for i in range(2):
        np.testing.assert_array_equal(a.labeled[i][0], b.labeled[i][0])
        np.testing.assert_array_equal(a.labeled[i][1], b.labeled[i][1])
        assert not np.array_equal(a.labeled[i][0], c.labeled[i][0])
    np.testing.assert_array_equal(a.unlabeled[0], b.unlabeled[0])
    np.testing.assert_array_equal(a.cases("val")[0].image, b.cases("val")[0].image)
    # train, val and test come from different seed streams
    assert not np.array_equal(a.labeled[0][0], a.cases("val")[0].image)
    assert not np.array_equal(a.cases("val")[0].image, a.cases("test")[0].image)
    # loaders survive pickling (data-loader workers)
    again = pickle.loads(pickle.dumps(a.labeled))
    np.testing.assert_array_equal(again[1][1], a.labeled[1][1])


@pytest.mark.parametrize("dim,shape,patch,n",
                         [(2, (128, 128), (128, 128), 30), (3, (64, 64, 48), (64, 64, 32), 8)])
def test_synthetic_shapes_and_classes(dim, shape, patch, n):
    d = synthetic(dim=dim, n_train=n, labeled=n, n_val=1)
    assert (d.dim, d.num_classes, d.in_channels, d.patch_size) == (dim, 4, 1, patch)
    assert d.policy == ("medical2d" if dim == 2 else "medical3d")
    assert len(d.class_names) == 4
    complete = 0
    for i in range(n):
        image, label = d.labeled[i]
        assert image.shape == (1, *shape) and image.dtype == np.float32
        assert label.shape == shape and label.dtype == np.int64
        assert np.isfinite(image).all() and -1 < image.mean() < 2
        complete += len(np.unique(label)) == 4
    assert complete >= 0.9 * n
    case = d.cases("val")[0]
    assert case.image.shape == (1, *shape) and case.label.shape == shape
    if dim == 2:
        assert "per image" in d.info["evaluation"]


@pytest.mark.parametrize("k", [2, 3])
def test_synthetic_fewer_classes(k):
    d = synthetic(num_classes=k, n_train=4, labeled=4, n_val=1)
    labels = [d.labeled[i][1] for i in range(4)]
    assert max(int(lab.max()) for lab in labels) == k - 1
    assert sum(len(np.unique(lab)) == k for lab in labels) >= 3


def test_synthetic_counts():
    d = synthetic(n_train=50, labeled=5, n_val=7)
    assert (len(d.labeled), len(d.unlabeled), len(d.cases("val")), len(d.cases("test"))) == (5, 45, 7, 7)
    d = synthetic(n_train=50, labeled=0.2, n_val=3, n_test=4)
    assert (len(d.labeled), len(d.unlabeled), len(d.cases("val")), len(d.cases("test"))) == (10, 40, 3, 4)
    assert synthetic(dim=2, size=(96, 80), n_train=2, labeled=1, n_val=1).patch_size == (96, 80)
    for bad in (0, -1, 51, 2.5):
        with pytest.raises(ConfigError):
            synthetic(n_train=50, labeled=bad)
    with pytest.raises(ConfigError):
        synthetic(num_classes=7)
    with pytest.raises(ConfigError):
        synthetic(dim=3, size=(64, 64))
    with pytest.raises(ConfigError, match="does not take option 'n_trian'"):
        check_kwargs(synthetic, {"n_trian": 3}, "dataset 'synthetic'")


def test_synthetic_speed():
    d2 = synthetic(dim=2, n_train=20, labeled=20, n_val=1)
    d3 = synthetic(dim=3, n_train=5, labeled=5, n_val=1)
    t = time.perf_counter()
    for i in range(20):
        d2.labeled[i]
    per2 = (time.perf_counter() - t) / 20
    t = time.perf_counter()
    for i in range(5):
        d3.labeled[i]
    per3 = (time.perf_counter() - t) / 5
    assert per2 < 0.05 and per3 < 0.25  # loose: ~6 ms and ~50 ms on one core


def test_split_helpers():
    assert resolve_count(3, 70) == 3
    assert resolve_count(0.05, 70) == 3  # the literature's "5%" of ACDC
    assert resolve_count(0.1, 70) == 7
    assert resolve_count(0.29, 100) == 29  # float noise does not lose one
    with pytest.warns(UserWarning, match="rounds to none"):
        assert resolve_count(0.001, 10) == 1
    assert holdout_tail(["c", "a", "b", "d", "e"], None) == (["a", "b", "c", "d"], ["e"])
    assert parse_acdc_slice("data/slices/patient099_frame01_slice_15.h5") == ("patient099_frame01", 14)
    with pytest.raises(DataError, match="labeled.txt"):
        parse_acdc_slice("data/slices/patient099_frame01.h5", "labeled.txt")


def test_backbone_dim_check():
    check_backbone_dim(2, 2, "unet", "acdc")
    msg = "'unet' is a 2D backbone but dataset 'la' is 3D; use --backbone vnet"
    with pytest.raises(ConfigError, match=msg):
        check_backbone_dim(3, 2, "unet", "la")
    with pytest.raises(ConfigError, match="'vnet' is a 3D backbone"):
        check_backbone_dim(2, 3, "vnet", "acdc")


# --------------------------------------------------------------------------- ACDC and LA on the shared data


def test_acdc_real(shared_data):
    root = shared_data / "acdc"
    t = time.perf_counter()
    d = acdc(root=str(root), labeled=3)
    assert time.perf_counter() - t < 10
    assert (len(d.labeled), len(d.unlabeled)) == (68, 1244)
    assert (d.dim, d.num_classes, d.in_channels, d.policy, d.patch_size) == (2, 4, 1, "medical2d", (256, 256))
    assert d.class_names == ["background", "RV", "Myo", "LV"]
    assert d.info["labeled_patients"] == ["patient099", "patient038", "patient050"]
    # the first line of the published split is slice K = index K-1 of the volume
    first = (root / "splits" / "3" / "labeled.txt").read_text().split()[0]
    vol, k = parse_acdc_slice(first)
    assert d.labeled.keys[0] == (vol, k)
    image, label = d.labeled[0]
    with h5py.File(root / "data" / f"{vol}.h5", "r") as f:
        np.testing.assert_array_equal(image[0], f["image"][k].astype(np.float32))
        np.testing.assert_array_equal(label, f["label"][k])
    assert image.shape[0] == 1 and label.dtype == np.int64
    assert d.unlabeled[0].ndim == 3
    pickle.loads(pickle.dumps(d.unlabeled))[5]  # open-file cache is not pickled
    test = d.cases("test")
    assert len(test) == 40 and len(d.cases("valtest")) == 60
    assert test[0].image.ndim == 4 and test[0].image.shape[1:] == test[0].label.shape
    assert test[0].spacing is None
    assert len(acdc(root=str(root), labeled=7).labeled) == 136
    assert len(acdc(root=str(root), labeled=0.05).labeled) == 68
    five = acdc(root=str(root), labeled=5)  # no published split: first five patients of train.list
    assert len(five.info["labeled_patients"]) == 5 and len(five.labeled) + len(five.unlabeled) == 1312


def test_la_half_real(shared_data):
    d = la(root=str(shared_data / "la-half"), labeled=8)
    assert (len(d.labeled), len(d.unlabeled), d.num_classes, d.dim, d.policy) == (8, 72, 2, 3, "medical3d")
    assert d.patch_size == (64, 64, 32)
    image, label = d.labeled[0]
    assert image.ndim == 4 and image.shape[1:] == label.shape and set(np.unique(label)) <= {0, 1}
    test = d.cases("test")
    assert len(test) == 20 and test[0].spacing == (1.25, 1.25, 1.25)
    assert [c.name for c in d.cases("val")] == [c.name for c in test]
    train = (shared_data / "la-half" / "train.list").read_text().split()
    assert list(d.labeled.keys) == train[:8] and list(d.unlabeled.keys) == train[8:]
    assert la(root=str(shared_data / "la-half"), labeled=16, spacing=2.0).info["spacing"] == (2.0, 2.0, 2.0)


# --------------------------------------------------------------------------- tiny files


def _h5(path: Path, image: np.ndarray, label: np.ndarray, **attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
        f.attrs.update(attrs)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_acdc(root: Path, depth: int = 3) -> Path:
    rng = np.random.default_rng(0)
    vols = [f"patient00{p}_frame01" for p in range(1, 5)]
    for v in vols:
        _h5(root / "data" / f"{v}.h5", rng.random((depth, 16, 12), dtype=np.float32),
            rng.integers(0, 4, (depth, 16, 12)).astype(np.uint8))
    (root / "train.list").write_text("\n".join(vols[:2]) + "\n")
    (root / "val.list").write_text(vols[2] + "\n")
    (root / "test.list").write_text(vols[3])
    (root / "splits" / "1").mkdir(parents=True)
    lines = lambda v: "".join(f"data/slices/{v}_slice_{k}.h5\n" for k in range(1, depth + 1))  # noqa: E731
    (root / "splits" / "1" / "labeled.txt").write_text(lines(vols[0]))
    (root / "splits" / "1" / "unlabeled.txt").write_text(lines(vols[1]))
    return root


def make_la(root: Path, n_train: int = 4, n_test: int = 2, shape=(20, 18, 12)) -> Path:
    rng = np.random.default_rng(0)
    ids = [f"CASE{i:02d}" for i in range(n_train + n_test)]
    for c in ids:
        _h5(root / c / "mri_norm2.h5", rng.normal(size=shape).astype(np.float32),
            (rng.random(shape) > 0.7).astype(np.uint8))
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "test.list").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def test_acdc_tiny(tmp_path):
    d = acdc(root=str(make_acdc(tmp_path)), labeled=1)
    assert (len(d.labeled), len(d.unlabeled), len(d.cases("val")), len(d.cases("test"))) == (3, 3, 1, 1)
    assert d.labeled.keys[2] == ("patient001_frame01", 2)
    two = acdc(root=str(tmp_path), labeled=2)  # no splits/2: first-N-patients rule
    assert (len(two.labeled), len(two.unlabeled)) == (6, 0)


def test_la_tiny_spacing_from_h5(tmp_path):
    root = make_la(tmp_path)
    d = la(root=str(root), labeled=0.5)
    assert (len(d.labeled), len(d.unlabeled)) == (2, 2)
    assert d.info["spacing"] == pytest.approx((0.625 * 88 / 12,) * 3)
    with h5py.File(root / "CASE00" / "mri_norm2.h5", "a") as f:
        f.attrs["spacing"] = np.array([0.7, 0.7, 1.4])
    assert la(root=str(root), labeled=2).info["spacing"] == (0.7, 0.7, 1.4)


def _nii(path: Path, data: np.ndarray, zooms=(1.5, 1.0, 2.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(zooms) + (1.0,) * (data.ndim - 3))
    nib.save(img, str(path))


def make_nifti(root: Path, layout: str = "msd", n: int = 6, channels: int = 1, shape=(16, 14, 8),
               n_test: int = 2, dataset_json: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n + n_test):
        folder = "imagesTr" if i < n else "imagesTs"
        name = f"case_{i:03d}"
        img = rng.normal(5.0, 3.0, size=(*shape, channels)).astype(np.float32)
        if layout == "msd":
            _nii(root / folder / f"{name}.nii.gz", img if channels > 1 else img[..., 0])
        else:
            for c in range(channels):
                _nii(root / folder / f"{name}_{c:04d}.nii.gz", img[..., c])
        if i < n:
            _nii(root / "labelsTr" / f"{name}.nii.gz", rng.integers(0, 3, shape).astype(np.uint8))
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00junk")  # macOS copy, must be ignored
    if dataset_json:
        meta = {"labels": {"0": "background", "1": "a", "2": "b"},
                "modality": {str(c): f"m{c}" for c in range(channels)}}
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("layout,channels", [("msd", 1), ("msd", 2), ("nnunet", 2)])
def test_nifti_3d(tmp_path, layout, channels):
    d = nifti(root=str(make_nifti(tmp_path, layout, channels=channels)), dim=3, labeled=2)
    assert (d.dim, d.num_classes, d.in_channels, d.policy) == (3, 3, channels, "medical3d")
    assert d.class_names == ["background", "a", "b"]
    assert d.info["channel_names"] == [f"m{c}" for c in range(channels)]
    assert d.info["labeled_cases"] == ["case_000", "case_001"] and d.info["val_cases"] == ["case_005"]
    assert len(d.unlabeled) == 3 + 2  # the rest of imagesTr plus imagesTs
    image, label = d.labeled[0]
    assert image.shape == (channels, 16, 14, 8) and label.shape == (16, 14, 8)
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3  # z-scored
    assert d.unlabeled[4].shape == (channels, 16, 14, 8)
    (case,) = d.cases("val")
    assert case.name == "case_005" and case.spacing == (1.5, 1.0, 2.0)
    assert case.affine[0, 3] == 10.0 and case.image.shape == (channels, 16, 14, 8)
    assert d.patch_size == (16, 16, 16)  # median shape floored to multiples of 16 (at least 16)


def test_nifti_2d(tmp_path):
    root = make_nifti(tmp_path, "nnunet", channels=1, dataset_json=False)
    d = nifti(root=str(root), dim=2, labeled=2, n_val=2)
    assert d.num_classes == 3 and d.class_names is None  # inferred from the labels
    assert (len(d.labeled), len(d.unlabeled)) == (2 * 8, (2 + 2) * 8)
    image, label = d.labeled[3]
    assert image.shape == (1, 16, 14) and label.shape == (16, 14) and d.policy == "medical2d"
    assert image.min() >= 0 and image.max() <= 1 and d.info["intensity"].endswith("minmax")  # 2D: [0, 1]
    cases = d.cases("val")
    assert [c.name for c in cases] == ["case_004", "case_005"]
    c = cases[0]
    # the image is preprocessed and slices-first (C, Z, X, Y); the label stays on the file's grid, with its
    # spacing and affine, and ``restore`` maps the predictor's probabilities there
    assert c.image.shape == (1, 8, 16, 14) and c.label.shape == (16, 14, 8) and c.spacing == (1.5, 1.0, 2.0)
    original = nib.load(str(tmp_path / "imagesTr" / "case_004_0000.nii.gz"))
    np.testing.assert_array_equal(c.affine, original.affine)
    lab = np.asanyarray(nib.load(str(tmp_path / "labelsTr" / "case_004.nii.gz")).dataobj)
    np.testing.assert_array_equal(c.label, lab)
    onehot = np.eye(3, dtype=np.float32)[lab].transpose(3, 2, 0, 1)  # (K, Z, X, Y) as a prediction would be
    np.testing.assert_array_equal(c.restore(onehot).argmax(0), lab)


def make_folder(root: Path, n: int = 6, rgb: bool = False, binary: bool = True, shape=(20, 24)) -> Path:
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "unlabeled"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        pix = rng.integers(0, 256, (*shape, 3) if rgb else shape).astype(np.uint8)
        Image.fromarray(pix).save(root / "images" / f"img{i}.{'jpg' if rgb else 'png'}")
        if binary:
            mask = (rng.random(shape) > 0.5).astype(np.uint8) * 255
        else:
            mask = rng.integers(0, 4, shape).astype(np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (*shape, 3) if rgb else shape).astype(np.uint8)).save(
            root / "unlabeled" / f"u{i}.png")
    return root


def test_folder2d_binary_grey(tmp_path):
    d = folder2d(root=str(make_folder(tmp_path)), labeled=2)
    assert (d.num_classes, d.in_channels, d.dim, d.policy, d.patch_size) == (2, 1, 2, "medical2d", (256, 256))
    assert (len(d.labeled), len(d.unlabeled), len(d.cases("val"))) == (2, 3 + 2, 1)
    image, label = d.labeled[0]
    assert image.shape == (1, 20, 24) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert label.shape == (20, 24) and set(np.unique(label)) == {0, 1}  # 0/255 -> 0/1
    assert d.cases("val")[0].name == "img5"


def test_folder2d_rgb_indices_tiff(tmp_path):
    root = make_folder(tmp_path, rgb=True, binary=False)
    import tifffile

    deep16 = np.arange(20 * 24 * 3, dtype=np.uint16).reshape(20, 24, 3)
    tifffile.imwrite(root / "unlabeled" / "deep.tif", deep16)
    d = folder2d(root=str(root), labeled=0.5, n_val=2)
    assert (d.num_classes, d.in_channels, len(d.labeled), len(d.unlabeled)) == (4, 3, 2, 2 + 3)
    assert d.labeled[0][0].shape == (3, 20, 24)
    deep = d.unlabeled[d.unlabeled.keys.index((root / "unlabeled" / "deep.tif", None))]
    assert deep.shape == (3, 20, 24) and deep.min() == 0 and deep.max() == 1


# --------------------------------------------------------------------------- bad inputs


def test_missing_root(tmp_path):
    for factory in (acdc, la, nifti, folder2d):
        with pytest.raises(DataError, match="nowhere"):
            factory(root=str(tmp_path / "nowhere"))
        with pytest.raises(ConfigError, match="--data-root"):
            factory(root=None)
    with pytest.raises(DataError, match="imagesTr"):
        nifti(root=str(tmp_path))
    with pytest.raises(DataError, match="train.list"):
        la(root=str(tmp_path))
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="holds no .h5"):
        acdc(root=str(tmp_path))


def test_truncated_h5(tmp_path):
    root = make_la(tmp_path)
    bad = root / "CASE01" / "mri_norm2.h5"
    _truncate(bad)
    with pytest.raises(DataError, match=f"'{_re(bad)}' cannot be read"):
        la(root=str(root), labeled=2)
    root = make_acdc(tmp_path / "acdc")
    bad = root / "data" / "patient003_frame01.h5"
    _truncate(bad)
    with pytest.raises(DataError, match=_re(bad)):
        acdc(root=str(root), labeled=1)


def test_truncated_nifti(tmp_path):
    root = make_nifti(tmp_path, n=4)
    bad = root / "imagesTr" / "case_000.nii.gz"
    _truncate(bad)
    with pytest.raises(DataError, match=f"'{_re(bad)}' cannot be read"):
        nifti(root=str(root), labeled=1)


def test_nan_image(tmp_path):
    root = make_la(tmp_path)
    path = root / "CASE00" / "mri_norm2.h5"
    image = np.ones((20, 18, 12), np.float32)
    image[3, 4, 5] = np.nan
    _h5(path, image, np.zeros((20, 18, 12), np.uint8))
    with pytest.raises(DataError, match=f"'{_re(path)}' contains 1 NaN or Inf"):
        la(root=str(root), labeled=2)
    root = make_nifti(tmp_path / "nii", n=4)
    path = root / "imagesTr" / "case_001.nii.gz"
    image = np.ones((16, 14, 8), np.float32)
    image[0, 0, 0] = np.inf
    _nii(path, image)
    with pytest.raises(DataError, match=_re(path)):
        nifti(root=str(root), labeled=2)


def test_label_out_of_range(tmp_path):
    root = make_acdc(tmp_path)
    path = root / "data" / "patient001_frame01.h5"
    label = np.zeros((3, 16, 12), np.uint8)
    label[1, 2, 3] = 7
    _h5(path, np.zeros((3, 16, 12), np.float32), label)
    with pytest.raises(DataError, match=f"'{_re(path)}' contains value 7 but the dataset has 4 classes"):
        acdc(root=str(root), labeled=1)
    root = make_nifti(tmp_path / "nii", n=4)
    path = root / "labelsTr" / "case_000.nii.gz"
    _nii(path, np.full((16, 14, 8), 7, np.uint8))
    with pytest.raises(DataError, match=f"'{_re(path)}' contains value 7 but the dataset has 3 classes"):
        nifti(root=str(root), labeled=1)
    root = make_folder(tmp_path / "folder", binary=False)
    path = root / "masks" / "img0.png"
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(path)
    with pytest.raises(DataError, match=f"'{_re(path)}' contains value 7 but the dataset has 4 classes"):
        folder2d(root=str(root), num_classes=4)


def test_shape_mismatch(tmp_path):
    root = make_la(tmp_path)
    path = root / "CASE03" / "mri_norm2.h5"
    _h5(path, np.zeros((20, 18, 12), np.float32), np.zeros((20, 18, 11), np.uint8))
    with pytest.raises(DataError, match=f"Image and label shapes differ in '{_re(path)}'"):
        la(root=str(root))
    root = make_nifti(tmp_path / "nii", n=4)
    path = root / "labelsTr" / "case_002.nii.gz"
    _nii(path, np.zeros((16, 14, 9), np.uint8))
    with pytest.raises(DataError, match=_re(path)):
        nifti(root=str(root))
    root = make_folder(tmp_path / "folder")
    path = root / "masks" / "img3.png"
    Image.fromarray(np.zeros((21, 24), np.uint8)).save(path)
    with pytest.raises(DataError, match=_re(path)):
        folder2d(root=str(root))


def test_empty_split(tmp_path):
    root = make_acdc(tmp_path)
    (root / "test.list").write_text("\n")
    with pytest.raises(DataError, match=f"test split of dataset 'acdc' is empty.*{_re(root / 'test.list')}"):
        acdc(root=str(root), labeled=1)
    root = make_acdc(tmp_path / "b")
    (root / "splits" / "1" / "labeled.txt").write_text("")
    with pytest.raises(DataError, match=f"labeled split of dataset 'acdc' is empty.*{_re(root / 'splits')}"):
        acdc(root=str(root), labeled=1)
    root = make_la(tmp_path / "la")
    (root / "train.list").write_text("")
    with pytest.raises(DataError, match=f"train split of dataset 'la' is empty.*{_re(root / 'train.list')}"):
        la(root=str(root))
    (tmp_path / "nii" / "imagesTr").mkdir(parents=True)
    (tmp_path / "nii" / "labelsTr").mkdir()
    with pytest.raises(DataError, match=_re(tmp_path / "nii" / "imagesTr")):
        nifti(root=str(tmp_path / "nii"))


def test_overlapping_splits(tmp_path):
    root = make_acdc(tmp_path)
    (root / "splits" / "1" / "unlabeled.txt").write_text("data/slices/patient001_frame01_slice_2.h5\n")
    with pytest.raises(DataError, match=f"labeled and unlabeled splits from '{_re(root / 'splits' / '1')}"):
        acdc(root=str(root), labeled=1)
    root = make_acdc(tmp_path / "b")
    (root / "splits" / "1" / "labeled.txt").write_text("data/slices/patient004_frame01_slice_1.h5\n")
    labeled_txt = root / "splits" / "1" / "labeled.txt"
    with pytest.raises(DataError, match=f"labeled and test splits from '{_re(labeled_txt)}'"):
        acdc(root=str(root), labeled=1)
    root = make_la(tmp_path / "la")
    (root / "test.list").write_text("CASE04\nCASE00\n")
    test_list = root / "test.list"
    with pytest.raises(DataError, match=f"train and test splits from '{_re(test_list)}' overlap .'CASE00"):
        la(root=str(root))
    root = make_folder(tmp_path / "folder")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "unlabeled" / "img2.png")
    unl = _re(root / "unlabeled")
    with pytest.raises(DataError, match=f"labeled and unlabeled splits from '{unl}' overlap"):
        folder2d(root=str(root))
    root = make_nifti(tmp_path / "nii", n=4)
    _nii(root / "imagesTs" / "case_001.nii.gz", np.zeros((16, 14, 8), np.float32))
    with pytest.raises(DataError, match=f"splits from '{_re(root / 'imagesTs')}' overlap .'case_001'"):
        nifti(root=str(root), labeled=2)


def test_missing_files_named(tmp_path):
    root = make_la(tmp_path)
    (root / "test.list").write_text("CASE04\nGHOST\n")
    with pytest.raises(DataError, match=f"'{_re(root / 'GHOST' / 'mri_norm2.h5')}' is missing.*test.list"):
        la(root=str(root))
    root = make_acdc(tmp_path / "acdc")
    (root / "val.list").write_text("patient009_frame01\n")
    val_list = _re(root / "val.list")
    with pytest.raises(DataError, match=f"The list '{val_list}' names volume 'patient009_frame01'"):
        acdc(root=str(root), labeled=1)
    root = make_nifti(tmp_path / "nii", n=4)
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError, match=f"'{_re(root / 'imagesTr' / 'case_002.nii.gz')}' has no label"):
        nifti(root=str(root))
    root = make_folder(tmp_path / "folder")
    (root / "masks" / "img4.png").unlink()
    with pytest.raises(DataError, match=f"'{_re(root / 'images' / 'img4.png')}' has no mask"):
        folder2d(root=str(root))
    root = make_acdc(tmp_path / "acdc2")
    (root / "splits" / "1" / "labeled.txt").write_text("data/slices/patient001_frame01_slice_9.h5\n")
    with pytest.raises(DataError, match="names slice 9 of 'patient001_frame01' which has only 3 slices"):
        acdc(root=str(root), labeled=1)
