"""`semiseg predict` never overwrites what the user gave, names every case uniquely, refuses wrong input."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from semiseg.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    run = tmp_path_factory.mktemp("p") / "run"
    r = invoke("train", "--data-opt", "n_train=8", "--data-opt", "n_val=1", "--data-opt", "size=32,32",
               "--patch-size", "32,32", "--width", "0.25", "--iterations", "1", "--batch-size", "2", "--quiet",
               "--out", run)
    assert r.exit_code == 0, r.output
    return run


def png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)
    return path


def test_folders_unique_names_and_no_overwrite(run2d, tmp_path):
    a, b = png(tmp_path / "in" / "one" / "scan.png"), png(tmp_path / "in" / "two" / "scan.png", 50)
    png(tmp_path / "in" / "x.b.png")
    png(tmp_path / "in" / "x.c.png")
    out = tmp_path / "pred"
    r = invoke("predict", run2d, tmp_path / "in", "--out", out)
    assert r.exit_code == 0, r.output
    names = ["scan-2", "scan", "x.b", "x.c"]  # each label map comes with its colour overlay
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in names]
                                                           + [f"{n}_overlay.png" for n in names])
    before = (out / "scan.png").read_bytes()
    r = invoke("predict", run2d, a, "--out", out)
    assert r.exit_code == 2 and "exists; pass --overwrite" in r.output
    assert invoke("predict", run2d, a, "--out", out, "--overwrite").exit_code == 0
    assert (out / "scan.png").read_bytes() == before  # same model, same input, same prediction
    assert b.is_file()


def test_output_inside_an_input_folder_or_onto_an_input_is_refused(run2d, tmp_path):
    img = png(tmp_path / "in" / "scan.png")
    original = img.read_bytes()
    r = invoke("predict", run2d, tmp_path / "in", "--out", tmp_path / "in")
    assert r.exit_code == 2 and "lies inside the input folder" in r.output
    r = invoke("predict", run2d, img, "--out", tmp_path / "in", "--overwrite")
    assert r.exit_code == 2 and "would replace an input" in r.output
    assert img.read_bytes() == original


def test_nan_input_and_a_2d_image_for_a_3d_model_are_refused(run2d, tmp_path):
    import nibabel as nib

    vol = np.zeros((32, 32, 4), np.float32)
    vol[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    r = invoke("predict", run2d, tmp_path / "nan.nii.gz", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "holds NaN or infinite values" in r.output
    run3d = tmp_path / "run3d"
    r = invoke("train", "--backbone", "vnet", "--width", "0.25", "--patch-size", "32,32,16", "--data-opt",
               "size=[32,32,16]", "--data-opt", "n_train=2", "--data-opt", "n_val=1", "--data-opt", "num_classes=2",
               "--labeled", "2", "--batch-size", "2", "--iterations", "1", "--quiet", "--out", run3d)
    assert r.exit_code == 0, r.output
    r = invoke("predict", run3d, png(tmp_path / "flat.png"), "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "is a 2D image but the model is 3D" in r.output


def test_eval_refuses_to_write_predictions_into_the_dataset_root(tmp_path):
    from semiseg.errors import ConfigError
    from semiseg.evaluation.runs import check_output_folder

    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ConfigError, match="lies inside the dataset root"):
        check_output_folder(root / "preds", [root], "the dataset root")
    check_output_folder(tmp_path / "elsewhere", [root], "the dataset root")  # anywhere else is fine


def test_checkpoint_file_probabilities_mirroring_and_overlay_for_2d(run2d, tmp_path):
    img = png(tmp_path / "in" / "scan.png", 120)
    out = tmp_path / "pred"
    ck = run2d / "checkpoints" / "last.pt"
    r = invoke("predict", run2d, img, "--out", out, "--checkpoint", ck, "--save-prob", "--tta", "flip")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["scan.png", "scan_overlay.png", "scan_prob.npz"]
    probs = np.load(out / "scan_prob.npz")["probabilities"]
    labels = np.asarray(Image.open(out / "scan.png"))
    assert probs.shape[1:] == (32, 32) and np.allclose(probs.sum(0), 1, atol=1e-5)
    scale = 255 if probs.shape[0] == 2 else 1
    np.testing.assert_array_equal(labels, probs.argmax(0) * scale)  # the label map is the probabilities' argmax
    overlay = np.asarray(Image.open(out / "scan_overlay.png"))
    assert overlay.shape == (32, 32, 3) and overlay.dtype == np.uint8
    grey = overlay[labels == 0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # background stays grey
    r = invoke("predict", run2d, img, "--out", tmp_path / "x", "--checkpoint", tmp_path / "nope.pt")
    assert r.exit_code == 2 and "does not exist; give last, best or a checkpoint file" in r.output


def test_a_colour_picture_for_a_grey_model_is_refused(run2d, tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    r = invoke("predict", run2d, tmp_path / "colour.png", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "has 3 channel(s) but the model takes 1" in r.output
    Image.fromarray(np.repeat(np.full((32, 32, 1), 90, np.uint8), 3, axis=2)).save(tmp_path / "grey.png")
    assert invoke("predict", run2d, tmp_path / "grey.png", "--out", tmp_path / "o").exit_code == 0
