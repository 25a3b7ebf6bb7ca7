"""Evaluate a predictor on a list of cases and write a report.

``evaluate_cases(predict_fn, cases, num_classes, out_dir=...)`` writes into ``out_dir``:

* ``cases.csv``: one row per case and foreground class: ``case,class,dice,jaccard,hd95,asd`` (missing values,
  see the empty-mask policy in :mod:`semiseg.evaluation.metrics`, are written as ``nan``);
* ``summary.json``: mean and std per class and overall, counts of empty masks and of missing values, the
  policy and units used (missing values are ``null`` there);
* ``pred/<case>.nii.gz`` (label map with the case affine; ``diag(spacing)`` when only the spacing is known,
  identity otherwise) or ``pred/<case>.h5`` (dataset ``prediction``);
* ``montage.png``: a few cases, one row each: image slice, ground-truth overlay, prediction overlay.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.base import Case
from semiseg.errors import ConfigError, DataError
from semiseg.evaluation.metrics import EMPTY_POLICIES, METRICS, case_metrics, summarize

CSV_COLUMNS = ("case", "class", *METRICS)


def _affine(case: Case) -> np.ndarray:
    if case.affine is not None:
        return np.asarray(case.affine, dtype=np.float64)
    aff = np.eye(4)
    if case.spacing is not None:
        for i, s in enumerate(list(case.spacing)[:3]):
            aff[i, i] = float(s)
    return aff


def _label_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.int16


def save_prediction(pred: np.ndarray, case: Case, folder: Path, fmt: str, num_classes: int) -> Path:
    """Write one label map as ``<case>.nii.gz`` or ``<case>.h5`` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(pred).astype(_label_dtype(num_classes))
    if fmt == "nifti":
        import nibabel as nib

        path = folder / f"{case.name}.nii.gz"
        img = nib.Nifti1Image(arr, _affine(case))
        img.set_data_dtype(arr.dtype)
        nib.save(img, str(path))
    elif fmt == "h5":
        import h5py

        path = folder / f"{case.name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("prediction", data=arr, compression="gzip")
            if case.spacing is not None:
                f.attrs["spacing"] = np.asarray(case.spacing, dtype=np.float64)
    else:
        raise ConfigError(f"save_pred must be 'nifti', 'h5' or None, got {fmt!r}.")
    return path


def _slice_axis(case: Case, shape: tuple[int, ...]) -> int:
    axes = str(case.meta.get("axes", "")) if case.meta else ""
    for letter in ("D", "Z"):  # the through-plane axis where the dataset names it
        if len(axes) == len(shape) and letter in axes:
            return axes.index(letter)
    return int(np.argmin(shape))  # otherwise the shortest axis, usually the through-plane one


def _montage_slices(case: Case, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """2D image, label and prediction through the middle of the object (of the volume when there is none)."""
    image = np.asarray(case.image)
    if case.restore is not None and hasattr(case.restore, "grid"):  # the image as it lies on the label's grid
        image = case.restore.grid(image[:1])
    image = image[0] if image.ndim == pred.ndim + 1 else image
    label = None if case.label is None else np.asarray(case.label)
    if pred.ndim == 2:
        return image, label, pred
    axis = _slice_axis(case, pred.shape)
    ref = label if label is not None and label.any() else pred
    other = tuple(a for a in range(pred.ndim) if a != axis)
    present = np.flatnonzero(ref.any(axis=other)) if ref.any() else np.array([pred.shape[axis] // 2])
    k = int(present[len(present) // 2])

    def take(a):
        return None if a is None else np.take(a, k, axis=axis)

    return take(image), take(label), take(pred)


def write_montage(
    items: Sequence[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]], path: Path, num_classes: int
) -> None:
    """PNG grid: per case, the image, the ground truth overlaid and the prediction overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = plt.get_cmap("tab10")(np.arange(10))
    cmap = ListedColormap(colors[np.arange(1, max(num_classes, 2)) % 10])
    fig, axes = plt.subplots(len(items), 3, figsize=(9, 3 * len(items)), squeeze=False)
    for row, (name, img, lab, pred) in zip(axes, items):
        for ax, (title, over) in zip(row, (("image", None), ("ground truth", lab), ("prediction", pred))):
            ax.imshow(img, cmap="gray", interpolation="nearest")
            if over is not None:
                masked = np.ma.masked_where(over == 0, over)
                ax.imshow(
                    masked,
                    cmap=cmap,
                    vmin=1,
                    vmax=max(num_classes - 1, 1),
                    alpha=0.5,
                    interpolation="nearest",
                )
            ax.set_title(f"{name}: {title}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_cases(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    cases: Iterable[Case],
    num_classes: int,
    spacing_mode: str = "voxel",
    empty: str = "nan",
    out_dir: str | Path | None = None,
    save_pred: str | None = "nifti",
    montage: int = 4,
    class_names: Sequence[str] | None = None,
    about: dict[str, Any] | None = None,
) -> dict:
    """Predict every case with ``predict_fn(case.image) -> labels`` (``predict_fn(case.image, case.restore)``
    for cases whose image was preprocessed onto another grid), score it and optionally write a report.

    ``spacing_mode="voxel"`` gives distances in voxels (the published protocols); ``"mm"`` uses each case's
    spacing (an error when a case has none). ``empty`` is the empty-mask policy (``"nan"`` or ``"zero"``).
    Cases without a label are predicted (and saved) but not scored. ``save_pred`` and ``montage`` (number of
    cases shown, spread over the list; 0 for none) only apply with ``out_dir``. ``about`` (split, checkpoint
    rule...) is stored with the numbers, in the result and in ``summary.json``.

    Returns :func:`semiseg.evaluation.metrics.summarize` of the scored cases (``mean_dice``, ``mean_hd95``,
    ``per_class``, ``overall``, ``empty`` counts...) plus ``rows`` (the CSV rows), the settings used and the
    prediction time; missing values are NaN there and ``null`` in ``summary.json``.
    """
    if spacing_mode not in ("voxel", "mm"):
        raise ConfigError(f"spacing_mode must be 'voxel' or 'mm', got {spacing_mode!r}.")
    if empty not in EMPTY_POLICIES:
        raise ConfigError(f"empty must be one of {', '.join(EMPTY_POLICIES)}, got {empty!r}.")
    if save_pred not in ("nifti", "h5", None):
        raise ConfigError(f"save_pred must be 'nifti', 'h5' or None, got {save_pred!r}.")
    cases = list(cases)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    show = set()
    if out is not None and montage > 0 and cases:
        show = {int(i) for i in np.linspace(0, len(cases) - 1, min(montage, len(cases))).round()}

    per_case: list[dict] = []
    rows: list[dict[str, Any]] = []
    shown = []
    unlabeled = 0
    seconds = 0.0
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        pred = predict_fn(case.image) if case.restore is None else predict_fn(case.image, case.restore)
        seconds += time.perf_counter() - t0
        pred = pred.detach().cpu().numpy() if hasattr(pred, "detach") else np.asarray(pred)
        if out is not None and save_pred is not None:
            save_prediction(pred, case, out / "pred", save_pred, num_classes)
        if i in show:
            shown.append((case.name, *_montage_slices(case, pred)))
        if case.label is None:
            unlabeled += 1
            continue
        if pred.shape != np.shape(case.label):
            raise DataError(
                f"The prediction for case '{case.name}' has shape {pred.shape} but its label has "
                f"{np.shape(case.label)}; the predictor must return a label map of the label's shape."
            )
        spacing = None
        if spacing_mode == "mm":
            if case.spacing is None:
                raise ConfigError(
                    f"Case '{case.name}' has no spacing, so distances cannot be in mm; "
                    "use spacing_mode='voxel'."
                )
            spacing = case.spacing
        m = case_metrics(pred, case.label, num_classes, spacing=spacing, empty=empty)
        per_case.append(m)
        for c, vals in m.items():
            rows.append({"case": case.name, "class": c, **{k: float(vals[k]) for k in METRICS}})

    summary = summarize(per_case)
    summary.update(
        empty_policy=empty,
        spacing_mode=spacing_mode,
        num_classes=num_classes,
        class_names=list(class_names) if class_names is not None else None,
        cases_without_label=unlabeled,
        predict_seconds=seconds,
        predict_seconds_per_case=seconds / len(cases) if cases else math.nan,
        **(about or {}),
    )
    if out is not None:
        with open(out / "cases.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        with open(out / "summary.json", "w") as f:
            json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
        if shown:
            write_montage(shown, out / "montage.png", num_classes)
    summary["rows"] = rows
    return summary
