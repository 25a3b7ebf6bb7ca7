"""Entropy minimisation and ICT (SSL4MIS classics): the step against the official formulas written out by hand,
the mix factors, option checks, short training runs in 2D and 3D, and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# imported explicitly: importing a module registers its algorithm
from semiseg.algorithms import em as em_mod
from semiseg.algorithms import ict as ict_mod
from semiseg.algorithms.base import StepContext
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.registry import ALGORITHMS, create_algorithm
from tests.conftest import assert_same_networks, full_and_resumed


# -- the official formulas, written out ----------------------------------------------------------------------
def ssl4mis_dice(probs: torch.Tensor, label: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """SSL4MIS ``DiceLoss``: per class, 1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5) over the batch,
    averaged over ``classes`` (all of them in SSL4MIS; the foreground only for binary data here)."""
    terms = []
    for c in classes:
        p, t = probs[:, c], (label == c).float()
        terms.append(1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5))
    return sum(terms) / len(terms)


def ssl4mis_sup(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """0.5 * (Dice + CE), SSL4MIS's supervised loss; binary data use the foreground Dice (docs/algorithms.md)."""
    c = logits.shape[1]
    classes = [1] if c == 2 else list(range(c))
    return 0.5 * (ssl4mis_dice(logits.softmax(1), label, classes) + F.cross_entropy(logits, label))


def ramp(t: int) -> float:
    """0.1 * sigmoid_rampup(t // 150, 200), written out."""
    phase = 1.0 - min(t // 150, 200) / 200
    return 0.1 * math.exp(-5.0 * phase * phase)


def conv(dim: int, classes: int, seed: int) -> nn.Module:
    """A 1x1 convolution: a deterministic 'network' without BatchNorm or dropout."""
    torch.manual_seed(seed)
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(1, classes, 1)


class Recorder(nn.Module):
    """Wraps a network; records each call's input and whether it ran in train mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), self.training))
        return self.net(x)


def make_batch(dim: int, classes: int, n_lab: int = 2, n_unl: int = 4) -> dict[str, torch.Tensor]:
    spatial = (4, 4) if dim == 2 else (4, 4, 3)
    torch.manual_seed(1)
    return {"x": torch.randn(n_lab, 1, *spatial), "y": torch.randint(0, classes, (n_lab, *spatial)),
            "u_w": torch.randn(n_unl, 1, *spatial)}


CASES = [(2, 4), (3, 2)]  # ACDC-like 4 classes in 2D, binary in 3D


# -- entropy minimisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,classes", CASES)
@pytest.mark.parametrize("entropy_on", ["all", "unlabeled"])
def test_em_loss_equals_the_official_formula(dim, classes, entropy_on):
    net = conv(dim, classes, seed=0)
    batch = make_batch(dim, classes)
    algo = em_mod.EntropyMinimization(entropy_on=entropy_on)
    algo.setup(num_classes=classes, dim=dim)
    t = 450  # t // 150 = 3
    r = algo.step(net, batch, StepContext(iteration=t, total_iterations=30000))
    assert r.pseudo_labels == {}  # the entropy term has no target

    with torch.no_grad():
        out = net(torch.cat([batch["x"], batch["u_w"]]))
    soft = out.softmax(1)
    sup = ssl4mis_sup(out[:2], batch["y"])
    # losses.entropy_loss(outputs_soft, C): -sum_c p log(p + 1e-6) / log(C), mean over pixels; the official
    # scripts pass the whole batch (labeled images included)
    p = soft if entropy_on == "all" else soft[2:]
    ent = torch.mean(-torch.sum(p * torch.log(p + 1e-6), dim=1) / math.log(classes))
    w = ramp(t)
    assert w == pytest.approx(0.1 * math.exp(-5 * (1 - 3 / 200) ** 2))
    torch.testing.assert_close(r.losses["sup"].detach(), sup)
    torch.testing.assert_close(r.losses["entropy"].detach(), w * ent)
    torch.testing.assert_close(sum(r.losses.values()).detach(), sup + w * ent)
    assert r.logs["consistency_weight"] == pytest.approx(w)
    assert r.logs["loss/entropy"] == pytest.approx(float(ent), rel=1e-5)


def test_em_entropy_gradient_reaches_the_labeled_images_as_the_official_code():
    """With ``all`` the labeled images' predictions are sharpened too; with ``unlabeled`` only the entropy
    term of the unlabeled images acts (checked through the gradient w.r.t. the logits)."""
    logits = torch.randn(4, 3, 2, 2, requires_grad=True)
    em_mod.normalised_entropy(logits.softmax(1)).backward()
    assert logits.grad is not None and logits.grad[:2].abs().sum() > 0
    logits.grad = None
    em_mod.normalised_entropy(logits.softmax(1)[2:]).backward()
    assert logits.grad[:2].abs().sum() == 0
    # normalised: uniform predictions score (almost exactly) 1, one-hot ones 0
    assert float(em_mod.normalised_entropy(torch.full((1, 4, 2, 2), 0.25))) == pytest.approx(1.0, abs=1e-5)
    assert float(em_mod.normalised_entropy(F.one_hot(torch.zeros(1, 2, 2).long(), 4).movedim(-1, 1).float())) \
        == pytest.approx(0.0, abs=1e-5)


# -- ICT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,classes", CASES)
def test_ict_loss_equals_the_official_formula(dim, classes, monkeypatch):
    student = conv(dim, classes, seed=0)
    teacher = Recorder(conv(dim, classes, seed=1))
    teacher.eval()  # the step must run it in train mode, as the official code, and give the mode back
    lam = torch.tensor([0.25, 0.9], dtype=torch.float64)
    monkeypatch.setattr(ict_mod, "mix_factors", lambda n, alpha: lam[:n].clone())
    batch = make_batch(dim, classes)
    algo = ict_mod.ICT()
    algo.setup(num_classes=classes, dim=dim)
    t = 3000  # t // 150 = 20
    r = algo.step(student, batch, StepContext(iteration=t, total_iterations=30000, teacher=teacher))

    u = batch["u_w"]
    u0, u1 = u[:2], u[2:]
    f = lam.float().view(2, *([1] * (u.dim() - 1)))  # ict_mix_factors
    mixed = u0 * (1.0 - f) + u1 * f  # batch_ux_mixed
    with torch.no_grad():
        outputs = student(torch.cat([batch["x"], mixed]))
        soft = outputs.softmax(1)
        ema0 = teacher.net(u0).softmax(1)
        ema1 = teacher.net(u1).softmax(1)
    pred_mixed = ema0 * (1.0 - f) + ema1 * f  # batch_pred_mixed
    sup = ssl4mis_sup(outputs[:2], batch["y"])
    con = torch.mean((soft[2:] - pred_mixed) ** 2)
    w = ramp(t)
    torch.testing.assert_close(r.losses["sup"].detach(), sup)
    torch.testing.assert_close(r.losses["consistency"].detach(), w * con)
    torch.testing.assert_close(sum(r.losses.values()).detach(), sup + w * con)
    assert r.logs["ict_lambda"] == pytest.approx(float(lam.mean()))

    # the teacher: two passes, one per unmixed half, in train mode; its mode given back afterwards
    assert [c[0].shape[0] for c in teacher.calls] == [2, 2]
    assert torch.equal(teacher.calls[0][0], u0) and torch.equal(teacher.calls[1][0], u1)
    assert all(training for _, training in teacher.calls) and not teacher.training
    # diagnostics: the teacher's argmax on the unmixed halves, against u_w's true labels in u_w's order
    seen = r.pseudo_labels["consistency"]
    assert torch.equal(seen.label, torch.cat([ema0, ema1]).argmax(1)) and seen.keep is None
    truth = torch.randint(0, classes, seen.label.shape)
    assert torch.equal(seen.truth({"u_y": truth}), truth)


def test_ict_target_carries_no_gradient_and_the_student_does():
    student = conv(2, 3, seed=0)
    teacher = conv(2, 3, seed=1)
    batch = make_batch(2, 3)
    r = ict_mod.ICT(consistency_rampup=0.0).step(student, batch, StepContext(0, 10, teacher=teacher))
    sum(r.losses.values()).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_ict_mix_factors_are_beta_draws_from_torchs_generator():
    torch.manual_seed(3)
    a = ict_mod.mix_factors(4000, 0.2)
    torch.manual_seed(3)
    b = torch.distributions.Beta(torch.tensor(0.2, dtype=torch.float64),
                                 torch.tensor(0.2, dtype=torch.float64)).sample((4000,))
    assert a.shape == (4000,) and torch.equal(a, b)
    # Beta(0.2, 0.2): symmetric around 0.5, U-shaped (P(x < 0.1 or x > 0.9) ~ 0.62)
    assert float(a.mean()) == pytest.approx(0.5, abs=0.03)
    assert 0.55 < float(((a < 0.1) | (a > 0.9)).double().mean()) < 0.7
    # the step draws from the same generator: seeded, its lambda is the one mix_factors gives
    batch = make_batch(2, 3, n_unl=6)
    algo, student, teacher = ict_mod.ICT(), conv(2, 3, 0), conv(2, 3, 1)  # conv() seeds: build them first
    torch.manual_seed(7)
    r = algo.step(student, batch, StepContext(0, 10, teacher=teacher))
    torch.manual_seed(7)
    assert r.logs["ict_lambda"] == pytest.approx(float(ict_mod.mix_factors(3, 0.2).mean()))


def test_ict_refuses_an_odd_unlabeled_batch():
    batch = make_batch(2, 3, n_unl=3)
    with pytest.raises(ConfigError, match="--unlabeled-batch-size must be even \\(got 3\\)"):
        ict_mod.ICT().step(conv(2, 3, 0), batch, StepContext(0, 10, teacher=conv(2, 3, 1)))


# -- options, recipes, registration --------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: em_mod.EntropyMinimization(consistency=-0.1), "consistency"),
    (lambda: em_mod.EntropyMinimization(consistency_rampup=-1.0), "consistency_rampup"),
    (lambda: em_mod.EntropyMinimization(rampup_every=0), "rampup_every"),
    (lambda: em_mod.EntropyMinimization(entropy_on="labeled"), "entropy_on must be 'all'"),
    (lambda: ict_mod.ICT(consistency=-1.0), "consistency"),
    (lambda: ict_mod.ICT(rampup_every=0), "rampup_every"),
    (lambda: ict_mod.ICT(ict_alpha=0.0), "ict_alpha"),
    (lambda: ict_mod.ICT(ict_alpha=-0.2), "ict_alpha"),
    (lambda: create_algorithm("ict", ict_alpha="0.2"), "'ict_alpha' must be float"),
    (lambda: create_algorithm("ict", alpha=0.2), "does not take option 'alpha'"),
    (lambda: create_algorithm("em", entropy="all"), "does not take option 'entropy'"),
])
def test_bad_options_are_refused_in_one_sentence(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_registered_with_the_official_recipe_and_ema():
    assert {"em", "ict"} <= set(ALGORITHMS.names())
    assert em_mod.EntropyMinimization.ema is None
    assert ict_mod.ICT.ema == {"decay": 0.99, "warmup": True, "buffers": False}
    for cls, script in ((em_mod.EntropyMinimization, "train_entropy_minimization"),
                        (ict_mod.ICT, "train_interpolation_consistency_training")):
        assert cls.needs == ("labeled", "unlabeled")
        for dim, batch in ((2, 12), (3, 2)):
            r = cls.official_recipe(dim)
            assert r.source == f"SSL4MIS code/{script}_{dim}D.py"
            s = r.settings
            assert (s["optimizer"], s["lr"], s["momentum"], s["weight_decay"], s["nesterov"]) == \
                ("sgd", 0.01, 0.9, 1e-4, False)
            assert (s["schedule"], s["iterations"], s["batch_size"], s["unlabeled_batch_size"]) == \
                ("poly", 30000, batch, batch)
        # 0.1 * sigmoid_rampup(t // 150, 200) in 2D and 3D alike
        a = cls()
        for dim in (2, 3):
            a.setup(num_classes=2, dim=dim)
            assert a.consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))
            assert a.consistency_weight(149 + 150 * 100) == pytest.approx(0.1 * math.exp(-5 * 0.25))
            assert a.consistency_weight(30000) == pytest.approx(0.1)


# -- training runs -------------------------------------------------------------------------------------------
def cfg2d(tmp_path: Path, algo: str, **kw) -> TrainConfig:
    base = dict(algo=algo, backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 2, "n_train": 24, "n_val": 2, "size": [32, 32], "num_classes": 2},
                patch_size=[32, 32], labeled=8, iterations=30, batch_size=4, optimizer="adamw", lr=0.01,
                val_every=30, log_every=1, out=str(tmp_path / algo), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def logged(cfg: TrainConfig) -> list[dict]:
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algo,term", [("em", "entropy"), ("ict", "consistency")])
def test_trains_2d_and_lowers_its_loss(tmp_path, algo, term):
    """30 AdamW steps on binary 32x32 phantoms with the unsupervised term at its full weight from the first
    step (consistency_rampup=0; the official ramp would leave it at 0.1 exp(-5) ~ 7e-4 this early)."""
    cfg = cfg2d(tmp_path, algo, algo_options={"consistency_rampup": 0.0}, diagnostics=True)
    s = Trainer(cfg, quiet=True).fit()
    assert s["iteration"] == 30 and not s["interrupted"]
    rows = logged(cfg)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5])
    assert all(r["consistency_weight"] == pytest.approx(0.1) for r in rows)
    assert rows[-1][term] > 0  # the unsupervised term is live
    diag = [k for k in rows[-1] if k.startswith("diag/")]
    if algo == "ict":  # pseudo-label diagnostics of the teacher on the unmixed halves
        assert 0.5 < rows[-1]["diag/consistency/acc_all"] <= 1.0
    else:
        assert diag == []  # entropy minimisation trains towards no target


@pytest.mark.parametrize("algo", ["em", "ict"])
def test_3d_runs_finish(tmp_path, algo):
    """V-Net, 2 + 2 volumes as the official 3D recipe: ICT's teacher then sees one volume per pass, so the patch
    must leave the bottleneck more than one voxel for train-mode BatchNorm (32x32x16 -> 2x2x1)."""
    cfg = TrainConfig(algo=algo, backbone="vnet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 3, "n_train": 6, "n_val": 1, "num_classes": 2, "size": [32, 32, 16]},
                      patch_size=[32, 32, 16], labeled=2, iterations=2, batch_size=2, val_every=2, log_every=1,
                      out=str(tmp_path / f"{algo}3d"), seed=0)
    s = Trainer(cfg, quiet=True).fit()
    assert s["iteration"] == 2
    assert all(math.isfinite(r["loss"]) for r in logged(cfg))


@pytest.mark.parametrize("algo", ["em", "ict"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, algo):
    """6 steps, interrupted before step 4 and resumed, leave the model (and ICT's teacher, BatchNorm buffers
    included) exactly as an uninterrupted run does: ICT's mix factors come from torch's restored generator."""
    kw = dict(iterations=6, val_every=100, batch_size=2, labeled=4,
              data_options={"dim": 2, "n_train": 12, "n_val": 1, "size": [32, 32], "num_classes": 2})
    full, resumed = full_and_resumed(lambda name: cfg2d(tmp_path, algo, out=str(tmp_path / name), **kw), 3,
                                     monkeypatch)
    assert resumed.iteration == 6
    assert_same_networks(full, resumed)  # the model, and ICT's teacher with its BatchNorm buffers
    assert (full.teacher is None) == (algo == "em")
    # the logged losses of the resumed steps are those of the uninterrupted run
    tail = [r["loss"] for r in logged(full.cfg)][3:]
    assert [r["loss"] for r in logged(resumed.cfg)][-3:] == tail
