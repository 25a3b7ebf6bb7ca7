"""A dataset from in-memory numpy arrays, for the Python API (``semiseg.train(data=semiseg.arrays(...))``).

Images are ``(H, W)`` / ``(C, H, W)`` for 2D or ``(X, Y, Z)`` / ``(C, X, Y, Z)`` for 3D, with intensities already
normalised the way the user wants them (e.g. in [0, 1], or z-scored); labels are integer maps of the images'
spatial shape with classes ``0 .. num_classes - 1``. Nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from semiseg.data.base import Case, SegData
from semiseg.errors import DataError


def _image(a: np.ndarray, dim: int, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == dim:
        a = a[None]
    if a.ndim != dim + 1:
        layout = "(H, W) or (C, H, W)" if dim == 2 else "(X, Y, Z) or (C, X, Y, Z)"
        raise DataError(f"{what} has shape {a.shape}; a {dim}D image must be {layout}.")
    if not np.isfinite(a).all():
        raise DataError(f"{what} holds NaN or infinite values; clean it before training.")
    return a


def _label(y: np.ndarray, image: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != image.shape[1:]:
        raise DataError(f"{what} has shape {y.shape} but its image is {image.shape[1:]}; they must match.")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{what} holds non-integer values; labels are class indices 0..{num_classes - 1}.")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{what} has values {int(y.min())}..{int(y.max())} outside 0..{num_classes - 1}; pass "
                        f"num_classes or map the labels to consecutive class indices.")
    return y


def _default_patch(shapes: list[tuple[int, ...]], dim: int) -> tuple[int, ...]:
    """2D: the first image's size rounded up to a multiple of 16, at most 256 (images are resized to it);
    3D: the smallest volume's size rounded down to a multiple of 16, at most 96 (patches are cropped)."""
    if dim == 2:
        return tuple(min(256, max(32, -(-s // 16) * 16)) for s in shapes[0])
    smallest = np.min(np.asarray(shapes), axis=0)
    return tuple(int(min(96, max(16, s // 16 * 16))) for s in smallest)


def arrays(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], unlabeled: Sequence[np.ndarray] = (),
           val_images: Sequence[np.ndarray] | None = None, val_labels: Sequence[np.ndarray] | None = None,
           dim: int | None = None, num_classes: int | None = None, patch_size: Sequence[int] | None = None,
           class_names: Sequence[str] | None = None) -> SegData:
    """A training set from arrays: labeled ``images`` with ``labels``, optional ``unlabeled`` images, optional
    validation images (default: the labeled images, which then measure fit rather than generalisation)."""
    if len(images) == 0 or len(images) != len(labels):
        raise DataError(f"arrays() needs as many labels as images and at least one of each; got {len(images)} "
                        f"images and {len(labels)} labels.")
    first = np.asarray(images[0])
    dim = int(dim or (2 if first.ndim in (2,) or (first.ndim == 3 and first.shape[0] <= 4) else 3))
    if dim not in (2, 3):
        raise DataError(f"arrays(): dim must be 2 or 3, got {dim}.")
    num_classes = int(num_classes or max(int(np.max(y)) for y in labels) + 1)
    num_classes = max(num_classes, 2)
    imgs = [_image(a, dim, f"image {i}") for i, a in enumerate(images)]
    labs = [_label(y, imgs[i], num_classes, f"label {i}") for i, y in enumerate(labels)]
    unl = [_image(a, dim, f"unlabeled image {i}") for i, a in enumerate(unlabeled)]
    channels = {a.shape[0] for a in imgs + unl}
    if len(channels) != 1:
        raise DataError(f"arrays(): images have different channel counts {sorted(channels)}; give every image "
                        f"the same channels.")
    if val_images is None:
        vi, vl = imgs, labs
    else:
        vi = [_image(a, dim, f"validation image {i}") for i, a in enumerate(val_images)]
        vl = [_label(y, vi[i], num_classes, f"validation label {i}") for i, y in enumerate(val_labels or [])]
        if len(vl) != len(vi):
            raise DataError("arrays(): val_images and val_labels must have the same length.")
    patch = tuple(int(p) for p in patch_size) if patch_size else _default_patch([a.shape[1:] for a in imgs], dim)
    val = [Case(f"val_{i:04d}", a, y) for i, (a, y) in enumerate(zip(vi, vl))]
    return SegData(
        name="arrays", dim=dim, num_classes=num_classes, in_channels=channels.pop(), patch_size=patch,
        labeled=list(zip(imgs, labs)), unlabeled=unl, splits={"val": val, "test": val},
        policy="medical2d" if dim == 2 else "medical3d",
        class_names=list(class_names) if class_names else None,
        info={"source": "in-memory arrays", "validation": "the labeled images" if val_images is None else "given"},
    )
