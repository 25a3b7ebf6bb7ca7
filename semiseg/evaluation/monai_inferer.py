"""Sliding-window inference by MONAI's ``sliding_window_inference``, as an alternative to semiseg's own
:func:`semiseg.evaluation.inference.sliding_window`.

``monai_sliding_window(model, image, patch_size, stride=...)`` returns the averaged softmax probabilities
``(K, *spatial)`` float32 of an image ``(C, *spatial)``; :class:`MonaiSlidingWindowInferer` returns the label map
(argmax), like :class:`semiseg.evaluation.inference.SlidingWindowInferer`. The model runs in eval mode under
``no_grad`` and every submodule gets its train/eval flag back (:func:`inference_mode`).

How the two compare, for an integer ``stride`` per axis (default: half the patch, as semiseg's protocol):

- **Window placement is the same.** MONAI places windows every ``int(patch * (1 - overlap))`` voxels, as many as
  reach the end, the last one shifted back to end at the border: starts ``min(i * interval, S - P)`` for
  ``i = 0 .. ceil((S - P) / interval)``, which is semiseg's (UA-MT's) rule. This module passes MONAI the per-axis
  overlap ``(P - stride - 0.5) / P`` (0 when ``stride == P``), whose interval is exactly ``stride`` whatever the
  floating-point rounding. An axis where the image equals the patch gets one window in both.
- **Padding is the same**: an image smaller than the patch is padded symmetrically with zeros (the extra voxel
  after, when odd), and the output is cropped back. Here MONAI does the padding.
- **Blending differs in the sums, not in the rule.** With ``mode="constant"`` both average the softmax over the
  windows covering a voxel; MONAI adds windows batch by batch into its own buffers, so float32 sums can differ in
  the last bits from semiseg's window-by-window order (labels agree except on exact ties). With
  ``mode="gaussian"`` both weight a window by a separable Gaussian of sigma ``0.125 * P`` floored at 1e-3;
  MONAI computes it in float32 and does not rescale an even side's peak to 1 (semiseg does, in float64), so the
  weights differ by rounding and, near the floor, by where it applies: probabilities agree closely, not exactly.
- A ``stride`` larger than the patch (gaps between windows) cannot be expressed as a MONAI overlap and is
  refused, as semiseg's own sliding window refuses it.

MONAI is imported when a function is called, so this module imports without it. See docs/monai.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from semiseg.backbones.monai import INSTALL_HINT  # one sentence for both MONAI features
from semiseg.errors import ConfigError
from semiseg.evaluation.inference import ArrayLike, _as_tensor, _check_classes, _device, _logits, _tuple, inference_mode


def _sliding_window_inference() -> Callable:
    try:
        import monai  # noqa: F401  (the parent first, so a missing package gives our sentence)
        from monai.inferers import sliding_window_inference
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return sliding_window_inference


def overlap_for_stride(patch: Sequence[int], stride: Sequence[int]) -> list[float]:
    """Per-axis MONAI overlap whose scan interval ``int(P * (1 - overlap))`` is exactly ``stride``.

    ``1 - stride / P`` can land just below the integer after rounding (``int(17.999...) == 17``); aiming at
    ``stride + 0.5`` keeps the truncation on ``stride``.
    """
    out = []
    for p, s in zip(patch, stride):
        if s > p:
            raise ValueError(f"stride {tuple(stride)} is larger than the patch {tuple(patch)}: some voxels would "
                             f"get no window")
        out.append(0.0 if s == p else (p - s - 0.5) / p)
    return out


def monai_sliding_window(
    model: nn.Module,
    image: ArrayLike,
    patch_size: Sequence[int],
    num_classes: int | None = None,
    stride: int | Sequence[int] | None = None,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    mode: str = "constant",
) -> np.ndarray:
    """Averaged softmax probabilities ``(K, *spatial)`` float32 of ``image`` ``(C, *spatial)`` or ``(*spatial)``.

    ``stride`` (int or per axis) defaults to half the patch; ``mode`` is MONAI's blend mode (``"constant"``:
    plain average, ``"gaussian"``: centre-weighted).
    """
    if mode not in ("constant", "gaussian"):
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    swi = _sliding_window_inference()
    nd = len(patch_size)
    patch = _tuple(patch_size, nd, "patch_size")
    img = _as_tensor(image)
    if img.ndim == nd:
        img = img[None]
    if img.ndim != nd + 1:
        raise ValueError(f"expected an image (C, *spatial) with {nd} spatial axes, got shape {tuple(img.shape)}")
    steps = _tuple(stride if stride is not None else tuple(max(1, p // 2) for p in patch), nd, "stride")
    overlap = overlap_for_stride(patch, steps)
    dev = _device(model, device)

    def predict(x: torch.Tensor) -> torch.Tensor:
        logits = _logits(model, x)
        _check_classes(logits, num_classes)
        return torch.softmax(logits.float(), dim=1)

    with inference_mode(model):
        out = swi(img.float()[None].to(dev), list(patch), sw_batch_size, predict,
                  overlap=overlap[0] if len(set(overlap)) == 1 else overlap, mode=mode,
                  padding_mode="constant", cval=0.0)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out  # a MetaTensor when the input is one
    return out[0].detach().float().cpu().numpy()


class MonaiSlidingWindowInferer:
    """``MonaiSlidingWindowInferer(patch_size, stride, ...)(model, image)`` -> label map ``(*spatial)`` int64;
    see :func:`monai_sliding_window`."""

    def __init__(self, patch_size: Sequence[int], stride: int | Sequence[int] | None = None,
                 mode: str = "constant", sw_batch_size: int = 4, num_classes: int | None = None,
                 device: str | torch.device | None = None) -> None:
        if mode not in ("constant", "gaussian"):
            raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
        self.patch_size, self.stride, self.mode = tuple(patch_size), stride, mode
        self.sw_batch_size, self.num_classes, self.device = sw_batch_size, num_classes, device

    def __call__(self, model: nn.Module, image: ArrayLike) -> np.ndarray:
        probs = monai_sliding_window(model, image, self.patch_size, num_classes=self.num_classes, stride=self.stride,
                                     sw_batch_size=self.sw_batch_size, device=self.device, mode=self.mode)
        return np.argmax(probs, axis=0).astype(np.int64)

    def predictor(self, model: nn.Module) -> Callable[[ArrayLike], np.ndarray]:
        """``image -> labels`` closure, e.g. for :func:`semiseg.evaluation.report.evaluate_cases`."""
        return lambda image: self(model, image)
