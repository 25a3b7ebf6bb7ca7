"""Augmentation policy contract.

A policy (registered with ``@register_policy(name)``) is a class built as
``Policy(patch_size=..., **options)``.
It works on numpy arrays of one sample (image ``(C, *spatial)`` float32, label ``(*spatial)`` int) and always
returns arrays of exactly ``patch_size``:

* ``weak(image, label, rng)``     -> (image, label): geometric augmentation + crop/resize to the patch;
* ``weak_unlabeled(image, rng)``  -> image: the same geometric pipeline for an unlabeled item;
* ``strong(image, rng)``          -> image: intensity-only perturbation of a weak view (geometry preserved, so
                                     weak and strong views stay aligned);
* ``cutmix_box(rng)``             -> uint8 mask of ``patch_size`` (all zeros with the policy's probability);
* ``weak_unlabeled_pair(image, label, rng)`` -> (image, label) or None: ``weak_unlabeled`` carrying a label
  through the same geometry (the image equal to ``weak_unlabeled``'s for the same rng), used only by the
  pseudo-label diagnostics; None (the default) when a policy cannot.

``rng`` is a ``numpy.random.Generator``; a policy must draw all randomness from it (and seed any library it
calls from it) so that a sample is a pure function of its seed. That is what makes CPU runs repeatable and
resume exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Policy(ABC):
    dim: int = 2

    def __init__(self, patch_size: tuple[int, ...]) -> None:
        self.patch_size = tuple(int(s) for s in patch_size)

    @abstractmethod
    def weak(self, image: np.ndarray, label: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Geometric augmentation + crop/resize of a labeled sample to the patch."""

    @abstractmethod
    def weak_unlabeled(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The same geometric pipeline for an unlabeled image."""

    @abstractmethod
    def strong(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Intensity-only perturbation of a weak view (geometry preserved)."""

    @abstractmethod
    def cutmix_box(self, rng: np.random.Generator) -> np.ndarray:
        """uint8 CutMix mask of ``patch_size`` (all zeros with the policy's probability)."""

    def weak_unlabeled_pair(self, image: np.ndarray, label: np.ndarray,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """``weak_unlabeled`` that also moves ``label`` through the same geometry (diagnostics only); None when
        the policy cannot, which turns the diagnostics off."""
        return None
