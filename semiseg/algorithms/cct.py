"""Cross-consistency training, CCT (Ouali et al., CVPR 2020), as SSL4MIS ``train_cross_consistency_training_2D.py``
with its ``UNet_CCT`` (``networks/unet.py``) does it.

One shared encoder and four decoders: the main one and three auxiliary decoders of the same architecture, each
fed the encoder's features (all five levels, skips included) under its own perturbation:

    aux 1: FeatureNoise     f + f * n,  n ~ U(-0.3, 0.3) of shape (C, *S), one draw per level shared by the batch
    aux 2: Dropout          element-wise dropout, p = 0.3, survivors scaled by 1/(1-p)
    aux 3: FeatureDropout   f * [a < m * U(0.7, 0.9)],  a = channel mean of f, m = max of a per sample

The labeled and the unlabeled batch go through in one pass. Every decoder is supervised on the labeled part,
and each auxiliary softmax is pulled towards the main one on the unlabeled part:

    L_sup = (sum_k CE(o_k, y) + sum_k Dice(softmax o_k, y)) / 8          k = main, aux 1..3
    L_con = 1/3 sum_{k=1..3} mean((softmax o_main(u) - softmax o_k(u))^2)
    L     = L_sup + lambda(t) L_con,   lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200)

The main prediction is *not* detached, as in the official code (gradient flows into the main decoder from the
consistency too); the CCT paper uses it as a fixed target and trains the auxiliary decoders on unlabeled data
only. ``--opt detach_main=true`` gives the paper's target.

The auxiliary decoders are the backbone's (``aux_decoders=3``, see ``backbone_options``); the perturbations are
this module's functions over the feature list. FeatureNoise and FeatureDropout are written here because
``perturbations.py`` has no equivalent (its ``noise`` is Gaussian and per sample); the dropout is its
``dropout:0.3``.
"""

from __future__ import annotations

from typing import Any, ClassVar

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
from semiseg.algorithms.losses import supervised_loss
from semiseg.algorithms.meanteacher import unlabeled_truth
from semiseg.algorithms.perturbations import Features, Perturbation, elementwise_dropout
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup


def feature_noise(uniform_range: float = 0.3) -> Perturbation:
    """SSL4MIS FeatureNoise: f + f * n with n ~ U(-r, r) of shape f.shape[1:], drawn once per level and shared by
    every sample of the batch (the reference samples ``x.shape[1:]`` and unsqueezes a batch axis)."""
    r = float(uniform_range)

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        out = []
        for f in features:
            n = torch.rand(f.shape[1:], generator=generator, device=f.device, dtype=f.dtype) * (2 * r) - r
            out.append(f + f * n.unsqueeze(0))
        return out

    return fn


def feature_dropout(low: float = 0.7, high: float = 0.9) -> Perturbation:
    """SSL4MIS FeatureDropout: zero the positions whose channel-mean activation reaches a fraction
    gamma ~ U(low, high) of the sample's maximum (one gamma per level, shared by the batch); no rescaling."""

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        out = []
        for f in features:
            attention = f.mean(1, keepdim=True)
            peak = attention.flatten(1).max(1).values.view(-1, *(1,) * (f.dim() - 1))
            gamma = low + (high - low) * torch.rand((), generator=generator, device=f.device, dtype=f.dtype)
            out.append(f * (attention < peak * gamma).to(f.dtype))
        return out

    return fn


def perturbed(model: nn.Module, features: Features, fn: Perturbation,
              generator: torch.Generator | None) -> Features:
    """``fn`` on the feature maps that perturbations may touch (smp encoders return the input image first)."""
    keep = int(getattr(model, "unperturbed_levels", 0))
    return features[:keep] + fn(features[keep:], generator)


def check_range(algo: str, name: str, value: float, low: float, high: float, closed_high: bool = True) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bound = "]" if closed_high else ")"
        raise ConfigError(f"Algorithm '{algo}' option {name}={value} must lie in [{low}, {high}{bound}.")


@register_algorithm("cct")
class CCT(Algorithm):
    name = "cct"
    paper = "CCT, cross-consistency training (Ouali et al., CVPR)"
    year = 2020
    needs = ("labeled", "unlabeled")
    # What the backbone must be built with (the engine passes it to unet / vnet).
    backbone_options: ClassVar[dict[str, Any]] = {"aux_decoders": 3}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # batch 24 of which labeled_bs 12: 12 labeled + 12 unlabeled
            return ssl4mis_recipe("SSL4MIS code/train_cross_consistency_training_2D.py", dim)
        # No official 3D CCT: SSL4MIS's 3D semi-supervised optimisation (train_mean_teacher_3D.py), borrowed.
        return ssl4mis_recipe("SSL4MIS code/train_mean_teacher_3D.py (borrowed: no official 3D CCT)", dim)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float = 200.0, rampup_every: int = 150,
                 noise_range: float = 0.3, dropout: float = 0.3, drop_low: float = 0.7, drop_high: float = 0.9,
                 detach_main: bool = False) -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}' needs consistency >= 0, consistency_rampup >= 0 and "
                              f"rampup_every >= 1 (got {consistency}, {consistency_rampup}, {rampup_every}).")
        check_range(self.name, "noise_range", noise_range, 0.0, 1.0)
        check_range(self.name, "dropout", dropout, 0.0, 1.0, closed_high=False)
        check_range(self.name, "drop_low", drop_low, 0.0, 1.0)
        check_range(self.name, "drop_high", drop_high, drop_low, 1.0)
        self.consistency, self.consistency_rampup, self.rampup_every = consistency, consistency_rampup, rampup_every
        self.detach_main = detach_main
        # official order: aux 1 FeatureNoise, aux 2 Dropout, aux 3 FeatureDropout
        self.perturbations = [feature_noise(noise_range), elementwise_dropout(dropout),
                              feature_dropout(drop_low, drop_high)]

    def notes(self, iterations: int) -> list[str]:
        return ramp_notes(self, iterations)

    def consistency_weight(self, iteration: int) -> float:
        """lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200)."""
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def check_model(self, model: nn.Module) -> None:
        if int(getattr(model, "aux_decoders", 0) or 0) < len(self.perturbations):
            raise ConfigError(f"Algorithm '{self.name}' needs a backbone with {len(self.perturbations)} auxiliary "
                              f"decoders; build unet or vnet with the backbone option aux_decoders=3 "
                              f"(--backbone-opt aux_decoders=3).")

    def losses(self, logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_sup, L_con) from the decoders' logits over cat(x, u), main first; ``y`` labels the first rows."""
        b = y.shape[0]
        # (CE + Dice) / 2 per decoder, averaged over the four: the official sum of eight terms / 8
        sup = torch.stack([supervised_loss(o[:b], y, classes=self.dice_classes) for o in logits]).mean()
        probs = [o[b:].float().softmax(1) for o in logits]
        main = probs[0].detach() if self.detach_main else probs[0]
        con = torch.stack([torch.mean((main - p) ** 2) for p in probs[1:]]).mean()
        return sup, con

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        self.check_model(model)
        x, y, u = batch["x"], batch["y"], batch["u_w"]
        # one encoder pass over labeled + unlabeled, as UNet_CCT's forward of the whole batch
        features = model.encode(torch.cat([x, u]))
        logits = [model.decode(features)]
        for k, fn in enumerate(self.perturbations, start=1):
            logits.append(model.decode(perturbed(model, features, fn, ctx.generator), head=k))
        sup, con = self.losses(logits, y)
        w = self.consistency_weight(ctx.iteration)
        logs = {"loss/sup": float(sup.detach()), "loss/consistency": float(con.detach()), "consistency_weight": w}
        # the main decoder's argmax on the unlabeled batch: what the auxiliary decoders are pulled towards
        target = PseudoLabel(logits[0][x.shape[0]:].detach().argmax(1), None, unlabeled_truth)
        return StepResult({"sup": sup, "consistency": w * con}, logs, {"consistency": target})
