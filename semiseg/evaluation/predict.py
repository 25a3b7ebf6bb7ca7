"""Predict new images with a trained run or checkpoint (`semiseg predict`): files or folders in, one label map per
case out, on each input's own grid (docs/nifti.md, "Predict")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg.data.base import Case
from semiseg.engine import checkpoint as ckpt_io
from semiseg.errors import CheckpointError, ConfigError, DataError
from semiseg.evaluation.protocol import predictor
from semiseg.evaluation.report import save_prediction
from semiseg.evaluation.runs import check_output_folder, load_model


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)


def _zscore(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / max(float(a.std()), 1e-8)).astype(np.float32)


SUFFIX = {"png": ".png", "nifti": ".nii.gz", "h5": ".h5"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _channel_index(path: Path) -> int | None:
    """NNNN of an nnU-Net channel file ``case_NNNN.nii.gz``, else None."""
    name = _strip_suffix(path.name)
    return int(name[-4:]) if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit() else None


def case_name(path: Path) -> str:
    """The file name without its image suffix (``a.b.nii.gz`` -> ``a.b``) and without the nnU-Net channel suffix
    (``case_0000`` -> ``case``)."""
    name = _strip_suffix(path.name)
    return name[:-5] if _channel_index(path) is not None else name


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """Files as given, and every image file of each folder given (sorted); also the folders themselves."""
    files: list[Path] = []
    folders: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            folders.append(p)
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")
                           and q.name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise DataError(f"Input folder '{p}' holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        else:
            if not p.is_file():
                raise DataError(f"Input '{p}' does not exist; pass existing image files.")
            files.append(p)
    return files, folders


def group_channels(files: list[Path]) -> list[list[Path]]:
    """The input cases: nnU-Net channel files of one folder (``case_0000``, ``case_0001``...) form one case, in
    channel order; every other file is a case of its own."""
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    singles: list[list[Path]] = []
    for f in dict.fromkeys(files):
        k = _channel_index(f)
        if k is None or not f.name.lower().endswith((".nii", ".nii.gz")):
            singles.append([f])
            continue
        groups.setdefault((f.parent, case_name(f)), {})[k] = f
    out = list(singles)
    for (folder, name), ch in groups.items():
        missing = [i for i in range(max(ch) + 1) if i not in ch]
        if missing:
            raise DataError(f"The case '{name}' in '{folder}' has channel files {sorted(ch)} but no "
                            f"'{name}_{missing[0]:04d}'; add the missing channel file.")
        out.append([ch[i] for i in sorted(ch)])
    return sorted(out, key=lambda g: str(g[0]))


def _refuse_channels(path: Path, found: int, expected: int) -> None:
    if found != expected:
        hint = ("give one file per channel named <case>_0000.nii.gz, <case>_0001.nii.gz, ..."
                if expected > 1 else "give single-channel images")
        raise DataError(f"Input '{path}' has {found} channel(s) but the model takes {expected}; {hint}.")


def _read_nifti(paths: list[Path], dim: int, in_channels: int, plan: dict | None) -> Case:
    """One NIfTI case (one file, or nnU-Net channel files), through the model's plan where it has one."""
    import nibabel as nib

    from semiseg.data import preprocessing as pp
    from semiseg.data.checks import check_same_affine

    name, first = case_name(paths[0]), paths[0]
    parts, affine = [], None
    for p in paths:
        img = nib.load(str(p))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        check_same_affine(affine, img.affine, first, p)
        affine = img.affine if affine is None else affine
        if arr.ndim == 4 and len(paths) == 1:  # MSD: (X, Y, Z, C)
            parts += [arr[..., c] for c in range(arr.shape[3])]
        elif arr.ndim in (2, 3):
            parts.append(arr if arr.ndim == 3 else arr[..., None])
        else:
            raise DataError(f"Input '{p}' has shape {arr.shape}; expected a volume (X, Y, Z) or (X, Y, Z, C).")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0,) * max(0, 3 - arr.ndim)
        shape = parts[-1].shape
    if dim == 3 and min(shape) == 1:
        raise DataError(f"Input '{first}' is a 2D image (shape {shape}) but the model is 3D; give it volumes.")
    _refuse_channels(first, len(parts), in_channels)
    raw = np.stack(parts)  # (C, X, Y, Z)
    if not np.isfinite(raw).all():
        raise DataError(f"Input '{first}' holds NaN or infinite values; clean it before predicting.")
    if plan is not None:  # the model's own preprocessing, and the way back to this file's grid
        geo = pp.geometry(shape, zooms, affine, plan)
        image = pp.preprocess_image(raw, geo, plan)
        if dim == 2:
            image = np.ascontiguousarray(np.moveaxis(image, 3, 1))
        return Case(name, image, None, zooms, affine, meta={"axes": "XYZ"},
                    restore=pp.Restore(geo, slices_first=dim == 2))
    if dim == 2:  # slices along the last axis, as the nifti dataset does
        vol = np.stack([_minmax(c) for c in raw])
        return Case(name, np.ascontiguousarray(np.moveaxis(vol, -1, 1)), None, zooms, affine,
                    meta={"slices_last": True})
    return Case(name, np.stack([_zscore(c) for c in raw]), None, zooms, affine)


def read_input(paths: Path | list[Path], dim: int, in_channels: int, plan: dict | None = None) -> Case:
    """Read one input case (a NIfTI, h5 or PNG/JPG/TIFF file, or the channel files of one NIfTI case).

    NIfTI files go through the model's preprocessing plan where it has one (reorientation, resampling,
    normalisation; the case's ``restore`` maps predictions back to the file's grid); otherwise they are read as
    the built-in datasets: 2D intensities in [0, 1] (8-bit / 255, otherwise 0.5-99.5 percentile min-max), 3D
    per-volume z-score. h5 files (ACDC/LA layouts) are taken as stored, since those files are already
    normalised. Input of the wrong dimensionality or channel count is refused in one sentence."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    path = paths[0]
    name = case_name(path)
    suffix = "".join(path.suffixes).lower()
    if not path.is_file():
        raise DataError(f"Input '{path}' does not exist; pass existing image files.")
    try:
        if suffix.endswith((".nii", ".nii.gz")):
            return _read_nifti(paths, dim, in_channels, plan)
        if suffix.endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise DataError(f"Input '{path}' has no dataset 'image'; store the image under that key.")
                arr = np.asarray(f["image"], dtype=np.float32)
            if arr.ndim != 3:
                raise DataError(f"Input '{path}' holds an image of shape {arr.shape}; expected a volume (3 axes).")
            _refuse_channels(path, 1, in_channels)
            if not np.isfinite(arr).all():
                raise DataError(f"Input '{path}' holds NaN or infinite values; clean it before predicting.")
            return Case(name, arr[None], None)
        if suffix.endswith(PICTURE_SUFFIXES):
            from PIL import Image

            if dim == 3:
                raise DataError(f"Input '{path}' is a 2D image but the model is 3D; give it volumes (NIfTI or h5).")
            im = np.asarray(Image.open(path))
            arr = im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else _minmax(im.astype(np.float32))
            arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
            if arr.shape[0] == 4:  # RGBA: the alpha channel is not image content
                arr = arr[:3]
            if arr.shape[0] != in_channels and in_channels == 1 and all(np.array_equal(arr[0], c) for c in arr):
                arr = arr[:1]  # a grey image stored as RGB
            _refuse_channels(path, arr.shape[0], in_channels)
            if not np.isfinite(arr).all():
                raise DataError(f"Input '{path}' holds NaN or infinite values; clean it before predicting.")
            return Case(name, arr, None)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"Input '{path}' cannot be read ({type(e).__name__}: {e}); check the file.") from e
    raise DataError(f"Input '{path}' has an unknown type; use .nii.gz, .h5 or .png/.jpg/.tif.")


def _overlay(image: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """RGB uint8: the image in grey with each class in its own colour at half opacity (class 0 left clear)."""
    from matplotlib import colormaps

    grey = image[0] if image.ndim == 3 else image
    grey = np.clip(grey, 0, 1) if grey.min() >= 0 and grey.max() <= 1 else _minmax(grey)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colors = colormaps["tab10"](np.arange(10))[:, :3]
    for c in range(1, num_classes):
        m = pred == c
        rgb[m] = 0.5 * rgb[m] + 0.5 * colors[c % 10]
    return (rgb * 255).round().astype(np.uint8)


def _save_probabilities(probs: np.ndarray, case: Case, target: Path, nifti: bool) -> Path:
    """(K, *S) float32: a 4D NIfTI (X, Y, Z, K) on the input's grid, or an .npz with ``probabilities``."""
    if nifti:
        import nibabel as nib

        img = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), np.asarray(case.affine))
        nib.save(img, str(target))
    else:
        np.savez_compressed(target, probabilities=probs.astype(np.float32))
    return target


def predict_files(checkpoint: str | Path, inputs: list[str], out: str | Path, device: str = "auto",
                  fmt: str | None = None, which: str = "last", overwrite: bool = False, save_prob: bool = False,
                  tta: bool = False, inferer: str = "semiseg", progress: bool = False) -> list[Path]:
    """Predict label maps for new images (files, or folders of them) and write them into ``out``, one per case,
    named by case (the ``_0000`` channel suffix dropped); ``out`` may not lie inside an input folder, an output
    never replaces an input, and an existing output is replaced only with ``overwrite``.

    ``which`` is ``last`` or ``best`` (a run directory's checkpoint, as in eval) or a checkpoint file.
    ``save_prob`` also writes the class probabilities; ``tta`` averages mirrored predictions; 2D PNG outputs
    come with a colour overlay ``<case>_overlay.png``."""
    from semiseg.engine.trainer import pick_device

    files, folders = expand_inputs(inputs)
    check_output_folder(Path(out), folders, "the input folder")
    ck_path = ckpt_io.resolve(checkpoint, prefer=which) if which in ("last", "best") else Path(which)
    if not ck_path.is_file():
        raise CheckpointError(f"Checkpoint '{ck_path}' does not exist; give last, best or a checkpoint file.")
    ck = ckpt_io.load(ck_path)
    meta = ck["meta"]
    plan = meta.get("preprocessing")
    values = (plan or {}).get("label_values")
    dev = pick_device(device)
    model = load_model(ck, dev)
    predict = predictor(model, meta["dim"], tuple(meta["patch_size"]), meta["num_classes"], dev, mode="test",
                        tta=tta, inferer=inferer)
    out = Path(out)

    # names and targets first, so that a conflict stops the run before any work
    inputs_resolved = {f.expanduser().resolve() for f in files}
    names: dict[str, int] = {}
    jobs = []
    for group in group_channels(files):
        name = case_name(group[0])
        n = names[name] = names.get(name, 0) + 1
        name = f"{name}-{n}" if n > 1 else name  # the same name from two folders (or two suffixes): keep both
        picture = group[0].name.lower().endswith(PICTURE_SUFFIXES)
        kind = fmt or ("png" if meta["dim"] == 2 and picture else "nifti")
        targets = [out / (name + SUFFIX[kind])]
        if save_prob:
            targets.append(out / (name + ("_prob.nii.gz" if kind == "nifti" and not picture else "_prob.npz")))
        if kind == "png":
            targets.append(out / f"{name}_overlay.png")
        for t in targets:
            if t.resolve() in inputs_resolved:
                raise ConfigError(f"Writing '{t}' would replace an input; choose another --out.")
            if t.exists() and not overwrite:
                raise ConfigError(f"'{t}' exists; pass --overwrite to replace it or choose another --out.")
        jobs.append((group, name, kind, targets))

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    steps = jobs
    if progress:
        from rich.progress import track

        steps = track(jobs, description="predicting", transient=True, console=_stderr_console())
    for group, name, kind, targets in steps:
        case = read_input(group, meta["dim"], meta["in_channels"], plan)
        case = Case(name, case.image, None, case.spacing, case.affine, case.meta, case.restore)
        probs = None
        if save_prob:
            probs = predict.probabilities(case.image)
            if case.restore is not None:
                probs = case.restore(probs)
            pred = np.argmax(probs, axis=0).astype(np.int64)
        else:
            pred = predict(case.image, case.restore)
        if case.meta.get("slices_last"):
            pred = np.moveaxis(pred, 0, -1)
            probs = None if probs is None else np.moveaxis(probs, 1, -1)
        if values is not None:  # back to the values the training label files use (e.g. 0/255)
            from semiseg.data.preprocessing import unmap_labels

            pred = unmap_labels(pred, values)
        if kind == "png":
            from PIL import Image

            scale = 255 if meta["num_classes"] == 2 and values is None else 1  # binary: 0/255, else indices
            Image.fromarray((pred * scale).astype(np.uint8)).save(targets[0])
            image2d = case.image if case.image.ndim == 3 else case.image[:, 0]
            Image.fromarray(_overlay(image2d, pred, meta["num_classes"])).save(targets[-1])
            written += [targets[0], targets[-1]]
        else:
            written.append(save_prediction(pred, case, out, kind, max(meta["num_classes"], max(values or [0]) + 1)))
        if probs is not None:
            written.append(_save_probabilities(probs, case, targets[1], targets[1].name.endswith(".nii.gz")))
    return written


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
