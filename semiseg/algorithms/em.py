"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004; Vu et al., ADVENT, CVPR 2019), as SSL4MIS
``train_entropy_minimization_2D.py`` / ``_3D.py`` compute it.

One network, one forward pass over the labeled and the unlabeled batch together. Besides the supervised loss on
the labeled part, the prediction is pushed towards confident (low-entropy) class distributions:

    L = L_sup(f(x), y) + lambda(t) * H
    H = mean over the batch's pixels of -sum_c p_c log(p_c + 1e-6) / log(C),   p = softmax f(cat(x, u))
    lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200)        (2D and 3D alike)

H is SSL4MIS ``losses.entropy_loss``: the per-pixel entropy normalised by log(C) (C = 4 for ACDC, 2 in 3D, the
number of classes here), so that it lies in [0, 1], averaged over every pixel. The official scripts apply it to
the softmax of the *whole* batch, labeled images included, and so does the default ``entropy_on="all"``;
``entropy_on="unlabeled"`` restricts it to the unlabeled images, as the papers write it. The gradient flows
through both factors of p log p. The term trains towards no target, so the step reports no pseudo-label.

Deviations from the official code are listed in docs/algorithms.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from semiseg.algorithms.base import Algorithm, Recipe, StepContext, StepResult, ramp_notes, ssl4mis_recipe
from semiseg.algorithms.losses import supervised_loss
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup

ENTROPY_ON = ("all", "unlabeled")


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """SSL4MIS ``entropy_loss(p, C)``: mean over pixels of -sum_c p log(p + 1e-6) / log(C), with C = p.shape[1]."""
    c = probs.shape[1]
    per_pixel = -(probs * torch.log(probs + 1e-6)).sum(1) / math.log(c)
    return per_pixel.mean()


@register_algorithm("em")
class EntropyMinimization(Algorithm):
    name = "em"
    paper = "Entropy minimisation (Vu et al., ADVENT; Grandvalet & Bengio)"
    year = 2019
    needs = ("labeled", "unlabeled")

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        # SSL4MIS: --batch_size 24 with --labeled_bs 12 in 2D; 4 with 2 in 3D (BraTS 2019)
        return ssl4mis_recipe(f"SSL4MIS code/train_entropy_minimization_{dim}D.py", dim)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float = 200.0, rampup_every: int = 150,
                 entropy_on: str = "all") -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}': consistency and consistency_rampup must be >= 0 and "
                              f"rampup_every >= 1 (got {consistency}, {consistency_rampup}, {rampup_every}).")
        if entropy_on not in ENTROPY_ON:
            raise ConfigError(f"Algorithm '{self.name}': entropy_on must be 'all' (the official code: labeled and "
                              f"unlabeled images) or 'unlabeled', got {entropy_on!r}.")
        self.consistency, self.consistency_rampup = consistency, consistency_rampup
        self.rampup_every, self.entropy_on = rampup_every, entropy_on

    def notes(self, iterations: int) -> list[str]:
        return ramp_notes(self, iterations)

    def consistency_weight(self, iteration: int) -> float:
        """lambda(t) = consistency * sigmoid_rampup(t // 150, rampup), as ``get_current_consistency_weight``."""
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        x, y, u = batch["x"], batch["y"], batch["u_w"]
        b = x.shape[0]
        # one pass over labeled + unlabeled, as the official code (BatchNorm sees both)
        logits = model(torch.cat([x, u]))
        sup = supervised_loss(logits[:b], y, classes=self.dice_classes)
        probs = logits.float().softmax(1)
        ent = normalised_entropy(probs if self.entropy_on == "all" else probs[b:])
        w = self.consistency_weight(ctx.iteration)
        logs = {"loss/sup": float(sup.detach()), "loss/entropy": float(ent.detach()), "consistency_weight": w}
        return StepResult({"sup": sup, "entropy": w * ent}, logs)
