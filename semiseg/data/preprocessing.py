"""The preprocessing plan of NIfTI data: computed once from the training cases, stored with the run and in every
checkpoint, and replayed by ``eval``, ``predict`` and ``export`` (the approach of nnU-Net's plans).

A plan is a plain JSON-able dict::

    {"version": 1, "dim": 3, "orientation": "RAS",
     "target_spacing": [x, y, z],              # mm, in canonical axes; 2D: the slice axis is null (kept)
     "anisotropy_threshold": 3.0,
     "channels": [{"name": "CT", "scheme": "ct", "clip": [lo, hi], "mean": m, "std": s},
                  {"name": "T2", "scheme": "zscore"}],
     "label_values": [0, 1, 2]}                # the values stored in the label files, in class order

Per case, in this order:

1. **Orientation.** The closest canonical (RAS+) orientation, by axis permutations and flips only (nibabel's
   ``io_orientation`` / ``apply_orientation``, as ``as_closest_canonical``): no interpolation.
2. **Spacing.** Resampled to ``target_spacing`` with nnU-Net's rule: when the largest spacing (of the case, or
   else of the target) exceeds ``anisotropy_threshold`` times the smallest, the low-resolution axis is resampled
   on its own with nearest neighbour (order 0) and the other axes slice by slice (images order 3, labels order 1
   on one-hot masks); otherwise all axes together (images order 3, labels order 1 on one-hot masks). The
   resizing is scikit-image's ``resize``, as in nnU-Net.
3. **Intensity**, per channel: ``ct`` clips to the 0.5 and 99.5 percentiles of the foreground intensities of
   the labeled training cases and z-scores with their mean and std (nnU-Net's CT normalisation); ``zscore``
   normalises each case by its own mean and std; ``minmax`` maps each case's 0.5-99.5 percentiles to [0, 1].

The target spacing is nnU-Net's full-resolution rule: the median spacing of the training cases, except that
an axis whose median spacing exceeds three times the others' (and whose median size is three times smaller)
takes the 10th percentile of its spacings instead.

Predictions go back the same way: class probabilities are resampled to the canonical grid of the file (order 1;
the low-resolution axis order 0), turned into labels, transposed and flipped back to the file's own axes and
mapped to the file's label values, so they are written on the input's grid with the input's affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from semiseg.errors import ConfigError, DataError

PLAN_VERSION = 1
ANISOTROPY = 3.0
SCHEMES = ("ct", "zscore", "minmax")
# Foreground voxels sampled per case for the CT statistics (nnU-Net samples 10 000 too).
FG_SAMPLES = 10_000


# -- orientation ------------------------------------------------------------------------------------------------
def orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (per file axis: canonical axis, flip) that takes the file's axes to RAS+."""
    from nibabel.orientations import io_orientation

    return io_orientation(np.asarray(affine, dtype=np.float64))


def to_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """The three spatial axes of ``array`` (leading, any trailing axes kept) reoriented to RAS+."""
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(array, ornt))


def from_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical`: the file's own axes back."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    return np.ascontiguousarray(apply_orientation(array, ornt_transform(axcodes2ornt("RAS"), ornt)))


def canonical_geometry(shape: Sequence[int], zooms: Sequence[float],
                       affine: np.ndarray) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Spatial shape and spacing in canonical axes, from a header."""
    ornt = orientation(affine)
    shape_c, spacing_c = [0, 0, 0], [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(ornt):
        shape_c[int(target)] = int(shape[axis])
        spacing_c[int(target)] = float(zooms[axis])
    return tuple(shape_c), tuple(spacing_c)


# -- resampling (nnU-Net's rule, scikit-image's resize) -----------------------------------------------------------
def _separate_axis(spacing: Sequence[float], threshold: float) -> int | None:
    """The one low-resolution axis when the spacing is anisotropic, else None (two such axes: None, as nnU-Net)."""
    s = np.asarray(spacing, dtype=np.float64)
    if s.max() / s.min() <= threshold:
        return None
    axes = np.where(s == s.max())[0]
    return int(axes[0]) if len(axes) == 1 else None


def separate_axis(old: Sequence[float], new: Sequence[float], threshold: float = ANISOTROPY) -> int | None:
    axis = _separate_axis(old, threshold)
    return axis if axis is not None else _separate_axis(new, threshold)


def _resize(a: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    from skimage.transform import resize

    if tuple(a.shape) == tuple(shape):
        return a.astype(np.float32, copy=False)
    return resize(a.astype(np.float32, copy=False), tuple(int(s) for s in shape), order=order, mode="edge",
                  anti_aliasing=False, preserve_range=True).astype(np.float32)


def resample_channels(data: np.ndarray, shape: Sequence[int], order: int, axis: int | None) -> np.ndarray:
    """(C, X, Y, Z) float resampled to ``shape``; with ``axis`` that axis order 0, the others slice by slice."""
    shape = tuple(int(s) for s in shape)
    out = []
    for channel in data:
        if axis is None:
            out.append(_resize(channel, shape, order))
            continue
        in_plane = [s for i, s in enumerate(shape) if i != axis]
        moved = np.moveaxis(channel, axis, 0)
        slices = np.stack([_resize(s, in_plane, order) for s in moved])
        # then the low-resolution axis alone, nearest neighbour (nnU-Net's order_z = 0)
        out.append(np.moveaxis(_resize(slices, (shape[axis], *in_plane), 0), 0, axis))
    return np.stack(out).astype(np.float32, copy=False)


def resample_label(label: np.ndarray, shape: Sequence[int], axis: int | None) -> np.ndarray:
    """(X, Y, Z) class indices resampled to ``shape``: each class's mask at order 1, kept where >= 0.5 (nnU-Net)."""
    shape = tuple(int(s) for s in shape)
    if tuple(label.shape) == shape:
        return label
    out = np.zeros(shape, dtype=label.dtype)
    for c in np.unique(label):
        if c == 0:
            continue
        mask = resample_channels((label == c)[None].astype(np.float32), shape, 1, axis)[0]
        out[mask >= 0.5] = c
    return out


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]) -> tuple[int, ...]:
    """The shape at ``target`` spacing (an axis with target None keeps its size)."""
    return tuple(int(n) if t is None else max(1, int(round(n * s / t)))
                 for n, s, t in zip(shape, spacing, target))


def _filled(target: Sequence[float | None], spacing: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(s) if t is None else float(t) for t, s in zip(target, spacing))


# -- the plan ---------------------------------------------------------------------------------------------------
def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], dim: int,
                   threshold: float = ANISOTROPY) -> list[float | None]:
    """nnU-Net's full-resolution target spacing from the canonical spacings and shapes of the training cases."""
    sp = np.asarray(spacings, dtype=np.float64)
    sz = np.asarray(shapes, dtype=np.float64)
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(sz, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > threshold * max(target[others])
    aniso_voxels = size[worst] * threshold < min(size[others])
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(sp[:, worst], 10))
        if t < max(target[others]):
            t = max(max(target[others]), t) + 1e-5
        target[worst] = t
    out: list[float | None] = [float(t) for t in target]
    if dim == 2:
        out[2] = None  # 2D trains on axial slices: the slice axis is not resampled
    return out


def channel_schemes(names: Sequence[str], intensity: str, dim: int) -> list[str]:
    """The normalisation of each channel: ``auto`` is ``ct`` for channels named CT, else ``zscore`` in 3D and
    ``minmax`` in 2D (the 2D policies expect intensities in [0, 1])."""
    if intensity != "auto":
        if intensity not in SCHEMES:
            raise ConfigError(f"nifti intensity='{intensity}' is not known; use auto, {', '.join(SCHEMES)}.")
        return [intensity] * len(names)
    return ["ct" if str(n).strip().upper() == "CT" else ("zscore" if dim == 3 else "minmax") for n in names]


def ct_statistics(samples: Sequence[np.ndarray]) -> dict[str, Any]:
    """Clip bounds and z-score statistics from foreground intensities (nnU-Net's CT normalisation)."""
    v = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.zeros(0)
    if v.size == 0:
        raise DataError("CT normalisation needs foreground voxels, but the labeled training cases have none; "
                        "check the labels or choose --data-opt intensity=zscore.")
    return {"clip": [float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))],
            "mean": float(v.mean()), "std": float(v.std())}


def foreground_sample(image: np.ndarray, label: np.ndarray, seed: int) -> list[np.ndarray]:
    """Up to :data:`FG_SAMPLES` foreground intensities per channel of one case (a fixed seed: the plan is
    a function of the data)."""
    fg = np.flatnonzero(label.reshape(-1) > 0)
    if fg.size > FG_SAMPLES:
        fg = np.random.default_rng(seed).choice(fg, FG_SAMPLES, replace=False)
    return [channel.reshape(-1)[fg] for channel in image]


def make_plan(dim: int, spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
              channel_names: Sequence[str], schemes: Sequence[str], label_values: Sequence[int],
              ct_stats: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    channels = []
    for i, (name, scheme) in enumerate(zip(channel_names, schemes)):
        entry: dict[str, Any] = {"name": str(name), "scheme": scheme}
        if scheme == "ct":
            entry.update((ct_stats or {})[i])
        channels.append(entry)
    return {"version": PLAN_VERSION, "dim": int(dim), "orientation": "RAS",
            "target_spacing": target_spacing(spacings, shapes, dim), "anisotropy_threshold": ANISOTROPY,
            "channels": channels, "label_values": [int(v) for v in label_values]}


def check_plan(plan: Any, source: str) -> dict[str, Any]:
    """A stored plan, checked enough that replaying it cannot fail half-way."""
    ok = isinstance(plan, dict) and plan.get("version") == PLAN_VERSION and isinstance(plan.get("channels"), list) \
        and len(plan.get("target_spacing") or []) == 3 and all(
            isinstance(c, dict) and c.get("scheme") in SCHEMES for c in plan["channels"])
    if not ok:
        raise ConfigError(f"The preprocessing plan of {source} is not a version-{PLAN_VERSION} semiseg plan; "
                          f"retrain with this semiseg version.")
    return plan


# -- applying it ------------------------------------------------------------------------------------------------
def normalise(image: np.ndarray, channels: Sequence[dict[str, Any]]) -> np.ndarray:
    """(C, ...) float32 normalised channel by channel as the plan says."""
    out = np.empty(image.shape, dtype=np.float32)
    for i, (channel, spec) in enumerate(zip(image, channels)):
        scheme = spec["scheme"]
        if scheme == "ct":
            lo, hi = spec["clip"]
            out[i] = (np.clip(channel, lo, hi) - spec["mean"]) / max(float(spec["std"]), 1e-8)
        elif scheme == "minmax":
            lo, hi = np.percentile(channel, [0.5, 99.5])
            out[i] = np.clip((channel - lo) / max(float(hi - lo), 1e-8), 0, 1)
        else:
            out[i] = (channel - channel.mean()) / max(float(channel.std()), 1e-8)
    return out


def map_labels(label: np.ndarray, values: Sequence[int], path: Any) -> np.ndarray:
    """Stored label values -> class indices 0..K-1 (identity when the values are already consecutive)."""
    values = np.asarray(values)
    if np.array_equal(values, np.arange(len(values))):
        return label
    idx = np.searchsorted(values, label)
    idx = np.clip(idx, 0, len(values) - 1)
    if not np.array_equal(values[idx], label):
        bad = sorted(set(np.unique(label).tolist()) - set(values.tolist()))[:5]
        raise DataError(f"The label '{path}' holds values {bad} that the training labels do not "
                        f"({values.tolist()}); relabel it.")
    return idx.astype(np.int64)


def unmap_labels(pred: np.ndarray, values: Sequence[int]) -> np.ndarray:
    values = np.asarray(values)
    if np.array_equal(values, np.arange(len(values))):
        return pred
    return values[pred]


def geometry(shape: Sequence[int], zooms: Sequence[float], affine: np.ndarray, plan: dict[str, Any]) -> dict:
    """Where a preprocessed case comes from and goes back to (plain values, so cases stay picklable)."""
    shape_c, spacing_c = canonical_geometry(shape, zooms, affine)
    target = _filled(plan["target_spacing"], spacing_c)
    return {"shape": [int(s) for s in shape[:3]], "affine": np.asarray(affine, dtype=np.float64).tolist(),
            "ornt": orientation(affine).tolist(), "canonical_shape": list(shape_c),
            "canonical_spacing": list(spacing_c), "spacing": list(target),
            "preprocessed_shape": list(new_shape(shape_c, spacing_c, target)),
            "axis": separate_axis(spacing_c, target, float(plan.get("anisotropy_threshold", ANISOTROPY)))}


def preprocess_image(image: np.ndarray, geo: dict, plan: dict[str, Any]) -> np.ndarray:
    """(C, X, Y, Z) as read from the file(s) -> canonical, resampled, normalised (C, X', Y', Z') float32."""
    ornt = np.asarray(geo["ornt"])
    canon = np.stack([to_canonical(c, ornt) for c in image])
    resampled = resample_channels(canon, geo["preprocessed_shape"], 3, geo["axis"])
    return normalise(resampled, plan["channels"])


def preprocess_label(label: np.ndarray, geo: dict) -> np.ndarray:
    """(X, Y, Z) class indices as read (after :func:`map_labels`) -> canonical, resampled."""
    canon = to_canonical(label, np.asarray(geo["ornt"]))
    return resample_label(canon, geo["preprocessed_shape"], geo["axis"]).astype(np.int64, copy=False)


def restore_grid(array: np.ndarray, geo: dict, order: int = 1) -> np.ndarray:
    """(C, X', Y', Z') on the preprocessed grid -> (C, X, Y, Z) on the file's own grid (the low-resolution axis
    order 0, as nnU-Net exports)."""
    back = resample_channels(np.asarray(array, dtype=np.float32), geo["canonical_shape"], order, geo["axis"])
    ornt = np.asarray(geo["ornt"])
    return np.stack([from_canonical(c, ornt) for c in back])


def restore_probabilities(probs: np.ndarray, geo: dict) -> np.ndarray:
    """(K, X', Y', Z') probabilities -> (K, X, Y, Z) on the file's grid (order 1), renormalised to sum to 1."""
    back = restore_grid(probs, geo, order=1)
    back /= np.maximum(back.sum(0, keepdims=True), 1e-8)
    return back


class Restore:
    """Maps class probabilities on a preprocessed case's grid to its file's grid (a picklable callable that a
    :class:`semiseg.data.base.Case` carries as ``restore``); ``slices_first`` undoes the 2D (C, Z, X, Y) layout."""

    def __init__(self, geo: dict, slices_first: bool = False) -> None:
        self.geo = geo
        self.slices_first = slices_first

    def _layout(self, array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, 1, 3) if self.slices_first else array  # (C, Z, X, Y) -> (C, X, Y, Z)

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        return restore_probabilities(self._layout(probs), self.geo)

    def grid(self, array: np.ndarray) -> np.ndarray:
        """Any (C, *image grid) array (an image, for display) on the file's grid, values not renormalised."""
        return restore_grid(self._layout(array), self.geo, order=1)
