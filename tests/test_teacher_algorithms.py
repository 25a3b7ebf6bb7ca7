"""Mean Teacher, UA-MT and BCP: the formulas against hand-computed values, then short training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# imported explicitly: importing a module registers its algorithm
from semiseg.algorithms import bcp as bcp_mod
from semiseg.algorithms import meanteacher as mt_mod
from semiseg.algorithms import uamt as uamt_mod
from semiseg.algorithms.base import Stage, StepContext
from semiseg.algorithms.losses import masked_mse
from semiseg.engine.config import TrainConfig
from semiseg.engine.ema import EMATeacher
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.registry import create_backbone
from semiseg.schedules import sigmoid_rampup

LN2 = math.log(2)


# -- EMA teacher ---------------------------------------------------------------------------------------------
def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))


@pytest.mark.parametrize("buffers", [False, True])
def test_ema_update_matches_formula(buffers):
    """alpha = min(1 - 1/(t+1), 0.99) with warm-up: a copy at t=0, the mean at t=1, 0.99 from t=99 on."""
    torch.manual_seed(0)
    student = small_net()
    ema = EMATeacher(student, decay=0.99, warmup=True, buffers=buffers)
    for t, alpha in [(0, 0.0), (1, 0.5), (3, 0.75), (99, 0.99), (500, 0.99)]:
        before = {k: v.clone() for k, v in ema.model.state_dict().items()}
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student[1].running_mean.add_(1.0)
            student[1].num_batches_tracked.add_(1)
        assert ema.update(student, t) == pytest.approx(alpha)
        s = student.state_dict()
        for k, v in ema.model.state_dict().items():
            if k in dict(student.named_parameters()):
                torch.testing.assert_close(v, alpha * before[k] + (1 - alpha) * s[k])
            elif not buffers:
                assert torch.equal(v, before[k]), k  # params only: buffers untouched by the EMA
            elif v.dtype.is_floating_point:
                torch.testing.assert_close(v, alpha * before[k] + (1 - alpha) * s[k])
            else:
                assert torch.equal(v, s[k])  # integer buffers are copied
    # no warm-up (BCP): the decay from the first step
    ema = EMATeacher(student, decay=0.99, warmup=False)
    assert ema.update(student, 0) == 0.99


def test_algorithms_ask_for_the_official_ema():
    assert mt_mod.MeanTeacher().ema == {"decay": 0.99, "warmup": True, "buffers": False}
    assert uamt_mod.UAMT().ema == {"decay": 0.99, "warmup": True, "buffers": False}
    b = bcp_mod.BCP()
    b.setup(num_classes=4, dim=2)  # ACDC averages the whole state_dict
    assert b.ema == {"decay": 0.99, "warmup": False, "buffers": True}
    b.setup(num_classes=2, dim=3)  # LA: parameters only
    assert b.ema == {"decay": 0.99, "warmup": False, "buffers": False}


# -- Mean Teacher / UA-MT schedules --------------------------------------------------------------------------
def test_uamt_threshold_and_consistency_weight():
    a = uamt_mod.UAMT()
    a.setup(num_classes=2, dim=3)  # LA: 6000 iterations, ramp 40
    # thr(t) = (0.75 + 0.25 exp(-5 (1 - t/6000)^2)) ln 2
    assert a.threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2)
    assert a.threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * LN2)
    assert a.threshold(6000, 6000) == pytest.approx(LN2)
    # lambda(t) = 0.1 exp(-5 (1 - (t // 150) / 40)^2)
    assert a.consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert a.consistency_weight(150 * 20) == pytest.approx(0.1 * math.exp(-1.25))
    assert a.consistency_weight(150 * 20 + 149) == pytest.approx(0.1 * math.exp(-1.25))
    assert a.consistency_weight(6000) == pytest.approx(0.1)
    a.setup(num_classes=4, dim=2)  # ACDC: ramp 200 "epochs", 30000 iterations
    assert a.consistency_weight(150 * 20) == pytest.approx(0.1 * math.exp(-5 * 0.9**2))
    assert a.consistency_weight(30000) == pytest.approx(0.1)
    # plain MT 2D: SSL4MIS zeroes the term before iteration 1000; 3D does not
    m = mt_mod.MeanTeacher()
    m.setup(num_classes=4, dim=2)
    assert m.consistency_weight(999) == 0.0
    assert m.consistency_weight(1000) == pytest.approx(0.1 * sigmoid_rampup(6, 200))
    m.setup(num_classes=2, dim=3)
    assert m.consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))


def test_masked_mse_hand_case():
    # two pixels, two classes; only the first pixel is certain
    p_s = torch.tensor([[[[0.2, 0.9]], [[0.8, 0.1]]]])  # (1, 2, 1, 2)
    p_t = torch.tensor([[[[0.4, 0.6]], [[0.6, 0.4]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2), broadcast over the classes
    # pixel 0: (0.2-0.4)^2 + (0.8-0.6)^2 = 0.08; sum(M) = 1 voxel -> 0.08 / (2 * 1)
    assert float(masked_mse(p_s, p_t, mask)) == pytest.approx(0.04)
    # no mask: the plain mean over all 4 entries, (0.04 + 0.04 + 0.09 + 0.09) / 4
    assert float(masked_mse(p_s, p_t)) == pytest.approx(0.065)


class FixedLogits(nn.Module):
    """A 'network' whose prediction ignores its input (a batch-expanded constant)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return self.logits.expand(x.shape[0], *self.logits.shape[1:]).clone()


@pytest.mark.parametrize("dim", [2, 3])
def test_uamt_uncertainty_mask_shape_and_value(dim):
    spatial = (4, 4) if dim == 2 else (4, 4, 2)
    # left half certain (p = 0.99 / 0.01, entropy ~0.056), right half undecided (entropy ~ln 2)
    logits = torch.zeros(1, 2, *spatial)
    logits[:, 0, :2] = math.log(99.0)
    teacher = FixedLogits(logits)
    a = uamt_mod.UAMT()
    a.setup(num_classes=2, dim=dim)
    u = torch.randn(3, 1, *spatial)
    unc = a.uncertainty(teacher, u)
    assert unc.shape == (3, 1, *spatial)
    # T/2 = 4 passes over the unlabeled batch repeated twice, each with its own noise
    assert len(teacher.calls) == 4 and all(c.shape[0] == 6 for c in teacher.calls)
    assert not torch.equal(teacher.calls[0][:3] - u, teacher.calls[0][3:] - u)
    h = -(0.99 * math.log(0.99 + 1e-6) + 0.01 * math.log(0.01 + 1e-6))
    torch.testing.assert_close(unc[:, :, :2], torch.full_like(unc[:, :, :2], h))
    torch.testing.assert_close(unc[:, :, 2:], torch.full_like(unc[:, :, 2:], 2 * -0.5 * math.log(0.5 + 1e-6)))
    # the consistency keeps the certain half only; the mask counts voxels, broadcast over classes
    teacher.calls.clear()
    p_s = torch.full((3, 2, *spatial), 0.5)
    ctx = StepContext(iteration=0, total_iterations=100)
    loss, logs, target = a.consistency_loss(p_s, u, teacher, ctx)
    assert logs["mask_ratio"] == pytest.approx(0.5)
    assert target.keep.shape == (3, *spatial) and float(target.keep.float().mean()) == pytest.approx(0.5)
    assert logs["threshold"] == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2)
    # certain half: p_t = (0.99, 0.01) against 0.5: 2 * 0.49^2 per voxel / (2 per voxel)
    assert float(loss) == pytest.approx(0.49**2, rel=1e-5)
    assert len(teacher.calls) == 5  # ema_out plus 4 Monte-Carlo passes


def test_uamt_teacher_runs_in_train_mode_and_gets_its_mode_back():
    torch.manual_seed(0)
    student = create_backbone("unet", in_channels=1, num_classes=2, width=0.25)
    teacher = EMATeacher(student).model
    teacher.eval()
    bn = next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    a = uamt_mod.UAMT()
    a.setup(num_classes=2, dim=2)
    batch = {"x": torch.randn(2, 1, 32, 32), "y": torch.randint(0, 2, (2, 32, 32)),
             "u_w": torch.randn(2, 1, 32, 32)}
    r = a.step(student, batch, StepContext(iteration=5, total_iterations=10, teacher=teacher))
    assert set(r.losses) == {"sup", "consistency"} and 0.0 <= r.logs["mask_ratio"] <= 1.0
    assert not teacher.training and not bn.training  # mode restored
    assert not torch.equal(bn.running_mean, before)  # train-mode passes moved its BatchNorm statistics


# -- BCP -----------------------------------------------------------------------------------------------------
def test_bcp_stages_and_teacher_start():
    stages = bcp_mod.BCP().stages(100)
    assert [(s.name, s.iterations) for s in stages] == [("pretrain", 25), ("selftrain", 75)]
    assert [s.iterations for s in bcp_mod.BCP(pretrain_iterations=10).stages(100)] == [10, 90]
    assert [s.name for s in bcp_mod.BCP(pretrain_fraction=0.0).stages(100)] == ["selftrain"]
    with pytest.raises(ConfigError, match="iterations"):
        bcp_mod.BCP(pretrain_iterations=100).stages(100)
    student, teacher = small_net(), small_net()
    with torch.no_grad():
        student[1].running_var.fill_(3.0)
    bcp_mod.BCP().on_stage_start(Stage("selftrain", 10), student, StepContext(0, 10, teacher=teacher))
    for k, v in student.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k


def constant_batch(spatial: tuple[int, ...], classes: tuple[int, int] = (1, 2)) -> dict[str, torch.Tensor]:
    """l_a, l_b, u_a, u_b filled with 1, 2, 3, 4 (two images each); labels y_a, y_b constant."""
    def full(v: float, n: int = 2) -> torch.Tensor:
        return torch.full((n, 1, *spatial), v)

    return {"x": torch.cat([full(1), full(2)]), "u_w": torch.cat([full(3), full(4)]),
            "y": torch.cat([torch.full((2, *spatial), classes[0]), torch.full((2, *spatial), classes[1])])}


def box_of(mask: torch.Tensor) -> torch.Tensor:
    return mask == 0


@pytest.mark.parametrize("spatial", [(12, 9), (12, 9, 6)])
def test_bcp_mixed_images_and_targets_come_from_the_right_source(spatial, monkeypatch):
    torch.manual_seed(0)
    algo = bcp_mod.BCP()
    algo.setup(num_classes=5, dim=len(spatial))
    calls: list[tuple] = []
    real = algo.mix_loss

    def spy(logits, img_label, patch_label, mask, img_weight, patch_weight):
        calls.append((img_label.clone(), patch_label.clone(), mask.clone(), img_weight, patch_weight))
        return real(logits, img_label, patch_label, mask, img_weight, patch_weight)

    monkeypatch.setattr(algo, "mix_loss", spy)
    student = FixedLogits(torch.zeros(1, 5, *spatial))

    class ByValue(nn.Module):
        """Teacher: predicts class = the image's (constant) value, so u_a -> 3 and u_b -> 4."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.one_hot(x[:, 0].round().long(), 5).movedim(-1, 1).float() * 10

    batch = constant_batch(spatial)
    r = algo.step(student, batch, StepContext(5, 10, stage="selftrain", teacher=ByValue()))
    x_in, x_out = student.calls
    (in_img, in_patch, m, in_w_img, in_w_patch), (out_img, out_patch, m2, out_w_img, out_w_patch) = calls
    assert torch.equal(m, m2)
    box = box_of(m)
    # one box, int(2/3 size) along each axis, shared by the batch
    sizes = [int(s * 2 / 3 + 1e-9) for s in spatial]
    assert int(box.sum()) == math.prod(sizes)
    idx = box.nonzero()
    assert [int(idx[:, d].max() - idx[:, d].min() + 1) for d in range(len(spatial))] == sizes
    # X_in = u_a outside the box (3), l_a inside (1); X_out = l_b outside (2), u_b inside (4)
    assert torch.all(x_in[:, 0][:, ~box] == 3) and torch.all(x_in[:, 0][:, box] == 1)
    assert torch.all(x_out[:, 0][:, ~box] == 2) and torch.all(x_out[:, 0][:, box] == 4)
    # targets: X_in takes the pseudo-label of u_a (3) outside the box at weight 0.5, y_a (1) inside at 1
    assert torch.all(in_img == 3) and torch.all(in_patch == 1) and (in_w_img, in_w_patch) == (0.5, 1.0)
    # X_out takes y_b (2) outside at weight 1, the pseudo-label of u_b (4) inside at 0.5
    assert torch.all(out_img == 2) and torch.all(out_patch == 4) and (out_w_img, out_w_patch) == (1.0, 0.5)
    assert set(r.losses) == {"mix_in", "mix_out"}

    # pre-train: a (1) outside the box, b (2) pasted inside; labels y_a outside, y_b inside
    targets: list[torch.Tensor] = []
    real_dice = algo.dice
    monkeypatch.setattr(algo, "dice", lambda p, t, w=None: targets.append(t.clone()) or real_dice(p, t, w))
    student.calls.clear()
    calls.clear()
    algo.step(student, batch, StepContext(0, 10, stage="pretrain"))
    (x_mix,) = student.calls
    assert x_mix.shape[0] == 2
    if algo.form == "acdc":  # the region loss with weights 1 / 1
        img_l, patch_l, m, w_img, w_patch = calls[0]
        box = box_of(m)
        assert torch.all(img_l == 1) and torch.all(patch_l == 2) and (w_img, w_patch) == (1.0, 1.0)
    else:  # LA: plain (CE + Dice) / 2 over the mixed label
        (y_mix,) = targets
        box = x_mix[0, 0] == 2
        assert torch.all(y_mix[:, ~box] == 1) and torch.all(y_mix[:, box] == 2)
        assert int(box.sum()) == math.prod(sizes)
    assert torch.all(x_mix[:, 0][:, ~box] == 1) and torch.all(x_mix[:, 0][:, box] == 2)


def test_bcp_loss_equals_the_written_out_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    img_l = torch.randint(0, 3, (2, 4, 5))
    patch_l = torch.randint(0, 3, (2, 4, 5))
    mask = torch.ones(4, 5)
    mask[1:3, 1:4] = 0
    p = logits.softmax(1)
    m = mask.expand(2, 4, 5)
    pm = 1 - m

    def ce(label, region):
        logp = logits.log_softmax(1).gather(1, label.unsqueeze(1)).squeeze(1)
        return (-logp * region).sum() / (region.sum() + 1e-16)

    def acdc_dice(label, region):  # SSL4MIS DiceLoss with mask: batch sums, squared terms, s = 1e-10
        total = 0.0
        for c in range(3):
            y = (label == c).float()
            inter = (p[:, c] * y * region).sum()
            denom = (p[:, c] ** 2 * region).sum() + (y * y * region).sum()
            total += 1 - (2 * inter + 1e-10) / (denom + 1e-10)
        return total / 3

    def la_dice(label, region):  # BCP mask_DiceLoss: per sample and class, union = sum(p) + sum(y), s = 1e-5
        vals = []
        for n in range(2):
            for c in range(3):
                y = (label[n] == c).float()
                inter = (p[n, c] * y * region[n]).sum()
                union = ((p[n, c] + y) * region[n]).sum()
                vals.append((2 * inter + 1e-5) / (union + 1e-5))
        return 1 - sum(vals) / len(vals)

    for variant, dice in (("acdc", acdc_dice), ("la", la_dice)):
        algo = bcp_mod.BCP(variant=variant)
        algo.setup(num_classes=3, dim=2)
        d, c = algo.mix_loss(logits, img_l, patch_l, mask, 0.5, 1.0)
        torch.testing.assert_close(d, 0.5 * dice(img_l, m) + 1.0 * dice(patch_l, pm))
        torch.testing.assert_close(c, 0.5 * ce(img_l, m) + 1.0 * ce(patch_l, pm))

    # the self-training total is (sum Dice + sum CE) / 2 over both mixed images
    algo = bcp_mod.BCP(lcc=False)
    algo.setup(num_classes=3, dim=2)
    student = FixedLogits(logits[:1])
    teacher = FixedLogits(torch.randn(1, 3, 4, 5))
    batch = {"x": torch.randn(2, 1, 4, 5), "y": img_l, "u_w": torch.randn(2, 1, 4, 5)}
    torch.manual_seed(1)
    r = algo.step(student, batch, StepContext(1, 2, stage="selftrain", teacher=teacher))
    torch.manual_seed(1)
    mk = algo.mask(batch["x"])
    pl = teacher.logits.argmax(1)
    d_in, c_in = algo.mix_loss(logits[:1], pl, img_l[:1], mk, 0.5, 1.0)
    d_out, c_out = algo.mix_loss(logits[:1], img_l[1:], pl, mk, 1.0, 0.5)
    torch.testing.assert_close(sum(r.losses.values()), (d_in + d_out + c_in + c_out) / 2)


def test_bcp_odd_batch_is_a_config_error():
    algo = bcp_mod.BCP()
    batch = {"x": torch.randn(3, 1, 8, 8), "y": torch.zeros(3, 8, 8, dtype=torch.long)}
    with pytest.raises(ConfigError, match="--batch-size"):
        algo.step(nn.Identity(), batch, StepContext(0, 10, stage="pretrain"))
    batch = {"x": torch.randn(2, 1, 8, 8), "y": torch.zeros(2, 8, 8, dtype=torch.long),
             "u_w": torch.randn(3, 1, 8, 8)}
    with pytest.raises(ConfigError, match="--unlabeled-batch-size"):
        algo.step(nn.Identity(), batch, StepContext(5, 10, stage="selftrain", teacher=nn.Identity()))


def test_largest_connected_component_full_connectivity():
    lab = torch.zeros(1, 7, 7, dtype=torch.long)
    for i in range(5):
        lab[0, i, i] = 1  # a diagonal: one component of 5 with 8-connectivity (5 components with 4)
    lab[0, 5:7, 0:2] = 1  # a class-1 blob of 4: dropped
    lab[0, 0, 6] = 2  # a single class-2 pixel: the largest of its class, kept
    expect = torch.zeros_like(lab)
    for i in range(5):
        expect[0, i, i] = 1
    expect[0, 0, 6] = 2
    assert torch.equal(bcp_mod.largest_components(lab, 3), expect)
    vol = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    for i in range(4):
        vol[0, i, i, i] = 1  # corner-touching voxels: one 26-connected component of 4
    vol[0, 5, 5, 0:3] = 1  # a line of 3: dropped
    out = bcp_mod.largest_components(vol, 2)
    assert int(out.sum()) == 4 and int(out[0, 5, 5].sum()) == 0


# -- training runs -------------------------------------------------------------------------------------------
def cfg2d(tmp_path, algo: str, **kw) -> TrainConfig:
    base = dict(algo=algo, backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 2, "n_train": 24, "n_val": 4, "size": [64, 64]}, patch_size=[64, 64],
                labeled=8, iterations=30, batch_size=4, lr=0.05, val_every=30, log_every=1,
                out=str(tmp_path / algo), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def cfg3d(tmp_path, algo: str, **kw) -> TrainConfig:
    base = dict(algo=algo, backbone="vnet", backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 3, "n_train": 6, "n_val": 1, "num_classes": 2, "size": [32, 32, 32]},
                patch_size=[32, 32, 16], labeled=2, iterations=4, batch_size=2, val_every=4, log_every=1,
                out=str(tmp_path / f"{algo}3d"), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def logged(cfg: TrainConfig) -> list[dict]:
    """The training rows of metrics.jsonl (validation rows carry no loss)."""
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algo,opts", [("meanteacher", {"consistency_start": 0}), ("uamt", {})])
def test_mean_teachers_train_2d(tmp_path, algo, opts):
    """30 steps on 64x64 phantoms. The loss is L_sup plus a consistency term weighted <= 0.1 exp(-5) ~ 7e-4
    this early, so it falls like the supervised loss does (about 0.9 -> 0.35 over these steps); the mean of
    the last 5 logged losses must sit well below that of the first 5."""
    cfg = cfg2d(tmp_path, algo, algo_options=opts)
    s = Trainer(cfg, quiet=True).fit()
    assert s["iteration"] == 30 and not s["interrupted"]
    rows = logged(cfg)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5])
    assert rows[-1]["consistency"] > 0  # the consistency term is live
    if algo == "uamt":
        assert 0.0 < rows[-1]["mask_ratio"] <= 1.0
        assert rows[-1]["threshold"] == pytest.approx(LN2 * (0.75 + 0.25 * sigmoid_rampup(29, 30)))


def test_bcp_trains_2d(tmp_path):
    """15 pre-train + 45 self-train steps on binary 64x64 phantoms, constant lr. Compared within the
    self-train stage (its loss has four weighted terms, so it jumps up at the stage change). Binary: with 4
    classes on such small patches and a 15-step teacher, some classes are absent from a region and their Dice
    terms (s = 1e-10) sit at ~1 whatever the net does; with 2 classes every term carries signal and the
    student fits the nearly fixed pseudo-labels (the teacher moves by 1% a step)."""
    cfg = cfg2d(tmp_path, "bcp", algo_options={"pretrain_iterations": 15}, iterations=60, val_every=60,
                schedule="constant", optimizer="adamw", lr=0.01,
                data_options={"dim": 2, "n_train": 24, "n_val": 4, "size": [64, 64], "num_classes": 2})
    s = Trainer(cfg, quiet=True).fit()
    assert s["iteration"] == 60
    rows = logged(cfg)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all("mix" in r for r in rows[:15]) and all("mix_in" in r for r in rows[15:])
    self_losses = [r["loss"] for r in rows[15:]]
    # means over 10 steps: single steps swing by +-0.1 with the random paste box
    assert mean(self_losses[-10:]) < 0.95 * mean(self_losses[:10])


@pytest.mark.parametrize("algo,opts", [("meanteacher", {}), ("uamt", {}),
                                       ("bcp", {"pretrain_iterations": 2})])
def test_3d_runs_finish(tmp_path, algo, opts):
    cfg = cfg3d(tmp_path, algo, algo_options=opts)
    s = Trainer(cfg, quiet=True).fit()
    assert s["iteration"] == 4
    assert all(math.isfinite(r["loss"]) for r in logged(cfg))


@pytest.mark.parametrize("algo,opts", [("uamt", {}), ("bcp", {"pretrain_iterations": 2})])
def test_teacher_survives_resume(tmp_path, monkeypatch, algo, opts):
    """6 steps, interrupted before step 4 and resumed, leave the teacher (parameters and BatchNorm buffers)
    exactly as an uninterrupted run does. BCP is interrupted inside the self-train stage."""
    kw = dict(algo_options=opts, iterations=6, val_every=100, batch_size=2, patch_size=[32, 32],
              data_options={"dim": 2, "n_train": 12, "n_val": 1, "size": [32, 32]}, labeled=4)
    full = Trainer(cfg2d(tmp_path, algo, out=str(tmp_path / "full"), **kw), quiet=True)
    full.fit()

    part = Trainer(cfg2d(tmp_path, algo, out=str(tmp_path / "part"), **kw), quiet=True)
    real = part.train_step

    def stop_at_3(batch, it):
        if it == 3:
            raise KeyboardInterrupt
        return real(batch, it)

    monkeypatch.setattr(part, "train_step", stop_at_3)
    assert part.fit()["interrupted"]
    monkeypatch.setattr(part, "train_step", real)
    resumed = Trainer(cfg2d(tmp_path, algo, out=str(tmp_path / "part"), **kw), quiet=True)
    assert resumed.fit(resume=True)["iteration"] == 6
    t_full, t_res = full.teacher.model.state_dict(), resumed.teacher.model.state_dict()
    assert t_full.keys() == t_res.keys()
    for k in t_full:
        assert torch.equal(t_full[k], t_res[k]), k
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
