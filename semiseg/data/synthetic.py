"""Procedural cardiac-like phantoms: the default dataset, needing no files.

Every sample is drawn from its own seed ``(seed, stream, index)`` (stream 0 = train, 1 = val, 2 = test), so it
is generated on access, identical across processes and runs, and nothing large is cached.

One sample: a deformed elliptical "body" of soft tissue in dark air, a few unlabeled distractor blobs, and
an organ made of a bright core (the last class, like the LV blood pool), a dark wall around it (like the
myocardium, nearly as dark as the surrounding tissue, so it is found by its shape around the core rather than
by intensity) and, with three foreground classes, a bright crescent beside the wall (like the RV, as bright as
the core and the distractors). Shapes are ellipses/ellipsoids whose surfaces are bent by low-frequency random
fields; pose, size, position and intensities vary per sample. Rendering adds partial-volume blur, fine
texture, a smooth multiplicative bias field and Gaussian noise. Intensities lie roughly in ``[0, 1]``.

Classes: ``num_classes=2`` -> the whole organ (core + wall); ``3`` -> wall, core; ``4`` -> crescent, wall,
core.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from semiseg.data.base import Case, LazyItems, SegData
from semiseg.data.splits import resolve_count
from semiseg.errors import ConfigError
from semiseg.registry import register_dataset

DEFAULT_SIZE = {2: (128, 128), 3: (64, 64, 48)}
DEFAULT_PATCH = {2: (128, 128), 3: (64, 64, 32)}
STREAMS = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = {
    2: ["background", "organ"],
    3: ["background", "wall", "core"],
    4: ["background", "crescent", "wall", "core"],
}


def _grid(size: tuple[int, ...]) -> list[np.ndarray]:
    """Open-grid coordinates, isotropic in voxels, the longest axis spanning [-1, 1]."""
    half = max(size) / 2.0
    out = []
    for ax, n in enumerate(size):
        shape = [1] * len(size)
        shape[ax] = n
        out.append(((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) / half).reshape(shape))
    return out


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    if dim == 2:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=np.float32)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))  # uniform over rotations/reflections; fine for a phantom
    return q.astype(np.float32)


def _field(rng: np.random.Generator, coords: list[np.ndarray], n: int, f_lo: float, f_hi: float,
           amp: float) -> np.ndarray:
    """A smooth random field: ``n`` plane waves with frequencies in [f_lo, f_hi], magnitude about ``amp``."""
    dim = len(coords)
    out = np.zeros(np.broadcast_shapes(*[c.shape for c in coords]), dtype=np.float32)
    for _ in range(n):
        d = rng.normal(size=dim)
        w = d / np.linalg.norm(d) * rng.uniform(f_lo, f_hi)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        arg = phase
        for c, wi in zip(coords, w):
            arg = arg + np.float32(wi) * c
        out += np.cos(arg)
    return out * np.float32(amp / np.sqrt(n))


def _local(coords: list[np.ndarray], center: np.ndarray, rot: np.ndarray, scale: float) -> list[np.ndarray]:
    """Coordinates in an object's frame: translated, rotated and scaled."""
    shifted = [c - np.float32(ci) for c, ci in zip(coords, center)]
    out = []
    for j in range(len(coords)):
        u = 0.0
        for i, s in enumerate(shifted):
            u = u + np.float32(rot[i, j] / scale) * s
        out.append(u)
    return out


def _rho(local: list[np.ndarray], axes: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Ellipsoidal radius: 1 on the surface of an ellipsoid with semi-axes ``axes``."""
    r = 0.0
    for j, u in enumerate(local):
        v = u - np.float32(offset[j]) if offset is not None else u
        r = r + (v / np.float32(axes[j])) ** 2
    return np.sqrt(r)


def generate(index: int, *, dim: int = 2, num_classes: int = 4, seed: int = 0, stream: int = 0,
             size: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``image`` (1, *size) float32 and ``label`` (*size) int64."""
    size = tuple(size or DEFAULT_SIZE[dim])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index), dim]))
    g = _grid(size)
    extent = np.array([n / max(size) for n in size], dtype=np.float32)  # half-extent per axis
    k = num_classes - 1

    # Body: a large deformed ellipse of tissue in air.
    # In 3D the body is an elliptic cylinder along the last axis (a torso), so every slice shows tissue.
    body_axes = np.array([rng.uniform(0.8, 0.95) * e for e in extent[:2]])
    body_shift = rng.uniform(-0.04, 0.04, 2) * extent[:2]
    body = _rho(g[:2], body_axes, body_shift) < 1 + _field(rng, g, 3, 1.5, 3.0, 0.06)

    # Organ pose: kept well inside the field of view (the crescent side reaches furthest).
    # Organs are relatively larger in 3D so that the wall stays several voxels thick at 64^3.
    grow = 1.0 if dim == 2 else 1.45
    rot = _rotation(rng, dim)
    scale = rng.uniform(0.8, 1.2)
    center = rng.uniform(-0.15, 0.15, dim) * extent / grow
    loc = _local(g, center, rot, scale)
    r0 = rng.uniform(0.15, 0.21) * grow
    ecc = rng.uniform(-0.2, 0.2, dim)
    core_axes = r0 * (1 + ecc)
    thick = rng.uniform(0.07, 0.1) * grow
    bend = _field(rng, loc, 4, 1.0 / r0, 2.2 / r0, 0.18)
    core = _rho(loc, core_axes) < 1 + bend
    outer = (_rho(loc, core_axes + thick) < 1 + bend + _field(rng, loc, 3, 1.0 / r0, 2.0 / r0, 0.08)) | core
    wall = outer & ~core
    crescent = None
    if k >= 3:
        # Centred just outside the wall and cut by it, the ellipse becomes a crescent hugging the wall.
        stretch = np.concatenate([[rng.uniform(0.7, 0.9)], rng.uniform(1.25, 1.5, dim - 1)])
        cr_axes = (core_axes + thick) * stretch
        offset = np.zeros(dim)
        offset[0] = (core_axes[0] + thick) * rng.uniform(0.6, 0.8) + cr_axes[0] * 0.5
        offset[1:] = rng.uniform(-0.05, 0.05, dim - 1)
        crescent = (_rho(loc, cr_axes, offset) < 1 + _field(rng, loc, 3, 0.8 / r0, 1.8 / r0, 0.12)) & ~outer

    # Render: piecewise intensities, distractors first so the organ is drawn over them.
    air, tissue = rng.uniform(0.02, 0.08), rng.uniform(0.33, 0.42)
    bright = rng.uniform(0.68, 0.8)
    img = np.where(body, np.float32(tissue), np.float32(air)).astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(-0.6, 0.6, dim) * extent
        ax = rng.uniform(0.05, 0.14, dim)
        blob = (_rho(g, ax, c) < 1 + _field(rng, g, 2, 3.0, 6.0, 0.1)) & body
        img[blob] = bright + rng.uniform(-0.08, 0.08) if rng.random() < 0.7 else rng.uniform(0.1, 0.2)
    img[wall] = tissue - rng.uniform(0.06, 0.12)
    img[core] = bright
    if crescent is not None:
        img[crescent] = bright - rng.uniform(0.0, 0.08)
    img = gaussian_filter(img, rng.uniform(0.6, 1.0), mode="nearest", truncate=2.5)
    img += _field(rng, g, 6, 15.0, 30.0, 0.05) * (img > 0.2)  # texture inside the body only
    img *= np.exp(_field(rng, g, 3, 0.5, 1.5, 0.25))  # smooth bias field
    img += rng.normal(0.0, rng.uniform(0.03, 0.06), size=img.shape).astype(np.float32)

    label = np.zeros(size, dtype=np.int64)
    if k == 1:
        label[outer] = 1
    else:
        label[wall] = k - 1
        label[core] = k
        if crescent is not None:
            label[crescent] = 1
    return img[None].astype(np.float32, copy=False), label


class _Sampler:
    """Picklable item loader: index -> sample (labeled) or image only (unlabeled)."""

    def __init__(self, dim: int, num_classes: int, seed: int, stream: int, size: tuple[int, ...],
                 with_label: bool) -> None:
        self.kw = dict(dim=dim, num_classes=num_classes, seed=seed, stream=stream, size=size)
        self.with_label = with_label

    def __call__(self, index: int):
        image, label = generate(index, **self.kw)
        return (image, label) if self.with_label else image


def _cases(name: str, n: int, dim: int, num_classes: int, seed: int, size: tuple[int, ...]):
    def load() -> list[Case]:
        out = []
        for i in range(n):
            image, label = generate(i, dim=dim, num_classes=num_classes, seed=seed, stream=STREAMS[name],
                                    size=size)
            out.append(Case(name=f"{name}_{i:04d}", image=image, label=label, meta={"index": i}))
        return out

    return load


def _check_args(dim, num_classes, n_train, n_val, n_test, size, patch_size) -> None:
    if dim not in (2, 3):
        raise ConfigError(f"synthetic dim={dim} is not supported; use dim=2 or dim=3.")
    if num_classes not in (2, 3, 4):
        raise ConfigError(f"synthetic num_classes={num_classes} is not supported; use 2, 3 or 4 "
                          f"(background plus 1 to 3 structures).")
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ConfigError(f"synthetic {name}={v!r} must be a whole number of at least 1.")
    for name, v in (("size", size), ("patch_size", patch_size)):
        if v is not None and (len(v) != dim or any(int(s) < 16 for s in v)):
            raise ConfigError(f"synthetic {name}={tuple(v)} must have {dim} sides of at least 16 "
                              f"for dim={dim}.")


@register_dataset("synthetic")
def synthetic(
    dim: int = 2,
    num_classes: int = 4,
    n_train: int = 200,
    labeled: float = 0.1,
    n_val: int = 20,
    patch_size: tuple[int, ...] | None = None,
    seed: int = 0,
    size: tuple[int, ...] | None = None,
    n_test: int | None = None,
) -> SegData:
    """Synthetic 2D or 3D phantoms, generated on access; ``labeled`` counts or fractions of ``n_train``.

    The first ``labeled`` training samples carry labels, the rest are unlabeled. Splits ``val`` (``n_val``
    samples) and ``test`` (``n_test``, default ``n_val``) come from separate seed streams. Default image size
    is 128x128 (2D) or 64x64x48 (3D); default patch is the whole image in 2D and 64x64x32 in 3D (with a
    custom ``size``, the size rounded down to multiples of 16).
    """
    n_test = n_val if n_test is None else n_test
    _check_args(dim, num_classes, n_train, n_val, n_test, size, patch_size)
    size = tuple(int(s) for s in (size or DEFAULT_SIZE[dim]))
    if patch_size is None:
        rounded = tuple(max(16, s // 16 * 16) for s in size)
        patch = DEFAULT_PATCH[dim] if size == DEFAULT_SIZE[dim] else rounded
    else:
        patch = tuple(int(p) for p in patch_size)
    n_lab = resolve_count(labeled, int(n_train), "samples", "synthetic n_train")
    idx = list(range(int(n_train)))
    return SegData(
        name="synthetic",
        dim=dim,
        num_classes=num_classes,
        in_channels=1,
        patch_size=patch,
        labeled=LazyItems(idx[:n_lab], _Sampler(dim, num_classes, seed, 0, size, True)),
        unlabeled=LazyItems(idx[n_lab:], _Sampler(dim, num_classes, seed, 0, size, False)),
        unlabeled_truth=LazyItems(idx[n_lab:], _Sampler(dim, num_classes, seed, 0, size, True)),
        splits={
            "val": _cases("val", int(n_val), dim, num_classes, seed, size),
            "test": _cases("test", int(n_test), dim, num_classes, seed, size),
        },
        policy="medical2d" if dim == 2 else "medical3d",
        class_names=list(CLASS_NAMES[num_classes]),
        info={
            "evaluation": "per image (2D cases are single images)" if dim == 2 else "per volume",
            "size": size,
            "seed": seed,
            "n_labeled": n_lab,
            "n_unlabeled": int(n_train) - n_lab,
        },
    )
