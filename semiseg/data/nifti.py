"""NIfTI folders in the Medical Segmentation Decathlon / nnU-Net layout.

Layout::

    root/imagesTr/<case>.nii.gz          MSD: one file per case, 4D (X, Y, Z, C) when multi-channel
    root/imagesTr/<case>_0000.nii.gz     nnU-Net: one file per channel (_0000, _0001, ...)
    root/labelsTr/<case>.nii.gz          class indices on the image grid
    root/imagesTs/...                    unlabeled images (or ``unlabeled_dir``), same naming
    root/labelsTs/<case>.nii.gz          optional: if present, imagesTs is the labeled ``test`` split instead
    root/dataset.json                    optional: ``labels`` gives num_classes and class names,
                                         ``channel_names`` / ``modality`` the channel names

Files whose names start with ``.`` (the ``._*`` macOS copies shipped in MSD tarballs) are ignored. A file
``<case>_NNNN`` is taken as channel NNNN of ``<case>`` when ``labelsTr/<case>`` exists and
``labelsTr/<case>_NNNN`` does not.

Splits (seed-free): validation = the last ``n_val`` labeled cases by sorted name (default 20%, rounded, at
least 1); ``labeled`` (count or fraction) takes the first cases of the rest; the remaining training cases and
every unlabeled image are unlabeled. Intensity, per channel of each volume (no CT windowing): ``zscore``
(mean 0, std 1 over the whole volume, the LA convention) or ``minmax`` (the 0.5 and 99.5 percentiles mapped to
0 and 1 and clipped, the ACDC convention, which the 2D policies expect); ``auto`` is ``zscore`` in 3D and
``minmax`` in 2D. ``dim=2`` trains on slices along the last axis; its cases are whole volumes transposed to
slices-first (C, Z, X, Y), with spacing and affine permuted to match, so they still save as correct NIfTI.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data import preprocessing as pp
from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.checks import (
    READ_ERRORS,
    ProcessLRU,
    broken_file,
    check_disjoint,
    check_finite,
    check_label_values,
    check_nonempty,
    check_same_affine,
    check_same_shape,
    content_sample,
    require_dir,
    require_root,
)
from semiseg.data.splits import holdout_tail, resolve_count, split_first
from semiseg.errors import ConfigError, DataError
from semiseg.registry import register_dataset

LAYOUT = "imagesTr/ and labelsTr/ (the MSD / nnU-Net layout)"
_CHANNEL = re.compile(r"^(.*)_(\d{4})$")
# Decoded volumes kept per process and loader (at most 8 of them): a .nii.gz cannot be sliced cheaply.
CACHE_BYTES = 512 * 2**20


def _stem(p: Path) -> str:
    n = p.name
    return n[:-7] if n.endswith(".nii.gz") else n[:-4]


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii")))


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


@dataclass(frozen=True)
class NiftiCase:
    name: str
    images: tuple[Path, ...]  # one file, or one per channel in channel order
    label: Path | None


def _group(folder: Path, label_dir: Path | None, channel_files: bool | None) -> tuple[list[NiftiCase], bool]:
    """Cases of a folder; ``channel_files`` None decides from the labels (imagesTr), else it is imposed."""
    files = _nifti_files(folder)
    groups: dict[str, dict[int, Path]] = {}
    is_channel = False
    for p in files:
        stem = _stem(p)
        m = _CHANNEL.match(stem)
        if channel_files is None:
            use = m is not None and label_dir is not None and _find(label_dir, stem) is None \
                and _find(label_dir, m.group(1)) is not None
        else:
            use = bool(channel_files) and m is not None
        if use:
            is_channel = True
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
        else:
            groups.setdefault(stem, {})[0] = p
    cases = []
    for name in sorted(groups):
        ch = groups[name]
        if sorted(ch) != list(range(len(ch))):
            gap = next(i for i in range(len(ch) + 1) if i not in ch)
            raise DataError(f"The case '{name}' in '{folder}' has channel files {sorted(ch)} but no "
                            f"'{name}_{gap:04d}'; add the missing channel file.")
        label = _find(label_dir, name) if label_dir is not None else None
        cases.append(NiftiCase(name, tuple(ch[i] for i in range(len(ch))), label))
    return cases, is_channel if channel_files is None else bool(channel_files)


def _header(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms()), img.affine
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def _spatial(shape: tuple[int, ...], path: Path, multi_file: bool,
             is_label: bool) -> tuple[tuple[int, ...], int]:
    """(spatial shape as (X, Y, Z), channels) from a file's shape."""
    if len(shape) == 2:
        return (*shape, 1), 1
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4 and (shape[3] == 1 or (not is_label and not multi_file)):
        return shape[:3], shape[3]
    what = "label" if is_label else "image"
    raise DataError(f"The {what} '{path}' has shape {shape}; expected (X, Y, Z)"
                    f"{'' if is_label or multi_file else ' or (X, Y, Z, C)'}, re-export it.")


def _read(path: Path, as_label: bool) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj) if as_label else img.get_fdata(dtype=np.float32)
    except READ_ERRORS as e:
        raise broken_file(path, e) from e


def read_image(case: NiftiCase) -> np.ndarray:
    """(C, X, Y, Z) float32 as stored in the file(s), on the file's own grid."""
    parts = []
    for p in case.images:
        a = _read(p, as_label=False)
        check_finite(a, p)
        a = a.reshape(_spatial(a.shape, p, len(case.images) > 1, False)[0] + (-1,))
        parts.append(np.moveaxis(a, -1, 0))
    return np.concatenate(parts, 0).astype(np.float32, copy=False)


def read_label(path: Path, plan: dict) -> np.ndarray:
    """(X, Y, Z) class indices on the file's own grid (the file's values mapped as the plan says)."""
    lab = _read(path, as_label=True)
    values = plan["label_values"]
    lab = lab.reshape(_spatial(lab.shape, path, False, True)[0])
    if values == list(range(len(values))):
        check_label_values(lab, len(values), path,
                           fix=f"store class indices 0..{len(values) - 1} or pass a larger num_classes")
        return lab.astype(np.int64)
    check_label_values(lab, int(max(values)) + 1, path, fix="store the values the other labels use")
    return pp.map_labels(lab.astype(np.int64), values, path)


def case_geometry(case: NiftiCase, plan: dict) -> dict:
    shape, zooms, affine = _header(case.images[0])
    return pp.geometry(shape, _zooms3(zooms), affine, plan)


def load_case(case: NiftiCase, plan: dict, with_label: bool) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A case through the plan: (C, X', Y', Z') image and (X', Y', Z') label on the preprocessed grid, and the
    geometry that maps predictions back to the file."""
    geo = case_geometry(case, plan)
    image = pp.preprocess_image(read_image(case), geo, plan)
    label = pp.preprocess_label(read_label(case.label, plan), geo) if with_label and case.label else None
    return image, label, geo


class _Volumes:
    """Picklable loader over case keys (3D) or (case, z) keys (2D), with a per-process LRU of volumes."""

    def __init__(self, plan: dict, with_label: bool, dim: int, cache: int) -> None:
        self.plan = plan
        self.with_label = with_label
        self.dim = dim
        self.cache = ProcessLRU(cache)

    def _load(self, case: NiftiCase):
        image, label, _ = load_case(case, self.plan, self.with_label)
        return image, label

    def __call__(self, key):
        case, z = key if self.dim == 2 else (key, None)
        image, label = self.cache.get(case.name, lambda: self._load(case))
        if z is not None:  # copies, so in-place augmentation cannot alter the cached volume
            image = np.ascontiguousarray(image[..., z])
            label = None if label is None else label[..., z].copy()
        elif self.cache.maxsize > 0:
            image, label = image.copy(), None if label is None else label.copy()
        return (image, label) if self.with_label else image


def _zooms3(zooms: tuple[float, ...]) -> tuple[float, float, float]:
    return tuple(zooms[:3]) if len(zooms) >= 3 else (*zooms[:2], 1.0)


def _to_case(case: NiftiCase, plan: dict, dim: int) -> Case:
    """An evaluation case: the preprocessed image, and the label on the file's own grid with the file's spacing
    and affine; ``restore`` maps predictions back, so metrics and saved predictions are in the file's space."""
    shape, zooms, affine = _header(case.images[0])
    image, _, geo = load_case(case, plan, with_label=False)
    label = read_label(case.label, plan) if case.label is not None else None
    if dim == 2:  # slices first (C, Z, X, Y): the 2D predictor walks axis 1
        image = np.ascontiguousarray(np.moveaxis(image, 3, 1))
    meta = {"axes": "XYZ", "files": [str(p) for p in case.images]}
    return Case(name=case.name, image=image, label=label, spacing=_zooms3(zooms), affine=np.asarray(affine),
                meta=meta, restore=pp.Restore(geo, slices_first=dim == 2))


def _split_cases(cases: list[NiftiCase], plan: dict, dim: int):
    return lambda: [_to_case(c, plan, dim) for c in cases]


def _read_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"The file '{path}' is not valid JSON ({e}); fix it or remove it.") from e


def _labels_from_json(meta: dict, path: Path) -> tuple[list[int], list[str]] | None:
    """(label values in class order, class names) from dataset.json's ``labels``."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    ids: dict[int, str] = {}
    try:
        for k, v in labels.items():
            if str(k).lstrip("-").isdigit():  # MSD: {"0": "background"}
                ids[int(k)] = str(v)
            else:  # nnU-Net v2: {"background": 0}, regions as lists
                for i in (v if isinstance(v, list) else [v]):
                    ids.setdefault(int(i), str(k))
    except (TypeError, ValueError) as e:
        raise DataError(f"The 'labels' entry of '{path}' is not a map of class ids and names; fix it.") from e
    if 0 not in ids or min(ids) < 0:
        raise DataError(f"The 'labels' entry of '{path}' has no background 0 (or a negative id); fix it.")
    values = sorted(ids)
    return values, [ids[v] for v in values]


def _channel_names(meta: dict) -> list[str] | None:
    ch = meta.get("channel_names") or meta.get("modality")
    if isinstance(ch, dict):
        return [str(ch[k]) for k in sorted(ch, key=lambda s: int(s) if str(s).isdigit() else 0)]
    return None


def names(cases: list[NiftiCase]) -> list[str]:
    return [c.name for c in cases]


def _default_patch(shapes: list[tuple[int, ...]], dim: int) -> tuple[int, ...]:
    med = np.median(np.array(shapes), axis=0)
    cap, axes = (256, med[:2]) if dim == 2 else (96, med)
    return tuple(int(max(16, min(cap, m) // 16 * 16)) for m in axes)


def _label_values(cases: list[NiftiCase], meta_labels: tuple[list[int], list[str]] | None,
                  num_classes: int | None) -> tuple[list[int], list[str] | None]:
    """The label values of the training files in class order, and the class names where dataset.json has them.
    Values that are not 0..K-1 (0/255 masks) are mapped to consecutive classes with a printed note."""
    if meta_labels is not None:
        values, class_names = meta_labels
        if num_classes is not None and num_classes != len(values):
            raise ConfigError(f"num_classes={num_classes} disagrees with the {len(values)} labels of dataset.json; "
                              f"drop num_classes or fix dataset.json.")
        return values, class_names
    if num_classes is not None:
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} must be at least 2 (background and one structure).")
        return list(range(num_classes)), None
    found: set[int] = set()
    for c in cases:  # every label file is read once to find its values
        lab = _read(c.label, as_label=True)
        check_label_values(lab, 2**31, c.label, fix="store whole class values")
        found.update(int(v) for v in np.unique(lab))
    values = sorted(found | {0})
    if len(values) < 2:
        values = [0, 1]  # all background: still a binary problem
    if values != list(range(len(values))):
        warnings.warn(f"nifti: the labels hold the values {values} and there is no dataset.json 'labels'; they "
                      f"are read as the classes 0..{len(values) - 1} in that order, and predictions are written "
                      f"back with the original values.", stacklevel=2)
    return values, None


def _plan(train: list[NiftiCase], labeled: list[NiftiCase], dim: int, intensity: str, in_ch: int,
          channel_names: list[str] | None, values: list[int]) -> dict:
    """The preprocessing plan from the training cases (labeled and unlabeled headers; the labeled cases'
    foreground intensities where a channel is CT)."""
    spacings, shapes = [], []
    for c in train:
        shape, zooms, affine = _header(c.images[0])
        sh, sp = pp.canonical_geometry(shape, _zooms3(zooms), affine)
        shapes.append(sh)
        spacings.append(sp)
    ch_names = list(channel_names or [])
    ch_names = ch_names if len(ch_names) == in_ch else [f"channel{i}" for i in range(in_ch)]
    schemes = pp.channel_schemes(ch_names, intensity, dim)
    stats = None
    if "ct" in schemes:
        samples: dict[int, list[np.ndarray]] = {i: [] for i in range(in_ch)}
        for k, c in enumerate(labeled):
            fg = pp.foreground_sample(read_image(c), read_label(c.label, {"label_values": values}), seed=k)
            for i, v in enumerate(fg):
                samples[i].append(v)
        stats = {i: pp.ct_statistics(samples[i]) for i, s in enumerate(schemes) if s == "ct"}
    return pp.make_plan(dim, spacings, shapes, ch_names, schemes, values, stats)


@register_dataset("nifti")
def nifti(
    root: str | None = None,
    dim: int = 3,
    labeled: float = 0.1,
    patch_size: tuple[int, ...] | None = None,
    unlabeled_dir: str | None = None,
    n_val: int | None = None,
    num_classes: int | None = None,
    intensity: str = "auto",
    target_spacing: tuple[float, ...] | None = None,
    foreground: float = 1 / 3,
    plan: dict | None = None,
) -> SegData:
    """MSD / nnU-Net NIfTI folder, reoriented, resampled and normalised by a stored plan; ``dim=2`` trains on
    axial slices."""
    if dim not in (2, 3):
        raise ConfigError(f"nifti dim={dim} is not supported; use dim=2 (slices) or dim=3 (volumes).")
    if intensity not in ("auto", *pp.SCHEMES):
        raise ConfigError(f"nifti intensity='{intensity}' is not known; use auto, {', '.join(pp.SCHEMES)}.")
    if not 0.0 <= float(foreground) <= 1.0:
        raise ConfigError(f"nifti foreground={foreground} is a share of patches; give a number in [0, 1].")
    root_p = require_root(root, "nifti", LAYOUT)
    img_dir = require_dir(root_p / "imagesTr", "training image", f"put the images in {root_p / 'imagesTr'}")
    lab_dir = require_dir(root_p / "labelsTr", "training label", f"put the labels in {root_p / 'labelsTr'}")
    meta = _read_json(root_p)

    cases, channel_files = _group(img_dir, lab_dir, None)
    check_nonempty(cases, "labeled", "nifti", f"put .nii.gz images in {img_dir}")
    for c in cases:
        if c.label is None:
            raise DataError(f"The image '{c.images[0]}' has no label '{lab_dir / (c.name + '.nii.gz')}'; "
                            f"add the label or move the image to imagesTs.")

    # Headers only: shapes, channel counts, and image/label agreement on grid and position for every file.
    in_ch = None

    def header_check(c: NiftiCase) -> None:
        nonlocal in_ch
        spatial, ch, first = None, 0, None
        for p in c.images:
            shape, _, affine = _header(p)
            s, n = _spatial(shape, p, len(c.images) > 1, False)
            if spatial is not None and s != spatial:
                check_same_shape(spatial, s, c.images[0], p)
            check_same_affine(first, affine, c.images[0], p)
            first = affine if first is None else first
            spatial, ch = s, ch + n
        if in_ch is None:
            in_ch = ch
        elif ch != in_ch:
            raise DataError(f"The case '{c.images[0]}' has {ch} channel(s) but earlier cases have {in_ch}; "
                            f"give every case the same channels.")
        if c.label is not None:
            shape, _, affine = _header(c.label)
            check_same_shape(spatial, _spatial(shape, c.label, False, True)[0], c.images[0], c.label)
            check_same_affine(first, affine, c.images[0], c.label)

    for c in cases:
        header_check(c)

    unl_dir = None
    if unlabeled_dir is not None:
        unl_dir = Path(unlabeled_dir).expanduser()
        unl_dir = unl_dir if unl_dir.is_absolute() else root_p / unl_dir
        require_dir(unl_dir, "unlabeled image", "fix --unlabeled-dir or create it")
    test_cases: list[NiftiCase] = []
    if (root_p / "imagesTs").is_dir() and (root_p / "labelsTs").is_dir():
        test_cases, _ = _group(root_p / "imagesTs", root_p / "labelsTs", channel_files)
        test_cases = [c for c in test_cases if c.label is not None]
    elif unl_dir is None and (root_p / "imagesTs").is_dir():
        unl_dir = root_p / "imagesTs"
    extra = _group(unl_dir, None, channel_files)[0] if unl_dir is not None else []
    for c in extra + test_cases:
        header_check(c)

    train, val = holdout_tail(cases, n_val, "the nifti imagesTr folder", key=lambda c: c.name)
    n_lab = resolve_count(labeled, len(train), "cases", "the nifti training set (after the hold-out)")
    lab_cases, rest = split_first(train, n_lab)
    unl_cases = rest + extra
    check_disjoint(names(lab_cases) + names(val), names(extra), "labeled", "unlabeled", unl_dir or img_dir)
    if test_cases:
        check_disjoint(names(cases), names(test_cases), "training", "test", root_p / "imagesTs")
        check_disjoint(names(extra), names(test_cases), "unlabeled", "test", unl_dir or root_p / "imagesTs")

    # The plan: computed once from the training cases, or replayed as stored with a model.
    if plan is not None:
        plan = pp.check_plan(plan, "the model")
        if plan["dim"] != dim or len(plan["channels"]) != in_ch:
            raise ConfigError(f"The stored preprocessing plan is for {plan['dim']}D data with "
                              f"{len(plan['channels'])} channel(s), but '{root_p}' is read as {dim}D with {in_ch}; "
                              f"use the data the model was trained on.")
        values, class_names = plan["label_values"], None
        json_labels = _labels_from_json(meta, root_p / "dataset.json")
        if json_labels is not None and json_labels[0] == values:
            class_names = json_labels[1]
    else:
        values, class_names = _label_values(cases, _labels_from_json(meta, root_p / "dataset.json"), num_classes)
        plan = _plan(lab_cases + unl_cases, lab_cases, dim, intensity, int(in_ch), _channel_names(meta), values)
        if target_spacing is not None:
            ts = [float(t) for t in target_spacing]
            if len(ts) != 3 or min(ts) <= 0:
                raise ConfigError(f"nifti target_spacing={target_spacing} needs three positive mm values (X,Y,Z).")
            plan["target_spacing"] = ts if dim == 3 else [ts[0], ts[1], None]
    num_classes = len(values)
    for c in content_sample(cases):  # NaN/Inf and label values on a sample of the files, before training
        read_image(c)
        read_label(c.label, plan)

    geos = {c.name: case_geometry(c, plan) for c in train + extra}
    shapes = {k: tuple(g["preprocessed_shape"]) for k, g in geos.items()}
    biggest = max(int(np.prod(s)) for s in shapes.values())
    cache = int(max(1, min(8, CACHE_BYTES // (biggest * (4 * int(in_ch) + 8)))))
    if dim == 2:
        lab_keys = [(c, z) for c in lab_cases for z in range(shapes[c.name][2])]
        unl_keys = [(c, z) for c in unl_cases for z in range(shapes[c.name][2])]
    else:
        lab_keys, unl_keys = lab_cases, unl_cases
    splits = {"val": _split_cases(val, plan, dim)}
    if test_cases:
        splits["test"] = _split_cases(test_cases, plan, dim)
    splits["train"] = _split_cases(lab_cases, plan, dim)
    if patch_size is None:
        patch = _default_patch([shapes[c.name] for c in train], dim)
    else:
        patch = tuple(int(p) for p in patch_size)
    spacing_text = ", ".join("kept" if t is None else f"{t:.3g}" for t in plan["target_spacing"])
    return SegData(
        name="nifti",
        dim=dim,
        num_classes=num_classes,
        in_channels=int(in_ch),
        patch_size=patch,
        labeled=LazyItems(lab_keys, _Volumes(plan, True, dim, cache)),
        unlabeled=LazyItems(unl_keys, _Volumes(plan, False, dim, cache if dim == 2 else 0)),
        splits=splits,
        policy="medical2d" if dim == 2 else "medical3d",
        class_names=class_names,
        policy_options={"foreground": float(foreground)} if dim == 3 else {},
        info={
            "evaluation": "per volume, on each file's own grid" + (", predicted slice by slice" if dim == 2 else ""),
            "layout": "nnU-Net channel files" if channel_files else "MSD single files",
            "channel_names": _channel_names(meta),
            "labeled_cases": names(lab_cases),
            "val_cases": names(val),
            "n_unlabeled_cases": len(unl_cases),
            "intensity": ", ".join(f"{c['name']}: {c['scheme']}" for c in plan["channels"]),
            "spacing": f"RAS, resampled to ({spacing_text}) mm",
            "preprocessing": plan,
        },
    )
