"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), as the official code does it
(BCP ``ACDC_BCP_train.py``, ``LA_BCP_train.py``, ``utils/BCP_utils.py``; docs/algorithms.md, "bcp").

One mask per iteration, shared by the batch: M = 1 everywhere but a box of 2/3 of each dimension.

Pre-train (supervised). The labeled batch is split into halves a, b; the network learns on a * M + b * (1 - M)
(b pasted into the box) with the labels mixed the same way.

Self-train. The student and the EMA teacher start from the pre-trained weights. The teacher (no gradient,
train mode) pseudo-labels the unlabeled halves u_a, u_b: argmax (foreground probability >= 0.5 when binary),
then the largest connected component of every class, per slice in 2D and per volume in 3D. Labeled and
unlabeled images are copy-pasted both ways:

    X_in  = u_a * M + l_a * (1 - M)     (a labeled patch pasted into an unlabeled image)
    X_out = l_b * M + u_b * (1 - M)     (an unlabeled patch pasted into a labeled image)

and each mixed prediction is supervised region by region, pseudo-labeled pixels weighted by u_weight = 0.5 and
ground-truth pixels by 1:

    L = (sum Dice + sum CE) / 2,  CE_region = sum(CE * m) / sum(m),  Dice_region = Dice with pixel weights m

The two official scripts differ in details, chosen by ``variant`` ("auto": acdc in 2D, la in 3D):

- acdc: batch-global Dice over all classes with squared denominators (s = 1e-10); the pre-train uses the same
  region loss with weights 1 / 1; the EMA averages BatchNorm buffers too.
- la: Dice per sample and class with a plain sum in the denominator (s = 1e-5, background included); the
  pre-train uses plain (CE + Dice) / 2 over the mixed label; the EMA averages parameters only.

Stages, as the official scripts: the pre-training share is 10 000 of 40 000 iterations on ACDC (25 %) and 2 000
of 17 000 on LA; self-training starts from the *best* pre-training checkpoint chosen on the validation split
(``selftrain_from="best"``; "last" continues from the last pre-training step), with that checkpoint's optimizer
state on ACDC and a fresh optimizer on LA. The official LA code chooses that checkpoint on its test set; semiseg
chooses on the dataset's validation split and says so when that split is the test split.
The LA script pastes the unlabeled patch into the first labeled image and the labeled patch into the second
unlabeled one (the same two directions, names swapped); both variants here use the ACDC layout above.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from semiseg.algorithms.base import OFFICIAL_SGD, Algorithm, PseudoLabel, Recipe, Stage, StepContext, StepResult
from semiseg.algorithms.losses import dice_loss
from semiseg.algorithms.meanteacher import require_teacher, train_mode, unlabeled_truth
from semiseg.augment.mixing import bcp_mask, copy_paste
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import SCHEDULES

# The official pre-training share of the whole run: ACDC 10 000 of 10 000 + 30 000; LA 2 000 of 2 000 + 15 000.
PRETRAIN_SHARE = {"acdc": 10000 / 40000, "la": 2000 / 17000}


def largest_components(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, per sample and per foreground class, only the largest connected component (full connectivity:
    8-neighbourhood in 2D, 26 in 3D, as skimage's default); other pixels of that class become background."""
    arr = labels.detach().cpu().numpy()
    out = np.zeros_like(arr)
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    for i in range(arr.shape[0]):
        for c in range(1, num_classes):
            comp, n = ndimage.label(arr[i] == c, structure=structure)
            if n == 0:
                continue
            # the first of the largest components, as np.argmax(np.bincount(...)[1:]) + 1 in the official code
            keep = np.argmax(np.bincount(comp.ravel())[1:]) + 1
            out[i][comp == keep] = c
    return torch.from_numpy(out).to(labels.device)


def sample_dice(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                smooth: float = 1e-5) -> torch.Tensor:
    """LA's ``mask_DiceLoss``: 1 - mean over samples and classes of (2 sum(p y m) + s) / (sum((p + y) m) + s).

    Unlike :func:`dice_loss`, sums run per sample, the denominator is not squared and background counts."""
    c = probs.shape[1]
    y = F.one_hot(target.long(), c).movedim(-1, 1).to(probs.dtype)
    m = torch.ones_like(probs[:, :1]) if weight is None else weight.unsqueeze(1).to(probs.dtype)
    dims = list(range(2, probs.dim()))
    inter = (probs * y * m).sum(dims)
    union = ((probs + y) * m).sum(dims)
    return 1 - ((2 * inter + smooth) / (union + smooth)).mean()


def halves(t: torch.Tensor, flag: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise ConfigError(f"BCP splits every batch into two halves, so {flag} must be even "
                          f"(got {t.shape[0]}).")
    a, b = t.chunk(2)
    return a, b


@register_algorithm("bcp")
class BCP(Algorithm):
    name = "bcp"
    paper = "BCP (Bai et al.)"
    year = 2023
    needs = ("labeled", "unlabeled")
    ema = {"decay": 0.99, "warmup": False, "buffers": True}

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # constant lr 0.01; 10 000 pre-training + 30 000 self-training steps of 12 + 12
            return Recipe("BCP code/ACDC_BCP_train.py",
                          {**OFFICIAL_SGD, "schedule": "constant", "iterations": 40000, "batch_size": 12,
                           "unlabeled_batch_size": 12, "val_every": 200,
                           "algo_options": {"pretrain_iterations": 10000}})
        # constant lr in pre-training, then a fresh SGD with lr x0.1 every 2 500 self-training steps; 4 + 4
        return Recipe("BCP code/LA_BCP_train.py",
                      {**OFFICIAL_SGD, "schedule": "constant", "iterations": 17000, "batch_size": 4,
                       "unlabeled_batch_size": 4, "val_every": 200,
                       "algo_options": {"pretrain_iterations": 2000, "selftrain_schedule": "step"}})

    def __init__(self, variant: str = "auto", pretrain_fraction: float | None = None,
                 pretrain_iterations: int | None = None, u_weight: float = 0.5, mask_ratio: float = 2 / 3,
                 lcc: bool = True, selftrain_from: str = "best", selftrain_schedule: str | None = None,
                 fresh_optimizer: bool | None = None) -> None:
        super().__init__()
        if variant not in ("auto", "acdc", "la"):
            raise ConfigError(f"BCP variant '{variant}' is unknown; use auto, acdc or la.")
        if selftrain_from not in ("best", "last"):
            raise ConfigError(f"BCP selftrain_from='{selftrain_from}' is unknown; use best (the official code) "
                              f"or last.")
        if selftrain_schedule is not None and selftrain_schedule not in SCHEDULES:
            raise ConfigError(f"BCP selftrain_schedule='{selftrain_schedule}' is unknown; use one of "
                              f"{', '.join(SCHEDULES)}.")
        self.selftrain_from, self.selftrain_schedule = selftrain_from, selftrain_schedule
        self.fresh_optimizer = fresh_optimizer
        if pretrain_fraction is not None and not 0.0 <= pretrain_fraction < 1.0:
            raise ConfigError(f"BCP pretrain_fraction={pretrain_fraction} must lie in [0, 1).")
        if pretrain_iterations is not None and pretrain_iterations < 0:
            raise ConfigError(f"BCP pretrain_iterations={pretrain_iterations} must be >= 0.")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"BCP mask_ratio={mask_ratio} must lie in (0, 1) (the official code uses 2/3).")
        self.variant = variant
        self.pretrain_fraction, self.pretrain_iterations = pretrain_fraction, pretrain_iterations
        self.u_weight, self.mask_ratio, self.lcc = u_weight, mask_ratio, lcc
        self.setup(num_classes=4, dim=2)

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        self.form = self.variant if self.variant != "auto" else ("la" if dim == 3 else "acdc")
        # ACDC's update_model_ema averages the whole state_dict; LA's update_ema_variables parameters only.
        self.ema = {"decay": 0.99, "warmup": False, "buffers": self.form == "acdc"}

    # -- stages ----------------------------------------------------------------------------------------------
    def stages(self, iterations: int) -> list[Stage]:
        pre = self.pretrain_iterations
        if pre is None:
            # the official share: ACDC 10 000 of 40 000, LA 2 000 of 17 000
            share = self.pretrain_fraction
            if share is None:
                share = PRETRAIN_SHARE[self.form]
            pre = int(round(iterations * share))
        if pre >= iterations:
            raise ConfigError(f"BCP pre-trains {pre} of {iterations} iterations and would never self-train; "
                              f"raise --iterations or lower pretrain_iterations.")
        if pre == 0:
            return [Stage("selftrain", iterations, schedule=self.selftrain_schedule)]
        fresh = self.form == "la" if self.fresh_optimizer is None else self.fresh_optimizer
        start = "best" if self.selftrain_from == "best" else None
        return [Stage("pretrain", pre),
                Stage("selftrain", iterations - pre, schedule=self.selftrain_schedule, start_from=start,
                      fresh_optimizer=fresh)]

    def on_stage_start(self, stage: Stage, model: nn.Module, ctx: StepContext) -> None:
        if stage.name == "selftrain":
            # the teacher starts from the pre-trained student (the engine restored the best pre-training
            # checkpoint first when the stage starts from it)
            require_teacher(ctx, self.name).load_state_dict(model.state_dict())

    # -- losses ----------------------------------------------------------------------------------------------
    def dice(self, probs: torch.Tensor, target: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.form == "acdc":
            return dice_loss(probs, target, classes="all", smooth=1e-10, weight=weight)
        return sample_dice(probs, target, weight)

    def mix_loss(self, logits: torch.Tensor, img_label: torch.Tensor, patch_label: torch.Tensor,
                 mask: torch.Tensor, img_weight: float,
                 patch_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Dice and CE of ``img_label`` where ``mask`` is 1 and of ``patch_label`` in the box (mix_loss)."""
        logits = logits.float()
        probs = logits.softmax(1)
        m = mask.expand_as(img_label).float()
        pm = 1 - m
        dice = img_weight * self.dice(probs, img_label, m) + patch_weight * self.dice(probs, patch_label, pm)
        ce_img = F.cross_entropy(logits, img_label.long(), reduction="none")
        ce_patch = F.cross_entropy(logits, patch_label.long(), reduction="none")
        ce = (img_weight * (ce_img * m).sum() / (m.sum() + 1e-16)
              + patch_weight * (ce_patch * pm).sum() / (pm.sum() + 1e-16))
        return dice, ce

    def pseudo_label(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1)
        # binary (LA): foreground probability >= 0.5, i.e. argmax but for exact ties
        label = (probs[:, 1] >= 0.5).long() if probs.shape[1] == 2 else probs.argmax(1)
        return largest_components(label, probs.shape[1]) if self.lcc else label

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        # torch's global generator: repeatable under the seed and restored on resume
        return bcp_mask(x.shape[2:], device=x.device, ratio=self.mask_ratio)

    # -- steps -----------------------------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        if ctx.stage == "pretrain":
            return self.pretrain_step(model, batch)
        return self.selftrain_step(model, batch, ctx)

    def pretrain_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        l_a, l_b = halves(batch["x"], "--batch-size")
        y_a, y_b = halves(batch["y"], "--batch-size")
        m = self.mask(l_a)
        logits = model(copy_paste(l_a, l_b, m))
        if self.form == "acdc":
            dice, ce = self.mix_loss(logits, y_a, y_b, m, 1.0, 1.0)
        else:
            y_mix = copy_paste(y_a, y_b, m)
            dice = self.dice(logits.float().softmax(1), y_mix)
            ce = F.cross_entropy(logits.float(), y_mix)
        logs = {"loss/dice": float(dice.detach()), "loss/ce": float(ce.detach())}
        return StepResult({"mix": (dice + ce) / 2}, logs)

    def selftrain_step(self, model: nn.Module, batch: dict[str, torch.Tensor],
                       ctx: StepContext) -> StepResult:
        teacher = require_teacher(ctx, self.name)
        l_a, l_b = halves(batch["x"], "--batch-size")
        y_a, y_b = halves(batch["y"], "--batch-size")
        u_a, u_b = halves(batch["u_w"], "--unlabeled-batch-size (default: --batch-size)")
        with torch.no_grad(), train_mode(teacher):
            p_a, p_b = self.pseudo_label(teacher(u_a)), self.pseudo_label(teacher(u_b))
        m = self.mask(l_a)
        out_in = model(copy_paste(u_a, l_a, m))  # X_in: labeled patch inside the unlabeled image
        out_out = model(copy_paste(l_b, u_b, m))  # X_out: unlabeled patch inside the labeled image
        d_in, c_in = self.mix_loss(out_in, p_a, y_a, m, self.u_weight, 1.0)
        d_out, c_out = self.mix_loss(out_out, y_b, p_b, m, 1.0, self.u_weight)
        logs = {"loss/dice": float((d_in + d_out).detach()), "loss/ce": float((c_in + c_out).detach())}
        # the teacher's pseudo-labels of u_a and u_b, on the pixels each mixed image takes from them
        keep = torch.cat([m.expand_as(p_a), 1 - m.expand_as(p_b)]).bool()
        target = PseudoLabel(torch.cat([p_a, p_b]), keep, unlabeled_truth)
        return StepResult({"mix_in": (d_in + c_in) / 2, "mix_out": (d_out + c_out) / 2}, logs,
                          {"pseudo": target})
