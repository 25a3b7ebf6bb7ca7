"""The evaluation protocol shared by in-training validation, `semiseg eval` and `semiseg bench`.

2D data: each slice (or image) is resized to the training patch, predicted, and resized back, as the official
ACDC code does: bilinear on logits during validation (UniMatch/CrossMatch in-training), nearest on inputs and
labels at test time (SSL4MIS/CrossMatch ``test.py``). 3D data: batched sliding window over the training patch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from semiseg.evaluation.inference import predict_slices, sliding_window
from semiseg.evaluation.metrics import dice


def predictor(model: nn.Module, dim: int, patch_size: tuple[int, ...], num_classes: int,
              device: torch.device, mode: str = "test", stride: tuple[int, ...] | None = None,
              sw_batch_size: int = 4) -> Callable[[np.ndarray], np.ndarray]:
    """A function image (C, *S) -> label (*S) implementing the protocol for this model."""
    patch = tuple(int(p) for p in patch_size)

    def predict(image: np.ndarray) -> np.ndarray:
        if dim == 2:
            interp = "bilinear" if mode == "val" else "nearest"
            if image.ndim == 3:  # one 2D image (C, H, W): a volume of one slice
                return predict_slices(model, image[:, None], num_classes, size=patch, mode=interp,
                                      device=device)[0]
            return predict_slices(model, image, num_classes, size=patch, mode=interp, device=device)
        st = stride or tuple(max(1, p // 2) for p in patch)
        return sliding_window(model, image, patch, stride=st, num_classes=num_classes,
                              sw_batch_size=sw_batch_size, device=device)

    return predict


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
        pred = predict(case.image)
        for c in range(1, data.num_classes):
            per_class[i, c - 1] = dice(pred == c, case.label == c)
    out = {"dice": float(per_class.mean()) if len(cases) else 0.0}
    names = foreground_names(data)
    for c, n in enumerate(names):
        out[f"dice_{n}"] = float(per_class[:, c].mean()) if len(cases) else 0.0
    return out
