"""Left Atrium (2018 challenge) in the UA-MT form: ``root/<case>/mri_norm2.h5`` volumes.

Layout::

    root/<CASE_ID>/mri_norm2.h5   image float32 (W, H, D) z-scored, label uint8 {0, 1}
    root/train.list, test.list    case ids, one per line

Labeled = the first N ids of ``train.list`` (``labeled`` counts cases, or is a fraction of them), unlabeled
= the rest. The published ``train_{N}_label.list`` / ``_unlabel.list`` files are ignored on purpose: the
16-label unlabeled list is shuffled and repeats 12 labeled cases, and first-N / rest reproduces the 4- and
8-label files.
Splits: ``test`` (``test.list``) and ``val`` = ``test``, because upstream (UA-MT, BCP, CrossMatch) selects
checkpoints on the test cases; report ``test`` numbers with that in mind.

Spacing: an h5 ``spacing`` attribute (file or image dataset) wins, then the ``spacing`` option, else it is
inferred from the depth: upstream volumes always have D = 88 at 0.625 mm, so a volume of depth D is taken as
``0.625 * 88 / D`` mm isotropic (1.25 mm for the half-resolution copy with D = 44).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.checks import (
    ProcessLRU,
    check_disjoint,
    check_finite,
    check_label_values,
    check_nonempty,
    check_same_shape,
    content_sample,
    h5_attr,
    h5_shapes,
    read_h5,
    require_file,
    require_root,
)
from semiseg.data.splits import read_list, resolve_count, split_first
from semiseg.errors import ConfigError, DataError
from semiseg.registry import register_dataset

NUM_CLASSES = 2
CLASS_NAMES = ["background", "left atrium"]
FILE = "mri_norm2.h5"
LAYOUT = "<case>/mri_norm2.h5 folders and train.list, test.list (the UA-MT LA layout)"
FULL_RES_DEPTH, FULL_RES_MM = 88, 0.625
FULL_RES_PATCH, HALF_RES_PATCH = (112, 112, 80), (64, 64, 32)
CACHED_VOLUMES = 16  # labeled volumes are revisited every few steps: keep them decoded per process


def load_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """image (1, W, H, D) float32 and label (W, H, D) int64, contents checked."""
    image, label = read_h5(path, ("image", "label"))
    check_finite(image, path)
    check_label_values(label, NUM_CLASSES, path, fix="fix or remove the file")
    return image.astype(np.float32, copy=False)[None], label.astype(np.int64, copy=False)


class H5Volumes:
    """Picklable loader: case id -> (image, label) or image, with an optional per-process LRU of arrays."""

    def __init__(self, root: Path, with_label: bool, cache: int) -> None:
        self.root = Path(root)
        self.with_label = with_label
        self.cache = ProcessLRU(cache)

    def __call__(self, case: str):
        image, label = self.cache.get(case, lambda: load_case(self.root / case / FILE))
        if self.cache.maxsize > 0:  # hand out copies so in-place augmentation cannot alter the cache
            image, label = image.copy(), label.copy()
        return (image, label) if self.with_label else image


def _spacing(path: Path, depth: int, option: float | None) -> tuple[float, float, float]:
    stored = h5_attr(path, "spacing")
    if stored is None:
        stored = h5_attr(path, "spacing", "image")
    if stored is not None:
        s = np.atleast_1d(np.asarray(stored, dtype=float))
        return tuple(float(v) for v in (np.repeat(s, 3) if s.size == 1 else s[:3]))
    if option is not None:
        if option <= 0:
            raise ConfigError(f"spacing={option} must be a positive size in mm.")
        return (float(option),) * 3
    mm = FULL_RES_MM * FULL_RES_DEPTH / depth
    return (mm, mm, mm)


def _ids(root: Path, name: str) -> list[str]:
    ids = read_list(root / name, "LA list file")
    for c in ids:
        require_file(root / c / FILE, "LA volume", f"restore it or remove '{c}' from {root / name}")
    return ids


def _cases(root: Path, ids: list[str], spacing: tuple[float, float, float]):
    def load() -> list[Case]:
        out = []
        for c in ids:
            image, label = load_case(root / c / FILE)
            out.append(Case(name=c, image=image, label=label, spacing=spacing, meta={"axes": "WHD"}))
        return out

    return load


@register_dataset("la")
def la(
    root: str | None = None,
    labeled: float = 8,
    patch_size: tuple[int, ...] | None = None,
    spacing: float | None = None,
) -> SegData:
    """Left atrium LGE-MRI, 3D; ``labeled`` = first N of train.list; patch default 112x112x80 (64x64x32 if the
    volumes are shallower than 80, as in the half-resolution copy)."""
    root_p = require_root(root, "la", LAYOUT)
    train_ids = _ids(root_p, "train.list")
    test_ids = _ids(root_p, "test.list")
    check_nonempty(train_ids, "train", "la", f"list training cases in {root_p / 'train.list'}")
    check_nonempty(test_ids, "test", "la", f"list test cases in {root_p / 'test.list'}")
    check_disjoint(train_ids, test_ids, "train", "test", root_p / "test.list")
    if len(set(train_ids)) != len(train_ids):
        dup = next(c for c in train_ids if train_ids.count(c) > 1)
        raise DataError(f"The list '{root_p / 'train.list'}' names case '{dup}' twice; remove the repeat.")

    shapes = {}
    for c in train_ids + test_ids:
        path = root_p / c / FILE
        s = h5_shapes(path, ("image", "label"))
        check_same_shape(s["image"], s["label"], path)
        if len(s["image"]) != 3:
            raise DataError(f"The volume '{path}' has shape {s['image']}, not (W, H, D); re-create it.")
        shapes[c] = s["image"]

    n_lab = resolve_count(labeled, len(train_ids), "cases", "the LA train.list")
    lab_ids, unl_ids = split_first(train_ids, n_lab)
    for c in content_sample(lab_ids):
        load_case(root_p / c / FILE)

    min_depth = min(s[2] for s in shapes.values())
    sp = _spacing(root_p / train_ids[0] / FILE, shapes[train_ids[0]][2], spacing)
    if patch_size is None:
        patch = FULL_RES_PATCH if min_depth >= FULL_RES_PATCH[2] else HALF_RES_PATCH
    else:
        patch = tuple(int(p) for p in patch_size)
    return SegData(
        name="la",
        dim=3,
        num_classes=NUM_CLASSES,
        in_channels=1,
        patch_size=patch,
        labeled=LazyItems(lab_ids, H5Volumes(root_p, True, CACHED_VOLUMES)),
        unlabeled=LazyItems(unl_ids, H5Volumes(root_p, False, 0)),
        unlabeled_truth=LazyItems(unl_ids, H5Volumes(root_p, True, 0)),
        splits={"val": _cases(root_p, test_ids, sp), "test": _cases(root_p, test_ids, sp)},
        policy="medical3d",
        class_names=list(CLASS_NAMES),
        info={
            "evaluation": "per volume; val is the test list (upstream protocol)",
            # the official LA test's sliding-window stride (UA-MT, BCP and CrossMatch test scripts)
            "eval_stride": (18, 18, 4),
            "spacing": sp,
            "n_labeled": len(lab_ids),
            "n_unlabeled": len(unl_ids),
            "labeled_source": f"first {n_lab} cases of {root_p / 'train.list'}",
        },
    )
