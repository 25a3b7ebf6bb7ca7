"""Interpolation consistency training (Verma et al., IJCAI 2019), as SSL4MIS
``train_interpolation_consistency_training_2D.py`` / ``_3D.py`` compute it.

The unlabeled batch is split into two halves u0, u1 (pair i = the i-th image of each half). Each pair is mixed
with its own factor drawn from a symmetric Beta distribution, and the student's prediction of the mixed image
is pulled towards the same mix of an EMA teacher's predictions of the two unmixed images:

    lambda_i ~ Beta(0.2, 0.2)                                one per pair
    u_mix    = (1 - lambda) u0 + lambda u1
    target   = (1 - lambda) softmax f_t(u0) + lambda softmax f_t(u1)      (no gradient)
    L = L_sup(f_s(x), y) + w(t) * mean((softmax f_s(u_mix) - target)^2)
    w(t) = 0.1 * sigmoid_rampup(t // 150, 200)              (2D and 3D alike)

As in the official code, the student sees cat(x, u_mix) in one pass (B + B_u/2 images), and the teacher runs
twice, once per half, in train mode (dropout on; BatchNorm on each half's own batch statistics, its running
statistics updated by these passes, since the EMA averages parameters only). The teacher is the engine's EMA
(alpha = min(1 - 1/(t+1), 0.99), updated after every optimiser step). The official code draws lambda with
``np.random.beta``; here it comes from torch's global CPU generator, which a resume restores.

Pseudo-label diagnostics: the target of a mixed image is a blend of two teacher predictions, and a mixed image
has no true label, so the step reports the teacher's argmax on the two *unmixed* halves (in the order of the
unlabeled batch) against their true labels: how right the predictions are that every target is blended from.

Deviations from the official code are listed in docs/algorithms.md.
"""

from __future__ import annotations

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
from semiseg.algorithms.meanteacher import require_teacher, train_mode, unlabeled_truth
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup


def mix_factors(n: int, alpha: float) -> torch.Tensor:
    """n factors ~ Beta(alpha, alpha), as ``np.random.beta(alpha, alpha, size=(n, ...))``, shape (n,), float64.

    Drawn on the CPU from torch's global generator, whatever the device: repeatable under the seed, restored on
    resume, and the same draw on the CPU and on a GPU.
    """
    a = torch.tensor(float(alpha), dtype=torch.float64)
    return torch.distributions.Beta(a, a).sample((n,))


def unlabeled_halves(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if u.shape[0] % 2:
        raise ConfigError(f"ICT mixes the first half of the unlabeled batch with the second, so "
                          f"--unlabeled-batch-size must be even (got {u.shape[0]}).")
    u0, u1 = u.chunk(2)
    return u0, u1


@register_algorithm("ict")
class ICT(Algorithm):
    name = "ict"
    paper = "ICT (Verma et al., IJCAI)"
    year = 2019
    needs = ("labeled", "unlabeled")
    ema = {"decay": 0.99, "warmup": True, "buffers": False}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        # SSL4MIS: --batch_size 24 with --labeled_bs 12 in 2D; 4 with 2 in 3D (BraTS 2019)
        return ssl4mis_recipe(f"SSL4MIS code/train_interpolation_consistency_training_{dim}D.py", dim)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float = 200.0, rampup_every: int = 150,
                 ict_alpha: float = 0.2) -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}': consistency and consistency_rampup must be >= 0 and "
                              f"rampup_every >= 1 (got {consistency}, {consistency_rampup}, {rampup_every}).")
        if not ict_alpha > 0:
            raise ConfigError(f"Algorithm '{self.name}': ict_alpha, the Beta(alpha, alpha) parameter of the mix "
                              f"factors, must be > 0 (got {ict_alpha}; the official code uses 0.2).")
        self.consistency, self.consistency_rampup = consistency, consistency_rampup
        self.rampup_every, self.ict_alpha = rampup_every, ict_alpha

    def notes(self, iterations: int) -> list[str]:
        return ramp_notes(self, iterations)

    def consistency_weight(self, iteration: int) -> float:
        """w(t) = consistency * sigmoid_rampup(t // 150, rampup), as ``get_current_consistency_weight``."""
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        teacher = require_teacher(ctx, self.name)
        x, y = batch["x"], batch["y"]
        u0, u1 = unlabeled_halves(batch["u_w"])
        b = x.shape[0]
        lam = mix_factors(u0.shape[0], self.ict_alpha)
        lam_img = lam.to(u0.device, u0.dtype).view(-1, *([1] * (u0.dim() - 1)))
        u_mix = u0 * (1.0 - lam_img) + u1 * lam_img
        # one student pass over labeled + mixed unlabeled, as the official code (BatchNorm sees both)
        logits = model(torch.cat([x, u_mix]))
        sup = supervised_loss(logits[:b], y, classes=self.dice_classes)
        with torch.no_grad(), train_mode(teacher):
            # two passes, one per half, as the official code: each half has its own BatchNorm statistics
            p0 = teacher(u0).float().softmax(1)
            p1 = teacher(u1).float().softmax(1)
        lam_p = lam.to(p0.device, torch.float32).view(-1, *([1] * (p0.dim() - 1)))
        target = p0 * (1.0 - lam_p) + p1 * lam_p
        con = masked_mse(logits[b:].float().softmax(1), target)
        w = self.consistency_weight(ctx.iteration)
        logs = {"loss/sup": float(sup.detach()), "loss/consistency": float(con.detach()),
                "consistency_weight": w, "ict_lambda": float(lam.mean())}
        # a mixed image has no true label: report the teacher's argmax on the unmixed halves (= u_w's order)
        seen = PseudoLabel(torch.cat([p0, p1]).argmax(1), None, unlabeled_truth)
        return StepResult({"sup": sup, "consistency": w * con}, logs, {"consistency": seen})
