"""ABD on BCP (chy-upc/ABD ``train_ACDC_BCP.py``): the displacement and the loss against the official code written
out, the strong view against torchvision, a short two-stage training, resume with every network and the
optimizer, and the options."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from skimage.measure import label as cc_label
from torch import nn

from semiseg import registry
from semiseg.algorithms import abd as abd_mod  # importing the module registers "abd"
from semiseg.algorithms.base import StepContext
from semiseg.augment.mixing import bcp_mask
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.recipes import apply_recipe
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from tests.conftest import assert_same_networks, full_and_resumed

ABD = abd_mod.ABD


# -- the official code, written out ------------------------------------------------------------------------------
def official_abd_r_bcp(out_max_1, out_max_2, net_input_1, net_input_2, out_1, out_2, args, draws):
    """``utils/displacement.py`` ``ABD_R_BCP`` line for line; ``draws`` replaces its ``random.random()`` calls."""
    patches_1 = rearrange(out_max_1, "b (h p1) (w p2)->b (h w) (p1 p2)", p1=args.patch_size, p2=args.patch_size)
    patches_2 = rearrange(out_max_2, "b (h p1) (w p2)->b (h w) (p1 p2)", p1=args.patch_size, p2=args.patch_size)
    image_patch_1 = rearrange(net_input_1.squeeze(1), "b  (h p1) (w p2) -> b (h w)(p1 p2) ", p1=args.patch_size,
                              p2=args.patch_size)
    image_patch_2 = rearrange(net_input_2.squeeze(1), "b  (h p1) (w p2) -> b (h w)(p1 p2) ", p1=args.patch_size,
                              p2=args.patch_size)
    patches_mean_1 = torch.mean(patches_1.detach(), dim=2)
    patches_mean_2 = torch.mean(patches_2.detach(), dim=2)
    patches_outputs_1 = rearrange(out_1, "b c (h p1) (w p2)->b c (h w) (p1 p2)", p1=args.patch_size,
                                  p2=args.patch_size)
    patches_outputs_2 = rearrange(out_2, "b c (h p1) (w p2)->b c (h w) (p1 p2)", p1=args.patch_size,
                                  p2=args.patch_size)
    patches_mean_outputs_1 = torch.mean(patches_outputs_1.detach(), dim=3).permute(0, 2, 1)
    patches_mean_outputs_2 = torch.mean(patches_outputs_2.detach(), dim=3).permute(0, 2, 1)
    _, patches_mean_1_top4_indices = patches_mean_1.topk(args.top_num, dim=1)
    _, patches_mean_2_top4_indices = patches_mean_2.topk(args.top_num, dim=1)
    draws = iter(draws)
    for i in range(args.labeled_bs):
        if next(draws) < 0.5:
            kl_similarities_1 = torch.empty(args.top_num)
            kl_similarities_2 = torch.empty(args.top_num)
            b = torch.argmin(patches_mean_1[i].detach(), dim=0)
            d = torch.argmin(patches_mean_2[i].detach(), dim=0)
            patches_mean_outputs_min_1 = patches_mean_outputs_1[i, b, :]
            patches_mean_outputs_min_2 = patches_mean_outputs_2[i, d, :]
            patches_mean_outputs_top4_1 = patches_mean_outputs_1[i, patches_mean_1_top4_indices[i, :], :]
            patches_mean_outputs_top4_2 = patches_mean_outputs_2[i, patches_mean_2_top4_indices[i, :], :]
            for j in range(args.top_num):
                kl_similarities_1[j] = torch.nn.functional.kl_div(
                    patches_mean_outputs_top4_1[j].softmax(dim=-1).log(), patches_mean_outputs_min_2.softmax(dim=-1),
                    reduction="sum")
                kl_similarities_2[j] = torch.nn.functional.kl_div(
                    patches_mean_outputs_top4_2[j].softmax(dim=-1).log(), patches_mean_outputs_min_1.softmax(dim=-1),
                    reduction="sum")
            a = torch.argmin(kl_similarities_1.detach(), dim=0, keepdim=False)
            c = torch.argmin(kl_similarities_2.detach(), dim=0, keepdim=False)
            a_ori = patches_mean_1_top4_indices[i, a]
            c_ori = patches_mean_2_top4_indices[i, c]
            max_patch_1 = image_patch_2[i][c_ori]
            image_patch_1[i][b] = max_patch_1
            max_patch_2 = image_patch_1[i][a_ori]
            image_patch_2[i][d] = max_patch_2
        else:
            a = torch.argmax(patches_mean_1[i].detach(), dim=0)
            b = torch.argmin(patches_mean_1[i].detach(), dim=0)
            c = torch.argmax(patches_mean_2[i].detach(), dim=0)
            d = torch.argmin(patches_mean_2[i].detach(), dim=0)
            max_patch_1 = image_patch_2[i][c]
            image_patch_1[i][b] = max_patch_1
            max_patch_2 = image_patch_1[i][a]
            image_patch_2[i][d] = max_patch_2
    image_patch = torch.cat([image_patch_1, image_patch_2], dim=0)
    return rearrange(image_patch, "b (h w)(p1 p2) -> b  (h p1) (w p2)", h=args.h_size, w=args.w_size,
                     p1=args.patch_size, p2=args.patch_size)


class OfficialDiceLoss:
    """ABD ``utils/losses.py`` ``DiceLoss``, with its ``_one_hot_mask_encoder`` (class 0's mask is all ones)."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes

    def _one_hot_encoder(self, t):
        return torch.cat([t == i * torch.ones_like(t) for i in range(self.n_classes)], dim=1).float()

    def _one_hot_mask_encoder(self, t):
        return torch.cat([t * i == i * torch.ones_like(t) for i in range(self.n_classes)], dim=1).float()

    def _dice_loss(self, score, target):
        target = target.float()
        smooth = 1e-5
        intersect = torch.sum(score * target)
        y_sum = torch.sum(target * target)
        z_sum = torch.sum(score * score)
        return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)

    def _dice_mask_loss(self, score, target, mask):
        target, mask = target.float(), mask.float()
        smooth = 1e-10
        intersect = torch.sum(score * target * mask)
        y_sum = torch.sum(target * target * mask)
        z_sum = torch.sum(score * score * mask)
        return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)

    def __call__(self, inputs, target, mask=None):
        target = self._one_hot_encoder(target)
        loss = 0.0
        if mask is not None:
            mask = self._one_hot_mask_encoder(mask)
            for i in range(self.n_classes):
                loss += self._dice_mask_loss(inputs[:, i], target[:, i], mask[:, i])
        else:
            for i in range(self.n_classes):
                loss += self._dice_loss(inputs[:, i], target[:, i])
        return loss / self.n_classes


def official_mix_loss(dice_loss, output, img_l, patch_l, mask, l_weight=1.0, u_weight=0.5, unlab=False):
    """``train_ACDC_BCP.py`` ``mix_loss``."""
    ce = nn.CrossEntropyLoss(reduction="none")
    img_l, patch_l = img_l.type(torch.int64), patch_l.type(torch.int64)
    output_soft = F.softmax(output, dim=1)
    image_weight, patch_weight = l_weight, u_weight
    if unlab:
        image_weight, patch_weight = u_weight, l_weight
    patch_mask = 1 - mask
    loss_dice = dice_loss(output_soft, img_l.unsqueeze(1), mask.unsqueeze(1)) * image_weight
    loss_dice += dice_loss(output_soft, patch_l.unsqueeze(1), patch_mask.unsqueeze(1)) * patch_weight
    loss_ce = image_weight * (ce(output, img_l) * mask).sum() / (mask.sum() + 1e-16)
    loss_ce += patch_weight * (ce(output, patch_l) * patch_mask).sum() / (patch_mask.sum() + 1e-16)
    return loss_dice, loss_ce


def official_masks(output):
    """``get_ACDC_masks(output, nms=1)``: argmax, then the largest component of classes 1..3 per slice."""
    seg = torch.argmax(F.softmax(output, dim=1), dim=1)
    batch = []
    for i in range(seg.shape[0]):
        classes = []
        for c in range(1, 4):
            temp = torch.zeros_like(seg[i])
            temp[seg[i] == c] = 1
            temp = temp.numpy()
            labels = cc_label(temp)
            if labels.max() != 0:
                classes.append((labels == np.argmax(np.bincount(labels.flat)[1:]) + 1) * c)
            else:
                classes.append(temp)
        batch.append(classes[0] + classes[1] + classes[2])
    return torch.Tensor(np.array(batch))


# -- the displacement ---------------------------------------------------------------------------------------------
def patch_images(values: list[float], grid: int = 2, size: int = 2) -> torch.Tensor:
    """One (1, 1, grid*size, grid*size) image whose patch k (row-major) is filled with values[k]."""
    img = torch.zeros(1, 1, grid * size, grid * size)
    for k, v in enumerate(values):
        r, c = divmod(k, grid)
        img[0, 0, r * size:(r + 1) * size, c * size:(c + 1) * size] = v
    return img


def conf_map(values: list[float], grid: int = 2, size: int = 2) -> torch.Tensor:
    return patch_images(values, grid, size)[:, 0]


def logits_map(per_patch: list[list[float]], grid: int = 2, size: int = 2) -> torch.Tensor:
    """(1, K, H, W) logits constant on each patch."""
    return torch.cat([patch_images([p[k] for p in per_patch], grid, size) for k in range(len(per_patch[0]))], 1)


def test_displacement_moves_the_chosen_patches_by_confidence():
    # view 1 (weak): patch 1 is the least confident, 0 the most, then 3; view 2 (strong): 2 least, 1 most, then 3
    conf1, conf2 = conf_map([0.9, 0.2, 0.6, 0.8]), conf_map([0.3, 0.95, 0.1, 0.7])
    img1, img2 = patch_images([10, 11, 12, 13]), patch_images([20, 21, 22, 23])
    # mean predictions: view 1's patch 3 resembles view 2's least confident patch (2), and view 2's patch 3
    # resembles view 1's least confident patch (1); the most confident patches do not
    lg1 = logits_map([[5, 0, 0], [0, 0, 4], [0, 0, 0], [0, 4, 0]])
    lg2 = logits_map([[0, 0, 0], [5, 0, 0], [0, 4, 0], [0, 0, 4]])

    def moved(use_kl: bool, top_k: int = 2) -> tuple[list[float], list[float]]:
        out = abd_mod.displace(conf1, conf2, img1, img2, lg1, lg2, 2, top_k, torch.tensor([use_kl]))
        p = abd_mod.to_patches(out, 2)[:, 0, :, 0]  # the value of each patch
        return p[0].tolist(), p[1].tolist()

    # plain: view 1's least confident patch (1) <- view 2's most confident (1), then view 2's least confident
    # (2) <- view 1's most confident (0)
    assert moved(False) == ([10, 21, 12, 13], [20, 21, 10, 23])
    # KL: among each view's top-2, the patch whose mean prediction is closest to the patch it replaces (3 and 3)
    assert moved(True) == ([10, 23, 12, 13], [20, 21, 13, 23])
    # top_k = every patch, and view 1's least confident patch (1) predicts like view 2's (2): view 1 takes view 2's
    # patch 2; view 1's choice for view 2 is then its own patch 1, which the official in-place code has already
    # replaced, so view 2's patch 2 gets itself back
    lg1b = logits_map([[5, 0, 0], [0, 4, 0], [0, 0, 0], [0, 0, 4]])
    out = abd_mod.displace(conf1, conf2, img1, img2, lg1b, lg2, 2, 4, torch.tensor([True]))
    p = abd_mod.to_patches(out, 2)[:, 0, :, 0]
    assert p[0].tolist() == [10, 22, 12, 13] and p[1].tolist() == [20, 21, 22, 23]


def test_displacement_equals_the_official_function():
    torch.manual_seed(0)
    n, k, size, patch = 6, 4, 16, 4
    out_1, out_2 = torch.randn(n, k, size, size), torch.randn(n, k, size, size)
    max_1, max_2 = out_1.softmax(1).max(1)[0], out_2.softmax(1).max(1)[0]
    in_1, in_2 = torch.randn(n, 1, size, size), torch.randn(n, 1, size, size)
    draws = [0.1, 0.7, 0.3, 0.9, 0.45, 0.55]
    args = SimpleNamespace(patch_size=patch, h_size=size // patch, w_size=size // patch, top_num=4, labeled_bs=n)
    expected = official_abd_r_bcp(max_1, max_2, in_1.clone(), in_2.clone(), out_1, out_2, args, draws)
    got = abd_mod.displace(max_1, max_2, in_1, in_2, out_1, out_2, size // patch, 4, torch.tensor(draws) < 0.5)
    assert torch.equal(got[:, 0], expected)
    assert not torch.equal(got[:n], in_1)  # something moved, and the inputs were not touched
    # patches round-trip in 2D and 3D
    for shape in [(2, 3, 8, 12), (2, 1, 8, 4, 12)]:
        t = torch.randn(shape)
        assert torch.equal(abd_mod.from_patches(abd_mod.to_patches(t, 4), shape[2:], 4), t)


# -- the strong view ----------------------------------------------------------------------------------------------
def test_strong_view_jitter_and_cutout():
    from torchvision.transforms import functional as TF

    torch.manual_seed(0)
    img = torch.rand(1, 12, 10)
    for first in (True, False):
        b_then_c = TF.adjust_contrast(TF.adjust_brightness(img, 1.6), 0.3)
        c_then_b = TF.adjust_brightness(TF.adjust_contrast(img, 0.3), 1.6)
        got = abd_mod.jitter_grey(img, 1.6, 0.3, first)
        torch.testing.assert_close(got, b_then_c if first else c_then_b)
    # cutout only (no jitter): a box of 0/1 pixels covering 2-40 % of the image, its labels set to background
    x = torch.full((64, 1, 48, 48), 0.5)
    y = torch.full((64, 48, 48), 2)
    xs, ys = abd_mod.strong_view(x, y, cutout_p=0.5, jitter=0.0)
    changed = xs[:, 0] != 0.5
    assert torch.equal(changed, ys == 0)
    assert set(xs[:, 0][changed].unique().tolist()) <= {0.0, 1.0}
    hit = changed.flatten(1).any(1)
    assert 16 < int(hit.sum()) < 48  # p = 0.5
    area = changed.flatten(1).float().sum(1)[hit] / 48**2  # U(0.02, 0.4) of the image, sides floored
    assert float(area.min()) >= 0.01 and float(area.max()) <= 0.4
    # jitter only: brightness and contrast factors within [0.2, 1.8], images stay in [0, 1]
    xs, ys2 = abd_mod.strong_view(torch.rand(32, 1, 8, 8), None, cutout_p=0.0, jitter=0.8)
    assert ys2 is None and float(xs.min()) >= 0 and float(xs.max()) <= 1
    # 3D without the clamp: z-scored volumes keep their range
    v = torch.randn(2, 1, 8, 8, 8) * 3
    vs, _ = abd_mod.strong_view(v, None, cutout_p=0.0, jitter=0.8, clamp=False)
    assert float(vs.abs().max()) > 1.5


# -- the loss -----------------------------------------------------------------------------------------------------
def test_selftrain_loss_equals_the_official_formula_written_out():
    """train_ACDC_BCP.py ``self_train``, labeled_bs 4 (2 + 2), 4 unlabeled (2 + 2), 4 classes, 16 x 16 images with
    4 x 4 patches (grid 4), top_num 4; 1x1 convolutions as the two students and the EMA teacher."""
    torch.manual_seed(0)
    model, model2, teacher = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1)
    x, u = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    y = torch.randint(0, 4, (4, 16, 16))
    algo = ABD()
    algo.setup(num_classes=4, dim=2)
    ctx = StepContext(iteration=50, total_iterations=100, stage="selftrain", teacher=teacher,
                      networks={"model": model, "model2": model2, "teacher": teacher})
    torch.manual_seed(7)
    r = algo.step(model, {"x": x, "y": y, "u_w": u}, ctx)

    # the step's random draws, in its order: strong views (labeled, then unlabeled), the BCP box, the KL choices
    torch.manual_seed(7)
    xs, ys = abd_mod.strong_view(x, y)
    us, _ = abd_mod.strong_view(u, None)
    img_mask = bcp_mask((16, 16)).long()
    draws = torch.rand(4)
    loss_mask = img_mask.expand(2, 16, 16)

    dice_loss = OfficialDiceLoss(4)
    args = SimpleNamespace(patch_size=4, h_size=4, w_size=4, top_num=4, labeled_bs=4, u_weight=0.5)
    img_a, img_b, uimg_a, uimg_b = x[:2], x[2:], u[:2], u[2:]
    lab_a, lab_b = y[:2], y[2:]
    img_a_s, img_b_s, uimg_a_s, uimg_b_s = xs[:2], xs[2:], us[:2], us[2:]
    lab_a_s, lab_b_s = ys[:2], ys[2:]
    with torch.no_grad():
        plab_a, plab_b = official_masks(teacher(uimg_a)), official_masks(teacher(uimg_b))
        plab_a_s, plab_b_s = official_masks(teacher(uimg_a_s)), official_masks(teacher(uimg_b_s))
    net_input_unl_1 = uimg_a * img_mask + img_a * (1 - img_mask)
    net_input_l_1 = img_b * img_mask + uimg_b * (1 - img_mask)
    net_input_1 = torch.cat([net_input_unl_1, net_input_l_1], dim=0)
    net_input_unl_2 = uimg_a_s * img_mask + img_a_s * (1 - img_mask)
    net_input_l_2 = img_b_s * img_mask + uimg_b_s * (1 - img_mask)
    net_input_2 = torch.cat([net_input_unl_2, net_input_l_2], dim=0)
    out_unl_1, out_l_1 = model(net_input_unl_1), model(net_input_l_1)
    out_1 = torch.cat([out_unl_1, out_l_1], dim=0)
    out_soft_1 = torch.softmax(out_1, dim=1)
    out_max_1 = torch.max(out_soft_1.detach(), dim=1)[0]
    out_pseudo_1 = torch.argmax(out_soft_1.detach(), dim=1, keepdim=False)
    unl_dice_1, unl_ce_1 = official_mix_loss(dice_loss, out_unl_1, plab_a, lab_a, loss_mask, u_weight=0.5, unlab=True)
    l_dice_1, l_ce_1 = official_mix_loss(dice_loss, out_l_1, lab_b, plab_b, loss_mask, u_weight=0.5)
    out_unl_2, out_l_2 = model2(net_input_unl_2), model2(net_input_l_2)
    out_2 = torch.cat([out_unl_2, out_l_2], dim=0)
    out_soft_2 = torch.softmax(out_2, dim=1)
    out_max_2 = torch.max(out_soft_2.detach(), dim=1)[0]
    out_pseudo_2 = torch.argmax(out_soft_2.detach(), dim=1, keepdim=False)
    unl_dice_2, unl_ce_2 = official_mix_loss(dice_loss, out_unl_2, plab_a_s, lab_a_s, loss_mask, u_weight=0.5,
                                             unlab=True)
    l_dice_2, l_ce_2 = official_mix_loss(dice_loss, out_l_2, lab_b_s, plab_b_s, loss_mask, u_weight=0.5)
    pseudo_supervision1 = dice_loss(out_soft_1, out_pseudo_2.unsqueeze(1))
    pseudo_supervision2 = dice_loss(out_soft_2, out_pseudo_1.unsqueeze(1))
    image_patch_last = official_abd_r_bcp(out_max_1, out_max_2, net_input_1, net_input_2, out_1, out_2, args,
                                          draws.tolist())
    image_output_soft_1 = torch.softmax(model(image_patch_last.unsqueeze(1)), dim=1)
    image_output_soft_2 = torch.softmax(model2(image_patch_last.unsqueeze(1)), dim=1)
    pseudo_supervision3 = dice_loss(image_output_soft_1, torch.argmax(image_output_soft_2.detach(), dim=1).unsqueeze(1))
    pseudo_supervision4 = dice_loss(image_output_soft_2, torch.argmax(image_output_soft_1.detach(), dim=1).unsqueeze(1))
    loss_1 = (unl_dice_1 + l_dice_1 + unl_ce_1 + l_ce_1) / 2 + pseudo_supervision1 + pseudo_supervision3
    loss_2 = (unl_dice_2 + l_dice_2 + unl_ce_2 + l_ce_2) / 2 + pseudo_supervision2 + pseudo_supervision4

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r.losses.values()), loss_1 + loss_2, **close)
    torch.testing.assert_close(r.losses["mix_in"] + r.losses["mix_out"],
                               (unl_dice_1 + l_dice_1 + unl_ce_1 + l_ce_1) / 2, **close)
    torch.testing.assert_close(r.losses["mix_in2"] + r.losses["mix_out2"],
                               (unl_dice_2 + l_dice_2 + unl_ce_2 + l_ce_2) / 2, **close)
    for name, value in (("cross1", pseudo_supervision1), ("cross2", pseudo_supervision2),
                        ("displace1", pseudo_supervision3), ("displace2", pseudo_supervision4)):
        torch.testing.assert_close(r.losses[name], value, **close)
    assert r.logs["kl_share"] == pytest.approx(float((draws < 0.5).float().mean()))
    # each cross term trains only its student (the other's argmax is a detached target)
    g = torch.autograd.grad(r.losses["cross1"] + r.losses["displace1"], [model.weight, model2.weight],
                            allow_unused=True)
    assert g[0].abs().sum() > 0 and (g[1] is None or g[1].abs().sum() == 0)
    assert set(r.pseudo_labels) == {"pseudo", "pseudo_strong", "cross"}

    # pre-training is BCP's on the ABD Dice (the background class unmasked)
    torch.manual_seed(3)
    pre = algo.step(model, {"x": x, "y": y}, StepContext(0, 100, stage="pretrain"))
    torch.manual_seed(3)
    mask = bcp_mask((16, 16)).long()
    d, c = official_mix_loss(dice_loss, model(img_a * mask + img_b * (1 - mask)), lab_a, lab_b,
                             mask.expand(2, 16, 16), u_weight=1.0, unlab=True)
    torch.testing.assert_close(pre.losses["mix"], (d + c) / 2, **close)
    # background_mask=True: every class restricted to its region (BCP's fixed DiceLoss)
    probs, target = out_soft_1[:2].detach(), y[:2]
    region = loss_mask.float()
    fixed = ABD(background_mask=True)
    expect = sum(dice_loss._dice_mask_loss(probs[:, i], (target == i).float(), region) for i in range(4)) / 4
    torch.testing.assert_close(fixed.dice(probs, target, region), expect)


def test_stage_start_copies_the_pretrained_model_into_both_students_and_the_teacher(tmp_path, monkeypatch):
    """At self-training's first step model2 and the teacher are the best pre-trained model, and model2's
    optimizer state is model's (the official code loads model_1's pre-training momentum into both optimizers)."""
    algo = ABD()
    algo.setup(num_classes=4, dim=2)
    assert list(algo.networks()) == ["model", "model2", "teacher"]
    assert (algo.networks()["teacher"].of, algo.networks()["teacher"].buffers) == ("model", True)
    stages = algo.stages(40000)
    assert [(s.name, s.iterations, s.start_from, s.fresh_optimizer, s.copy) for s in stages] == [
        ("pretrain", 10000, None, False, {}), ("selftrain", 30000, "best", False, {"model2": "model"})]

    seen = {}
    real = ABD.on_stage_start

    def spy(self, stage, model, ctx):
        real(self, stage, model, ctx)
        if stage.name == "selftrain":
            t = trainer
            groups = {g["network"]: g["params"] for g in t.optimizer.param_groups}
            def snap(net):  # copies: training goes on changing the live tensors
                return {k: v.clone() for k, v in net.state_dict().items()}

            seen["weights"] = [(snap(ctx.networks[n]), snap(model)) for n in ("model2", "teacher")]
            seen["momentum"] = [(t.optimizer.state[a]["momentum_buffer"].clone(),
                                 t.optimizer.state[b]["momentum_buffer"].clone())
                                for a, b in zip(groups["model"], groups["model2"])]

    monkeypatch.setattr(ABD, "on_stage_start", spy)
    trainer = Trainer(cfg(tmp_path, "copy", iterations=12, val_every=5, optimizer="sgd"), quiet=True)
    trainer.fit()
    for copied, source in seen["weights"]:
        assert all(torch.equal(copied[k], v) for k, v in source.items())
    assert seen["momentum"] and all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in seen["momentum"])


# -- training -----------------------------------------------------------------------------------------------------
def cfg(tmp_path: Path, name: str = "abd", **kw) -> TrainConfig:
    base = dict(algo="abd", algo_options={"pretrain_iterations": 10}, backbone="unet",
                backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 2, "n_train": 24, "n_val": 2, "size": [32, 32], "num_classes": 2},
                patch_size=[32, 32], labeled=8, iterations=40, batch_size=4, optimizer="adamw", lr=0.01,
                schedule="constant", val_every=10, log_every=1, out=str(tmp_path / name), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_in_both_stages(tmp_path):
    c = cfg(tmp_path, diagnostics=True)
    t = Trainer(c, quiet=True)
    assert [g["network"] for g in t.optimizer.param_groups] == ["model", "model2"]
    s = t.fit()
    assert s["iteration"] == 40 and not s["interrupted"]
    rows = [json.loads(x) for x in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in steps)
    pre, self_ = [r["loss"] for r in steps[:10]], [r["loss"] for r in steps[10:]]
    assert all("mix" in r for r in steps[:10]) and all("displace2" in r for r in steps[10:])
    assert mean(pre[-3:]) < 0.8 * mean(pre[:3])
    assert mean(self_[-8:]) < 0.9 * mean(self_[:8])
    # the pseudo-labels are scored against the unlabeled images' true labels
    assert {f"diag/{n}/acc_kept" for n in ("pseudo", "pseudo_strong", "cross")} <= set(steps[-1])
    ck = ckpt_io.load(Path(c.out) / "checkpoints" / "last.pt")
    assert set(ck["networks"]) == {"model2", "teacher"} and ck["meta"]["eval_network"] == "model"


@pytest.mark.parametrize("stop", [6, 14])  # inside pre-training (resume crosses the stage change) or after it
def test_resume_restores_every_network_and_the_optimizer(tmp_path, monkeypatch, stop):
    kw = dict(algo_options={"pretrain_iterations": 8}, iterations=18, val_every=4, optimizer="sgd", lr=0.01)
    full, resumed = full_and_resumed(lambda name: cfg(tmp_path, name, **kw), stop, monkeypatch)
    assert resumed.iteration == 18
    assert_same_networks(full, resumed)  # model, model2, teacher and the momentum buffers


# -- options and recipe -------------------------------------------------------------------------------------------
def test_bad_options_are_refused():
    for kw, match in [({"grid": 0}, "grid=0"), ({"top_k": 0}, "top_k=0"), ({"kl_prob": 1.5}, "kl_prob=1.5"),
                      ({"cutout_p": -0.1}, "cutout_p"), ({"jitter": -1.0}, "jitter"),
                      ({"u_weight": -0.5}, "u_weight"), ({"cross_weight": -1.0}, "cross_weight"),
                      ({"displace_weight": -1.0}, "displace_weight"), ({"selftrain_from": "top"}, "top"),
                      ({"mask_ratio": 1.5}, "mask_ratio")]:
        with pytest.raises(ConfigError, match=match):
            ABD(**kw)
    with pytest.raises(ConfigError, match="top_k=20 exceeds the 16 patches"):
        ABD(top_k=20).setup(num_classes=4, dim=2)
    ABD(top_k=20).setup(num_classes=2, dim=3)  # 64 patches in 3D
    with pytest.raises(ConfigError, match="'grid' must be int"):
        registry.create_algorithm("abd", grid="4")
    with pytest.raises(ConfigError):
        registry.create_algorithm("abd", patch_size=64)
    algo = ABD(grid=3)
    algo.setup(num_classes=2, dim=2)
    batch = {"x": torch.rand(2, 1, 16, 16), "y": torch.zeros(2, 16, 16, dtype=torch.long)}
    with pytest.raises(ConfigError, match="divisible by grid=3"):
        algo.step(nn.Conv2d(1, 2, 1), batch, StepContext(0, 10, stage="pretrain"))


def test_official_recipe_is_2d_only():
    c = TrainConfig(algo="abd", recipe="official")
    applied = apply_recipe(c, SimpleNamespace(dim=2, unlabeled=[], labeled=[]), explicit=set())
    assert applied["source"] == "ABD code/train_ACDC_BCP.py"
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.schedule) == ("sgd", 0.01, 0.9, 1e-4, "constant")
    assert (c.iterations, c.batch_size, c.unlabeled_batch_size, c.val_every) == (40000, 12, 12, 200)
    assert c.algo_options == {"pretrain_iterations": 10000}
    assert ABD.official_recipe(3) is None
    with pytest.raises(ConfigError, match="no official 3D recipe"):
        apply_recipe(TrainConfig(algo="abd", recipe="official"), SimpleNamespace(dim=3), explicit=set())


def test_3d_step_runs():
    """No official 3D code: BCP's LA form, a grid of patches on every axis, the jitter without the clamp."""
    torch.manual_seed(0)
    algo = ABD()
    algo.setup(num_classes=2, dim=3)
    nets = {k: nn.Conv3d(1, 2, 1) for k in ("model", "model2", "teacher")}
    batch = {"x": torch.randn(2, 1, 8, 8, 8), "y": torch.randint(0, 2, (2, 8, 8, 8)),
             "u_w": torch.randn(2, 1, 8, 8, 8)}
    r = algo.step(nets["model"], batch, StepContext(5, 10, stage="selftrain", teacher=nets["teacher"],
                                                    networks=nets))
    assert all(torch.isfinite(v) for v in r.losses.values()) and len(r.losses) == 8
    assert algo.networks()["teacher"].buffers is False  # the LA form averages parameters only
