"""Whole-case inference: slice-wise 2D (ACDC) and sliding-window 3D/2D (LA), batched, faithful to the
published evaluation loops.

Functional core (:func:`predict_slices`, :func:`sliding_window`) plus thin callable wrappers
(:class:`SliceInferer`, :class:`SlidingWindowInferer`) whose ``__call__(model, image)`` returns the label map.
All functions run under ``torch.no_grad`` with the model in eval mode and put every submodule back in the
train/eval mode it had before. Inputs may be numpy arrays or tensors; outputs are numpy int64 label maps.

Published protocols reproduced exactly:

* ACDC test (SSL4MIS / BCP / CrossMatch ``test.py``): every slice zoomed to 256x256 with
  ``scipy.ndimage.zoom(order=0)``, eval-mode net, argmax of softmax, zoomed back with ``order=0``
  -> ``predict_slices(mode="nearest")``. The zoom is done as a gather with index maps computed by scipy's own
  ``zoom`` on an index image, so it is scipy's nearest rule to the voxel (``F.interpolate`` nearest is not:
  it floors ``i * in / out`` where scipy rounds ``i * (in - 1) / (out - 1)``), while slices run in batches.
* ACDC in-training validation (UniMatch / CrossMatch): whole volume as a batch of slices, bilinear
  ``F.interpolate`` (``align_corners=False``) to 256 and back on the logits, argmax
  -> ``predict_slices(mode="bilinear")``.
* LA test (UA-MT ``test_single_case``): sliding window 112x112x80, strides (18, 18, 4), symmetric zero padding
  when the image is smaller than the patch, window starts ``min(i * stride, S - P)`` for
  ``i in range(ceil((S - P) / stride) + 1)``, softmax summed and divided by the overlap count, argmax, padding
  cropped -> ``sliding_window(weighting="constant")``. Windows run in batches; scores are accumulated in the
  published window order and precision (float32), so the result is the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

ArrayLike = np.ndarray | torch.Tensor

# The LA protocol of UA-MT, CrossMatch and BCP.
LA_PATCH = (112, 112, 80)
LA_STRIDE = (18, 18, 4)


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no_grad for the block; each submodule gets its previous train/eval flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    # Models with auxiliary heads return a sequence; the first item is the main prediction.
    return out[0] if isinstance(out, (tuple, list)) else out


def _as_tensor(a: ArrayLike) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    a = np.ascontiguousarray(a)
    # torch wants writable memory (read-only arrays come from memory maps and caches).
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _check_classes(logits: torch.Tensor, num_classes: int | None) -> None:
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model gives {logits.shape[1]} output channels, expected num_classes={num_classes}")


# --------------------------------------------------------------------------------------------------------
# Slice-wise 2D inference
# --------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _zoom_index(shape: tuple[int, int], zoom: tuple[float, float]) -> np.ndarray:
    """Flat source index of every output pixel of ``scipy.ndimage.zoom(x, zoom, order=0)`` for ``x.shape``.

    Zooming an image of its own flat indices with scipy itself gives scipy's nearest rule exactly (float64
    holds the indices exactly and order 0 copies values without arithmetic).
    """
    idx = np.arange(shape[0] * shape[1], dtype=np.float64).reshape(shape)
    return ndimage.zoom(idx, zoom, order=0).astype(np.int64)


def predict_slices(
    model: nn.Module,
    volume: ArrayLike,
    num_classes: int | None = None,
    size: tuple[int, int] = (256, 256),
    batch_size: int = 16,
    mode: str = "nearest",
    device: str | torch.device | None = None,
    return_probs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Label map ``(D, H, W)`` of a volume ``(C, D, H, W)`` or ``(D, H, W)`` predicted slice by slice.

    ``mode="nearest"``: the published ACDC test (scipy ``zoom`` order 0 to ``size``, argmax of softmax,
    order 0 back). ``mode="bilinear"``: the in-training validation (bilinear resize of the image, bilinear
    resize of the logits back, argmax). ``batch_size`` slices go through the net at once (eval mode: no
    effect on results). With ``return_probs`` also the class probabilities ``(K, D, H, W)`` float32, moved back
    the same way as the labels (their argmax is the label map).
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    vol = _as_tensor(volume)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"expected a volume (C, D, H, W) or (D, H, W), got shape {tuple(vol.shape)}")
    c, d, h, w = vol.shape
    dev = _device(model, device)
    vol = vol.float()
    pred = np.zeros((d, h, w), dtype=np.int64)
    probs: np.ndarray | None = None
    if d == 0:
        return (pred, np.zeros((num_classes or 0, 0, h, w), np.float32)) if return_probs else pred
    if mode == "nearest":
        zoom_in = (size[0] / h, size[1] / w)
        in_idx = _zoom_index((h, w), zoom_in)
        zh, zw = in_idx.shape
        # The published back-zoom factor is (h / 256, w / 256) with the literal target size.
        out_idx = _zoom_index((zh, zw), (h / size[0], w / size[1]))
        if out_idx.shape != (h, w):
            raise ValueError(f"zoom back gives {out_idx.shape}, not the slice shape {(h, w)}")
        in_idx_t = torch.from_numpy(in_idx.ravel()).to(dev)
        out_idx_t = torch.from_numpy(out_idx.ravel()).to(dev)
    with inference_mode(model):
        for s in range(0, d, batch_size):
            x = vol[:, s : s + batch_size].to(dev).transpose(0, 1)  # (n, C, H, W)
            n = x.shape[0]
            if mode == "nearest":
                x = x.reshape(n, c, h * w).index_select(2, in_idx_t).reshape(n, c, zh, zw)
                logits = _logits(model, x)
                _check_classes(logits, num_classes)
                soft = torch.softmax(logits, dim=1)
                lab = torch.argmax(soft, dim=1)  # as published: argmax of softmax
                lab = lab.reshape(n, zh * zw).index_select(1, out_idx_t).reshape(n, h, w)
                if return_probs:
                    k = soft.shape[1]
                    soft = soft.reshape(n, k, zh * zw).index_select(2, out_idx_t).reshape(n, k, h, w)
            else:
                x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
                logits = _logits(model, x)
                _check_classes(logits, num_classes)
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                lab = torch.argmax(logits, dim=1)
                soft = torch.softmax(logits, dim=1) if return_probs else None
            pred[s : s + n] = lab.cpu().numpy()
            if return_probs:
                if probs is None:
                    probs = np.zeros((soft.shape[1], d, h, w), dtype=np.float32)
                probs[:, s : s + n] = soft.float().cpu().numpy().transpose(1, 0, 2, 3)
    return (pred, probs) if return_probs else pred


# --------------------------------------------------------------------------------------------------------
# Sliding window
# --------------------------------------------------------------------------------------------------------


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis as published: ``min(i * stride, size - patch)``, ``ceil`` count + 1."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(i * stride, size - patch) for i in range(n)]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian window weights (peak 1, sigma = ``sigma_scale`` * patch side, floor 1e-3)."""
    w = torch.ones(())
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        g = torch.exp(-0.5 * (x / max(sigma_scale * p, 1e-6)) ** 2)
        w = w[..., None] * (g / g.max())
    # A floor keeps border voxels (covered only by window edges) from a 0/0 division.
    return w.clamp_min(1e-3).float()


def _tuple(v: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    t = (int(v),) * n if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
    if len(t) != n or min(t) < 1:
        raise ValueError(f"{name} must be {n} positive integers, got {v!r}")
    return t


def sliding_window(
    model: nn.Module,
    image: ArrayLike,
    patch_size: Sequence[int],
    num_classes: int | None = None,
    stride: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    weighting: str = "constant",
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    return_probs: bool = False,
    sigma_scale: float = 0.125,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sliding-window label map of an image ``(C, *spatial)`` or ``(*spatial)``, 2D or 3D.

    ``stride`` (int or per axis) defaults to ``patch * (1 - overlap)``. ``weighting="constant"`` is the
    published average of softmax over windows (same result as UA-MT's ``test_single_case`` with
    ``stride=(stride_xy, stride_xy, stride_z)``); ``"gaussian"`` weights each window by a centred Gaussian.
    Returns the label map ``(*spatial)`` int64, and the averaged probabilities ``(K, *spatial)`` float32 too
    when ``return_probs``.
    """
    if weighting not in ("constant", "gaussian"):
        raise ValueError(f"weighting must be 'constant' or 'gaussian', got {weighting!r}")
    nd = len(patch_size)
    patch = _tuple(patch_size, nd, "patch_size")
    img = _as_tensor(image)
    if img.ndim == nd:
        img = img[None]
    if img.ndim != nd + 1:
        raise ValueError(
            f"expected an image (C, *spatial) with {nd} spatial axes, got shape {tuple(img.shape)}"
        )
    if stride is None:
        stride = tuple(max(1, int(p * (1 - overlap))) for p in patch)
    steps = _tuple(stride, nd, "stride")
    if any(st > p for st, p in zip(steps, patch)):
        raise ValueError(f"stride {steps} is larger than the patch {patch}: some voxels would get no window")
    dev = _device(model, device)
    spatial = tuple(img.shape[1:])

    # Symmetric zero padding up to the patch (the published np.pad(..., constant_values=0)).
    pads = [max(p - s, 0) for p, s in zip(patch, spatial)]
    lo = [q // 2 for q in pads]
    img = img.float().to(dev)
    if any(pads):
        torch_pad: list[int] = []
        for q, left in zip(reversed(pads), reversed(lo)):
            torch_pad += [left, q - left]
        img = F.pad(img, torch_pad, mode="constant", value=0.0)
    full = tuple(img.shape[1:])

    starts = list(itertools.product(*(window_starts(s, p, st) for s, p, st in zip(full, patch, steps))))
    weight = gaussian_importance(patch, sigma_scale).to(dev) if weighting == "gaussian" else None
    score: torch.Tensor | None = None
    count = torch.zeros(full, dtype=torch.float32, device=dev)

    def window(st: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a, a + p) for a, p in zip(st, patch))

    with inference_mode(model):
        for b in range(0, len(starts), sw_batch_size):
            batch = starts[b : b + sw_batch_size]
            x = torch.stack([img[(slice(None),) + window(st)] for st in batch])
            prob = torch.softmax(_logits(model, x), dim=1).float()
            _check_classes(prob, num_classes)
            if score is None:
                score = torch.zeros((prob.shape[1],) + full, dtype=torch.float32, device=dev)
            # One window at a time, in the published x-y-z order: float32 sums come out the same.
            for k, st in enumerate(batch):
                sl = window(st)
                if weight is None:
                    score[(slice(None),) + sl] += prob[k]
                    count[sl] += 1.0
                else:
                    score[(slice(None),) + sl] += prob[k] * weight
                    count[sl] += weight
    assert score is not None  # at least one window always exists
    score /= count[None]
    labels = torch.argmax(score, dim=0)
    crop = tuple(slice(left, left + s) for left, s in zip(lo, spatial))
    labels_np = labels[crop].cpu().numpy().astype(np.int64)
    if return_probs:
        return labels_np, score[(slice(None),) + crop].cpu().numpy()
    return labels_np


# --------------------------------------------------------------------------------------------------------
# Callable wrappers
# --------------------------------------------------------------------------------------------------------


class SliceInferer:
    """``SliceInferer(size, mode, ...)(model, volume)`` -> label map; see :func:`predict_slices`."""

    def __init__(
        self,
        size: tuple[int, int] = (256, 256),
        mode: str = "nearest",
        batch_size: int = 16,
        num_classes: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
        self.size, self.mode, self.batch_size = tuple(size), mode, batch_size
        self.num_classes, self.device = num_classes, device

    def __call__(self, model: nn.Module, image: ArrayLike) -> np.ndarray:
        return predict_slices(
            model, image, self.num_classes, self.size, self.batch_size, self.mode, self.device
        )

    def predictor(self, model: nn.Module) -> Callable[[ArrayLike], np.ndarray]:
        """``image -> labels`` closure, e.g. for :func:`semiseg.evaluation.report.evaluate_cases`."""
        return lambda image: self(model, image)


class SlidingWindowInferer:
    """``SlidingWindowInferer(patch_size, stride, ...)(model, image)`` -> labels; see :func:`sliding_window`.

    ``SlidingWindowInferer(LA_PATCH, LA_STRIDE)`` is the published LA test.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        stride: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        weighting: str = "constant",
        sw_batch_size: int = 4,
        num_classes: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if weighting not in ("constant", "gaussian"):
            raise ValueError(f"weighting must be 'constant' or 'gaussian', got {weighting!r}")
        self.patch_size = tuple(patch_size)
        self.stride, self.overlap, self.weighting = stride, overlap, weighting
        self.sw_batch_size, self.num_classes, self.device = sw_batch_size, num_classes, device

    def __call__(self, model: nn.Module, image: ArrayLike) -> np.ndarray:
        out = sliding_window(
            model,
            image,
            self.patch_size,
            num_classes=self.num_classes,
            stride=self.stride,
            overlap=self.overlap,
            weighting=self.weighting,
            sw_batch_size=self.sw_batch_size,
            device=self.device,
        )
        assert isinstance(out, np.ndarray)
        return out

    def predictor(self, model: nn.Module) -> Callable[[ArrayLike], np.ndarray]:
        """``image -> labels`` closure, e.g. for :func:`semiseg.evaluation.report.evaluate_cases`."""
        return lambda image: self(model, image)
