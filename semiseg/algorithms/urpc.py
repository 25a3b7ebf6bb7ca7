"""Uncertainty rectified pyramid consistency, URPC (Luo et al., MICCAI 2021 / MedIA 2022), as SSL4MIS
``train_uncertainty_rectified_pyramid_consistency_2D.py`` (``UNet_URPC``) and ``_3D.py`` (``unet_3D_dv_semi``).

The network predicts at S = 4 scales (the backbone's ``deep_supervision`` heads, each resized to the input's
size; ``decode_pyramid`` returns them main first). Labeled and unlabeled images go through in one pass:

    L_sup = (sum_s CE(o_s, y) + sum_s Dice(p_s, y)) / 8                   p_s = softmax o_s, s = 0..3
    p_bar = (1/S) sum_s p_s                                                the pyramid's mean prediction
    D_s   = sum_c p_bar_c (log p_bar_c - log p_s,c)                         KL(p_bar || p_s) per pixel, (B, 1, *S)
    L_s   = mean(exp(-D_s) (p_bar - p_s)^2) / (mean(exp(-D_s)) + 1e-8) + mean(D_s)
    L     = L_sup + lambda(t) (1/S) sum_s L_s,   lambda(t) = 0.1 * sigmoid_rampup(t // 150, R)

on the unlabeled part, with R = 200 in 2D and 400 in 3D. Nothing is detached: p_bar and D_s carry gradient, as
in the official code. The first mean runs over classes and pixels, the second over pixels only, as there.

Each scale sees its own perturbation, which the official networks build in and which this module passes to
``decode_pyramid`` (``perturb=False`` switches them off):

- 2D (Decoder_URPC), on the head's input only: 1/8 element-wise dropout p = 0.5; 1/4 FeatureDropout; 1/2
  FeatureNoise U(-0.3, 0.3) (the CCT functions); the main head none.
- 3D (unet_3D_dv_semi), in the decoder path: channel dropout (Dropout3d) p = 0.5 at 1/8, 0.3 at 1/4 and 0.2 at
  1/2; the reference's 0.1 at full size is replaced by the V-Net's own head Dropout3d(0.5).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.algorithms.base import (
    Algorithm,
    PseudoLabel,
    Recipe,
    StepContext,
    StepResult,
    ramp_notes,
    ssl4mis_recipe,
)
from semiseg.algorithms.cct import feature_dropout, feature_noise
from semiseg.algorithms.losses import supervised_loss
from semiseg.algorithms.meanteacher import unlabeled_truth
from semiseg.algorithms.perturbations import Perturbation, channel_dropout, elementwise_dropout
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup


def rectified_consistency(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/S) sum_s L_s from the scales' logits on the unlabeled images, and the mean uncertainty
    (1/S) sum_s mean(D_s) (for the log)."""
    log_probs = [o.float().log_softmax(1) for o in logits]
    probs = [lp.exp() for lp in log_probs]
    mean = torch.stack(probs).mean(0)
    terms, unc = [], []
    for p, lp in zip(probs, log_probs):
        # nn.KLDivLoss(reduction='none')(log p_s, p_bar) summed over classes. The reference takes
        # torch.log(softmax): the same value, but -inf (and an infinite loss) where the softmax underflows to 0
        d = F.kl_div(lp, mean, reduction="none").sum(1, keepdim=True)
        w = torch.exp(-d)
        terms.append(torch.mean((mean - p) ** 2 * w) / (torch.mean(w) + 1e-8) + torch.mean(d))
        unc.append(d.mean())
    return torch.stack(terms).mean(), torch.stack(unc).mean().detach()


@register_algorithm("urpc")
class URPC(Algorithm):
    name = "urpc"
    paper = "URPC, uncertainty rectified pyramid consistency (Luo et al., MICCAI / MedIA)"
    year = 2021
    needs = ("labeled", "unlabeled")
    # What the backbone must be built with (the engine passes it to unet / vnet).
    backbone_options: ClassVar[dict[str, Any]] = {"deep_supervision": True}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # batch 24 of which labeled_bs 12
            return ssl4mis_recipe("SSL4MIS code/train_uncertainty_rectified_pyramid_consistency_2D.py", dim)
        # written for GTV/BraTS-style data (96^3 patches): base_lr 0.1, 60 000 iterations, batch 4 = 2 + 2
        return ssl4mis_recipe("SSL4MIS code/train_uncertainty_rectified_pyramid_consistency_3D.py", dim, lr=0.1,
                              iterations=60000)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float | None = None, rampup_every: int = 150,
                 perturb: bool = True) -> None:
        super().__init__()
        if consistency < 0 or (consistency_rampup is not None and consistency_rampup < 0) or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}' needs consistency >= 0, consistency_rampup >= 0 and "
                              f"rampup_every >= 1 (got {consistency}, {consistency_rampup}, {rampup_every}).")
        self.consistency, self.rampup_every, self.perturb = consistency, rampup_every, perturb
        self._rampup = consistency_rampup
        self.setup(num_classes=4, dim=2)

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        # the 2D script ramps over 200 "epochs" of 150 iterations, the 3D one over 400
        self.consistency_rampup = self._rampup if self._rampup is not None else (400.0 if dim == 3 else 200.0)

    def notes(self, iterations: int) -> list[str]:
        return ramp_notes(self, iterations)

    def consistency_weight(self, iteration: int) -> float:
        """lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200 in 2D / 400 in 3D)."""
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def level_perturbations(self) -> tuple[list[Perturbation | None], bool]:
        """The per-scale perturbations (main first) and whether they stay in the decoder path."""
        if not self.perturb:
            return [None] * 4, False
        if self.dim == 3:  # unet_3D_dv_semi: Dropout3d 0.2 / 0.3 / 0.5 after the up-blocks at 1/2, 1/4, 1/8
            return [None, channel_dropout(0.2), channel_dropout(0.3), channel_dropout(0.5)], True
        # Decoder_URPC: dp1 FeatureNoise, dp2 FeatureDropout, dp3 Dropout(p=0.5), on the heads' inputs only
        return [None, feature_noise(0.3), feature_dropout(0.7, 0.9), elementwise_dropout(0.5)], False

    def check_model(self, model: nn.Module) -> None:
        if not getattr(model, "deep_supervision", False) or not hasattr(model, "decode_pyramid"):
            raise ConfigError(f"Algorithm '{self.name}' needs a backbone with per-scale heads; build unet or vnet "
                              f"with the backbone option deep_supervision=true (--backbone-opt "
                              f"deep_supervision=true).")

    def losses(self, logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_sup, L_con, mean uncertainty) from the scales' logits over cat(x, u); ``y`` labels the first rows."""
        b = y.shape[0]
        # (CE + Dice) / 2 per scale, averaged over the four: the official sum of eight terms / 8
        sup = torch.stack([supervised_loss(o[:b], y, classes=self.dice_classes) for o in logits]).mean()
        con, unc = rectified_consistency([o[b:] for o in logits])
        return sup, con, unc

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        self.check_model(model)
        x, y, u = batch["x"], batch["y"], batch["u_w"]
        fns, in_path = self.level_perturbations()
        gen = ctx.generator
        perturb = [None if fn is None else (lambda t, fn=fn: fn([t], gen)[0]) for fn in fns]
        logits = model.decode_pyramid(model.encode(torch.cat([x, u])), perturb=perturb, in_path=in_path)
        sup, con, unc = self.losses(logits, y)
        w = self.consistency_weight(ctx.iteration)
        logs = {"loss/sup": float(sup.detach()), "loss/consistency": float(con.detach()),
                "consistency_weight": w, "uncertainty": float(unc)}
        # the scales' mean prediction on the unlabeled batch is the consistency target; its argmax for diagnostics
        with torch.no_grad():
            mean = torch.stack([o[x.shape[0]:].float().softmax(1) for o in logits]).mean(0)
        target = PseudoLabel(mean.argmax(1), None, unlabeled_truth)
        return StepResult({"sup": sup, "consistency": w * con}, logs, {"consistency": target})
