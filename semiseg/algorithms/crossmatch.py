"""CrossMatch (Zhao et al., IEEE JBHI 2025): knowledge distillation between image- and feature-perturbed streams.

Follows the official code at its current head (docs/algorithms.md, "crossmatch"). The weak view u_w is the teacher.
Its hard pseudo-label T_w (with the mix partner's prediction inside each CutMix box: T1, T2) supervises the two
strong views (image-level perturbation, L_ip) and four feature-perturbed students: weak and strong channel
dropout of u_w and of s2 (teacher-to-student distillation, L_tkd). The feature-perturbed weak streams are
themselves teachers of the matching perturbed strong streams (teacher-assistant distillation, L_dkd).

    L = (L_sup + 0.25 D(P_s1, T1) + 0.25 D(P_s2, T2) + K ((1 - eta) mean(L_tkd) + eta mean(L_dkd))) / 2

with every unsupervised term a Dice on hard labels with unconfident pixels ignored; K = 0.5 on 2D (ACDC
code), 1.0 on 3D (LA code). The model stays in train mode throughout, as in the official code since cd1e25c.
Every feature-perturbed forward runs with the backbone's decoder dropout off (the V-Net's head dropout; the
official LA code's ``no_drop=True``); only the plain mix-partner forward keeps it.

``plan``: "minimal" (default) computes the mix partner's clean and perturbed teachers in one encoder pass;
"official" spends the official code's two passes (a plain forward, then a feature-perturbed forward padded
with the labeled batch), which changes BatchNorm statistics and dropout masks but no loss formula.
See docs/algorithms.md.
"""

from __future__ import annotations

import math

from semiseg.algorithms.base import OFFICIAL_SGD, Recipe, StepContext
from semiseg.algorithms.graph import Edge, GraphAlgorithm, MixView, Stream
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup

PLANS = ("minimal", "official")
# A mix-partner teacher decoded from perturbed features: no gradient, the backbone's decoder dropout off.
MIX_FP_TEACHER = {"grad": False, "decoder_dropout": False}


def crossmatch_la_recipe(note: str = "") -> Recipe:
    """CrossMatch LA: AdamW 1e-3, poly decay over 17 000 iterations whatever the length, 14 000 iterations
    (its train.sh), 2 labeled + 2 unlabeled (+ 2 mix partner) volumes per step."""
    source = "CrossMatch LA/code/train_cross_match.py, train.sh" + (f" ({note})" if note else "")
    return Recipe(source, {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup": 0,
                           "schedule": "poly", "poly_total": 17000, "iterations": 14000, "batch_size": 2,
                           "unlabeled_batch_size": 2})


@register_algorithm("crossmatch")
class CrossMatch(GraphAlgorithm):
    name = "crossmatch"
    paper = "CrossMatch (Zhao et al.)"
    year = 2025
    needs = ("labeled", "unlabeled", "strong", "mix")

    def __init__(self, variant: str = "auto", eta: float = 0.3, weak_drop: float = 0.25,
                 strong_drop: float = 0.75, perturb: str = "drop", threshold: float | None = None,
                 threshold_ramp: int = 17000, kd_weight: float | None = None, plan: str = "minimal") -> None:
        super().__init__()
        if plan not in PLANS:
            raise ConfigError(f"CrossMatch plan '{plan}' is unknown; use one of {', '.join(PLANS)} "
                              f"(--opt plan=official reproduces the official code's passes).")
        self.passes = plan
        if variant not in ("auto", "acdc", "la"):
            raise ConfigError(f"CrossMatch variant '{variant}' is unknown; use auto, acdc or la.")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"CrossMatch eta={eta} must lie in [0, 1] (the paper uses 0.3).")
        self.variant, self.eta = variant, eta
        self.weak, self.strong = f"{perturb}:{weak_drop}", f"{perturb}:{strong_drop}"
        self.threshold, self.threshold_ramp, self.kd_weight = threshold, threshold_ramp, kd_weight
        self.setup(num_classes=4, dim=2)

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # UniMatch's ACDC recipe with nesterov: 300 epochs of |U| // 12, 12 + 12 (+ 12 mix partner)
            return Recipe("CrossMatch ACDC/train_cross_match.py, configs/acdc.yaml",
                          {**OFFICIAL_SGD, "nesterov": True, "schedule": "poly", "batch_size": 12,
                           "unlabeled_batch_size": 12}, epochs=300)
        return crossmatch_la_recipe()

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        variant = self.variant if self.variant != "auto" else ("la" if dim == 3 else "acdc")
        kd = self.kd_weight if self.kd_weight is not None else (1.0 if variant == "la" else 0.5)
        tau = self._la_threshold if variant == "la" else (0.95 if self.threshold is None else self.threshold)
        w_ip, w_tkd, w_dkd = 0.25 / 2, kd * (1 - self.eta) / 4 / 2, kd * self.eta / 2 / 2
        weak, strong = self.weak, self.strong

        self.views = [MixView("s1", "u_s1", "u_s1_mix", "box1"), MixView("s2", "u_s2", "u_s2_mix", "box2")]
        # Every feature-perturbed forward f_fp decodes with the backbone's own decoder dropout off (the LA V-Net's
        # no_drop=True); only the plain forward of the mix partner keeps it.
        fp = {"decoder_dropout": False}
        self.streams = [
            *self._mix_teachers(weak, strong),
            # f_fp(cat(x, u_w)): one encoder pass, one decoder pass over 4B
            Stream("P_x", "x", group="weak", **fp),
            Stream("P_w", "u_w", group="weak", **fp),
            Stream("P_w_w", "u_w", weak, group="weak", **fp),
            Stream("P_w_s", "u_w", strong, group="weak", **fp),
            # f_fp(cat(s1, s2)): s1 gets the clean decoder only, s2 all three
            Stream("P_s1", "s1", group="strong", **fp),
            Stream("P_s2", "s2", group="strong", **fp),
            Stream("P_s2_w", "s2", weak, group="strong", **fp),
            Stream("P_s2_s", "s2", strong, group="strong", **fp),
        ]
        self.edges = [
            Edge("P_x", "y", loss="sup", weight=0.5, name="sup"),
            # L_ip: image-level perturbation
            Edge("P_s1", "P_w", w_ip, threshold=tau, box="box1", mix_teacher="P_mix", name="ip_s1"),
            Edge("P_s2", "P_w", w_ip, threshold=tau, box="box2", mix_teacher="P_mix", name="ip_s2"),
            # L_tkd: teacher -> feature-perturbed students
            Edge("P_w_w", "P_w", w_tkd, threshold=tau, name="tkd_w_weak"),
            Edge("P_w_s", "P_w", w_tkd, threshold=tau, name="tkd_w_strong"),
            Edge("P_s2_w", "P_w", w_tkd, threshold=tau, box="box2", mix_teacher="P_mix", name="tkd_s2_weak"),
            Edge("P_s2_s", "P_w", w_tkd, threshold=tau, box="box2", mix_teacher="P_mix", name="tkd_s2_strong"),
            # L_dkd: teacher assistants (perturbed weak streams) -> perturbed strong streams
            Edge("P_s2_w", "P_w_w", w_dkd, threshold=tau, box="box2", mix_teacher="P_mix_w", name="dkd_weak"),
            Edge("P_s2_s", "P_w_s", w_dkd, threshold=tau, box="box2", mix_teacher="P_mix_s", name="dkd_strong"),
        ]
        self.check_graph()

    def _mix_teachers(self, weak: str, strong: str) -> list[Stream]:
        """The teachers of the CutMix boxes: the mix partner, clean and feature-perturbed, no gradient.

        minimal: one encoder pass over the mix partner (B encoder, 3B decoder image-passes).
        official: as the official code, a plain forward (head dropout on), then f_fp(cat(x, u_w_mix)) whose
        decoder batch is [x, u_w_mix, weak(u_w_mix), strong(u_w_mix)]; the first two outputs pad the batch (no
        loss reads them) but share its BatchNorm statistics (3B encoder, 5B decoder image-passes).
        """
        off = MIX_FP_TEACHER
        if self.passes == "minimal":
            return [Stream("P_mix", "u_w_mix", grad=False, group="mix"),
                    Stream("P_mix_w", "u_w_mix", weak, group="mix", **off),
                    Stream("P_mix_s", "u_w_mix", strong, group="mix", **off)]
        return [Stream("P_mix", "u_w_mix", grad=False, group="mix"),
                Stream("P_pad_x", "x", group="mix_fp", **off),
                Stream("P_pad_mix", "u_w_mix", group="mix_fp", **off),
                Stream("P_mix_w", "u_w_mix", weak, group="mix_fp", **off),
                Stream("P_mix_s", "u_w_mix", strong, group="mix_fp", **off)]

    def _la_threshold(self, ctx: StepContext) -> float:
        """LA code: tau0 at the first step, then (tau0 + (1 - tau0) sigmoid_rampup(t, 17000)) ln 2."""
        tau0 = 0.75 if self.threshold is None else self.threshold
        if ctx.iteration == 0:
            return tau0
        return (tau0 + (1 - tau0) * sigmoid_rampup(ctx.iteration, self.threshold_ramp)) * math.log(2)
