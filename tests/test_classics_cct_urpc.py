"""CCT and URPC (SSL4MIS classics): the backbone options they need (aux decoders, a per-scale pyramid), their
losses against the official formulas written out by hand, short training runs, resume and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# imported explicitly: importing a module registers its algorithm
from semiseg.algorithms import cct as cct_mod
from semiseg.algorithms import urpc as urpc_mod
from semiseg.algorithms.base import StepContext
from semiseg.algorithms.perturbations import channel_dropout, elementwise_dropout
from semiseg.backbones.unet import unet
from semiseg.backbones.vnet import vnet
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.registry import create_backbone
from semiseg.schedules import sigmoid_rampup
from tests.conftest import assert_same_networks, full_and_resumed


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def built(seed: int, factory, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**kw)


# -- backbone options ----------------------------------------------------------------------------------------
BACKBONES = {
    "unet": (unet, dict(in_channels=1, num_classes=4, width=0.25), (2, 1, 32, 32)),
    "vnet": (vnet, dict(in_channels=1, num_classes=2, width=0.25), (1, 1, 32, 32, 16)),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_options_off_change_nothing_and_on_keep_the_main_path(name):
    """Off: the same parameters, keys and outputs as before. On: the main path's weights are drawn first (the same
    values under the same seed) and forward still returns the main logits only."""
    factory, kw, shape = BACKBONES[name]
    x = torch.randn(*shape)
    plain = built(0, factory, **kw).eval()
    off = built(0, factory, aux_decoders=0, deep_supervision=False, **kw).eval()
    on = built(0, factory, aux_decoders=2, deep_supervision=True, **kw).eval()
    ref = plain.state_dict()
    assert list(off.state_dict()) == list(ref)
    assert all(torch.equal(off.state_dict()[k], v) for k, v in ref.items())
    assert set(ref) < set(on.state_dict()) and all(torch.equal(on.state_dict()[k], v) for k, v in ref.items())
    with torch.no_grad():
        y = plain(x)
        assert torch.equal(off(x), y) and torch.equal(on(x), y)
        assert torch.equal(on.decode(on.encode(x)), y) and torch.equal(on.decode_pyramid(on.encode(x))[0], y)
    assert plain.describe()["aux_decoders"] == 0 and on.describe()["deep_supervision"] is True
    assert on.divisor == plain.divisor == 16


def test_option_off_parameter_counts_are_the_reference_ones():
    assert n_params(unet(in_channels=1, num_classes=4)) == 1_813_764
    assert n_params(vnet(in_channels=1, num_classes=2)) == 9_448_866


def test_head_names_follow_the_references():
    u = unet(width=0.25, aux_decoders=3, deep_supervision=True).state_dict()
    # UNet_CCT's aux_decoder1..3, UNet_URPC's decoder.out_conv_dp1..3 (its unused out_conv_dp4 is left out)
    assert {"aux_decoder1.up1.conv1x1.weight", "aux_decoder3.out_conv.weight", "decoder.out_conv_dp3.weight",
            "decoder.out_conv_dp1.bias"} <= set(u)
    assert "aux_decoder4.out_conv.weight" not in u and "decoder.out_conv_dp4.weight" not in u
    v = vnet(width=0.25, aux_decoders=1, deep_supervision=True).state_dict()
    # unet_3D_dv_semi's dsv4 / dsv3 / dsv2 (UnetDsv3: conv then upsample)
    assert {"dsv4.dsv.0.weight", "dsv2.dsv.0.bias", "aux_decoder1.block_five_up.conv.0.weight",
            "aux_decoder1.block_nine.conv.0.weight", "aux_decoder1.out_conv.weight"} <= set(v)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_aux_heads_and_pyramid_levels_have_the_input_size(name):
    factory, kw, shape = BACKBONES[name]
    m = built(0, factory, aux_decoders=3, deep_supervision=True, **kw)
    x = torch.randn(*shape)
    out_shape = (shape[0], kw["num_classes"], *shape[2:])
    m.train()
    feats = m.encode(x)
    heads = [m.decode(feats, head=k) for k in range(4)]
    pyramid = m.decode_pyramid(feats)
    assert all(h.shape == out_shape for h in heads) and len(pyramid) == 4
    assert all(p.shape == out_shape for p in pyramid)
    main_decoder = [p for n, p in m.named_parameters() if n.startswith(("decoder.up", "decoder.out_conv.",
                                                                         "block_five_up", "block_six", "block_seven",
                                                                         "block_eight", "block_nine", "out_conv"))]
    assert sum(p.numel() for p in m.aux_decoder1.parameters()) == sum(p.numel() for p in main_decoder)
    assert not torch.allclose(heads[0], heads[1])  # own weights
    # every parameter is reached: nothing unused for DDP when all heads are read
    (sum(h.sum() for h in heads) + sum(p.sum() for p in pyramid[1:])).backward()
    assert all(p.grad is not None for p in m.parameters())
    if name == "unet":  # 2D: nearest resizing, so the 1/8 head is constant on 8 x 8 blocks
        coarse = pyramid[3]
        assert torch.equal(coarse, coarse[..., ::8, ::8].repeat_interleave(8, -1).repeat_interleave(8, -2))
    with pytest.raises(ValueError, match="head=4"):
        m.decode(feats, head=4)
    plain = factory(**kw)
    with pytest.raises(ValueError, match="deep_supervision=True"):
        plain.decode_pyramid(plain.encode(x))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_pyramid_perturbations_on_the_heads_or_in_the_path(name):
    """``perturb`` acts on a level's head input only, or also on the decoder path (``in_path``)."""
    factory, kw, shape = BACKBONES[name]
    m = built(0, factory, deep_supervision=True, **kw).eval()
    x = torch.randn(*shape)
    zero = [None, None, lambda t: t * 0, None]  # wipes the 1/4 level
    with torch.no_grad():
        feats = m.encode(x)
        clean = m.decode_pyramid(feats)
        heads_only = m.decode_pyramid(feats, perturb=zero)
        in_path = m.decode_pyramid(feats, perturb=zero, in_path=True)
    for level in (0, 1, 3):
        assert torch.equal(heads_only[level], clean[level])
    assert not torch.equal(heads_only[2], clean[2])
    assert torch.equal(in_path[2], heads_only[2]) and torch.equal(in_path[3], clean[3])  # deeper: untouched
    assert not torch.allclose(in_path[0], clean[0]) and not torch.allclose(in_path[1], clean[1])


def test_backbone_option_refusals():
    with pytest.raises(ConfigError, match="aux_decoders=-1"):
        unet(aux_decoders=-1)
    with pytest.raises(ConfigError, match="deep_supervision"):
        vnet(deep_supervision="yes")
    with pytest.raises(ConfigError, match="aux_decoders"):
        create_backbone("vnet", aux_decoders=1.5)
    m = create_backbone("unet", width=0.25, aux_decoders=1)
    assert m.aux_decoders == 1


# -- perturbations -------------------------------------------------------------------------------------------
def test_feature_noise_is_uniform_and_shared_by_the_batch():
    """SSL4MIS FeatureNoise: f + f * n, n ~ U(-0.3, 0.3) of shape (C, H, W), one draw for the whole batch."""
    f = torch.rand(3, 4, 16, 16) + 0.5
    (out,) = cct_mod.feature_noise(0.3)([f], torch.Generator().manual_seed(0))
    n = (out - f) / f
    assert torch.allclose(n, n[:1].expand_as(n), atol=1e-6)
    assert float(n.abs().max()) <= 0.3 + 1e-6 and float(n.abs().max()) > 0.25
    assert abs(float(n.mean())) < 0.03 and float(n.var()) == pytest.approx(0.3**2 / 3, rel=0.15)


@pytest.mark.parametrize("spatial", [(8, 8), (4, 4, 4)])
def test_feature_dropout_matches_the_official_rule(spatial):
    """SSL4MIS FeatureDropout: attention = channel mean; drop where attention >= max * gamma, gamma ~ U(0.7, 0.9)
    per call, per-sample max; whole channel columns, no rescaling."""
    torch.manual_seed(0)
    f = torch.rand(2, 3, *spatial)
    g = torch.Generator().manual_seed(5)
    gamma = 0.7 + 0.2 * float(torch.rand((), generator=torch.Generator().manual_seed(5)))
    (out,) = cct_mod.feature_dropout(0.7, 0.9)([f], g)
    attention = f.mean(1, keepdim=True)
    peak = attention.flatten(1).max(1).values.view(-1, *(1,) * len(spatial) + (1,))
    expect = f * (attention < peak * gamma).float()
    torch.testing.assert_close(out, expect)
    assert 0.7 <= gamma <= 0.9 and bool((out == 0).any()) and bool((out == f).any())


# -- CCT -----------------------------------------------------------------------------------------------------
def ssl4mis_dice(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSL4MIS DiceLoss(C): per class over the whole batch, s = 1e-5, mean over the C classes."""
    c = probs.shape[1]
    total = 0.0
    for i in range(c):
        t = (y == i).float()
        inter = (probs[:, i] * t).sum()
        total = total + 1 - (2 * inter + 1e-5) / ((probs[:, i] ** 2).sum() + (t * t).sum() + 1e-5)
    return total / c


def official_cct(outs: list[torch.Tensor], y: torch.Tensor, lb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train_cross_consistency_training_2D.py, lines for supervised_loss and consistency_loss."""
    soft = [torch.softmax(o, dim=1) for o in outs]
    ce = [F.cross_entropy(o[:lb], y[:lb].long()) for o in outs]
    dice = [ssl4mis_dice(s[:lb], y[:lb]) for s in soft]
    supervised = (ce[0] + ce[1] + ce[2] + ce[3] + dice[0] + dice[1] + dice[2] + dice[3]) / 8
    c = [torch.mean((soft[0][lb:] - soft[k][lb:]) ** 2) for k in (1, 2, 3)]
    return supervised, (c[0] + c[1] + c[2]) / 3


def hand_logits(classes: int = 4, lb: int = 2, spatial: tuple[int, ...] = (6, 5)):
    torch.manual_seed(0)
    outs = [(torch.randn(2 * lb, classes, *spatial) * 2).requires_grad_() for _ in range(4)]
    y = torch.randint(0, classes, (lb, *spatial))
    return outs, y


def test_cct_loss_and_gradient_equal_the_official_formula():
    outs, y = hand_logits()
    algo = cct_mod.CCT()
    algo.setup(num_classes=4, dim=2)
    sup, con = algo.losses(outs, y)
    ref_sup, ref_con = official_cct(outs, y, lb=2)
    torch.testing.assert_close(sup, ref_sup)
    torch.testing.assert_close(con, ref_con)
    # the main softmax is not detached in the official code: the same gradient, main decoder included
    ours = torch.autograd.grad(sup + 0.1 * con, outs)
    ref = torch.autograd.grad(ref_sup + 0.1 * ref_con, outs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert float(torch.autograd.grad(algo.losses(outs, y)[1], outs[0])[0].abs().sum()) > 0
    detached = cct_mod.CCT(detach_main=True)
    detached.setup(num_classes=4, dim=2)
    con_detached = detached.losses(outs, y)[1]
    torch.testing.assert_close(con_detached, con)  # the same value, but no gradient into the main decoder
    assert torch.autograd.grad(con_detached, outs[0], allow_unused=True)[0] is None


def test_cct_step_wires_each_perturbation_to_its_decoder():
    torch.manual_seed(0)
    m = unet(num_classes=4, width=0.25, dropout=False, aux_decoders=3)
    algo = cct_mod.CCT()
    algo.setup(num_classes=4, dim=2)
    batch = {"x": torch.randn(2, 1, 32, 32), "y": torch.randint(0, 4, (2, 32, 32)),
             "u_w": torch.randn(2, 1, 32, 32)}
    ctx = StepContext(iteration=450, total_iterations=1000, generator=torch.Generator().manual_seed(3))
    r = algo.step(m, batch, ctx)
    # by hand: aux 1 FeatureNoise(0.3), aux 2 Dropout(0.3), aux 3 FeatureDropout, in this order of draws
    g = torch.Generator().manual_seed(3)
    feats = m.encode(torch.cat([batch["x"], batch["u_w"]]))
    outs = [m.decode(feats)]
    for k, fn in enumerate((cct_mod.feature_noise(0.3), elementwise_dropout(0.3), cct_mod.feature_dropout()), 1):
        outs.append(m.decode(fn(feats, g), head=k))
    sup, con = official_cct(outs, batch["y"], lb=2)
    w = 0.1 * sigmoid_rampup(3, 200)  # lambda(t) = 0.1 sigmoid_rampup(t // 150, 200)
    assert algo.consistency_weight(450) == pytest.approx(w)
    torch.testing.assert_close(r.losses["sup"], sup)
    torch.testing.assert_close(r.losses["consistency"], w * con)
    assert r.logs["consistency_weight"] == pytest.approx(w)
    pl = r.pseudo_labels["consistency"]
    assert torch.equal(pl.label, outs[0][2:].argmax(1)) and pl.keep is None
    assert torch.equal(pl.truth({"u_y": batch["y"]}), batch["y"])


# -- URPC ----------------------------------------------------------------------------------------------------
def official_urpc(outs: list[torch.Tensor], y: torch.Tensor, lb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train_uncertainty_rectified_pyramid_consistency_2D.py (the 3D script is the same with four dsv outputs)."""
    kl_distance = nn.KLDivLoss(reduction="none")
    soft = [torch.softmax(o, dim=1) for o in outs]
    ce = [F.cross_entropy(o[:lb], y[:lb].long()) for o in outs]
    dice = [ssl4mis_dice(s[:lb], y[:lb]) for s in soft]
    supervised = sum(ce + dice) / 8
    preds = (soft[0] + soft[1] + soft[2] + soft[3]) / 4
    terms = []
    for s in soft:
        variance = torch.sum(kl_distance(torch.log(s[lb:]), preds[lb:]), dim=1, keepdim=True)
        exp_variance = torch.exp(-variance)
        dist = (preds[lb:] - s[lb:]) ** 2
        terms.append(torch.mean(dist * exp_variance) / (torch.mean(exp_variance) + 1e-8) + torch.mean(variance))
    return supervised, (terms[0] + terms[1] + terms[2] + terms[3]) / 4


def test_urpc_loss_and_gradient_equal_the_official_formula():
    outs, y = hand_logits()
    algo = urpc_mod.URPC()
    algo.setup(num_classes=4, dim=2)
    sup, con, unc = algo.losses(outs, y)
    ref_sup, ref_con = official_urpc(outs, y, lb=2)
    torch.testing.assert_close(sup, ref_sup)
    torch.testing.assert_close(con, ref_con)
    assert float(unc) > 0
    # nothing detached: the mean prediction and the uncertainty carry gradient there too
    for a, b in zip(torch.autograd.grad(sup + 0.1 * con, outs), torch.autograd.grad(ref_sup + 0.1 * ref_con, outs)):
        torch.testing.assert_close(a, b)
    # a hand case: identical scales have zero uncertainty and zero consistency
    same = [torch.randn(2, 3, 4, 4)] * 4
    c, u = urpc_mod.rectified_consistency(same)
    assert float(c) == pytest.approx(0.0, abs=1e-7) and float(u) == pytest.approx(0.0, abs=1e-7)


def test_urpc_ramp_and_recipes():
    a = urpc_mod.URPC()
    a.setup(num_classes=4, dim=2)
    assert a.consistency_weight(150 * 50) == pytest.approx(0.1 * math.exp(-5 * 0.75**2))
    a.setup(num_classes=2, dim=3)  # the 3D script ramps over 400
    assert a.consistency_weight(150 * 100) == pytest.approx(0.1 * math.exp(-5 * 0.75**2))
    assert a.consistency_weight(60000) == pytest.approx(0.1)
    r2, r3 = urpc_mod.URPC.official_recipe(2).settings, urpc_mod.URPC.official_recipe(3).settings
    assert (r2["optimizer"], r2["lr"], r2["momentum"], r2["weight_decay"]) == ("sgd", 0.01, 0.9, 1e-4)
    assert (r2["schedule"], r2["iterations"], r2["batch_size"], r2["unlabeled_batch_size"]) == ("poly", 30000, 12, 12)
    assert (r3["lr"], r3["iterations"], r3["batch_size"], r3["unlabeled_batch_size"]) == (0.1, 60000, 2, 2)
    c2, c3 = cct_mod.CCT.official_recipe(2), cct_mod.CCT.official_recipe(3)
    assert (c2.settings["iterations"], c2.settings["batch_size"], c2.settings["lr"]) == (30000, 12, 0.01)
    assert "borrowed" in c3.source and c3.settings["batch_size"] == 2
    assert cct_mod.CCT.backbone_options == {"aux_decoders": 3}
    assert urpc_mod.URPC.backbone_options == {"deep_supervision": True}
    assert cct_mod.CCT.needs == urpc_mod.URPC.needs == ("labeled", "unlabeled")


@pytest.mark.parametrize("dim", [2, 3])
def test_urpc_step_perturbs_the_heads_in_2d_and_the_path_in_3d(dim, monkeypatch):
    torch.manual_seed(0)
    if dim == 2:
        m, spatial, c = unet(num_classes=4, width=0.25, dropout=False, deep_supervision=True), (32, 32), 4
    else:
        # 3 classes as the official 3D script (binary data would take the foreground Dice, as the LA codes do)
        m, spatial, c = vnet(num_classes=3, width=0.25, has_dropout=False, deep_supervision=True), (32, 32, 16), 3
    algo = urpc_mod.URPC()
    algo.setup(num_classes=c, dim=dim)
    batch = {"x": torch.randn(1, 1, *spatial), "y": torch.randint(0, c, (1, *spatial)),
             "u_w": torch.randn(1, 1, *spatial)}
    seen = {}
    real = m.decode_pyramid

    def spy(features, **kw):
        seen["features"], seen["kw"] = features, kw
        seen["outs"] = real(features, **kw)
        return seen["outs"]

    monkeypatch.setattr(m, "decode_pyramid", spy)
    r = algo.step(m, batch, StepContext(iteration=0, total_iterations=10))
    assert seen["kw"]["in_path"] is (dim == 3)
    perturb = seen["kw"]["perturb"]
    assert perturb[0] is None and all(callable(p) for p in perturb[1:])
    main_alone = m.decode(seen["features"])  # BatchNorm on batch statistics, no dropout: deterministic
    assert torch.equal(seen["outs"][0], main_alone) is (dim == 2)
    sup, con = official_urpc(seen["outs"], batch["y"], lb=1)
    torch.testing.assert_close(r.losses["sup"], sup)
    torch.testing.assert_close(r.losses["consistency"], algo.consistency_weight(0) * con)
    if dim == 3:  # unet_3D_dv_semi's Dropout3d rates 0.2, 0.3, 0.5 at 1/2, 1/4, 1/8: whole channels
        t = torch.ones(2, 50, 2, 2, 2)
        for level, p in ((1, 0.2), (2, 0.3), (3, 0.5)):
            torch.manual_seed(level)
            out = perturb[level](t)
            torch.manual_seed(level)
            torch.testing.assert_close(out, channel_dropout(p)([t])[0])


# -- refusals ------------------------------------------------------------------------------------------------
def test_missing_heads_and_bad_options_are_config_errors():
    batch = {"x": torch.randn(1, 1, 32, 32), "y": torch.zeros(1, 32, 32, dtype=torch.long),
             "u_w": torch.randn(1, 1, 32, 32)}
    ctx = StepContext(0, 10)
    plain = unet(width=0.25)
    with pytest.raises(ConfigError, match="aux_decoders=3"):
        cct_mod.CCT().step(plain, batch, ctx)
    with pytest.raises(ConfigError, match="aux_decoders=3"):
        cct_mod.CCT().step(unet(width=0.25, aux_decoders=2), batch, ctx)
    with pytest.raises(ConfigError, match="deep_supervision=true"):
        urpc_mod.URPC().step(plain, batch, ctx)
    for bad in (dict(dropout=1.0), dict(noise_range=-0.1), dict(drop_low=0.9, drop_high=0.8), dict(consistency=-1)):
        with pytest.raises(ConfigError, match="cct"):
            cct_mod.CCT(**bad)
    for bad in (dict(rampup_every=0), dict(consistency_rampup=-1.0)):
        with pytest.raises(ConfigError, match="urpc"):
            urpc_mod.URPC(**bad)


# -- training runs -------------------------------------------------------------------------------------------
def cfg(tmp_path: Path, algo: str, **kw) -> TrainConfig:
    # the algorithm's own backbone_options, given explicitly until the engine passes them by itself
    heads = {"cct": cct_mod.CCT, "urpc": urpc_mod.URPC}[algo].backbone_options
    base = dict(algo=algo, backbone="unet", backbone_options={"width": 0.25, **heads}, data="synthetic",
                data_options={"dim": 2, "n_train": 16, "n_val": 2, "size": [32, 32], "num_classes": 2},
                patch_size=[32, 32], labeled=4, iterations=20, batch_size=4, optimizer="adamw", lr=0.01,
                val_every=20, log_every=1, out=str(tmp_path / algo), seed=0,
                algo_options={"consistency_rampup": 0.0})  # lambda = 0.1 from the start: the term is live
    base.update(kw)
    return TrainConfig(**base)


def logged(c: TrainConfig) -> list[dict]:
    rows = [json.loads(x) for x in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algo", ["cct", "urpc"])
def test_training_lowers_the_loss(tmp_path, algo):
    """20 AdamW steps on binary 32x32 phantoms with the full consistency weight (0.1): observed 0.67 -> 0.23
    (CCT) and 0.53 -> 0.22 (URPC) between the means of the first and last 5 steps."""
    c = cfg(tmp_path, algo)
    s = Trainer(c, quiet=True).fit()
    assert s["iteration"] == 20 and not s["interrupted"]
    rows = logged(c)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5])
    assert rows[-1]["consistency"] > 0 and rows[-1]["consistency_weight"] == pytest.approx(0.1)


@pytest.mark.parametrize("algo", ["cct", "urpc"])
def test_3d_runs_finish_on_the_vnet(tmp_path, algo):
    heads = {"cct": cct_mod.CCT, "urpc": urpc_mod.URPC}[algo].backbone_options
    c = cfg(tmp_path, algo, backbone="vnet", backbone_options={"width": 0.25, **heads}, patch_size=[32, 32, 16],
            data_options={"dim": 3, "n_train": 4, "n_val": 1, "num_classes": 2, "size": [32, 32, 16]},
            labeled=2, iterations=2, batch_size=1, val_every=2, out=str(tmp_path / f"{algo}3d"))
    assert Trainer(c, quiet=True).fit()["iteration"] == 2
    assert all(math.isfinite(r["loss"]) for r in logged(c))


@pytest.mark.parametrize("algo", ["cct", "urpc"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, algo):
    """6 steps, interrupted before step 4 and resumed, end with the same weights (aux decoders and heads
    included) as an uninterrupted run: the perturbations draw from torch's RNG, which the checkpoint restores."""
    kw = dict(iterations=6, val_every=100, batch_size=2)
    full, resumed = full_and_resumed(lambda name: cfg(tmp_path, algo, out=str(tmp_path / name), **kw), 3,
                                     monkeypatch)
    assert resumed.iteration == 6
    assert_same_networks(full, resumed)
    assert any(k.startswith(("aux_decoder3.", "decoder.out_conv_dp")) for k in full.model.state_dict())
    assert [r["loss"] for r in logged(full.cfg)][-2:] == [r["loss"] for r in logged(resumed.cfg)][-2:]


def test_a_backbone_without_the_needed_heads_is_refused_in_one_sentence(tmp_path):
    from semiseg.engine.config import TrainConfig as Config

    for algo, backbone, option in (("cct", "smp", "aux_decoders"), ("urpc", "unet3d", "deep_supervision")):
        dim = 3 if backbone == "unet3d" else 2
        c = Config(algo=algo, backbone=backbone, data="synthetic", data_options={"dim": dim, "n_train": 4, "n_val": 1},
                   iterations=1, out=str(tmp_path / algo))
        with pytest.raises(ConfigError, match=f"needs the backbone option {option}, which backbone '{backbone}' does "
                                              f"not have; use --backbone unet or vnet"):
            Trainer(c, quiet=True)
