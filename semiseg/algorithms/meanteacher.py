"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as SSL4MIS ``train_mean_teacher_2D.py`` / ``_3D.py``.

The student sees the labeled and the unlabeled batch in one forward pass. The teacher is an exponential moving
average of the student (alpha = min(1 - 1/(t+1), 0.99), parameters only; the engine keeps it) and sees the
unlabeled batch with Gaussian noise xi = clamp(N(0, 0.1^2), -0.2, 0.2). The student's softmax is pulled
towards the teacher's:

    L = L_sup(x, y) + lambda(t) * mean((softmax f_s(u) - softmax f_t(u + xi))^2)
    lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200 in 2D / 40 in 3D)

The teacher runs in train mode, as the official code leaves it (dropout on, BatchNorm on batch statistics,
its running statistics updated by its own passes; the EMA averages parameters only). The 2D script also zeroes
the consistency term for the first 1000 iterations (``consistency_start``); the 3D one does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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
from semiseg.algorithms.losses import masked_mse, supervised_loss
from semiseg.errors import ConfigError, TrainingError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup


def unlabeled_truth(truth: dict[str, torch.Tensor]) -> torch.Tensor:
    """The true labels of the weak unlabeled view ``u_w`` (teacher targets of the teacher methods)."""
    return truth["u_y"]


@contextmanager
def train_mode(module: nn.Module, mode: bool = True) -> Iterator[nn.Module]:
    """Run ``module`` in train (or eval) mode, then give every submodule back the mode it had."""
    before = [(m, m.training) for m in module.modules()]
    module.train(mode)
    try:
        yield module
    finally:
        for m, was in before:
            m.training = was


def gaussian_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """clamp(N(0, std^2), -clip, clip), drawn from torch's global generator (restored on resume)."""
    return torch.clamp(torch.randn_like(x) * std, -clip, clip)


def require_teacher(ctx: StepContext, name: str) -> nn.Module:
    if ctx.teacher is None:
        raise TrainingError(f"Algorithm '{name}' needs the engine's EMA teacher, but none was given.")
    return ctx.teacher


@register_algorithm("meanteacher")
class MeanTeacher(Algorithm):
    name = "meanteacher"
    paper = "Mean Teacher (Tarvainen & Valpola)"
    year = 2017
    needs = ("labeled", "unlabeled")
    ema = {"decay": 0.99, "warmup": True, "buffers": False}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        return ssl4mis_recipe(f"SSL4MIS code/train_mean_teacher_{dim}D.py", dim)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float | None = None,
                 rampup_every: int = 150, consistency_start: int | None = None, noise_std: float = 0.1,
                 noise_clip: float = 0.2) -> None:
        super().__init__()
        if consistency < 0 or noise_std < 0 or noise_clip < 0 or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}': consistency, noise_std and noise_clip must be >= 0 "
                              f"and rampup_every >= 1.")
        self.consistency, self.rampup_every = consistency, rampup_every
        self.noise_std, self.noise_clip = noise_std, noise_clip
        self._rampup, self._start = consistency_rampup, consistency_start
        self.setup(num_classes=4, dim=2)

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        # SSL4MIS 2D ramps over 200 "epochs" of 150 iterations; UA-MT's LA code over 40.
        self.consistency_rampup = self._rampup if self._rampup is not None else (40.0 if dim == 3 else 200.0)
        self.consistency_start = self._start if self._start is not None else (0 if dim == 3 else 1000)

    def consistency_weight(self, iteration: int) -> float:
        """lambda(t) = consistency * sigmoid_rampup(t // 150, rampup); 0 before ``consistency_start``."""
        if iteration < self.consistency_start:
            return 0.0
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def notes(self, iterations: int) -> list[str]:
        lines = ramp_notes(self, iterations)
        if self.consistency_start >= iterations:
            start = iterations * self.consistency_start // 30000  # the 2D script's 1000 of its 30 000 iterations
            lines.append(f"{self.name}: the consistency term starts at iteration {self.consistency_start} (the "
                         f"official 2D script's), after this {iterations}-iteration run ends; --opt "
                         f"consistency_start={start} starts it at the same share of the run.")
        return lines

    def noisy(self, u: torch.Tensor) -> torch.Tensor:
        return u + gaussian_noise(u, self.noise_std, self.noise_clip)

    def consistency_loss(self, p_student: torch.Tensor, u: torch.Tensor, teacher: nn.Module,
                         ctx: StepContext) -> tuple[torch.Tensor, dict[str, float], PseudoLabel]:
        """Plain MT: mean squared difference of the softmaxes (SSL4MIS ``torch.mean((p_s - p_t)**2)``).
        Also returns the teacher's argmax as the (soft) target's pseudo-label, for the diagnostics."""
        with torch.no_grad(), train_mode(teacher):
            p_teacher = teacher(self.noisy(u)).float().softmax(1)
        return masked_mse(p_student, p_teacher), {}, PseudoLabel(p_teacher.argmax(1), None, unlabeled_truth)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        teacher = require_teacher(ctx, self.name)
        x, y, u = batch["x"], batch["y"], batch["u_w"]
        b = x.shape[0]
        # one student pass over labeled + unlabeled, as the official code (BatchNorm sees both)
        logits = model(torch.cat([x, u]))
        sup = supervised_loss(logits[:b], y, classes=self.dice_classes)
        con, logs, target = self.consistency_loss(logits[b:].float().softmax(1), u, teacher, ctx)
        w = self.consistency_weight(ctx.iteration)
        logs.update({"loss/sup": float(sup.detach()), "loss/consistency": float(con.detach()),
                     "consistency_weight": w})
        return StepResult({"sup": sup, "consistency": w * con}, logs, {"consistency": target})
