"""ACDC in the SSL4MIS form: ``root/data/patient<NNN>_frame<FF>.h5`` volumes, sliced on the fly.

Layout (as redistributed by SSL4MIS, UM-med and CrossMatch)::

    root/data/*.h5                         image float (D, H, W) in [0, 1], label uint8 (D, H, W):
                                           0 background, 1 RV, 2 Myo, 3 LV
    root/train.list, val.list, test.list   volume ids, one per line
    root/splits/{1,3,7}/labeled.txt, unlabeled.txt   slice paths data/slices/patient<NNN>_frame<FF>_slice_<K>.h5

Labeled split: ``labeled`` counts *patients* (or is a fraction of the 70 training patients, rounded
down). When ``root/splits/{N}/labeled.txt`` exists it is used as published (slice K is index K-1 of the
volume) with ``unlabeled.txt`` beside it; otherwise the labeled slices are every slice of the first N patients
in ``train.list`` order and the unlabeled ones every other slice of ``train.list`` (the published 1/3/7 splits
follow the same rule, so both give the same sets). Training items are 2D slices; evaluation cases are whole
volumes (``val``, ``test``, ``valtest`` = both, ``train``), evaluated slice by slice, in voxels (the h5 has no
spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.checks import (
    READ_ERRORS,
    ProcessLRU,
    broken_file,
    check_disjoint,
    check_finite,
    check_label_values,
    check_nonempty,
    check_same_shape,
    content_sample,
    h5_shapes,
    read_h5,
    require_dir,
    require_root,
)
from semiseg.data.splits import acdc_patient, parse_acdc_slice, read_list, resolve_count, unique_in_order
from semiseg.errors import DataError
from semiseg.registry import register_dataset

NUM_CLASSES = 4
CLASS_NAMES = ["background", "RV", "Myo", "LV"]
LAYOUT = "data/*.h5 volumes and train.list, val.list, test.list (the SSL4MIS ACDC layout)"
OPEN_FILES = 16  # open h5 handles kept per process: a slice read is then one small hyperslab read


def _close(f) -> None:
    try:
        f.close()
    except Exception:  # closing a handle of a dead file must not mask the real error
        pass


class H5Slices:
    """Picklable loader for ``(volume_id, slice_index)`` keys, with an LRU of open files per process."""

    def __init__(self, data_dir: Path, with_label: bool = True, open_files: int = OPEN_FILES) -> None:
        self.data_dir = Path(data_dir)
        self.with_label = with_label
        self.files = ProcessLRU(open_files, on_evict=_close)

    def _open(self, path: Path):
        import h5py

        return h5py.File(path, "r")

    def __call__(self, key: tuple[str, int]):
        vol, k = key
        path = self.data_dir / f"{vol}.h5"
        try:
            f = self.files.get(path, lambda: self._open(path))
            image = np.asarray(f["image"][k], dtype=np.float32)[None]
            if not self.with_label:
                return image
            return image, np.asarray(f["label"][k], dtype=np.int64)
        except READ_ERRORS as e:
            raise broken_file(path, e) from e


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A whole volume: image (1, D, H, W) float32 and label (D, H, W) int64, contents checked."""
    image, label = read_h5(path, ("image", "label"))
    check_finite(image, path)
    check_label_values(label, NUM_CLASSES, path, fix="fix or remove the file")
    return image.astype(np.float32, copy=False)[None], label.astype(np.int64, copy=False)


def _cases(data_dir: Path, ids: list[str]):
    def load() -> list[Case]:
        out = []
        for vid in ids:
            image, label = load_volume(data_dir / f"{vid}.h5")
            patient, _, frame = vid.partition("_")
            out.append(Case(name=vid, image=image, label=label, spacing=None,
                            meta={"patient": patient, "frame": frame, "axes": "DHW"}))
        return out

    return load


def _list_ids(root: Path, name: str, depth: dict[str, int]) -> list[str]:
    path = root / name
    ids = [Path(s).stem if s.endswith(".h5") else s for s in read_list(path, "ACDC list file")]
    ids = [s.split("/")[-1] for s in ids]
    missing = [s for s in ids if s not in depth]
    if missing:
        raise DataError(f"The list '{path}' names volume '{missing[0]}' but "
                        f"'{root / 'data' / missing[0]}.h5' does not exist; restore the file or remove "
                        f"the line.")
    return ids


def _slices_from_file(path: Path, depth: dict[str, int]) -> list[tuple[str, int]]:
    keys = [parse_acdc_slice(s, path) for s in read_list(path, "ACDC split file")]
    for vol, k in keys:
        if vol not in depth:
            raise DataError(f"The split file '{path}' names volume '{vol}' which is not in data/; restore "
                            f"data/{vol}.h5 or remove its lines.")
        if k >= depth[vol]:
            raise DataError(f"The split file '{path}' names slice {k + 1} of '{vol}' which has only "
                            f"{depth[vol]} slices; fix the line.")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"The split file '{path}' lists slice {dup[1] + 1} of '{dup[0]}' twice; "
                        f"remove the repeat.")
    return keys


@register_dataset("acdc")
def acdc(
    root: str | None = None,
    labeled: float = 3,
    patch_size: tuple[int, ...] | None = (256, 256),
) -> SegData:
    """ACDC cine-MRI (RV/Myo/LV), 2D training on slices of SSL4MIS h5 volumes; ``labeled`` counts patients."""
    root_p = require_root(root, "acdc", LAYOUT)
    data_dir = require_dir(root_p / "data", "ACDC data", f"put the volume files in {root_p / 'data'}")
    paths = sorted(data_dir.glob("*.h5"))
    if not paths:
        raise DataError(f"The ACDC data folder '{data_dir}' holds no .h5 files; "
                        f"put the SSL4MIS volumes there.")

    # Index from headers only: one h5 open per volume, no data read.
    depth: dict[str, int] = {}
    for p in paths:
        shapes = h5_shapes(p, ("image", "label"))
        check_same_shape(shapes["image"], shapes["label"], p)
        if len(shapes["image"]) != 3:
            raise DataError(f"The volume '{p}' has shape {shapes['image']}, not (D, H, W); re-create it.")
        depth[p.stem] = shapes["image"][0]

    train_ids = _list_ids(root_p, "train.list", depth)
    val_ids = _list_ids(root_p, "val.list", depth)
    test_ids = _list_ids(root_p, "test.list", depth)
    check_nonempty(train_ids, "train", "acdc", f"list training volumes in {root_p / 'train.list'}")
    for name, ids in (("val", val_ids), ("test", test_ids)):
        check_nonempty(ids, name, "acdc", f"list volumes in {root_p / (name + '.list')}")
        check_disjoint(train_ids, ids, "train", name, root_p / f"{name}.list")

    patients = unique_in_order([acdc_patient(v) for v in train_ids])
    n_pat = resolve_count(labeled, len(patients), "patients", "the ACDC train.list")
    split_dir = root_p / "splits" / str(n_pat)
    if (split_dir / "labeled.txt").is_file():
        lab_keys = _slices_from_file(split_dir / "labeled.txt", depth)
        unl_keys = _slices_from_file(split_dir / "unlabeled.txt", depth)
        source, unl_source = str(split_dir / "labeled.txt"), str(split_dir / "unlabeled.txt")
        slice_names = lambda keys: [f"{v}_slice_{k + 1}" for v, k in keys]  # noqa: E731  (as in the file)
        check_disjoint(slice_names(lab_keys), slice_names(unl_keys), "labeled", "unlabeled",
                       split_dir / "unlabeled.txt")
    else:
        chosen = set(patients[:n_pat])
        lab_keys = [(v, k) for v in train_ids if acdc_patient(v) in chosen for k in range(depth[v])]
        unl_keys = [(v, k) for v in train_ids if acdc_patient(v) not in chosen for k in range(depth[v])]
        source = unl_source = f"first {n_pat} patients of {root_p / 'train.list'}"
    check_nonempty(lab_keys, "labeled", "acdc", f"check {source}")
    lab_vols = unique_in_order([v for v, _ in lab_keys])
    unl_vols = unique_in_order([v for v, _ in unl_keys])
    for name, ids in (("val", val_ids), ("test", test_ids)):
        check_disjoint(lab_vols, ids, "labeled", name, source)
        check_disjoint(unl_vols, ids, "unlabeled", name, unl_source)

    # Contents of the labeled volumes (few: 2 per patient) are read in full once.
    for vid in content_sample(lab_vols):
        load_volume(data_dir / f"{vid}.h5")

    return SegData(
        name="acdc",
        dim=2,
        num_classes=NUM_CLASSES,
        in_channels=1,
        patch_size=tuple(int(p) for p in (patch_size or (256, 256))),
        labeled=LazyItems(lab_keys, H5Slices(data_dir, with_label=True)),
        unlabeled=LazyItems(unl_keys, H5Slices(data_dir, with_label=False)),
        unlabeled_truth=LazyItems(unl_keys, H5Slices(data_dir, with_label=True)),
        splits={
            "val": _cases(data_dir, val_ids),
            "test": _cases(data_dir, test_ids),
            "valtest": _cases(data_dir, val_ids + test_ids),
            "train": _cases(data_dir, train_ids),
        },
        policy="medical2d",
        class_names=list(CLASS_NAMES),
        info={
            "evaluation": "per volume, slice by slice; metrics in voxels (no spacing stored)",
            "labeled_patients": unique_in_order([acdc_patient(v) for v in lab_vols]),
            "labeled_source": source,
            "n_labeled_slices": len(lab_keys),
            "n_unlabeled_slices": len(unl_keys),
        },
    )
