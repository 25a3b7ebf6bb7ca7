"""Evaluate a trained run or checkpoint (`semiseg eval`) and predict new images (`semiseg predict`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg import registry
from semiseg.data.base import Case
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.perf import to_channels_last, use_channels_last
from semiseg.errors import ConfigError, DataError
from semiseg.evaluation.metrics import METRIC_DEFINITIONS
from semiseg.evaluation.protocol import foreground_names, predictor
from semiseg.evaluation.report import evaluate_cases, save_prediction


def load_model(ckpt: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """Rebuild the backbone a checkpoint was trained with and load its weights (eval mode)."""
    meta = ckpt["meta"]
    opts = dict(meta.get("backbone_options") or {})
    opts.pop("weights", None)  # the trained weights replace any pre-trained encoder file
    opts.setdefault("in_channels", meta["in_channels"])
    opts.setdefault("num_classes", meta["num_classes"])
    model = registry.create_backbone(meta["backbone"], **opts)
    model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    dim = int(meta.get("dim", 2))
    return to_channels_last(model, dim) if use_channels_last(None, dim, device) else model  # as in training


def evaluate_run(path: str | Path, split: str = "test", data_root: str | None = None, out: str | Path | None = None,
                 which: str = "last", device: str = "auto", save_pred: str | None = "nifti", empty: str = "nan",
                 spacing: str = "voxel", max_cases: int | None = None, stride: tuple[int, ...] | None = None,
                 montage: int = 4) -> dict[str, Any]:
    """Evaluate a run directory or checkpoint on ``split`` with the test protocol; write the report."""
    from semiseg.engine.trainer import build_data, pick_device

    ck_path = ckpt_io.resolve(path, prefer=which)
    ck = ckpt_io.load(ck_path)
    cfg = TrainConfig.from_dict(ck["config"], source=f"Checkpoint '{ck_path}'")
    registry.require_plugins(cfg.plugins, f"Checkpoint '{ck_path}'")
    if data_root is not None:
        cfg.data_root = data_root
    data = build_data(cfg)
    if data.num_classes != ck["meta"]["num_classes"]:
        raise ConfigError(f"Dataset '{data.name}' has {data.num_classes} classes but checkpoint '{ck_path}' was "
                          f"trained for {ck['meta']['num_classes']}; evaluate on the data it was trained on.")
    dev = pick_device(device)
    model = load_model(ck, dev)
    cases = data.cases(split)
    if max_cases:
        cases = cases[:max_cases]
    if stride is None and data.info.get("eval_stride") is not None:
        stride = tuple(int(s) for s in data.info["eval_stride"])  # the dataset's official test stride
    predict = predictor(model, data.dim, data.patch_size, data.num_classes, dev, mode="test", stride=stride)
    if save_pred is not None and out is not None and cfg.data_root:
        check_output_folder(Path(out), [Path(cfg.data_root)], "the dataset root")
    # every report is kept under a name that says what it measured: RUN/eval/<split>-<checkpoint>
    rule = which if Path(path).is_dir() else ck_path.stem
    base = ck_path.parent.parent if ck_path.parent.name == "checkpoints" else ck_path.parent
    out_dir = Path(out) if out else base / "eval" / f"{split}-{rule}"
    # what the numbers mean travels with them (the printed table and summary.json name each)
    about = {"split": split, "checkpoint_rule": which if Path(path).is_dir() else "file",
             "checkpoint": str(ck_path), "iteration": ck["iteration"],
             "stride": list(stride) if stride is not None else None, "metric_definitions": METRIC_DEFINITIONS}
    summary = evaluate_cases(predict, cases, data.num_classes, spacing_mode=spacing, empty=empty, out_dir=out_dir,
                             save_pred=save_pred, montage=montage, class_names=foreground_names(data), about=about)
    summary["out_dir"] = str(out_dir)
    return summary


# -- predict ----------------------------------------------------------------------------------------------------
def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)


def _zscore(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / max(float(a.std()), 1e-8)).astype(np.float32)


SUFFIX = {"png": ".png", "nifti": ".nii.gz", "h5": ".h5"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def case_name(path: Path) -> str:
    """The file name without its image suffix (``a.b.nii.gz`` -> ``a.b``) and without the nnU-Net channel suffix
    (``case_0000`` -> ``case``)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """Files as given, and every image file of each folder given (sorted); also the folders themselves."""
    files: list[Path] = []
    folders: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            folders.append(p)
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise DataError(f"Input folder '{p}' holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        else:
            files.append(p)
    return files, folders


def check_output_folder(out: Path, protected: list[Path], what: str) -> None:
    """Refuse an output folder that is, or lies inside, a folder the user gave as input (or the data root)."""
    o = out.expanduser().resolve()
    for folder in protected:
        f = folder.expanduser().resolve()
        if o == f or f in o.parents:
            raise ConfigError(f"--out '{out}' lies inside {what} '{folder}'; write predictions elsewhere, so that "
                              f"nothing you gave is overwritten.")


def read_input(path: Path, dim: int, in_channels: int) -> Case:
    """Read a NIfTI, h5 or PNG/JPG/TIFF image as a Case with the normalisation the built-in datasets use:
    2D: intensities in [0, 1] (8-bit / 255, otherwise 0.5-99.5 percentile min-max); 3D: per-volume z-score;
    h5 files (ACDC/LA layouts) are taken as stored, since those files are already normalised."""
    name = case_name(path)
    suffix = "".join(path.suffixes).lower()
    if not path.is_file():
        raise DataError(f"Input '{path}' does not exist; pass existing image files.")
    try:
        if suffix.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
            spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
            if dim == 2:  # slices along the last axis, as the nifti dataset does
                vol = _minmax(arr)
                return Case(name, np.moveaxis(vol, -1, 0)[None], None, spacing, img.affine,
                            meta={"slices_last": True})
            return Case(name, _zscore(arr)[None], None, spacing, img.affine)
        if suffix.endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise DataError(f"Input '{path}' has no dataset 'image'; store the image under that key.")
                arr = np.asarray(f["image"], dtype=np.float32)
            return Case(name, arr[None], None)
        if suffix.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
            from PIL import Image

            if dim == 3:
                raise DataError(f"Input '{path}' is a 2D image but the model is 3D; give it volumes (NIfTI or h5).")
            im = np.asarray(Image.open(path))
            arr = im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else _minmax(im.astype(np.float32))
            arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
            if arr.shape[0] != in_channels:
                arr = arr.mean(0, keepdims=True).repeat(in_channels, 0)
            return Case(name, arr, None)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"Input '{path}' cannot be read ({type(e).__name__}: {e}); check the file.") from e
    raise DataError(f"Input '{path}' has an unknown type; use .nii.gz, .h5 or .png/.jpg/.tif.")


def predict_files(checkpoint: str | Path, inputs: list[str], out: str | Path, device: str = "auto",
                  fmt: str | None = None, which: str = "last", overwrite: bool = False) -> list[Path]:
    """Predict label maps for new images (files, or folders of them) and write them into ``out``, one per case,
    named by case; ``out`` may not lie inside an input folder, an output never replaces an input, and an existing
    output is replaced only with ``overwrite``."""
    from semiseg.engine.trainer import pick_device

    files, folders = expand_inputs(inputs)
    check_output_folder(Path(out), folders, "the input folder")
    ck_path = ckpt_io.resolve(checkpoint, prefer=which)
    ck = ckpt_io.load(ck_path)
    meta = ck["meta"]
    dev = pick_device(device)
    model = load_model(ck, dev)
    predict = predictor(model, meta["dim"], tuple(meta["patch_size"]), meta["num_classes"], dev, mode="test")
    out = Path(out)
    inputs_resolved = {f.expanduser().resolve() for f in files}
    names: dict[str, int] = {}
    cases = []
    for p in files:
        case = read_input(p, meta["dim"], meta["in_channels"])
        n = names[case.name] = names.get(case.name, 0) + 1
        if n > 1:  # the same name from two folders (or two suffixes): keep both
            case = Case(f"{case.name}-{n}", case.image, case.label, case.spacing, case.affine, case.meta)
        if not np.isfinite(case.image).all():
            raise DataError(f"Input '{p}' holds NaN or infinite values; clean it before predicting.")
        cases.append(case)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        kind = fmt or ("png" if (meta["dim"] == 2 and not case.meta.get("slices_last")
                                 and case.image.ndim == 3) else "nifti")
        target = out / (case.name + SUFFIX[kind])
        if target.resolve() in inputs_resolved:
            raise ConfigError(f"Writing '{target}' would replace an input; choose another --out.")
        if target.exists() and not overwrite:
            raise ConfigError(f"'{target}' exists; pass --overwrite to replace it or choose another --out.")
        pred = predict(case.image)
        if case.meta.get("slices_last"):
            pred = np.moveaxis(pred, 0, -1)
        if kind == "png":
            from PIL import Image

            scale = 255 if meta["num_classes"] == 2 else 1  # binary masks as 0/255, others as class indices
            Image.fromarray((pred * scale).astype(np.uint8)).save(target)
            written.append(target)
        else:
            written.append(save_prediction(pred, case, out, kind, meta["num_classes"]))
    return written
