"""Pseudo-label diagnostics: how right each pseudo-label edge's target is, measured against the true labels of
the unlabeled images (which ACDC, LA and the synthetic data have, and which training never uses).

For every edge that trains on a hard pseudo-label the step reports a :class:`~semiseg.algorithms.base.PseudoLabel`;
after the step the engine compares it with the truth and logs, per edge:

* ``diag/<edge>/acc_kept``: pixel accuracy of the target on the pixels the loss keeps (above the threshold);
* ``diag/<edge>/acc_all``: pixel accuracy on all pixels;
* ``diag/<edge>/dice_kept``: mean foreground Dice of the target against the truth on the kept pixels (accuracy
  is dominated by background on most medical images);
* ``diag/<edge>/kept``: the share of pixels kept (the mask ratio).

The true labels travel in the batch as ``u_y`` / ``u_y_mix`` only as far as the engine, which removes them before
the algorithm's step: no algorithm, and so no loss, can read them.
"""

from __future__ import annotations

import math

import torch

from semiseg.algorithms.base import PseudoLabel

TRUTH_KEYS = ("u_y", "u_y_mix")


def split_truth(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The batch without the unlabeled images' true labels, and those labels."""
    truth = {k: v for k, v in batch.items() if k in TRUTH_KEYS}
    return {k: v for k, v in batch.items() if k not in TRUTH_KEYS}, truth


def foreground_dice(label: torch.Tensor, truth: torch.Tensor, keep: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes present in the truth or the target (on kept pixels) of 2|P∩G|/(|P|+|G|)."""
    scores = []
    for c in range(1, num_classes):
        p, g = (label == c) & keep, (truth == c) & keep
        denom = int(p.sum() + g.sum())
        if denom:
            scores.append(2.0 * float((p & g).sum()) / denom)
    return sum(scores) / len(scores) if scores else math.nan


def pseudo_label_stats(pseudo: dict[str, PseudoLabel], truth: dict[str, torch.Tensor],
                       num_classes: int) -> dict[str, float]:
    """The diagnostics of every reported pseudo-label (empty without truth)."""
    if not truth:
        return {}
    out: dict[str, float] = {}
    for name, p in pseudo.items():
        t = p.truth(truth).to(p.label.device)
        right = p.label == t
        keep = torch.ones_like(right) if p.keep is None else p.keep.to(right.device)
        n_keep = int(keep.sum())
        out[f"diag/{name}/acc_all"] = float(right.float().mean())
        out[f"diag/{name}/acc_kept"] = float(right[keep].float().mean()) if n_keep else math.nan
        out[f"diag/{name}/dice_kept"] = foreground_dice(p.label, t, keep, num_classes)
        out[f"diag/{name}/kept"] = n_keep / keep.numel()
    return out
