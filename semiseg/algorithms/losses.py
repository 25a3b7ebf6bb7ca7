"""Segmentation losses as the official code computes them (docs/algorithms.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) integer -> (B, C, *S) float."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).float()


def dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    ignore: torch.Tensor | None = None,
    classes: str = "all",
    smooth: float = 1e-5,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice over the whole batch, mean over classes: 1 - (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s).

    ``probs`` (B, C, *S) probabilities; ``target`` (B, *S) class indices; ``ignore`` (B, *S) with 1 where a
    pixel is left out of every sum (unconfident pseudo-labels); ``classes`` "all" (ACDC, background included)
    or "foreground" (LA, classes 1..C-1); ``weight`` (B, *S) multiplies each pixel's terms (region losses).
    """
    c = probs.shape[1]
    y = one_hot(target, c)
    keep = torch.ones_like(target, dtype=probs.dtype) if ignore is None else (ignore != 1).to(probs.dtype)
    if weight is not None:
        keep = keep * weight
    keep = keep.unsqueeze(1)
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * y * keep).sum(dims)
    p2 = (probs * probs * keep).sum(dims)
    y2 = (y * y * keep).sum(dims)
    per_class = 1 - (2 * inter + smooth) / (p2 + y2 + smooth)
    if classes == "foreground":
        per_class = per_class[1:]
    elif classes != "all":
        raise ValueError(f"classes must be 'all' or 'foreground', got {classes!r}")
    return per_class.mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the pixels that are not ignored (0 when all are ignored)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if ignore is None:
        return ce.mean()
    keep = (ignore != 1).float()
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, classes: str = "all",
                    smooth: float = 1e-5) -> torch.Tensor:
    """L_sup = (CE + Dice) / 2, the supervised term of every algorithm here."""
    probs = logits.float().softmax(1)
    return (ce_loss(logits, target) + dice_loss(probs, target, classes=classes, smooth=smooth)) / 2


def masked_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of probabilities; with ``mask`` (B, 1 or C, *S) the UA-MT normalisation
    sum(M (p_s - p_t)^2) / (2 sum(M) + 1e-16), where sum(M) counts voxels of a (B, 1, *S) mask."""
    d = (student_probs.float() - teacher_probs.float()) ** 2
    if mask is None:
        return d.mean()
    return (mask * d).sum() / (2 * mask.sum() + 1e-16)


def kl_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
            ignore: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per pixel, averaged over pixels not ignored."""
    logp = student_logits.float().log_softmax(1)
    kl = (teacher_probs * (teacher_probs.clamp_min(1e-8).log() - logp)).sum(1)
    if ignore is None:
        return kl.mean()
    keep = (ignore != 1).float()
    return (kl * keep).sum() / keep.sum().clamp_min(1.0)
