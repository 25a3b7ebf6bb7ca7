"""The evaluation protocol shared by in-training validation, `semiseg eval` and `semiseg bench`.

2D data: each slice (or image) is resized to the training patch, predicted, and resized back, as the official
ACDC code does: bilinear on logits during validation (UniMatch/CrossMatch in-training), nearest on inputs and
labels at test time (SSL4MIS/CrossMatch ``test.py``). 3D data: batched sliding window over the training patch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.evaluation.inference import predict_slices, sliding_window
from semiseg.evaluation.metrics import dice

INFERERS = ("semiseg", "monai")


def probabilities(model: nn.Module, dim: int, patch_size: tuple[int, ...], num_classes: int,
                  device: torch.device, mode: str = "test", stride: tuple[int, ...] | None = None,
                  sw_batch_size: int = 4, inferer: str = "semiseg") -> Callable[[np.ndarray], np.ndarray]:
    """A function image (C, *S) -> class probabilities (K, *S) float32 under the protocol (their argmax is the
    protocol's label map)."""
    patch = tuple(int(p) for p in patch_size)
    if inferer not in INFERERS:
        raise ConfigError(f"Inferer '{inferer}' is not known; use {' or '.join(INFERERS)}.")
    if inferer == "monai" and dim == 2:
        raise ConfigError("--inferer monai is a sliding window for 3D models; 2D models are predicted slice by "
                          "slice at their training size, so leave --inferer at semiseg.")

    def probs(image: np.ndarray) -> np.ndarray:
        if dim == 2:
            interp = "bilinear" if mode == "val" else "nearest"
            if image.ndim == 3:  # one 2D image (C, H, W): a volume of one slice
                return predict_slices(model, image[:, None], num_classes, size=patch, mode=interp, device=device,
                                      return_probs=True)[1][:, 0]
            return predict_slices(model, image, num_classes, size=patch, mode=interp, device=device,
                                  return_probs=True)[1]
        st = stride or tuple(max(1, p // 2) for p in patch)
        if inferer == "monai":
            from semiseg.evaluation.monai_inferer import monai_sliding_window

            return monai_sliding_window(model, image, patch, num_classes=num_classes, stride=st,
                                        sw_batch_size=sw_batch_size, device=device)
        return sliding_window(model, image, patch, stride=st, num_classes=num_classes,
                              sw_batch_size=sw_batch_size, device=device, return_probs=True)[1]

    return probs


def mirrored(probs: Callable[[np.ndarray], np.ndarray], dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation by mirroring: probabilities averaged over every combination of flips of the
    in-plane axes (2D: 4 passes) or of the three axes (3D: 8 passes), as nnU-Net does."""

    def averaged(image: np.ndarray) -> np.ndarray:
        spatial = list(range(1, image.ndim))
        axes = spatial[-2:] if dim == 2 else spatial  # 2D volumes (C, D, H, W): slices are not mirrored
        total = None
        combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        for flip in combos:
            p = probs(np.flip(image, flip).copy() if flip else image)
            p = np.flip(p, flip) if flip else p
            total = p.astype(np.float32, copy=True) if total is None else total + p
        return total / len(combos)

    return averaged


def predictor(model: nn.Module, dim: int, patch_size: tuple[int, ...], num_classes: int,
              device: torch.device, mode: str = "test", stride: tuple[int, ...] | None = None,
              sw_batch_size: int = 4, tta: bool = False,
              inferer: str = "semiseg") -> Callable[..., np.ndarray]:
    """A function ``predict(image, restore=None)`` -> label map implementing the protocol for this model.

    ``image`` is (C, *S); ``restore`` (a case's, see :class:`semiseg.data.base.Case`) maps the probabilities to
    the label's grid before the argmax. Without restore, mirroring (``tta``) or another inferer the labels come
    from the published protocol's own path.
    """
    patch = tuple(int(p) for p in patch_size)
    probs = probabilities(model, dim, patch, num_classes, device, mode, stride, sw_batch_size, inferer)
    if tta:
        probs = mirrored(probs, dim)

    def predict(image: np.ndarray, restore: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        if restore is None and not tta and inferer == "semiseg":
            if dim == 2:
                interp = "bilinear" if mode == "val" else "nearest"
                if image.ndim == 3:
                    return predict_slices(model, image[:, None], num_classes, size=patch, mode=interp,
                                          device=device)[0]
                return predict_slices(model, image, num_classes, size=patch, mode=interp, device=device)
            st = stride or tuple(max(1, p // 2) for p in patch)
            return sliding_window(model, image, patch, stride=st, num_classes=num_classes,
                                  sw_batch_size=sw_batch_size, device=device)
        p = probs(image)
        if restore is not None:
            p = restore(p)
        return np.argmax(p, axis=0).astype(np.int64)

    predict.probabilities = probs  # type: ignore[attr-defined]  # predict uses it for --save-prob
    return predict


def predict_case(predict: Callable[..., np.ndarray], case) -> np.ndarray:
    """A case's label map on its label's grid (through ``case.restore`` where its image was preprocessed)."""
    restore = getattr(case, "restore", None)
    return predict(case.image) if restore is None else predict(case.image, restore)


def foreground_names(data) -> list[str]:
    """Names of classes 1..C-1 (datasets may list the background too)."""
    names = list(data.class_names or [])
    if len(names) == data.num_classes:
        names = names[1:]
    return names if len(names) == data.num_classes - 1 else [str(c) for c in range(1, data.num_classes)]


def validate(model: nn.Module, data, split: str, device: torch.device,
             max_cases: int | None = None) -> dict[str, float]:
    """Mean foreground Dice over the cases of ``split`` (per class, averaged over cases, then over classes)."""
    cases = data.cases(split)
    if max_cases:
        cases = cases[:max_cases]
    predict = predictor(model, data.dim, data.patch_size, data.num_classes, device, mode="val")
    per_class = np.zeros((len(cases), data.num_classes - 1))
    for i, case in enumerate(cases):
        pred = predict_case(predict, case)
        for c in range(1, data.num_classes):
            per_class[i, c - 1] = dice(pred == c, case.label == c)
    out = {"dice": float(per_class.mean()) if len(cases) else 0.0}
    names = foreground_names(data)
    for c, n in enumerate(names):
        out[f"dice_{n}"] = float(per_class[:, c].mean()) if len(cases) else 0.0
    return out
