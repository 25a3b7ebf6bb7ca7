"""AD-MT, alternate diverse teaching (Zhao et al., ECCV 2024), as the official code ZhenZHAO/AD-MT
(``code/train_post_2d_aut.py``, ``code/train_post_3d_aut.py``, ``code/train_utils.py``,
``code/dataloaders/mixaugs.py``, ``cfgs/config_2d_aut.yml``, ``cfgs/config_3d_la_aut.yml``; docs/algorithms.md,
"admt").

One student and two EMA teachers, A and B, each started from its own random initialisation. Training is cut
into periods of random length L ~ U{1..P} (P = 50 in 2D, 19 in 3D); A is *active* in the odd periods (the
first one included), B in the even ones. Only the active teacher follows the student, and the view the
student learns from depends on it:

- A active: the strong (intensity) view of the unlabeled batch (2D: ColorJitter + blur from the loader; 3D:
  brightness/contrast + Gaussian noise, drawn here);
- B active: CutMix of the *weak* view with a permutation of its own batch (one lambda ~ Beta(4, 4) per batch,
  box sides int(s sqrt(1 - lambda)), centres in [s/8, s)), the target mixed the same way.

Both teachers see the weak view u (the active one in train mode, the other in eval mode) and are fused per
pixel by entropy (the Conflict-Combating Module):

    p_k = softmax f_k(u),  H_k = -sum_c p_k log2(p_k + 1e-10),  w_1 = e^-H_1 / (e^-H_1 + e^-H_2),  w_2 = 1 - w_1
    q = normalise((w_1 p_1 + w_2 p_2)^(1/T)),  conf, yhat = max_c q, argmax_c q,  conflict = argmax p_1 != argmax p_2

Where the teachers conflict and the student's prediction on u (from the same forward as its loss) disagrees
with yhat and is more confident, the student's own label and confidence replace them ("pixel_confidence").
The student sees cat(x, u, u_s) in one pass:

    L = L_sup(x, y) + lambda(t) * L_u,   L_sup = (CE + Dice) / 2,   lambda(t) = 2 * sigmoid_rampup(t // 150, R)
    L_u = Dice(P_s, yhat; conf >= tau)        2D (tau = 0.95, R = 50)
    L_u = CE(P_s, yhat; conf >= tau)          3D (tau = 0.8, R = 40)

Dice averages every class, background included, in 2D and 3D (``DiceLoss(num_classes)``). After the step the
active teacher moves: alpha = 0 while t // 2 < R, then min(1 - 1/(t // 2 - R + 1), 0.99), on parameters and
buffers. The teachers are ``ema`` networks built fresh (their own random initialisation, as the official code
builds three networks); ``update_ema`` tells the engine which one moves after each step and with which alpha.
Validation, eval and predict use the student, as the official test scripts do (``--flag_check_with_best_stu``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from semiseg.algorithms.base import (
    OFFICIAL_SGD,
    PRIMARY,
    Algorithm,
    Network,
    PseudoLabel,
    Recipe,
    Stage,
    StepContext,
    StepResult,
    ramp_notes,
)
from semiseg.algorithms.losses import ce_loss, dice_loss, supervised_loss
from semiseg.algorithms.meanteacher import train_mode
from semiseg.errors import ConfigError, TrainingError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup

TEACHER_A, TEACHER_B = "teacher_a", "teacher_b"
CONFLICT_MODES = ("pixel_confidence", "always_tea", "always_stu", "random")
# config_2d_aut.yml / config_3d_la_aut.yml
DEFAULTS = {2: {"threshold": 0.95, "consistency_rampup": 50.0, "period": 50, "unsup_loss": "dice"},
            3: {"threshold": 0.8, "consistency_rampup": 40.0, "period": 19, "unsup_loss": "ce"}}


# -- pieces of the official step, as functions the tests check one by one ------------------------------------
def fuse_teachers(p1: torch.Tensor, p2: torch.Tensor,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entropy-weighted ensemble of two teachers' softmaxes (B, C, *S): confidence, label and the
    teachers' conflict (their argmaxes differ), each (B, *S)."""
    conflict = p1.argmax(1) != p2.argmax(1)
    h1 = -(p1 * torch.log2(p1 + 1e-10)).sum(1)
    h2 = -(p2 * torch.log2(p2 + 1e-10)).sum(1)
    w1 = torch.exp(-h1) / (torch.exp(-h1) + torch.exp(-h2))
    q = w1.unsqueeze(1) * p1 + (1.0 - w1).unsqueeze(1) * p2
    q = q.pow(1.0 / temperature)
    q = q / q.sum(1, keepdim=True)
    conf, label = q.max(1)
    return conf, label, conflict


def compromise(label: torch.Tensor, conf: torch.Tensor, label_s: torch.Tensor, conf_s: torch.Tensor,
               conflict: torch.Tensor, mode: str = "pixel_confidence",
               coin: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_compromise_pseudo_btw_tea_stu``: where the teachers conflict and the student disagrees with the
    ensemble, take the student's label and confidence (``pixel_confidence``: where it is more confident;
    ``always_stu``: always; ``random``: everywhere when ``coin`` < 0.5; ``always_tea``: never)."""
    if mode not in CONFLICT_MODES:
        raise ConfigError(f"AD-MT conflict_mode '{mode}' is unknown; use one of {', '.join(CONFLICT_MODES)}.")
    disagree = (label != label_s) & conflict
    if mode == "pixel_confidence":
        take = disagree & (conf_s > conf)
    elif mode == "always_stu" or (mode == "random" and coin is not None and coin < 0.5):
        take = disagree
    else:
        return label, conf
    return torch.where(take, label_s, label), torch.where(take, conf_s, conf)


def ema_alpha(iteration: int, rampup: float, decay: float = 0.99) -> float:
    """The official ``update_ema_variables(model, ema, decay, iter_num // 2, args)``: 0 (a copy of the student)
    while t // 2 < R, then min(1 - 1/(t // 2 - R + 1), decay), R = ``consistency_rampup``."""
    g = iteration // 2
    if g < rampup:
        return 0.0
    return min(1.0 - 1.0 / (g - rampup + 1.0), decay)


def sample_cutmix(shape: torch.Size | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixaugs.cut_mix`` / ``cut_mix_3d``'s draws for a batch of ``shape`` (B, C, *S): a permutation of the
    batch (the partner of each image, possibly itself) and a boolean box mask (B, *S). One lambda ~ Beta(4, 4)
    per batch gives every axis the side int(s sqrt(1 - lambda)) (sqrt in 3D too); each image's centre is
    uniform in [int(s/8), s) per axis and the box [c - side//2, c + side//2) is clipped to the patch. All draws
    come from torch's global CPU generator (restored on resume)."""
    b, spatial = int(shape[0]), [int(s) for s in shape[2:]]
    perm = torch.randperm(b)
    lam = float(torch.distributions.Beta(torch.tensor(4.0), torch.tensor(4.0)).sample())
    cut_rat = math.sqrt(1.0 - lam)
    mask = torch.ones((b, *spatial), dtype=torch.bool)
    for axis, s in enumerate(spatial):
        cut = int(s * cut_rat)
        c = torch.randint(int(s / 8), s, (b,))
        lo, hi = (c - cut // 2).clamp(0, s), (c + cut // 2).clamp(0, s)
        ar = torch.arange(s)
        inside = (ar[None] >= lo[:, None]) & (ar[None] < hi[:, None])  # (B, s)
        view = [b] + [1] * len(spatial)
        view[axis + 1] = s
        mask &= inside.view(view)
    return perm, mask


def apply_cutmix(t: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` (B, *S) or (B, C, *S) with its ``perm``-partner's values inside the box ``mask`` (B, *S)."""
    m = mask.to(t.device)
    if t.dim() == m.dim() + 1:
        m = m.unsqueeze(1)
    return torch.where(m, t[perm.to(t.device)], t)


def strong_3d(u: torch.Tensor, p_color: float = 0.8, p_noise: float = 0.2) -> torch.Tensor:
    """The 3D strong view of ``dataset_3d.WeakStrongAugment`` on a batch (B, C, X, Y, Z), per volume:
    RandomBrightnessContrast(0.5, 0.5) with p = 0.8 on the min-max normalised patch (y = clip(a x + b mean(a x),
    0, 1), a = 1 + U(-0.5, 0.5), b = U(-0.5, 0.5), mapped back to the patch's range), then RandomGaussianNoise
    with p = 0.2 (x + clip(sigma N(0, 1), -2 sigma, 2 sigma), sigma ~ U(0.1, 1)). Parameters from torch's global
    CPU generator, the noise from the batch's device generator (both restored on resume)."""
    b = u.shape[0]
    dims = tuple(range(1, u.dim()))
    shape = (b,) + (1,) * (u.dim() - 1)
    a = (1.0 + (torch.rand(b) - 0.5)).view(shape).to(u)
    beta = (torch.rand(b) - 0.5).view(shape).to(u)
    color = (torch.rand(b) < p_color).view(shape).to(u.device)
    sigma = (0.1 + 0.9 * torch.rand(b)).view(shape).to(u)
    noisy = (torch.rand(b) < p_noise).view(shape).to(u.device)
    x = u.float()
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = (hi - lo).clamp_min(1e-8)  # a constant patch stays constant instead of becoming NaN
    n = (x - lo) / span * a
    n = (n + beta * n.mean(dims, keepdim=True)).clamp(0.0, 1.0)
    x = torch.where(color, n * span + lo, x)
    noise = torch.maximum(torch.minimum(sigma * torch.randn_like(x), 2 * sigma), -2 * sigma)
    return torch.where(noisy, x + noise, x).to(u.dtype)


@register_algorithm("admt")
class ADMT(Algorithm):
    name = "admt"
    paper = "AD-MT (Zhao et al., ECCV)"
    year = 2024
    # the strong view comes from the loader in 2D; in 3D ``setup`` drops it (the official 3D view is drawn here)
    needs = ("labeled", "unlabeled", "strong")
    eval_network = PRIMARY  # the official test scripts load the best *student* (--flag_check_with_best_stu)

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # 30 000 steps of 12 + 12, poly lr; validation every 2 epochs (~200 steps on ACDC)
            return Recipe("AD-MT code/train_post_2d_aut.py, cfgs/config_2d_aut.yml",
                          {**OFFICIAL_SGD, "schedule": "poly", "iterations": 30000, "batch_size": 12,
                           "unlabeled_batch_size": 12, "val_every": 200, "policy_options": {"blur_p": 0.2}})
        # 15 000 steps of 2 + 2, poly lr; validation every 4 epochs of 76 // 2 steps (152)
        return Recipe("AD-MT code/train_post_3d_aut.py, cfgs/config_3d_la_aut.yml",
                      {**OFFICIAL_SGD, "schedule": "poly", "iterations": 15000, "batch_size": 2,
                       "unlabeled_batch_size": 2, "val_every": 152})

    def __init__(self, consistency: float = 2.0, consistency_rampup: float | None = None, rampup_every: int = 150,
                 threshold: float | None = None, unsup_loss: str = "auto", ema_decay: float = 0.99,
                 period: int | None = None, random_period: bool = True, conflict_mode: str = "pixel_confidence",
                 conflict_weight: float = 1.0, ensemble_temp: float = 1.0, cutmix_p: float = 1.0,
                 strong3d: str = "official", teacher_init: str = "independent") -> None:
        super().__init__()
        if consistency < 0 or (consistency_rampup is not None and consistency_rampup < 0) or rampup_every < 1:
            raise ConfigError("AD-MT consistency and consistency_rampup must be >= 0 and rampup_every >= 1.")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"AD-MT threshold={threshold} must lie in [0, 1] (official: 0.95 in 2D, 0.8 in 3D).")
        if unsup_loss not in ("auto", "dice", "ce"):
            raise ConfigError(f"AD-MT unsup_loss '{unsup_loss}' is unknown; use auto (dice in 2D, ce in 3D), "
                              f"dice or ce.")
        if not 0.0 <= ema_decay <= 1.0:
            raise ConfigError(f"AD-MT ema_decay={ema_decay} must lie in [0, 1] (official: 0.99).")
        if period is not None and period < 1:
            raise ConfigError(f"AD-MT period={period} must be >= 1 (official: 50 in 2D, 19 in 3D).")
        if conflict_mode not in CONFLICT_MODES:
            raise ConfigError(f"AD-MT conflict_mode '{conflict_mode}' is unknown; use one of "
                              f"{', '.join(CONFLICT_MODES)}.")
        if conflict_weight < 0 or ensemble_temp <= 0:
            raise ConfigError("AD-MT conflict_weight must be >= 0 and ensemble_temp > 0.")
        if not 0.0 <= cutmix_p <= 1.0:
            raise ConfigError(f"AD-MT cutmix_p={cutmix_p} must lie in [0, 1] (official: 1.0).")
        for key, value, allowed in (("strong3d", strong3d, ("official", "policy")),
                                    ("teacher_init", teacher_init, ("independent", "copy"))):
            if value not in allowed:
                raise ConfigError(f"AD-MT {key} '{value}' is unknown; use {' or '.join(allowed)}.")
        self.consistency, self.rampup_every, self.ema_decay = consistency, rampup_every, ema_decay
        self.random_period, self.conflict_mode = random_period, conflict_mode
        self.conflict_weight, self.ensemble_temp, self.cutmix_p = conflict_weight, ensemble_temp, cutmix_p
        self.strong3d, self.teacher_init = strong3d, teacher_init
        self._given = {"threshold": threshold, "consistency_rampup": consistency_rampup, "period": period,
                       "unsup_loss": None if unsup_loss == "auto" else unsup_loss}
        self._seed: int | None = None  # the period schedule's seed, drawn once and saved with the run
        self._ends: list[int] = []  # cumulative period ends drawn so far (a cache of the seed's schedule)
        self._gen: torch.Generator | None = None
        self.setup(num_classes=4, dim=2)

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        # DiceLoss(num_classes) of both scripts averages every class, background included, even when binary
        self.dice_classes = "all"
        base = DEFAULTS[3 if dim == 3 else 2]
        chosen = {k: (v if v is not None else base[k]) for k, v in self._given.items()}
        self.threshold = float(chosen["threshold"])
        self.consistency_rampup = float(chosen["consistency_rampup"])
        self.period = int(chosen["period"])
        self.unsup_loss = str(chosen["unsup_loss"])
        self.official_strong3d = dim == 3 and self.strong3d == "official"
        self.needs = ("labeled", "unlabeled") if self.official_strong3d else ("labeled", "unlabeled", "strong")
        self._ends, self._gen = [], None

    def networks(self) -> dict[str, Network]:
        # both teachers follow the student (EMA with buffers), each from its own random initialisation
        init = "fresh" if self.teacher_init == "independent" else None
        spec = Network("ema", of=PRIMARY, decay=self.ema_decay, warmup=True, buffers=True, init=init)
        return {PRIMARY: Network(), TEACHER_A: spec, TEACHER_B: spec}

    # -- the random periodic alternation ---------------------------------------------------------------------
    @property
    def schedule_seed(self) -> int:
        if self._seed is None:
            # drawn from torch's global generator (seeded by --seed); saved in state_dict, so resume is exact
            self._seed = int(torch.randint(0, 2**62, (1,)).item())
        return self._seed

    def period_lengths(self, n: int) -> list[int]:
        """The first ``n`` period lengths: U{1..P} from a generator seeded by ``schedule_seed`` (the official
        ``np.random.randint(1, P + 1)``), or P each without ``random_period``."""
        self._extend(n)
        return [e - s for s, e in zip([0] + self._ends[: n - 1], self._ends[:n])]

    def _extend(self, periods: int = 0, iteration: int = -1) -> None:
        while len(self._ends) < periods or not self._ends or self._ends[-1] <= iteration:
            if not self.random_period:
                draws = [self.period] * 1024
            else:
                if self._gen is None:
                    self._gen = torch.Generator().manual_seed(self.schedule_seed)
                draws = torch.randint(1, self.period + 1, (1024,), generator=self._gen).tolist()
            start = self._ends[-1] if self._ends else 0
            for d in draws:
                start += int(d)
                self._ends.append(start)

    def active_teacher(self, iteration: int) -> str:
        """The teacher that follows the student after step ``iteration`` (and decides its view): A in the
        first period and every other one after it, B in the others (``AlternateUpdate``, initial flag True)."""
        self._extend(iteration=iteration)
        k = bisect.bisect_right(self._ends, iteration)
        return TEACHER_A if k % 2 == 0 else TEACHER_B

    def update_ema(self, name: str, iteration: int) -> bool | float:
        """Only the active teacher moves, with the official warm-up (not the engine's min(1 - 1/(t+1), decay));
        the engine caps it at the teachers' decay, ``ema_decay`` or ``--ema-decay`` where given."""
        if name != self.active_teacher(iteration):
            return False
        return ema_alpha(iteration, self.consistency_rampup, decay=1.0)

    def on_stage_start(self, stage: Stage, model: nn.Module, ctx: StepContext) -> None:
        # the schedule's seed is drawn before any step, where every distributed rank has the same generator
        _ = self.schedule_seed

    def state_dict(self) -> dict[str, Any]:
        return {"schedule_seed": self._seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seed = state.get("schedule_seed")
        self._ends, self._gen = [], None

    # -- the step --------------------------------------------------------------------------------------------
    def notes(self, iterations: int) -> list[str]:
        # R also times the teachers' EMA (a copy of the student while t // 2 < R): the fix scales R itself
        return ramp_notes(self, iterations, "consistency_rampup")

    def consistency_weight(self, iteration: int) -> float:
        """lambda(t) = consistency * sigmoid_rampup(t // 150, R)."""
        return self.consistency * sigmoid_rampup(iteration // self.rampup_every, self.consistency_rampup)

    def _net(self, ctx: StepContext, name: str) -> nn.Module:
        if name not in ctx.networks:
            raise TrainingError(f"Algorithm 'admt' needs the network '{name}' in the step context, but it has "
                                f"only {', '.join(ctx.networks) or 'none'}.")
        return ctx.networks[name]

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        x, y, u = batch["x"], batch["y"], batch["u_w"]
        b, bu = x.shape[0], u.shape[0]
        active = self.active_teacher(ctx.iteration)
        t_a, t_b = self._net(ctx, TEACHER_A), self._net(ctx, TEACHER_B)
        # the active teacher runs in train mode (dropout, batch statistics), the other in eval mode
        with torch.no_grad(), train_mode(t_a, active == TEACHER_A), train_mode(t_b, active == TEACHER_B):
            p1 = t_a(u).float().softmax(1)
            p2 = t_b(u).float().softmax(1)
        conf, label, conflict = fuse_teachers(p1, p2, self.ensemble_temp)
        truth: Callable[[dict[str, torch.Tensor]], torch.Tensor] = _weak_truth
        mixed = 0.0
        if active == TEACHER_A:
            # A's periods: the strong intensity view, aligned with u
            u_s = strong_3d(u) if self.official_strong3d else batch["u_s1"]
        elif float(torch.rand(1)) < self.cutmix_p:
            # B's periods: CutMix of the weak view inside its own batch; targets and conflicts follow the box
            perm, box = sample_cutmix(u.shape)
            u_s = apply_cutmix(u, perm, box)
            label, conf, conflict = (apply_cutmix(t, perm, box) for t in (label, conf, conflict))
            truth, mixed = _mixed_truth(perm, box), float(box.float().mean())
        else:
            u_s = u.clone()
        high_ratio = float((conf >= self.threshold).float().mean())

        logits = model(torch.cat([x, u, u_s]))
        p_x, p_w, p_s = logits[:b], logits[b:b + bu], logits[b + bu:]
        with torch.no_grad():
            conf_s, label_s = p_w.detach().float().softmax(1).max(1)
        sup = supervised_loss(p_x, y, classes=self.dice_classes)

        coin = float(torch.rand(1)) if self.conflict_mode == "random" else None
        label, conf = compromise(label, conf, label_s, conf_s, conflict, self.conflict_mode, coin)
        unsup, parts = self.unsup(p_s, label, conf, conflict)
        w = self.consistency_weight(ctx.iteration)
        logs = {"loss/sup": float(sup.detach()), "loss/unsup": float(unsup.detach()), "consistency_weight": w,
                "high_ratio": high_ratio, "conflict_ratio": float(conflict.float().mean()),
                "teacher_b_active": float(active == TEACHER_B), "cutmix_area": mixed,
                **{f"loss/{k}": float(v.detach()) for k, v in parts.items()}}
        keep = conf >= self.threshold
        return StepResult({"sup": sup, "unsup": w * unsup}, logs, {"unsup": PseudoLabel(label, keep, truth)})

    def unsup(self, p_s: torch.Tensor, label: torch.Tensor, conf: torch.Tensor,
              conflict: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unsupervised term on confident pixels. With ``conflict_weight`` 1 (official) one loss over them;
        otherwise consistent and conflicting pixels in two terms, L = L_consist + w * L_conflict."""
        low = conf < self.threshold
        if self.conflict_weight == 1.0:
            return self._loss(p_s, label, low), {}
        consist = self._loss(p_s, label, low | conflict)
        if self.conflict_weight == 0.0:
            return consist, {"consist": consist}
        # an all-ignored conflict term is 0 here (0/0 in the official CE, which the official code then skips)
        conflicting = self._loss(p_s, label, low | ~conflict)
        return consist + self.conflict_weight * conflicting, {"consist": consist, "conflict": conflicting}

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        if self.unsup_loss == "dice":
            return dice_loss(logits.float().softmax(1), target, ignore=ignore.float(), classes=self.dice_classes)
        return ce_loss(logits, target, ignore=ignore.float())


def _weak_truth(truth: dict[str, torch.Tensor]) -> torch.Tensor:
    """The true labels of the weak unlabeled view (A's strong view is aligned with it)."""
    return truth["u_y"]


def _mixed_truth(perm: torch.Tensor, box: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The true labels of B's CutMixed view: u_y mixed with the same partners and boxes."""
    return lambda truth: apply_cutmix(truth["u_y"], perm, box)


