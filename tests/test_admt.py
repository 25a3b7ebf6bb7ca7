"""AD-MT (one student, two alternately updated EMA teachers): the step against the official code written out
(ZhenZHAO/AD-MT ``train_post_2d_aut.py``, ``train_post_3d_aut.py``, ``train_utils.py``, ``mixaugs.py``), the
random periodic alternation and the EMA rule against ``AlternateUpdate`` and ``update_ema_variables``, then
short runs: training lowers the loss, resume restores the student, both teachers and the optimizer, 3D finishes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# imported explicitly: importing the module registers the algorithm
from semiseg.algorithms import admt as admt_mod
from semiseg.algorithms.admt import ADMT, TEACHER_A, TEACHER_B
from semiseg.algorithms.base import StepContext
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.ema import EMATeacher
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.evaluation.runs import evaluate_run
from semiseg.schedules import sigmoid_rampup
from tests.conftest import assert_same_networks, full_and_resumed


# -- the official code, written out ---------------------------------------------------------------------------
def official_dice(inputs: torch.Tensor, target: torch.Tensor, n: int, ignore: torch.Tensor) -> torch.Tensor:
    """``utils/losses.DiceLoss(n)(inputs, target.unsqueeze(1), ignore=ignore)``."""
    loss = 0.0
    for i in range(n):
        score, t = inputs[:, i], (target == i).float()
        keep = ignore != 1
        intersect = torch.sum(score[keep] * t[keep])
        y_sum = torch.sum(t[keep] * t[keep])
        z_sum = torch.sum(score[keep] * score[keep])
        loss = loss + 1 - (2 * intersect + 1e-5) / (z_sum + y_sum + 1e-5)
    return loss / n


def official_cut_mix(image, mask, logits, conflict, rand_index, lo, hi):
    """``mixaugs.cut_mix`` / ``cut_mix_3d`` with the box corners given (``lo``/``hi``: one array per axis)."""
    image, mask, logits, conflict = image.clone(), mask.clone(), logits.clone(), conflict.clone()
    src = [t.clone() for t in (image, mask, logits, conflict)]
    for i in range(image.shape[0]):
        box = tuple(slice(int(a[i]), int(b[i])) for a, b in zip(lo, hi))
        image[(i, slice(None), *box)] = src[0][(int(rand_index[i]), slice(None), *box)]
        for dst, s in zip((mask, logits, conflict), src[1:]):
            dst[(i, *box)] = s[(int(rand_index[i]), *box)]
    return image, mask, logits, conflict


def official_compromise(target_tea, logits_tea, target_stu, logits_stu, mtx_teacher_conflict):
    """``get_compromise_pseudo_btw_tea_stu(..., "pixel_confidence", mtx_bool_conflict)``."""
    target, logits = target_tea.clone(), logits_tea.clone()
    mtx_bool_conflict = (target_tea != target_stu) & mtx_teacher_conflict
    sel = (logits_stu > logits_tea) & mtx_bool_conflict
    target[sel] = target_stu[sel]
    logits[sel] = logits_stu[sel]
    return target, logits


def official_step(nets, batch, it, flag_a, args, n_classes, mix=None):
    """One iteration of the official loop, up to the loss (``flag_a``: the alternate state, True = ema_model)."""
    model, ema_model, ema_model_another = nets
    img_lb_w, target_lb, img_ulb_w = batch["x"], batch["y"], batch["u_w"]
    img_ulb_s = batch.get("u_s1")
    num_ulb = img_ulb_w.shape[0]
    with torch.no_grad():
        s1 = torch.softmax(ema_model(img_ulb_w), dim=1)
        s2 = torch.softmax(ema_model_another(img_ulb_w), dim=1)
        _, p1 = torch.max(s1, dim=1)
        _, p2 = torch.max(s2, dim=1)
        mtx_bool_conflict = p1 != p2
        e1 = -torch.sum(s1 * torch.log2(s1 + 1e-10), dim=1)
        e2 = -torch.sum(s2 * torch.log2(s2 + 1e-10), dim=1)
        w1 = torch.exp(-e1) / (torch.exp(-e1) + torch.exp(-e2))
        w2 = 1.0 - w1
        weighted = w1.unsqueeze(1) * s1 + w2.unsqueeze(1) * s2
        weighted = torch.pow(weighted, 1.0 / 1.0)
        weighted = weighted / torch.sum(weighted, dim=1, keepdim=True)
        pseudo_logits, pseudo_outputs = torch.max(weighted, dim=1)
    if not flag_a:
        img_ulb_s, pseudo_outputs, pseudo_logits, mtx_bool_conflict = official_cut_mix(
            img_ulb_w, pseudo_outputs, pseudo_logits, mtx_bool_conflict, *mix)
    assert num_ulb == img_ulb_s.shape[0]
    pred = model(torch.cat((img_lb_w, img_ulb_w, img_ulb_s)))
    nl = img_lb_w.shape[0]
    pred_lb = pred[:nl]
    pred_ulb_w, pred_ulb_s = pred[nl:].chunk(2)
    with torch.no_grad():
        pseudo_logits_stu, pseudo_outputs_stu = torch.max(torch.softmax(pred_ulb_w.detach(), dim=1), dim=1)
    loss_lb = (F.cross_entropy(pred_lb, target_lb.long())
               + official_dice(torch.softmax(pred_lb, dim=1), target_lb, n_classes,
                               torch.zeros_like(target_lb).float())) / 2.0
    pseudo_outputs, pseudo_logits = official_compromise(pseudo_outputs, pseudo_logits, pseudo_outputs_stu,
                                                        pseudo_logits_stu, mtx_bool_conflict)
    thr, w = args["conf_threshold"], args["conflict_weight"]
    if args["loss"] == "dice":
        if w == 1:
            loss_ulb = official_dice(torch.softmax(pred_ulb_s, dim=1), pseudo_outputs, n_classes,
                                     (pseudo_logits < thr).float())
        else:
            consist = pseudo_logits.clone()
            consist[mtx_bool_conflict] = -0.1
            loss_consist = official_dice(torch.softmax(pred_ulb_s, dim=1), pseudo_outputs, n_classes,
                                         (consist < thr).float())
            conflict = pseudo_logits.clone()
            conflict[~mtx_bool_conflict] = -0.1
            loss_conflict = official_dice(torch.softmax(pred_ulb_s, dim=1), pseudo_outputs, n_classes,
                                          (conflict < thr).float())
            loss_ulb = loss_consist + w * loss_conflict if loss_conflict > 0.0 else loss_consist
    else:
        if w == 1:
            pseudo_outputs[~pseudo_logits.ge(thr)] = -100
            loss_ulb = F.cross_entropy(pred_ulb_s, pseudo_outputs.long(), ignore_index=-100)
        else:
            pseudo_outputs[~pseudo_logits.ge(thr)] = -100
            target_consist = pseudo_outputs.clone()
            target_consist[mtx_bool_conflict] = -100
            loss_consist = F.cross_entropy(pred_ulb_s, target_consist.long(), ignore_index=-100)
            target_conflict = pseudo_outputs.clone()
            target_conflict[~mtx_bool_conflict] = -100
            loss_conflict = F.cross_entropy(pred_ulb_s, target_conflict.long(), ignore_index=-100)
            loss_ulb = loss_consist + w * loss_conflict if loss_conflict > 0.0 else loss_consist
    weight = args["consistency"] * sigmoid_rampup(it // 150, args["consistency_rampup"])
    return loss_lb, loss_ulb, weight


class OfficialAlternateUpdate:
    """``train_utils.AlternateUpdate`` with ``np.random.randint(1, P + 1)`` replaced by ``draw()``."""

    def __init__(self, alternate_period, draw, initial_flag=True, flag_random=False):
        self.alternate_period, self.flag_alternate, self._counter = alternate_period, initial_flag, 0
        self.flag_random, self.draw = flag_random, draw
        self.random_alternate_period = self.draw() if flag_random else self.flag_alternate

    def get_alternate_state(self):
        return self.flag_alternate

    def update(self):
        self._counter += 1
        if self._counter >= self.random_alternate_period:
            self.flag_alternate = not self.flag_alternate
            self._counter = 0
            if self.flag_random:
                self.random_alternate_period = self.draw()


def official_update_ema_variables(model, ema_model, alpha, global_step, rampup):
    if global_step < rampup:
        alpha = 0.0
    else:
        alpha = min(1 - 1 / (global_step - rampup + 1), alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)
    for buffer_train, buffer_eval in zip(model.buffers(), ema_model.buffers()):
        if buffer_eval.dtype.is_floating_point:  # the official code also blends num_batches_tracked (unused)
            buffer_eval.data = buffer_eval.data * alpha + buffer_train.data * (1 - alpha)
        else:
            buffer_eval.data = buffer_train.data.clone()


# -- the step ------------------------------------------------------------------------------------------------
def fake_nets(conv: type, classes: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    nets = tuple(conv(1, classes, 1) for _ in range(3))
    with torch.no_grad():  # sharper teachers, so the threshold keeps some pixels and drops others
        for n in nets[1:]:
            n.weight.mul_(4.0)
    return nets


def period_iterations(algo: ADMT) -> tuple[int, int]:
    """An iteration where teacher A is active and one where B is (above 150, so lambda(t) > exp(-5))."""
    its = range(300, 600)
    return (next(t for t in its if algo.active_teacher(t) == TEACHER_A),
            next(t for t in its if algo.active_teacher(t) == TEACHER_B))


@pytest.mark.parametrize("dim,conflict_weight", [(2, 1.0), (2, 0.5), (3, 1.0), (3, 0.5)])
def test_step_equals_the_official_code(monkeypatch, dim, conflict_weight):
    """2D: Dice over confident pixels (tau 0.95 replaced by 0.6 to keep both kinds); 3D: CE (tau 0.8). Both
    with the official conflict_weight 1 (one loss) and 0.5 (consistent + 0.5 conflicting). Teacher A's
    period learns from the strong view, B's from the CutMixed weak view with the target mixed alike."""
    classes = 3 if dim == 2 else 2
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    model, ta, tb = fake_nets(conv, classes)
    spatial = (6, 5) if dim == 2 else (6, 5, 4)
    torch.manual_seed(1)
    batch = {"x": torch.randn(2, 1, *spatial), "y": torch.randint(0, classes, (2, *spatial)),
             "u_w": torch.randn(3, 1, *spatial), "u_s1": torch.randn(3, 1, *spatial)}
    thr = 0.6 if dim == 2 else 0.8
    algo = ADMT(threshold=thr, conflict_weight=conflict_weight, strong3d="policy")
    algo.setup(num_classes=classes, dim=dim)
    algo._seed = 7
    nets = {"model": model, TEACHER_A: ta, TEACHER_B: tb}
    args = {"conf_threshold": thr, "conflict_weight": conflict_weight, "loss": "dice" if dim == 2 else "ce",
            "consistency": 2.0, "consistency_rampup": 50 if dim == 2 else 40}

    # a fixed CutMix draw: image i takes its partner perm[i] inside [lo, hi) per axis
    perm = torch.tensor([2, 0, 1])
    lo = [np.array([1, 0, 2]), np.array([0, 2, 1]), np.array([0, 1, 1])][:dim]
    hi = [np.array([4, 3, 6]), np.array([3, 5, 4]), np.array([2, 4, 3])][:dim]
    box = torch.ones((3, *spatial), dtype=torch.bool)
    for axis, (a, b) in enumerate(zip(lo, hi)):
        ar = torch.arange(spatial[axis])
        inside = (ar[None] >= torch.tensor(a)[:, None]) & (ar[None] < torch.tensor(b)[:, None])
        shape = [3] + [1] * dim
        shape[axis + 1] = spatial[axis]
        box &= inside.view(shape)
    monkeypatch.setattr(admt_mod, "sample_cutmix", lambda shape: (perm, box))

    for it, flag_a in zip(period_iterations(algo), (True, False)):
        ctx = StepContext(iteration=it, total_iterations=30000, networks=nets)
        r = algo.step(model, dict(batch), ctx)
        sup, uns, w = official_step((model, ta, tb), dict(batch), it, flag_a, args, classes, (perm, lo, hi))
        assert float(r.losses["sup"].detach()) == pytest.approx(float(sup.detach()), rel=1e-5)
        assert float(r.losses["unsup"].detach()) == pytest.approx(float(w * uns.detach()), rel=1e-5, abs=1e-8)
        assert r.logs["consistency_weight"] == pytest.approx(w)
        assert r.logs["teacher_b_active"] == float(not flag_a)
        assert 0.0 < r.logs["loss/unsup"]  # the unsupervised term is live: some pixels pass the threshold
        # the reported pseudo-label is the compromise, on the pixels that entered the loss
        pl = r.pseudo_labels["unsup"]
        assert pl.label.shape == batch["u_w"].shape[:1] + spatial and 0 < int(pl.keep.sum()) < pl.keep.numel()
        u_y = torch.arange(3 * math.prod(spatial)).view(3, *spatial)
        expect = u_y if flag_a else torch.where(box, u_y[perm], u_y)
        assert torch.equal(pl.truth({"u_y": u_y}), expect)
        # the teachers get no gradient; the student does
        g = torch.autograd.grad(sum(r.losses.values()), [model.weight])[0]
        assert g.abs().sum() > 0 and ta.weight.grad is None and tb.weight.grad is None


class ModeRecorder(nn.Conv2d):
    """A 1x1 convolution that remembers whether it ran in train mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = self.training
        return super().forward(x)


def test_active_teacher_runs_in_train_mode_the_other_in_eval_mode():
    torch.manual_seed(0)
    model, ta, tb = nn.Conv2d(1, 2, 1), ModeRecorder(1, 2, 1), ModeRecorder(1, 2, 1)
    algo = ADMT()
    algo._seed = 3
    batch = {"x": torch.randn(1, 1, 4, 4), "y": torch.zeros(1, 4, 4, dtype=torch.long),
             "u_w": torch.randn(2, 1, 4, 4), "u_s1": torch.randn(2, 1, 4, 4)}
    for it, active in zip(period_iterations(algo), (TEACHER_A, TEACHER_B)):
        ta.train(False), tb.train(True)  # whatever they were before, and restored after
        algo.step(model, batch, StepContext(it, 30000, networks={"model": model, TEACHER_A: ta, TEACHER_B: tb}))
        assert (ta.seen, tb.seen) == (active == TEACHER_A, active == TEACHER_B)
        assert (ta.training, tb.training) == (False, True)


def test_fusion_compromise_and_conflict_modes():
    p1 = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]).T.unsqueeze(0)  # (1, C=2, 3 pixels)
    p2 = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.5, 0.5]]).T.unsqueeze(0)
    conf, label, conflict = admt_mod.fuse_teachers(p1, p2)
    assert conflict.tolist() == [[False, True, True]]
    h = [-(p * torch.log2(p + 1e-10)).sum(1) for p in (p1, p2)]
    w1 = torch.exp(-h[0]) / (torch.exp(-h[0]) + torch.exp(-h[1]))
    q = w1.unsqueeze(1) * p1 + (1 - w1).unsqueeze(1) * p2
    torch.testing.assert_close(conf, q.max(1).values)
    # a temperature sharpens the ensemble before its max
    conf_t, _, _ = admt_mod.fuse_teachers(p1, p2, temperature=0.5)
    assert bool((conf_t >= conf - 1e-7).all())

    label_s, conf_s = torch.tensor([[1, 0, 0]]), torch.tensor([[0.99, 0.99, 0.1]])
    lab, c = admt_mod.compromise(label, conf, label_s, conf_s, conflict)
    # pixel 0: no teacher conflict -> the ensemble; pixel 1: conflict, student disagrees and is surer -> student;
    # pixel 2: conflict but the student is less sure -> the ensemble
    assert lab[0, 0] == label[0, 0] and lab[0, 1] == 0 and c[0, 1] == pytest.approx(0.99)
    assert lab[0, 2] == label[0, 2] and c[0, 2] == conf[0, 2]
    assert torch.equal(admt_mod.compromise(label, conf, label_s, conf_s, conflict, "always_tea")[0], label)
    stu = admt_mod.compromise(label, conf, label_s, conf_s, conflict, "always_stu")[0]
    assert stu[0, 2] == 0 and stu[0, 0] == label[0, 0]
    assert torch.equal(admt_mod.compromise(label, conf, label_s, conf_s, conflict, "random", coin=0.7)[0], label)
    assert torch.equal(admt_mod.compromise(label, conf, label_s, conf_s, conflict, "random", coin=0.2)[0], stu)


@pytest.mark.parametrize("shape", [(4, 1, 40, 24), (3, 1, 32, 24, 16)])
def test_cutmix_draw_is_the_official_rand_bbox(shape):
    """One lambda ~ Beta(4, 4) per batch, sides int(s sqrt(1 - lambda)) on every axis, centres in [s/8, s),
    the box [c - side//2, c + side//2) clipped: ``rand_bbox`` / ``rand_bbox_3d`` with the same draws."""
    torch.manual_seed(3)
    perm, mask = admt_mod.sample_cutmix(shape)
    torch.manual_seed(3)
    assert torch.equal(perm, torch.randperm(shape[0]))
    lam = float(torch.distributions.Beta(torch.tensor(4.0), torch.tensor(4.0)).sample())
    cut_rat = np.sqrt(1.0 - lam)
    expect = np.ones((shape[0], *shape[2:]), dtype=bool)
    for axis, s in enumerate(shape[2:]):
        cut = int(s * cut_rat)
        c = torch.randint(int(s / 8), s, (shape[0],)).numpy()
        lo, hi = np.clip(c - cut // 2, 0, s), np.clip(c + cut // 2, 0, s)
        inside = np.zeros((shape[0], s), dtype=bool)
        for i in range(shape[0]):
            inside[i, lo[i]:hi[i]] = True
        view = [shape[0]] + [1] * (len(shape) - 2)
        view[axis + 1] = s
        expect &= inside.reshape(view)
    assert np.array_equal(mask.numpy(), expect)
    x = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    mixed = admt_mod.apply_cutmix(x, perm, mask)
    assert torch.equal(mixed, torch.where(mask.unsqueeze(1), x[perm], x))


def test_strong_3d_is_the_official_brightness_contrast_and_noise():
    torch.manual_seed(0)
    u = torch.randn(2, 1, 8, 6, 4) * 2 + 1
    torch.manual_seed(5)
    out = admt_mod.strong_3d(u, p_color=1.0, p_noise=0.0)
    torch.manual_seed(5)
    a, beta = 1.0 + (torch.rand(2) - 0.5), torch.rand(2) - 0.5
    for i in range(2):
        # dataset_3d.RandomBrightnessContrast + randcolor._brightness_contrast_adjust_non_uint (clipped to [0, 1])
        image = u[i, 0].numpy().astype(np.float32)
        img_min, img_max = image.min(), image.max()
        norm = (image - img_min) / (img_max - img_min)
        norm = norm * float(a[i])
        norm = np.clip(norm + float(beta[i]) * np.mean(norm), 0, 1.0)
        np.testing.assert_allclose(out[i, 0].numpy(), norm * (img_max - img_min) + img_min, rtol=1e-5, atol=1e-5)
    noisy = admt_mod.strong_3d(u, p_color=0.0, p_noise=1.0)
    d = (noisy - u).flatten(1).abs().amax(1)
    assert bool((d > 0).all()) and bool((d <= 2.0 + 1e-6).all())  # |noise| <= 2 sigma <= 2
    assert torch.isfinite(admt_mod.strong_3d(torch.ones(2, 1, 4, 4, 4))).all()  # a constant patch


# -- the alternation and the EMA -----------------------------------------------------------------------------
@pytest.mark.parametrize("period", [1, 5, 50])
def test_alternation_follows_the_official_alternate_update(period):
    algo = ADMT(period=period)
    algo.setup(num_classes=4, dim=2)
    algo._seed = 11
    lengths = algo.period_lengths(3001)  # enough for 3000 steps even at period 1
    assert all(1 <= n <= period for n in lengths)
    if period > 1:
        assert len(set(lengths)) > 1  # random lengths
    draws = iter(lengths)
    official = OfficialAlternateUpdate(period, lambda: next(draws), initial_flag=True, flag_random=True)
    for t in range(3000):
        expect = TEACHER_A if official.get_alternate_state() else TEACHER_B
        assert algo.active_teacher(t) == expect, t
        official.update()
    # the schedule is a pure function of the saved seed: a fresh instance queried out of order agrees
    other = ADMT(period=period)
    other.setup(num_classes=4, dim=2)
    other.load_state_dict(algo.state_dict())
    assert [other.active_teacher(t) for t in (2999, 0, 1500)] == [algo.active_teacher(t) for t in (2999, 0, 1500)]
    # the default periods: 50 in 2D, 19 in 3D; without random_period a fixed period
    fixed = ADMT(random_period=False, period=3)
    fixed.setup(num_classes=2, dim=3)
    assert [fixed.active_teacher(t) for t in range(7)] == [TEACHER_A] * 3 + [TEACHER_B] * 3 + [TEACHER_A]
    d3 = ADMT()
    d3.setup(num_classes=2, dim=3)
    assert (d3.period, d3.threshold, d3.consistency_rampup, d3.unsup_loss) == (19, 0.8, 40.0, "ce")
    assert d3.needs == ("labeled", "unlabeled")  # the 3D strong view is drawn by the algorithm


def test_only_the_active_teacher_moves_with_the_official_alpha():
    """``update_ema_variables(model, teacher, 0.99, iter_num // 2, args)`` on the active teacher only: a copy
    of the student (alpha 0) while t // 2 < R, then min(1 - 1/(t // 2 - R + 1), 0.99), buffers included. The
    algorithm tells the engine which teacher moves and with which alpha; the engine's averager applies it."""
    from semiseg.engine.networks import Networks

    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))
    algo = ADMT(period=4, consistency_rampup=3.0)
    algo.setup(num_classes=3, dim=2)
    algo._seed = 2
    specs = algo.networks()
    emas = {n: EMATeacher(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)), buffers=True)
            for n in (TEACHER_A, TEACHER_B)}
    nets = Networks(specs, {"model": student, **{n: e.model for n, e in emas.items()}}, emas, {})
    ref = {n: copy.deepcopy(e.model) for n, e in emas.items()}
    for t in range(30):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student[1].running_mean.add_(torch.randn(3))
            student[1].num_batches_tracked.add_(1)
        active = algo.active_teacher(t)
        assert algo.update_ema(TEACHER_A if active == TEACHER_B else TEACHER_B, t) is False
        assert algo.update_ema(active, t) == admt_mod.ema_alpha(t, 3.0, decay=1.0)  # the engine caps it
        nets.update_emas(algo, t)
        official_update_ema_variables(student, ref[active], 0.99, t // 2, 3.0)
        for name in emas:
            a, b = nets.modules[name].state_dict(), ref[name].state_dict()
            for k in a:
                torch.testing.assert_close(a[k], b[k].to(a[k].dtype), rtol=1e-6, atol=1e-6)
    assert admt_mod.ema_alpha(5, 3.0) == 0.0 and admt_mod.ema_alpha(6, 3.0) == 0.0
    assert admt_mod.ema_alpha(8, 3.0) == pytest.approx(0.5) and admt_mod.ema_alpha(10**6, 3.0) == 0.99


def test_teachers_start_from_their_own_initialisation(tmp_path):
    for init, differs in (("independent", True), ("copy", False)):
        assert ADMT(teacher_init=init).networks()[TEACHER_A].init == ("fresh" if differs else None)
        t = Trainer(cfg(tmp_path, f"init-{init}", iterations=1, algo_options={"teacher_init": init}), quiet=True)
        w = [next(t.networks.modules[n].parameters()) for n in ("model", TEACHER_A, TEACHER_B)]
        assert (not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])) == differs


# -- runs ----------------------------------------------------------------------------------------------------
def cfg(tmp_path, name: str = "admt", **kw) -> TrainConfig:
    base = dict(algo="admt", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 2, "n_train": 24, "n_val": 2, "size": [64, 64], "num_classes": 2},
                patch_size=[64, 64], labeled=8, iterations=40, batch_size=4, optimizer="adamw", lr=0.01,
                val_every=20, log_every=1, out=str(tmp_path / name), seed=0,
                algo_options={"period": 5, "consistency_rampup": 2.0, "threshold": 0.7})
    base.update(kw)
    return TrainConfig(**base)


def logged(c: TrainConfig) -> list[dict]:
    rows = [json.loads(x) for x in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_training_lowers_the_loss_and_saves_three_networks(tmp_path):
    c = cfg(tmp_path)
    t = Trainer(c, quiet=True)
    assert list(t.networks.modules) == ["model", TEACHER_A, TEACHER_B]
    assert [g["network"] for g in t.optimizer.param_groups] == ["model"]  # the teachers are not optimised
    s = t.fit()
    assert s["iteration"] == 40
    rows = logged(c)
    assert all(math.isfinite(r["loss"]) for r in rows)
    sup = [r["loss/sup"] for r in rows]
    assert sum(sup[-8:]) < 0.6 * sum(sup[:8])
    active = [r["teacher_b_active"] for r in rows]
    assert 0 < sum(active) < len(active)  # both teachers took turns
    # independent initialisations, then each moved only in its own periods: all three differ at the end
    w = [next(t.networks.modules[n].parameters()) for n in ("model", TEACHER_A, TEACHER_B)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    ck = ckpt_io.load(tmp_path / "admt" / "checkpoints" / "last.pt")
    assert set(ck["networks"]) == {TEACHER_A, TEACHER_B} and ck["meta"]["eval_network"] == "model"
    assert {n: m["role"] for n, m in ck["meta"]["networks"].items()} == {
        "model": "trained", TEACHER_A: "ema", TEACHER_B: "ema"}
    assert ck["algorithm"]["schedule_seed"] == t.algo.state_dict()["schedule_seed"]
    out = evaluate_run(tmp_path / "admt", split="val", save_pred=None, montage=0, network=TEACHER_B)
    assert out["network"] == TEACHER_B and 0.0 <= out["mean_dice"] <= 1.0


def test_ema_decay_flag_caps_the_official_alpha(tmp_path):
    """``--ema-decay`` (TrainConfig.ema_decay) reaches AD-MT's own rule: the active teacher moves with
    min(official warm-up, decay), logged per step as ``ema/<teacher>``; the idle one logs nothing."""
    opts = {"period": 3, "consistency_rampup": 1.0, "threshold": 0.6}
    for decay in (None, 0.5):
        c = cfg(tmp_path, f"decay-{decay}", iterations=10, val_every=10, ema_decay=decay, algo_options=opts)
        t = Trainer(c, quiet=True)
        t.fit()
        for r in logged(c):
            it = r["iter"] - 1
            moved = [k for k in r if k.startswith("ema/")]
            assert moved == [f"ema/{t.algo.active_teacher(it)}"]
            cap = 0.99 if decay is None else decay
            assert r[moved[0]] == pytest.approx(min(admt_mod.ema_alpha(it, 1.0, decay=1.0), cap))
        # the last steps (t // 2 = 4, R = 1): 1 - 1/4 = 0.75, under 0.99, or the flag's 0.5
        assert r[moved[0]] == pytest.approx(0.75 if decay is None else 0.5)


def test_resume_restores_the_student_both_teachers_and_the_optimizer(tmp_path, monkeypatch):
    kw = dict(iterations=12, val_every=6, optimizer="sgd", lr=0.05,
              algo_options={"period": 3, "consistency_rampup": 1.0, "threshold": 0.6, "rampup_every": 1})
    full, resumed = full_and_resumed(lambda name: cfg(tmp_path, name, **kw), 8, monkeypatch)
    assert resumed.iteration == 12
    assert resumed.algo.state_dict() == full.algo.state_dict()
    assert_same_networks(full, resumed)
    # both teachers moved after the interruption (periods of <= 3 steps over steps 8..11)
    assert {full.algo.active_teacher(t) for t in range(8, 12)} == {TEACHER_A, TEACHER_B}


def test_3d_run_on_the_vnet_finishes(tmp_path):
    c = cfg(tmp_path, "admt3d", backbone="vnet",
            data_options={"dim": 3, "n_train": 6, "n_val": 1, "num_classes": 2, "size": [32, 32, 32]},
            patch_size=[32, 32, 16], labeled=2, iterations=4, batch_size=2, val_every=4,
            algo_options={"period": 1, "random_period": False})
    s = Trainer(c, quiet=True).fit()
    assert s["iteration"] == 4
    rows = logged(c)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["teacher_b_active"] for r in rows] == [0.0, 1.0, 0.0, 1.0]


def test_official_recipes(tmp_path):
    r2, r3 = ADMT.official_recipe(2), ADMT.official_recipe(3)
    assert {k: r2.settings[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "schedule", "iterations",
                                         "batch_size", "unlabeled_batch_size")} == {
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "poly",
        "iterations": 30000, "batch_size": 12, "unlabeled_batch_size": 12}
    assert r2.settings["policy_options"] == {"blur_p": 0.2}
    assert (r3.settings["iterations"], r3.settings["batch_size"], r3.settings["unlabeled_batch_size"]) == (
        15000, 2, 2)
    # applied to a run: the optimiser and the 2D strong view's blur probability 0.2 (medical2d's default is 0.5)
    t = Trainer(cfg(tmp_path, "recipe", recipe="official", optimizer="sgd", lr=None, iterations=1, batch_size=2,
                    unlabeled_batch_size=2, val_every=1), quiet=True)
    assert (t.cfg.optimizer, t.cfg.schedule, t.cfg.policy_options) == ("sgd", "poly", {"blur_p": 0.2})
    assert t.policy.blur_p == 0.2
    d2 = ADMT()
    assert (d2.period, d2.threshold, d2.consistency_rampup, d2.unsup_loss, d2.dice_classes) == (
        50, 0.95, 50.0, "dice", "all")
    assert d2.consistency_weight(150 * 50) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"consistency": -1}, "consistency"), ({"rampup_every": 0}, "rampup_every"),
    ({"threshold": 1.5}, "threshold"), ({"unsup_loss": "mse"}, "unsup_loss"), ({"ema_decay": 2.0}, "ema_decay"),
    ({"period": 0}, "period"), ({"conflict_mode": "vote"}, "conflict_mode"),
    ({"conflict_weight": -1}, "conflict_weight"), ({"ensemble_temp": 0}, "ensemble_temp"),
    ({"cutmix_p": 2}, "cutmix_p"), ({"strong3d": "torchio"}, "strong3d"),
    ({"teacher_init": "kaiming"}, "teacher_init")])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ADMT(**kwargs)
