"""2D policy ``medical2d``: the ACDC pipeline of UniMatch / CrossMatch (``dataset/acdc.py``).

Weak (geometry, scipy so that the official nearest-neighbour ops are reproduced exactly):
  with p=0.5 rot90 (k in 0..3) then a flip on axis 0 or 1; otherwise with p=0.5 a rotation by an integer angle
  in [-20, 19] degrees (order 0, reshape False, zero fill); otherwise nothing; then a zoom to the patch with
  order 0 for image and label alike.
Strong (intensity, albumentations): ColorJitter(0.5, 0.5, 0.5, 0.25) with p=0.8 and Gaussian blur with
  sigma ~ U(0.1, 2.0) with p=0.5, on the uint8 version of the weak view.

Also holds :func:`sample_cutmix_box`, the ``obtain_cutmix_box`` sampler generalised to any patch shape and
dimension (the 3D policy uses it too).
"""

from __future__ import annotations

import math
import os

import numpy as np
from scipy import ndimage

from semiseg.augment.base import Policy
from semiseg.errors import ConfigError
from semiseg.registry import register_policy


def sample_cutmix_box(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    p: float = 0.5,
    size_min: float = 0.02,
    size_max: float = 0.4,
    ratio_min: float = 0.3,
    ratio_max: float = 1 / 0.3,
    max_tries: int = 1000,
) -> np.ndarray:
    """One CutMix box as a uint8 mask of ``shape`` (2D ``(H, W)`` or 3D ``(X, Y, Z)``), all zeros w.p. 1-p.

    Official rule: the box volume ``V = U(size_min, size_max) * prod(shape)`` is drawn once; the aspect ratio
    ``r`` and the corner (uniform over the whole patch) are redrawn until the box fits.
    2D: width ``floor(sqrt(V/r))`` along W, height ``floor(sqrt(V*r))`` along H.
    3D: ``floor((V/r)^(1/3))`` along X, ``floor((V*r)^(1/3))`` along Y, ``floor(V^(1/3))`` along Z (placed on
    the axes they are named for, i.e. without the transposition of the LA reference code).
    """
    shape = tuple(int(s) for s in shape)
    mask = np.zeros(shape, dtype=np.uint8)
    if rng.random() >= p:
        return mask
    volume = rng.uniform(size_min, size_max) * math.prod(shape)
    sizes: tuple[int, ...] = ()
    corner: list[int] = []
    for _ in range(max_tries):
        sizes = _box_sizes(volume, rng.uniform(ratio_min, ratio_max), len(shape))
        corner = [int(rng.integers(0, s)) for s in shape]
        if all(c + b <= s for c, b, s in zip(corner, sizes, shape)):
            break
    else:
        # Only very elongated patches get here (the official loop would spin forever): clamp the last box
        # to the patch and place it uniformly among the positions where it fits.
        sizes = tuple(min(b, s) for b, s in zip(sizes, shape))
        corner = [int(rng.integers(0, s - b + 1)) for b, s in zip(sizes, shape)]
    mask[tuple(slice(c, c + b) for c, b in zip(corner, sizes))] = 1
    return mask


def _box_sizes(volume: float, ratio: float, ndim: int) -> tuple[int, ...]:
    """Box extents in array-axis order for a box of ``volume`` and aspect ``ratio``."""
    if ndim == 2:
        w = int(math.sqrt(volume / ratio))  # along W (x, the last axis)
        h = int(math.sqrt(volume * ratio))  # along H (y, the first axis)
        return (h, w)
    if ndim == 3:
        return (int((volume / ratio) ** (1 / 3)), int((volume * ratio) ** (1 / 3)), int(volume ** (1 / 3)))
    raise ValueError(f"CutMix boxes are defined for 2D and 3D patches, not {ndim}D.")


def _albumentations():
    # Imported lazily: albumentations costs ~1.5 s to import and only training needs it. Its import-time
    # update check would also try the network, which a library must not do.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    if not hasattr(A.Compose, "set_random_seed"):
        raise ConfigError(
            f"medical2d needs albumentations>=2.0 (installed: {A.__version__}); "
            "upgrade it with `pip install -U albumentations`."
        )
    return A


@register_policy("medical2d")
class Medical2D(Policy):
    """ACDC weak/strong augmentation of UniMatch and CrossMatch, on ``(C, H, W)`` images in [0, 1].

    ``quantize``: like the official loader, the unlabeled weak view is cast to uint8 (``floor(x*255)/255``),
    and the strong views are computed on that uint8 image. Labeled weak views are never quantised.
    """

    dim = 2

    def __init__(
        self,
        patch_size: tuple[int, int] = (256, 256),
        quantize: bool = True,
        cutmix_p: float = 0.5,
        jitter_p: float = 0.8,
        blur_p: float = 0.5,
    ) -> None:
        super().__init__(patch_size)
        if len(self.patch_size) != 2:
            raise ConfigError(f"medical2d needs a 2D patch_size (H, W), got {self.patch_size}.")
        self.quantize = bool(quantize)
        self.cutmix_p = float(cutmix_p)
        self.jitter_p = float(jitter_p)
        self.blur_p = float(blur_p)
        A = _albumentations()
        # One pipeline, reseeded from the caller's rng on every call: albumentations keeps its own RNG, so
        # this is what makes a strong view a pure function of the sample seed. On grey images ColorJitter's
        # saturation and hue are identities, as with PIL in the reference; blur_limit=0 derives the kernel
        # from sigma the way PIL's GaussianBlur(radius=sigma) does.
        self._pipe = A.Compose(
            [
                A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=self.jitter_p),
                A.GaussianBlur(sigma_limit=(0.1, 2.0), blur_limit=0, p=self.blur_p),
            ]
        )

    # -- weak -------------------------------------------------------------------------------------
    def weak(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        _check(image, label)
        image, label = self._geometric(image, label, rng)
        return image, label

    def weak_unlabeled(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._unlabeled(image, None, rng)[0]

    def weak_unlabeled_pair(self, image: np.ndarray, label: np.ndarray,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label = self._unlabeled(image, label, rng)
        assert label is not None
        return image, label

    def _unlabeled(self, image: np.ndarray, label: np.ndarray | None,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        _check(image, label)
        image, label = self._geometric(image, label, rng)
        if self.quantize:
            image = _to_uint8(image, floor=True).astype(np.float32) / np.float32(255.0)
        return image, label

    def _geometric(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        # The three rng draws are made in every branch so that the stream position does not depend on it.
        u_branch, u_rotate = rng.random(2)
        k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        angle = int(rng.integers(-20, 20))
        if u_branch < 0.5:
            image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
            label = None if label is None else np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
        elif u_rotate < 0.5:
            image = np.stack([ndimage.rotate(c, angle, order=0, reshape=False) for c in image])
            label = None if label is None else ndimage.rotate(label, angle, order=0, reshape=False)
        h, w = image.shape[1:]
        if (h, w) != self.patch_size:
            factors = (self.patch_size[0] / h, self.patch_size[1] / w)
            image = np.stack([ndimage.zoom(c, factors, order=0) for c in image])
            label = None if label is None else ndimage.zoom(label, factors, order=0)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = None if label is None else np.ascontiguousarray(label, dtype=np.int64)
        return image, label

    # -- strong -----------------------------------------------------------------------------------
    def strong(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image, None)
        seed = int(rng.integers(0, 2**32))
        # Exact on a quantised weak view (k/255 -> k); otherwise the nearest uint8 level, as the intensities
        # are in [0, 1] for this pipeline (values outside are clipped).
        work = _to_uint8(image, floor=False) if self.quantize else np.clip(image, 0.0, 1.0).astype(np.float32)
        out = np.empty(work.shape, dtype=np.float32)
        for c in range(work.shape[0]):
            # Each channel is treated as a grey image with the same draws (same seed).
            self._pipe.set_random_seed(seed)
            res = self._pipe(image=np.ascontiguousarray(work[c]))["image"]
            out[c] = res.reshape(work.shape[1:])
        if self.quantize:
            out /= np.float32(255.0)
        return out

    def cutmix_box(self, rng: np.random.Generator) -> np.ndarray:
        return sample_cutmix_box(self.patch_size, rng, p=self.cutmix_p)


def _to_uint8(image: np.ndarray, floor: bool) -> np.ndarray:
    x = np.clip(image, 0.0, 1.0) * 255.0
    return (np.floor(x) if floor else np.rint(x)).astype(np.uint8)


def _check(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3:
        raise ValueError(f"medical2d expects a (C, H, W) image, got shape {image.shape}.")
    if label is not None and label.shape != image.shape[1:]:
        raise ValueError(f"medical2d: label shape {label.shape} does not match image shape {image.shape}.")
