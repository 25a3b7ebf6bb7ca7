"""ABD, adaptive bidirectional displacement (Chi et al., CVPR 2024), in its BCP form, as the official code does it
(chy-upc/ABD ``code/train_ACDC_BCP.py``, ``code/utils/displacement.py`` ``ABD_R_BCP``,
``code/dataloaders/dataset.py`` ``WeakStrongAugment``; docs/algorithms.md, "abd").

Pre-training is BCP's (one network, labeled copy-paste; :class:`~semiseg.algorithms.bcp.BCP`). Self-training
starts two students, ``model`` and ``model2``, and BCP's EMA teacher (of ``model``) from the best pre-trained
weights. Each step:

1. Views. A strong view of every labeled and unlabeled image (``strong_view``: with p = 0.5 a cutout box of
   random 0/1 pixels, whose labeled pixels become background, then ColorJitter(0.8, 0.8, 0.8, 0.2)).
2. Teacher. The EMA teacher (train mode, no gradient) pseudo-labels u_a, u_b and their strong views (argmax,
   largest component per class), four passes.
3. BCP. One mask M for the step; the weak mixes X_in = u_a M + l_a (1-M), X_out = l_b M + u_b (1-M) go to
   ``model``, the same mixes of the strong views to ``model2``, each supervised by BCP's region loss (the
   strong mixes by the strong pseudo-labels and the strong labels).
4. Cross pseudo supervision. Dice of each student's softmax on its mixes against the other's argmax.
5. Displacement (``displace``). Each mixed image is cut into a grid of patches (4 x 4 of 64 px at 256). Per
   sample, the weak image's least confident patch (mean max-softmax of ``model``) is replaced by a confident
   patch of the strong image, and then the strong image's least confident patch by a confident patch of the
   (already updated) weak image. With p = 0.5 the confident patch is the most confident one; otherwise it is,
   among the top-4, the one whose mean prediction is closest (KL) to the patch it replaces.
6. Both students predict all displaced images; Dice of each against the other's argmax.

    L = sum over k = 1, 2 of  (Dice_mix_k + CE_mix_k) / 2 + Dice(p_k, argmax p_j) + Dice(d_k, argmax d_j)

where the mixed-image terms are BCP's (unlabeled pixels at u_weight = 0.5) and the cross terms the ABD
``DiceLoss`` (batch sums, squared denominators, every class, s = 1e-5). The teacher follows ``model`` only.
Validation and the official test evaluate ``model``.

The region Dice follows ABD's ``DiceLoss``, which predates BCP's fix: the background class ignores the region
mask (``background_mask=True`` applies it, as semiseg's ``bcp`` does).

Where semiseg differs: the strong view is built inside the step from the loader's weak views, with torch's
generator (the loaders give no strong view of labeled images, nor a label that follows the cutout). As the
official code, ``model2`` starts self-training as the best pre-trained ``model``, its momentum included
(``Stage.copy``). Pre-training leaves ``model2`` without gradients, so ABD declares ``idle_networks`` and
distributed training looks for unused parameters.

3D has no official code. The parts generalise and run: BCP's LA form, a grid of patches along every axis, a
cutout box in the volume, the jitter without the [0, 1] clamp (LA intensities are z-scored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.algorithms.base import OFFICIAL_SGD, PRIMARY, Network, PseudoLabel, Recipe, Stage, StepContext, StepResult
from semiseg.algorithms.bcp import BCP, halves
from semiseg.algorithms.losses import dice_loss, one_hot
from semiseg.algorithms.meanteacher import require_teacher, train_mode, unlabeled_truth
from semiseg.augment.mixing import copy_paste
from semiseg.augment.policies2d import _box_sizes
from semiseg.errors import ConfigError, TrainingError
from semiseg.registry import register_algorithm

SECOND = "model2"


# -- patches ----------------------------------------------------------------------------------------------------
def to_patches(t: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, *S) -> (B, C, N, P): ``grid`` patches along each axis, row-major (einops
    ``b c (h p1) (w p2) -> b c (h w) (p1 p2)``, the official layout)."""
    b, c, *s = t.shape
    d = len(s)
    shape = [b, c]
    for n in s:
        shape += [grid, n // grid]
    perm = [0, 1] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)]
    return t.reshape(shape).permute(perm).reshape(b, c, grid**d, math.prod(n // grid for n in s))


def from_patches(t: torch.Tensor, spatial: Sequence[int], grid: int) -> torch.Tensor:
    """The inverse of :func:`to_patches`: (B, C, N, P) -> (B, C, *spatial)."""
    b, c = t.shape[:2]
    d = len(spatial)
    t = t.reshape([b, c] + [grid] * d + [n // grid for n in spatial])
    perm = [0, 1] + [a for i in range(d) for a in (2 + i, 2 + d + i)]
    return t.permute(perm).reshape(b, c, *spatial)


def select_patches(conf1: torch.Tensor, conf2: torch.Tensor, logits1: torch.Tensor, logits2: torch.Tensor,
                   grid: int, top_k: int, use_kl: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Which patches move (``ABD_R_BCP``), per sample: ``(low1, high1, low2, high2)``.

    ``conf*`` (B, *S) max-softmax maps of the two views, ``logits*`` (B, K, *S). ``low`` is a view's least
    confident patch (mean confidence). ``high`` is its most confident patch, or, where ``use_kl`` (B,), among its
    ``top_k`` most confident the one whose softmax of mean logits q minimises KL(p_low || q) against the *other*
    view's least confident patch (``kl_div(q.log(), p_low, reduction='sum')``). Ties go to the first index.
    """
    c1 = to_patches(conf1.detach().float().unsqueeze(1), grid)[:, 0].mean(-1)  # (B, N)
    c2 = to_patches(conf2.detach().float().unsqueeze(1), grid)[:, 0].mean(-1)
    m1 = to_patches(logits1.detach().float(), grid).mean(-1).transpose(1, 2)  # (B, N, K) mean logits per patch
    m2 = to_patches(logits2.detach().float(), grid).mean(-1).transpose(1, 2)
    rows = torch.arange(c1.shape[0], device=c1.device)
    low1, low2 = c1.argmin(1), c2.argmin(1)
    top1, top2 = c1.topk(top_k, dim=1).indices, c2.topk(top_k, dim=1).indices

    def closest(means: torch.Tensor, top: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cand = means.gather(1, top.unsqueeze(-1).expand(-1, -1, means.shape[-1])).softmax(-1)  # (B, k, K)
        kl = F.kl_div(cand.log(), target.softmax(-1).unsqueeze(1).expand_as(cand), reduction="none").sum(-1)
        return top.gather(1, kl.argmin(1, keepdim=True)).squeeze(1)

    use_kl = use_kl.to(c1.device)
    high1 = torch.where(use_kl, closest(m1, top1, m2[rows, low2]), c1.argmax(1))
    high2 = torch.where(use_kl, closest(m2, top2, m1[rows, low1]), c2.argmax(1))
    return low1, high1, low2, high2


def displace(conf1: torch.Tensor, conf2: torch.Tensor, images1: torch.Tensor, images2: torch.Tensor,
             logits1: torch.Tensor, logits2: torch.Tensor, grid: int, top_k: int,
             use_kl: torch.Tensor) -> torch.Tensor:
    """ABD-R's bidirectional displacement: cat(images1', images2') of shape (2B, C, *S).

    images1' = images1 with its least confident patch replaced by the chosen patch of images2; images2' = images2
    with its least confident patch replaced by the chosen patch of images1' (the official code writes in place, so
    a chosen patch that is also images1's least confident one arrives already replaced)."""
    spatial = tuple(images1.shape[2:])
    low1, high1, low2, high2 = select_patches(conf1, conf2, logits1, logits2, grid, top_k, use_kl)
    rows = torch.arange(images1.shape[0], device=images1.device)
    p1, p2 = to_patches(images1, grid).clone(), to_patches(images2, grid).clone()
    p1[rows, :, low1] = p2[rows, :, high2]
    p2[rows, :, low2] = p1[rows, :, high1]
    return torch.cat([from_patches(p1, spatial, grid), from_patches(p2, spatial, grid)])


# -- the strong view --------------------------------------------------------------------------------------------
def cutout_box(spatial: Sequence[int], rng: np.random.Generator, p: float, size_min: float = 0.02,
               size_max: float = 0.4, ratio_min: float = 0.3, ratio_max: float = 1 / 0.3,
               max_tries: int = 1000) -> np.ndarray | None:
    """ABD's ``cutout_gray`` box as a boolean mask, or None (probability 1 - p). Unlike the CutMix box, the area
    is redrawn with the ratio and the corner at every try until the box fits (the official loop)."""
    shape = tuple(int(s) for s in spatial)
    if rng.random() >= p:
        return None
    sizes: tuple[int, ...] = shape
    corner = [0] * len(shape)
    for _ in range(max_tries):
        area = rng.uniform(size_min, size_max) * math.prod(shape)
        sizes = _box_sizes(area, rng.uniform(ratio_min, ratio_max), len(shape))
        corner = [int(rng.integers(0, s)) for s in shape]
        if all(c + b <= s for c, b, s in zip(corner, sizes, shape)):
            break
    else:  # very elongated patches only (the official loop would spin forever): clamp and place where it fits
        sizes = tuple(min(b, s) for b, s in zip(sizes, shape))
        corner = [int(rng.integers(0, s - b + 1)) for b, s in zip(sizes, shape)]
    box = np.zeros(shape, dtype=bool)
    box[tuple(slice(c, c + b) for c, b in zip(corner, sizes))] = True
    return box


def strong_view(images: torch.Tensor, labels: torch.Tensor | None, cutout_p: float = 0.5, jitter: float = 0.8,
                clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ABD's strong view of weak views (``WeakStrongAugment``: ``cutout_gray`` then ``color_jitter``), per sample:

    - with probability ``cutout_p`` a box (:func:`cutout_box`) filled with random 0/1 pixels; its labels become 0;
    - ColorJitter(brightness=contrast=saturation=jitter, hue=0.2) in random order. On grey images saturation and
      hue are identities, so brightness x -> b x and contrast x -> c x + (1 - c) mean(x), with b, c ~
      U(max(0, 1 - jitter), 1 + jitter), each clamped to [0, 1] (``clamp``, torchvision's float images).

    Each channel is a grey image (the official images have one). The draws come from a numpy generator seeded
    from torch's global generator, which the engine restores on resume.
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
    out = images.clone()
    out_labels = None if labels is None else labels.clone()
    spatial = tuple(images.shape[2:])
    lo, hi = max(0.0, 1.0 - jitter), 1.0 + jitter
    for i in range(images.shape[0]):
        box = cutout_box(spatial, rng, cutout_p)
        if box is not None:
            mask = torch.from_numpy(box).to(images.device)
            noise = rng.integers(0, 2, size=(images.shape[1], int(box.sum())))
            out[i][:, mask] = torch.from_numpy(noise).to(out.device, out.dtype)
            if out_labels is not None:
                out_labels[i][mask] = 0
        b, c = rng.uniform(lo, hi, 2)
        out[i] = jitter_grey(out[i], float(b), float(c), bool(rng.random() < 0.5), clamp)
    return out, out_labels


def jitter_grey(image: torch.Tensor, brightness: float, contrast: float, brightness_first: bool,
                clamp: bool = True) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` and ``adjust_contrast`` of a (C, *S) image, each channel a grey image:
    x -> b x and x -> c x + (1 - c) mean(x), in the given order, each clamped to [0, 1] when ``clamp``."""
    dims = tuple(range(1, image.dim()))
    x = image
    for op in ("b", "c") if brightness_first else ("c", "b"):
        x = x * brightness if op == "b" else contrast * x + (1 - contrast) * x.mean(dims, keepdim=True)
        if clamp:
            x = x.clamp(0.0, 1.0)
    return x


# -- losses -----------------------------------------------------------------------------------------------------
def region_dice(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, smooth: float = 1e-10,
                background_mask: bool = False) -> torch.Tensor:
    """ABD's ``DiceLoss(probs, target, mask)``: per class 1 - (2 sum(p y m) + s) / (sum(p^2 m) + sum(y^2 m) + s)
    over the whole batch, averaged over every class. Its ``_one_hot_mask_encoder`` makes the background's mask
    all ones (``mask * 0 == 0``), so class 0 ignores the region unless ``background_mask``."""
    c = probs.shape[1]
    y = one_hot(target, c)
    w = torch.ones_like(probs[:, :1]) if weight is None else weight.unsqueeze(1).to(probs.dtype)
    w = w.expand_as(probs)
    if not background_mask:
        w = torch.cat([torch.ones_like(w[:, :1]), w[:, 1:]], 1)
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * y * w).sum(dims)
    denom = (probs * probs * w).sum(dims) + (y * y * w).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def cross_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ABD's unmasked ``DiceLoss(n_classes)``: every class, background included, s = 1e-5."""
    return dice_loss(probs, target, classes="all", smooth=1e-5)


@register_algorithm("abd")
class ABD(BCP):
    name = "abd"
    paper = "ABD (Chi et al.)"
    year = 2024
    needs = ("labeled", "unlabeled")  # the strong views are built in the step (see strong_view)
    idle_networks = True  # model2 has no gradient while BCP pre-trains model

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe | None:
        if dim != 2:
            return None  # the official code is 2D only (ACDC, PROMISE12)
        # BCP's ACDC schedule: two SGD 0.01 (one per student), constant lr; 10 000 + 30 000 steps of 12 + 12
        return Recipe("ABD code/train_ACDC_BCP.py",
                      {**OFFICIAL_SGD, "schedule": "constant", "iterations": 40000, "batch_size": 12,
                       "unlabeled_batch_size": 12, "val_every": 200,
                       "algo_options": {"pretrain_iterations": 10000}})

    def __init__(self, variant: str = "auto", pretrain_fraction: float | None = None,
                 pretrain_iterations: int | None = None, u_weight: float = 0.5, mask_ratio: float = 2 / 3,
                 lcc: bool = True, selftrain_from: str = "best", selftrain_schedule: str | None = None,
                 fresh_optimizer: bool | None = None, grid: int = 4, top_k: int = 4, kl_prob: float = 0.5,
                 cross_weight: float = 1.0, displace_weight: float = 1.0, cutout_p: float = 0.5,
                 jitter: float = 0.8, background_mask: bool = False) -> None:
        if grid < 1 or top_k < 1:
            raise ConfigError(f"ABD grid={grid} and top_k={top_k} must be >= 1 (the official code: 4 and 4).")
        for key, value in (("kl_prob", kl_prob), ("cutout_p", cutout_p)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ABD {key}={value} is a probability and must lie in [0, 1].")
        for key, value in (("u_weight", u_weight), ("cross_weight", cross_weight),
                           ("displace_weight", displace_weight), ("jitter", jitter)):
            if value < 0:
                raise ConfigError(f"ABD {key}={value} must be >= 0.")
        # set before BCP's __init__, which calls setup()
        self.grid, self.top_k, self.kl_prob = grid, top_k, kl_prob
        self.cross_weight, self.displace_weight = cross_weight, displace_weight
        self.cutout_p, self.jitter, self.background_mask = cutout_p, jitter, background_mask
        self._built = False  # BCP's __init__ calls setup() with placeholder dimensions; check the real ones
        super().__init__(variant=variant, pretrain_fraction=pretrain_fraction,
                         pretrain_iterations=pretrain_iterations, u_weight=u_weight, mask_ratio=mask_ratio,
                         lcc=lcc, selftrain_from=selftrain_from, selftrain_schedule=selftrain_schedule,
                         fresh_optimizer=fresh_optimizer)
        self._built = True

    def setup(self, num_classes: int, dim: int) -> None:
        super().setup(num_classes, dim)
        if self._built and self.top_k > self.grid**dim:
            raise ConfigError(f"ABD top_k={self.top_k} exceeds the {self.grid**dim} patches of a grid of "
                              f"{self.grid} per axis; lower top_k or raise grid.")

    def networks(self) -> dict[str, Network]:
        # two students (both start from the pre-trained model at self-training) and BCP's EMA teacher of model_1
        assert self.ema is not None
        return {PRIMARY: Network(), SECOND: Network(), "teacher": Network("ema", of=PRIMARY, **self.ema)}

    def stages(self, iterations: int) -> list[Stage]:
        # the official code loads the best pre-trained weights, and the pre-training optimizer state, into
        # model_1 and model_2 alike: the engine copies model into model2 at self-training's first step
        stages = super().stages(iterations)
        for st in stages:
            if st.name == "selftrain" and len(stages) > 1:
                st.copy = {SECOND: PRIMARY}
        return stages

    def _second(self, ctx: StepContext) -> nn.Module:
        net = ctx.networks.get(SECOND)
        if net is None:
            raise TrainingError(f"Algorithm '{self.name}' needs its second network '{SECOND}' in ctx.networks, "
                                f"but none was given.")
        return net

    # -- losses ----------------------------------------------------------------------------------------------
    def dice(self, probs: torch.Tensor, target: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.form == "acdc":
            return region_dice(probs, target, weight, smooth=1e-10, background_mask=self.background_mask)
        return super().dice(probs, target, weight)

    def check_grid(self, x: torch.Tensor) -> None:
        bad = [s for s in x.shape[2:] if s % self.grid]
        if bad:
            raise ConfigError(f"ABD cuts each image into {self.grid} patches per axis, so --patch-size "
                              f"{','.join(map(str, x.shape[2:]))} must be divisible by grid={self.grid}.")

    # -- steps -----------------------------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        self.check_grid(batch["x"])  # at the first step, not after pre-training
        return super().step(model, batch, ctx)

    def strong(self, images: torch.Tensor,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # torchvision clamps float images to [0, 1]; LA volumes are z-scored, so 3D keeps the range
        return strong_view(images, labels, self.cutout_p, self.jitter, clamp=self.dim == 2)

    def selftrain_step(self, model: nn.Module, batch: dict[str, torch.Tensor],
                       ctx: StepContext) -> StepResult:
        teacher, model2 = require_teacher(ctx, self.name), self._second(ctx)
        unl = "--unlabeled-batch-size (default: --batch-size)"
        l_a, l_b = halves(batch["x"], "--batch-size")
        y_a, y_b = halves(batch["y"], "--batch-size")
        u_a, u_b = halves(batch["u_w"], unl)
        xs, ys = self.strong(batch["x"], batch["y"])
        us, _ = self.strong(batch["u_w"], None)
        assert ys is not None
        ls_a, ls_b = halves(xs, "--batch-size")
        ys_a, ys_b = halves(ys, "--batch-size")
        us_a, us_b = halves(us, unl)
        with torch.no_grad(), train_mode(teacher):  # four passes, as the official code
            p_a, p_b = self.pseudo_label(teacher(u_a)), self.pseudo_label(teacher(u_b))
            ps_a, ps_b = self.pseudo_label(teacher(us_a)), self.pseudo_label(teacher(us_b))
        m = self.mask(l_a)  # one box for the step, shared by the weak and the strong mixes
        w_in, w_out = copy_paste(u_a, l_a, m), copy_paste(l_b, u_b, m)
        s_in, s_out = copy_paste(us_a, ls_a, m), copy_paste(ls_b, us_b, m)

        # BCP on each student: model on the weak mixes, model2 on the strong ones (one pass per mixed batch)
        o1_in, o1_out = model(w_in), model(w_out)
        o2_in, o2_out = model2(s_in), model2(s_out)
        d1_in, c1_in = self.mix_loss(o1_in, p_a, y_a, m, self.u_weight, 1.0)
        d1_out, c1_out = self.mix_loss(o1_out, y_b, p_b, m, 1.0, self.u_weight)
        d2_in, c2_in = self.mix_loss(o2_in, ps_a, ys_a, m, self.u_weight, 1.0)
        d2_out, c2_out = self.mix_loss(o2_out, ys_b, ps_b, m, 1.0, self.u_weight)

        # cross pseudo supervision on the mixed images
        out1, out2 = torch.cat([o1_in, o1_out]).float(), torch.cat([o2_in, o2_out]).float()
        prob1, prob2 = out1.softmax(1), out2.softmax(1)
        conf1, plab1 = prob1.detach().max(1)[0], prob1.detach().argmax(1)
        conf2, plab2 = prob2.detach().max(1)[0], prob2.detach().argmax(1)
        cross1, cross2 = cross_dice(prob1, plab2), cross_dice(prob2, plab1)

        # the displaced images, predicted by both students, each supervising the other
        use_kl = torch.rand(out1.shape[0]) < self.kl_prob  # the official random.random() < 0.5 per sample
        moved = displace(conf1, conf2, torch.cat([w_in, w_out]), torch.cat([s_in, s_out]), out1.detach(),
                         out2.detach(), self.grid, self.top_k, use_kl)
        q1, q2 = model(moved).float().softmax(1), model2(moved).float().softmax(1)
        disp1, disp2 = cross_dice(q1, q2.detach().argmax(1)), cross_dice(q2, q1.detach().argmax(1))

        losses = {"mix_in": (d1_in + c1_in) / 2, "mix_out": (d1_out + c1_out) / 2,
                  "mix_in2": (d2_in + c2_in) / 2, "mix_out2": (d2_out + c2_out) / 2,
                  "cross1": self.cross_weight * cross1, "cross2": self.cross_weight * cross2,
                  "displace1": self.displace_weight * disp1, "displace2": self.displace_weight * disp2}
        raw = {"loss/dice": d1_in + d1_out, "loss/ce": c1_in + c1_out, "loss/dice2": d2_in + d2_out,
               "loss/ce2": c2_in + c2_out, "loss/cross1": cross1, "loss/cross2": cross2,
               "loss/displace1": disp1, "loss/displace2": disp2}
        logs = {k: float(v.detach()) for k, v in raw.items()}
        logs["kl_share"] = float(use_kl.float().mean())
        # pseudo-labels on the pixels each mixed image takes from u_a (outside the box) and u_b (inside)
        keep = torch.cat([m.expand_as(p_a), 1 - m.expand_as(p_b)]).bool()
        targets = {"pseudo": PseudoLabel(torch.cat([p_a, p_b]), keep, unlabeled_truth),
                   "pseudo_strong": PseudoLabel(torch.cat([ps_a, ps_b]), keep, unlabeled_truth),
                   "cross": PseudoLabel(plab2, keep, unlabeled_truth)}  # model2's labels that teach model
        return StepResult(losses, logs, targets)
