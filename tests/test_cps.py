"""Cross pseudo supervision with two networks, and the engine's several-networks support it runs on: the loss
equals SSL4MIS's formula, training lowers it, resume restores both networks and the optimizer exactly, each
network has its own initialisation, parameter group and checkpoint entry, and eval picks one or the ensemble."""

from __future__ import annotations

import json
import math
from statistics import mean

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.algorithms.base import Network, StepContext
from semiseg.algorithms.cps import CPS
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.networks import check_specs, initialise
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.evaluation.runs import evaluate_run, load_model
from semiseg.schedules import sigmoid_rampup
from tests.conftest import assert_same_networks, full_and_resumed


def cfg(tmp_path, name: str = "cps", **kw) -> TrainConfig:
    base = dict(algo="cps", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                data_options={"dim": 2, "n_train": 24, "n_val": 2, "size": [64, 64], "num_classes": 2},
                patch_size=[64, 64], labeled=8, iterations=40, batch_size=4, optimizer="adamw", lr=0.01,
                val_every=20, log_every=1, out=str(tmp_path / name), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def ssl4mis_dice(probs: torch.Tensor, target: torch.Tensor, n: int, smooth: float = 1e-5) -> torch.Tensor:
    """SSL4MIS ``losses.DiceLoss(n)(softmax, target)``: 1 - (2 I + s) / (Z + Y + s) per class, averaged."""
    total = 0.0
    for i in range(n):
        t = (target == i).float()
        score = probs[:, i]
        total = total + 1 - (2 * (score * t).sum() + smooth) / ((score * score).sum() + (t * t).sum() + smooth)
    return total / n


def test_loss_equals_the_official_formula_written_out():
    torch.manual_seed(0)
    net1, net2 = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1)  # forward-only networks, different weights
    x, u = torch.randn(2, 1, 6, 5), torch.randn(3, 1, 6, 5)
    y = torch.randint(0, 3, (2, 6, 5))
    algo = CPS()
    algo.setup(num_classes=3, dim=2)
    ctx = StepContext(iteration=3000, total_iterations=30000, networks={"model": net1, "model2": net2})
    r = algo.step(net1, {"x": x, "y": y, "u_w": u}, ctx)

    # train_cross_pseudo_supervision_2D.py, with labeled_bs = 2
    volume = torch.cat([x, u])
    o1, o2 = net1(volume), net2(volume)
    s1, s2 = o1.softmax(1), o2.softmax(1)
    w = 0.1 * sigmoid_rampup(3000 // 150, 200.0)
    loss1 = 0.5 * (F.cross_entropy(o1[:2], y) + ssl4mis_dice(s1[:2], y, 3))
    loss2 = 0.5 * (F.cross_entropy(o2[:2], y) + ssl4mis_dice(s2[:2], y, 3))
    ps1 = F.cross_entropy(o1[2:], s2[2:].detach().argmax(1))
    ps2 = F.cross_entropy(o2[2:], s1[2:].detach().argmax(1))
    expected = loss1 + w * ps1 + loss2 + w * ps2
    assert float(sum(r.losses.values()).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(r.losses["cps1"].detach()) == pytest.approx(float((w * ps1).detach()), rel=1e-5)
    assert r.logs["consistency_weight"] == pytest.approx(w)
    # the pseudo-labels are detached: model2's term moves only model2, model's only model
    g = torch.autograd.grad(r.losses["cps1"], [net1.weight, net2.weight], allow_unused=True)
    assert g[0] is not None and g[0].abs().sum() > 0 and (g[1] is None or g[1].abs().sum() == 0)


def test_two_networks_train_lower_the_loss_and_are_saved_apart(tmp_path):
    t = Trainer(cfg(tmp_path), quiet=True)
    assert set(t.networks.modules) == {"model", "model2"}
    # separately initialised, each its own optimizer parameter group
    assert not torch.equal(next(t.model.parameters()), next(t.networks.modules["model2"].parameters()))
    assert [g["network"] for g in t.optimizer.param_groups] == ["model", "model2"]
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "cps" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in steps)
    sup = [r["loss/sup1"] + r["loss/sup2"] for r in steps]
    assert mean(sup[-8:]) < 0.6 * mean(sup[:8])
    assert {"loss/cps1", "loss/cps2", "consistency_weight"} <= set(steps[-1])
    ck = ckpt_io.load(tmp_path / "cps" / "checkpoints" / "last.pt")
    assert set(ck["networks"]) == {"model2"} and ck["meta"]["eval_network"] == "model"
    assert {n: m["role"] for n, m in ck["meta"]["networks"].items()} == {"model": "trained", "model2": "trained"}
    for name, weights in (("model", ck["model"]), ("model2", ck["networks"]["model2"])):
        net = load_model(ck, torch.device("cpu"), name)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    # eval: model by default, the other network, or both averaged
    for net in (None, "model2", "model+model2"):
        s = evaluate_run(tmp_path / "cps", split="val", save_pred=None, montage=0, network=net)
        assert s["network"] == (net or "model") and 0.0 <= s["mean_dice"] <= 1.0
    with pytest.raises(ConfigError, match="names no network of this algorithm"):
        evaluate_run(tmp_path / "cps", split="val", save_pred=None, network="teacher")


def test_resume_restores_both_networks_and_the_optimizer(tmp_path, monkeypatch):
    full, resumed = full_and_resumed(lambda name: cfg(tmp_path, name, iterations=12, val_every=6), 8, monkeypatch)
    assert resumed.iteration == 12
    assert_same_networks(full, resumed)


def test_3d_networks_start_kaiming_and_xavier_and_the_bench_counts_both(tmp_path):
    algo = CPS()
    algo.setup(num_classes=2, dim=3)
    assert algo.networks() == {"model": Network(init="kaiming"), "model2": Network(init="xavier")}
    algo.setup(num_classes=2, dim=2)
    assert algo.networks() == {"model": Network(), "model2": Network()}
    conv = nn.Conv3d(8, 16, 3)
    initialise(conv, "kaiming")
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (8 * 27)), rel=0.1)
    initialise(conv, "xavier")
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (8 * 27 + 16 * 27)), rel=0.1)

    from semiseg.bench.timing import time_trainer

    t = Trainer(cfg(tmp_path, "time", iterations=1), quiet=True)
    one = sum(p.numel() for p in t.model.parameters())
    stats = time_trainer(t, warmup=0, iters=1)
    assert stats["params"] == 2 * one  # both trained networks count


def test_network_declarations_are_checked():
    with pytest.raises(ConfigError, match="trained network named 'model' first"):
        check_specs({"a": Network()}, "x")
    with pytest.raises(ConfigError, match="follows 'nope'"):
        check_specs({"model": Network(), "t": Network("ema", of="nope")}, "x")
    with pytest.raises(ConfigError, match="role 'teacher'"):
        check_specs({"model": Network(), "t": Network("teacher", of="model")}, "x")
    with pytest.raises(ConfigError, match="consistency"):
        CPS(consistency=-1)


def test_the_python_api_loads_either_network(tmp_path):
    import numpy as np

    import semiseg

    Trainer(cfg(tmp_path, "api", iterations=2, val_every=2), quiet=True).fit()
    image = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    for network in (None, "model2", "model+model2"):
        labels = semiseg.load(tmp_path / "api", network=network).predict(image)
        assert labels.shape == (64, 64) and set(np.unique(labels)) <= {0, 1}
    with pytest.raises(ConfigError, match="names no network"):
        semiseg.load(tmp_path / "api", network="teacher")
