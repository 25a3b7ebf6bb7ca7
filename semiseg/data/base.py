"""What every dataset gives the engine.

A dataset factory (registered with ``@register_dataset``) returns a :class:`SegData`. Datasets know files and
splits; they do not augment. Augmentation policies (``semiseg.augment``) turn the raw items into training views.

Conventions
-----------
* image arrays are float32 with a leading channel axis: 2D ``(C, H, W)``, 3D ``(C, X, Y, Z)``;
* label arrays are integer (int64 or uint8) without channel axis: ``(H, W)`` / ``(X, Y, Z)``, values in
  ``[0, num_classes)``;
* for 2D datasets built from volumes (ACDC), training items are slices while evaluation cases are whole volumes
  ``(C, D, H, W)`` / ``(D, H, W)`` evaluated slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Case:
    """One evaluation case: a whole image (2D image or 3D volume) with its label and geometry."""

    name: str
    image: np.ndarray  # (C, *spatial) float32
    label: np.ndarray | None  # (*spatial) integer, None when unknown (prediction only)
    spacing: tuple[float, ...] | None = None  # physical voxel size per spatial axis, None = voxels
    affine: np.ndarray | None = None  # 4x4 affine for NIfTI output where known
    meta: dict[str, Any] = field(default_factory=dict)
    # Where ``image`` was preprocessed onto another grid than ``label`` (NIfTI plans): maps class probabilities
    # (K, *image grid) to (K, *label grid); ``restore.grid(x)`` moves any (C, *image grid) array without
    # renormalising. None: image and label share one grid.
    restore: Callable[[np.ndarray], np.ndarray] | None = None


class LazyItems(Sequence):
    """A sequence whose items are loaded by a function on access (keeps memory flat, workers picklable)."""

    def __init__(self, keys: Sequence[Any], load) -> None:
        self.keys = list(keys)
        self.load = load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.load(self.keys[i])


@dataclass
class SegData:
    """A dataset ready for training: labeled and unlabeled items, evaluation cases and shape facts.

    ``labeled[i]`` -> ``(image, label)`` numpy arrays (a slice for 2D-from-volume data, a volume for 3D);
    ``unlabeled[i]`` -> ``image``; ``cases(split)`` -> list of :class:`Case` for ``val``/``test``/...
    ``patch_size`` is the training crop (2D ``(H, W)``, 3D ``(X, Y, Z)``); ``policy`` names the default
    augmentation policy (``semiseg list`` shows them).
    """

    name: str
    dim: int
    num_classes: int
    in_channels: int
    patch_size: tuple[int, ...]
    labeled: Sequence
    unlabeled: Sequence
    splits: dict[str, Any]  # split name -> callable returning list[Case] (or list[Case])
    policy: str
    class_names: list[str] | None = None
    val_split: str = "val"
    info: dict[str, Any] = field(default_factory=dict)
    # The unlabeled items with the labels training never sees ((image, label), same order as ``unlabeled``),
    # where the files hold them; read only by the pseudo-label diagnostics, never by a loss.
    unlabeled_truth: Sequence | None = None
    # Options the dataset gives its default policy (e.g. the share of foreground-centred 3D patches); the
    # user's ``policy_options`` win, and a policy chosen with ``--policy`` gets none of them.
    policy_options: dict[str, Any] = field(default_factory=dict)

    def cases(self, split: str) -> list[Case]:
        from semiseg.errors import ConfigError

        if split not in self.splits:
            raise ConfigError(
                f"Dataset '{self.name}' has no split '{split}'; choose one of: {', '.join(self.splits)}."
            )
        s = self.splits[split]
        return list(s() if callable(s) else s)

    def split_names(self) -> list[str]:
        return list(self.splits)
