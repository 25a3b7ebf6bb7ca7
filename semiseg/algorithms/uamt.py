"""UA-MT, uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as the official code does it
(UA-MT ``train_LA_meanteacher_certainty_unlabel.py``; SSL4MIS ``train_uncertainty_aware_mean_teacher_2D.py``).

A Mean Teacher whose consistency only counts where the teacher is certain. The teacher (EMA of the student,
in train mode so that its dropout is on) predicts the unlabeled batch under noise
xi = clamp(N(0, 0.1^2), -0.2, 0.2). Its uncertainty comes from T = 8 Monte-Carlo samples (4 passes over the
unlabeled batch repeated twice, each with fresh noise): U = -sum_c p_mean log(p_mean + 1e-6). Voxels whose
uncertainty is below a threshold rising from 0.75 ln 2 to ln 2 over the run enter the consistency:

    L = L_sup + lambda(t) * sum(M * (softmax f_s(u) - softmax f_t(u + xi))^2) / (2 sum(M) + 1e-16)
    M = [U < (0.75 + 0.25 sigmoid_rampup(t, t_max)) ln 2]   (B, 1, *S), broadcast over the classes
    lambda(t) = 0.1 * sigmoid_rampup(t // 150, 40 in 3D / 200 in 2D)

ln 2 is the binary maximum entropy; the 2D (4-class ACDC) code keeps it too. The teacher's BatchNorm
running statistics are updated by these train-mode passes, as in the official code, whose EMA averages
parameters only.
Unlike SSL4MIS's plain Mean Teacher 2D script, neither UA-MT script delays the consistency term, so
``consistency_start`` defaults to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from semiseg.algorithms.base import OFFICIAL_SGD, PseudoLabel, Recipe, StepContext
from semiseg.algorithms.losses import masked_mse
from semiseg.algorithms.meanteacher import MeanTeacher, train_mode, unlabeled_truth
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p log(p + 1e-6), (B, C, *S) -> (B, 1, *S), in nats."""
    return -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True)


@register_algorithm("uamt")
class UAMT(MeanTeacher):
    name = "uamt"
    paper = "UA-MT (Yu et al.)"
    year = 2019
    needs = ("labeled", "unlabeled")
    ema = {"decay": 0.99, "warmup": True, "buffers": False}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:
            return Recipe("SSL4MIS code/train_uncertainty_aware_mean_teacher_2D.py",
                          {**OFFICIAL_SGD, "schedule": "poly", "iterations": 30000, "batch_size": 12,
                           "unlabeled_batch_size": 12})
        return Recipe("UA-MT code/train_LA_meanteacher_certainty_unlabel.py",
                      {**OFFICIAL_SGD, "schedule": "step", "iterations": 6000, "batch_size": 2,
                       "unlabeled_batch_size": 2})

    def __init__(self, consistency: float = 0.1, consistency_rampup: float | None = None,
                 rampup_every: int = 150, consistency_start: int = 0, noise_std: float = 0.1,
                 noise_clip: float = 0.2, mc_samples: int = 8, threshold_start: float = 0.75) -> None:
        super().__init__(consistency=consistency, consistency_rampup=consistency_rampup,
                         rampup_every=rampup_every, consistency_start=consistency_start, noise_std=noise_std,
                         noise_clip=noise_clip)
        if mc_samples < 2 or mc_samples % 2:
            raise ConfigError(f"UA-MT mc_samples={mc_samples} must be even and >= 2 (the official code uses "
                              f"8: 4 passes over the unlabeled batch repeated twice).")
        self.mc_samples, self.threshold_start = mc_samples, threshold_start

    def threshold(self, iteration: int, total: int) -> float:
        """thr(t) = (0.75 + 0.25 sigmoid_rampup(t, t_max)) ln 2, t_max = the run's length."""
        s = self.threshold_start
        return (s + (1 - s) * sigmoid_rampup(iteration, total)) * math.log(2)

    @torch.no_grad()
    def uncertainty(self, teacher: nn.Module, u: torch.Tensor) -> torch.Tensor:
        """Predictive entropy of T noisy teacher passes: T/2 passes over ``u`` repeated twice, (B, 1, *S)."""
        b = u.shape[0]
        u2 = u.repeat(2, *([1] * (u.dim() - 1)))
        probs = torch.cat([teacher(self.noisy(u2)).float().softmax(1) for _ in range(self.mc_samples // 2)])
        mean = probs.reshape(self.mc_samples, b, *probs.shape[1:]).mean(0)
        return entropy(mean)

    def consistency_loss(self, p_student: torch.Tensor, u: torch.Tensor, teacher: nn.Module,
                         ctx: StepContext) -> tuple[torch.Tensor, dict[str, float], PseudoLabel]:
        with torch.no_grad(), train_mode(teacher):
            p_teacher = teacher(self.noisy(u)).float().softmax(1)
            unc = self.uncertainty(teacher, u)
        thr = self.threshold(ctx.iteration, ctx.total_iterations)
        mask = (unc < thr).float()
        logs = {"mask_ratio": float(mask.mean()), "threshold": thr, "uncertainty": float(unc.mean())}
        # the certainty mask (B, 1, *S) says which pixels the consistency keeps
        target = PseudoLabel(p_teacher.argmax(1), mask[:, 0].bool(), unlabeled_truth)
        return masked_mse(p_student, p_teacher, mask), logs, target
