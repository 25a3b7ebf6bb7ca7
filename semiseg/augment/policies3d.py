"""3D policy ``medical3d``: the LA pipeline of UA-MT / CrossMatch (``dataloaders/la_heart.py``).

Weak: RandomRotFlip (rot90 by k in the X-Y plane, then a flip of X or Y) followed by RandomCrop to the patch.
This RotFlip-then-Crop order is the one of the CrossMatch (and UA-MT) training scripts; it also keeps the
patch shape when X != Y.
With ``foreground`` > 0 (nnU-Net uses 1/3; the ``nifti`` data sets 1/3 by default, ``la`` keeps the official
0) that share of labeled patches is centred on a random foreground voxel instead of drawn uniformly.
Strong, each branch independently: with p=0.8 torchio's RandomBiasField (order 3, coefficients U(-0.5, 0.5),
field exp(polynomial)) followed by a gamma with log(gamma) ~ U(-0.5, 0.5) applied as sign(I)|I|^gamma
(LA intensities are z-scored, hence negative); with p=0.5 torchio's RandomBlur with std ~ U(0.1, 2)
voxels per axis.

The bias field is torchio's formula evaluated separably (:func:`bias_field`, checked against torchio in the
tests): torchio's own evaluation takes ~0.4 s for a 112x112x80 patch, which would dominate a training step.
"""

from __future__ import annotations

import numpy as np
import torch

from semiseg.augment.base import Policy
from semiseg.augment.policies2d import sample_cutmix_box
from semiseg.errors import ConfigError
from semiseg.registry import register_policy


def random_crop_pad(
    image: np.ndarray, label: np.ndarray | None, patch: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference RandomCrop on ``(C, X, Y, Z)`` / ``(X, Y, Z)``.

    If any axis is <= the patch, every axis is zero-padded by ``max((patch - size) // 2 + 3, 0)`` per side;
    the corner is then drawn in ``[0, size - patch)`` (the reference's exclusive upper bound).
    """
    shape = image.shape[1:]
    if any(s <= p for s, p in zip(shape, patch)):
        pads = [(max((p - s) // 2 + 3, 0),) * 2 for s, p in zip(shape, patch)]
        image = np.pad(image, [(0, 0), *pads], mode="constant", constant_values=0)
        label = None if label is None else np.pad(label, pads, mode="constant", constant_values=0)
        shape = image.shape[1:]
    corner = [int(rng.integers(0, s - p)) for s, p in zip(shape, patch)]
    window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    image = image[(slice(None), *window)]
    label = None if label is None else label[window]
    return image, label


def foreground_crop_pad(
    image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """A patch centred on a random foreground voxel (nnU-Net's oversampling: a class present is drawn first,
    then one of its voxels), zero-padded where the patch leaves the volume; None when there is no foreground."""
    classes = np.unique(label)
    classes = classes[classes > 0]
    if classes.size == 0:
        return None
    c = classes[int(rng.integers(0, classes.size))]
    voxels = np.flatnonzero(label == c)
    centre = np.unravel_index(int(voxels[int(rng.integers(0, voxels.size))]), label.shape)
    pads, window = [], []
    for size, p, m in zip(label.shape, patch, centre):
        start = int(m) - p // 2
        lo, hi = max(0, -start), max(0, start + p - size)
        pads.append((lo, hi))
        window.append(slice(start + lo, start + lo + p))
    if any(lo or hi for lo, hi in pads):
        image = np.pad(image, [(0, 0), *pads], mode="constant", constant_values=0)
        label = np.pad(label, pads, mode="constant", constant_values=0)
    return image[(slice(None), *window)], label[tuple(window)]


def bias_field(shape: tuple[int, int, int], coefficients: np.ndarray, order: int = 3) -> np.ndarray:
    """torchio's ``BiasField`` map ``exp(sum c_ijk x^i y^j z^k)`` (i+j+k <= order), float32 of ``shape``.

    Coordinates are voxel centres scaled to [-1, 1] per axis and the coefficients are taken in torchio's
    loop order (x outer, z inner), so that the same coefficients give the same field. A product of an X-Y
    plane and a Z profile per (i, j) pair costs 10 passes over the volume instead of torchio's 20 full
    meshgrid products in float64.
    """
    axes = []
    for n in shape:
        r = np.arange(-n / 2, n / 2) + 0.5
        axes.append(r / r.max() if r.max() > 0 else r)
    x, y, z = axes
    field = np.zeros(tuple(shape), dtype=np.float32)
    i = 0
    for xo in range(order + 1):
        for yo in range(order + 1 - xo):
            profile = np.zeros(len(z))
            for zo in range(order + 1 - xo - yo):
                profile += coefficients[i] * z**zo
                i += 1
            plane = np.outer(x**xo, y**yo).astype(np.float32)
            field += plane[:, :, None] * profile.astype(np.float32)[None, None, :]
    return np.exp(field)


def num_bias_coefficients(order: int) -> int:
    return (order + 1) * (order + 2) * (order + 3) // 6


def signed_gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """sign(I) * |I|**gamma: a gamma that is defined (and odd) for negative intensities."""
    return (np.sign(x) * np.abs(x) ** np.float32(gamma)).astype(np.float32, copy=False)


def _torchio():
    import torchio as tio  # lazily: ~1 s to import, needed only for training

    return tio


@register_policy("medical3d")
class Medical3D(Policy):
    """LA weak/strong augmentation of UA-MT and CrossMatch on ``(C, X, Y, Z)`` images (any intensity)."""

    dim = 3

    def __init__(
        self,
        patch_size: tuple[int, int, int] = (112, 112, 80),
        cutmix_p: float = 0.5,
        bias_p: float = 0.8,
        blur_p: float = 0.5,
        foreground: float = 0.0,
    ) -> None:
        super().__init__(patch_size)
        if len(self.patch_size) != 3:
            raise ConfigError(f"medical3d needs a 3D patch_size (X, Y, Z), got {self.patch_size}.")
        self.cutmix_p = float(cutmix_p)
        self.bias_p = float(bias_p)
        self.blur_p = float(blur_p)
        if not 0.0 <= float(foreground) <= 1.0:
            raise ConfigError(f"medical3d foreground={foreground} is a share of labeled patches; give a number "
                              f"in [0, 1].")
        self.foreground = float(foreground)
        tio = _torchio()
        self._blur = tio.RandomBlur(std=(0.1, 2.0))

    # -- weak -------------------------------------------------------------------------------------
    def weak(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        _check(image, label)
        image, label = self._geometric(image, label, rng, self.foreground)
        return image, label

    def weak_unlabeled(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image, None)
        image, _ = self._geometric(image, None, rng)
        return image

    def weak_unlabeled_pair(self, image: np.ndarray, label: np.ndarray,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check(image, label)
        # the unlabeled pipeline: uniform crops only (unlabeled patches cannot look for the organ)
        image, label = self._geometric(image, label, rng)
        return image, label

    def _geometric(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, foreground: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
        label = None if label is None else np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
        # a share of labeled patches centred on the organ; the draw happens only when the option is on, so
        # the official LA pipeline (share 0) keeps its random stream
        crop = None
        if foreground > 0 and label is not None and rng.random() < foreground:
            crop = foreground_crop_pad(image, label, self.patch_size, rng)
        image, label = crop if crop is not None else random_crop_pad(image, label, self.patch_size, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = None if label is None else np.ascontiguousarray(label, dtype=np.int64)
        return image, label

    # -- strong -----------------------------------------------------------------------------------
    def strong(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image, None)
        # Fixed number of draws whatever the branches, so the stream position never depends on them.
        u_bias, u_blur = rng.random(2)
        coefficients = rng.uniform(-0.5, 0.5, num_bias_coefficients(3))
        gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
        seed = int(rng.integers(0, 2**63 - 1))
        # numpy (single-threaded) rather than torch ops: multi-threaded torch kernels on small volumes are
        # slower than one thread as soon as the cores are shared with a loader or a training process.
        x = np.array(image, dtype=np.float32)  # a copy: the weak view must stay intact
        if u_bias < self.bias_p:
            x = signed_gamma(x * bias_field(x.shape[1:], coefficients, order=3), gamma)
        if u_blur < self.blur_p:
            # torchio draws its parameters from torch's global CPU generator: fork it, seed it from the
            # sample's rng, and restore it afterwards. Only the CPU generator is touched (torch.manual_seed
            # would also reseed the CUDA generators, which fork_rng(devices=[]) does not restore).
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                x = self._blur(torch.from_numpy(x)).numpy()
        return np.ascontiguousarray(x, dtype=np.float32)

    def cutmix_box(self, rng: np.random.Generator) -> np.ndarray:
        return sample_cutmix_box(self.patch_size, rng, p=self.cutmix_p)


def _check(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 4:
        raise ValueError(f"medical3d expects a (C, X, Y, Z) image, got shape {image.shape}.")
    if label is not None and label.shape != image.shape[1:]:
        raise ValueError(f"medical3d: label shape {label.shape} does not match image shape {image.shape}.")
