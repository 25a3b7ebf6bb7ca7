"""The stream-graph executor and the loss formulas of FixMatch, UniMatch and CrossMatch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.algorithms.base import StepContext
from semiseg.algorithms.crossmatch import CrossMatch
from semiseg.algorithms.fixmatch import FixMatch
from semiseg.algorithms.graph import Edge, GraphAlgorithm, Stream
from semiseg.algorithms.losses import dice_loss
from semiseg.algorithms.unimatch import UniMatch
from semiseg.backbones.base import SegBackbone
from semiseg.errors import ConfigError
from semiseg.registry import create_algorithm, load_plugin
from tests.conftest import REPO_ROOT


class TinyNet(SegBackbone):
    """Two-level encoder/decoder without dropout, so eval-mode outputs are deterministic."""

    def __init__(self, c_in: int = 1, n: int = 4) -> None:
        super().__init__()
        self.num_classes = n
        self.e1 = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.e2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(24, n, 1)

    def encode(self, x):
        a = self.e1(x)
        return [a, self.e2(a)]

    def decode(self, f):
        return self.head(torch.cat([f[0], self.up(f[1])], 1))


def make_batch(b: int = 2, s: int = 16, c: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(b, 1, s, s, generator=g) for k in
             ("x", "u_w", "u_s1", "u_s2", "u_w_mix", "u_s1_mix", "u_s2_mix")}
    batch["y"] = torch.randint(0, c, (b, s, s), generator=g)
    for k in ("box1", "box2"):
        box = torch.zeros(b, s, s, dtype=torch.uint8)
        box[:, 2:9, 4:12] = 1
        box[0] = 0  # one sample without a box, as with CutMix p = 0.5
        batch[k] = box
    return batch


def ctx(it: int = 5) -> StepContext:
    return StepContext(iteration=it, total_iterations=100)


# -- hand-written reference losses (independent of semiseg.algorithms.losses) ---------------------------------
def hand_dice(logits, target, conf=None, tau=None, classes=range(4)):
    """UM-med DiceLoss: per class 1 - (2 sum(p y) + s)/(sum p^2 + sum y^2 + s) over non-ignored pixels."""
    p = logits.softmax(1)
    keep = torch.ones_like(target, dtype=torch.bool) if tau is None else conf >= tau
    total = 0.0
    for c in classes:
        pc, yc = p[:, c][keep], (target == c).float()[keep]
        total = total + 1 - (2 * (pc * yc).sum() + 1e-5) / ((pc * pc).sum() + (yc * yc).sum() + 1e-5)
    return total / len(classes)


def hand_sup(logits, y):
    return (F.cross_entropy(logits, y) + hand_dice(logits, y)) / 2


def teacher(logits):
    conf, lab = logits.softmax(1).max(1)
    return lab, conf


def mixed(t, tm, box):
    return torch.where(box.bool(), tm[0], t[0]), torch.where(box.bool(), tm[1], t[1])


def random_logits(names, b=2, c=4, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    # scaled so that some pixels pass a 0.95 threshold and some do not
    return {n: 4 * torch.randn(b, c, s, s, generator=g) for n in names}


def test_dice_loss_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.randint(0, 4, (3, 8, 8), generator=g)
    ign = torch.rand(3, 8, 8, generator=g) > 0.5
    conf = (~ign).float()
    ours = dice_loss(logits.softmax(1), y, ign)
    assert torch.allclose(ours, hand_dice(logits, y, conf, 0.5), atol=1e-6)
    # foreground-only (LA): class 1 of 2
    l2, y2 = torch.randn(2, 2, 6, 6, generator=g), torch.randint(0, 2, (2, 6, 6), generator=g)
    assert torch.allclose(dice_loss(l2.softmax(1), y2, classes="foreground"), hand_dice(l2, y2, classes=[1]),
                          atol=1e-6)


def test_dice_loss_perfect_prediction_is_zero():
    y = torch.tensor([[[0, 1], [2, 3]]])
    probs = F.one_hot(y, 4).movedim(-1, 1).float()
    assert dice_loss(probs, y).item() == pytest.approx(0.0, abs=1e-6)


def test_crossmatch_acdc_total_loss_equals_formula():
    algo = CrossMatch()
    algo.setup(num_classes=4, dim=2)
    batch = make_batch()
    L = random_logits([s.name for s in algo.streams])
    res = algo.edge_losses(L, batch, ctx())
    total = sum(res.losses.values())

    tau, eta = 0.95, 0.3
    tw, tmix = teacher(L["P_w"]), teacher(L["P_mix"])
    t1, t2 = mixed(tw, tmix, batch["box1"]), mixed(tw, tmix, batch["box2"])
    ta_w = mixed(teacher(L["P_w_w"]), teacher(L["P_mix_w"]), batch["box2"])
    ta_s = mixed(teacher(L["P_w_s"]), teacher(L["P_mix_s"]), batch["box2"])

    def D(student, t):
        return hand_dice(L[student], t[0], t[1], tau)

    loss_x = hand_sup(L["P_x"], batch["y"])
    tkd = (D("P_w_w", tw) + D("P_w_s", tw) + D("P_s2_w", t2) + D("P_s2_s", t2)) / 4
    dkd = (D("P_s2_w", ta_w) + D("P_s2_s", ta_s)) / 2
    kd = (1 - eta) * tkd + eta * dkd
    expected = (loss_x + 0.25 * D("P_s1", t1) + 0.25 * D("P_s2", t2) + 0.5 * kd) / 2
    assert torch.allclose(total, expected, atol=1e-5)
    assert 0 < res.logs["mask/ip_s1"] < 1


def test_crossmatch_la_variant_weights_and_threshold_ramp():
    algo = CrossMatch()
    algo.setup(num_classes=2, dim=3)
    kd = {e.name: e.weight for e in algo.edges}
    assert kd["tkd_w_weak"] == pytest.approx(1.0 * 0.7 / 4 / 2)  # 0.0875 in the total
    assert kd["dkd_weak"] == pytest.approx(1.0 * 0.3 / 2 / 2)  # 0.075
    tau = algo.edges[1].threshold
    assert tau(ctx(0)) == pytest.approx(0.75)
    expected = (0.75 + 0.25 * math.exp(-5 * (1 - 1000 / 17000) ** 2)) * math.log(2)
    assert tau(ctx(1000)) == pytest.approx(expected)


def test_unimatch_total_loss_equals_formula():
    algo = UniMatch()
    algo.setup(num_classes=4, dim=2)
    batch = make_batch()
    L = random_logits([s.name for s in algo.streams], seed=3)
    total = sum(algo.edge_losses(L, batch, ctx()).losses.values())
    tw, tmix = teacher(L["P_w"]), teacher(L["P_mix"])
    t1, t2 = mixed(tw, tmix, batch["box1"]), mixed(tw, tmix, batch["box2"])
    expected = (hand_sup(L["P_x"], batch["y"]) + 0.25 * hand_dice(L["P_s1"], *t1, 0.95)
                + 0.25 * hand_dice(L["P_s2"], *t2, 0.95) + 0.5 * hand_dice(L["P_w_fp"], *tw, 0.95)) / 2
    assert torch.allclose(total, expected, atol=1e-5)


def test_fixmatch_total_loss_equals_formula():
    algo = FixMatch()
    algo.setup(num_classes=4, dim=2)
    batch = make_batch()
    L = random_logits([s.name for s in algo.streams], seed=4)
    total = sum(algo.edge_losses(L, batch, ctx()).losses.values())
    t1 = mixed(teacher(L["P_w"]), teacher(L["P_mix"]), batch["box1"])
    expected = (hand_sup(L["P_x"], batch["y"]) + hand_dice(L["P_s"], *t1, 0.95)) / 2
    assert torch.allclose(total, expected, atol=1e-5)


class CountingNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.calls = {"encode": 0, "decode": 0, "enc_images": 0, "dec_images": 0}

    def encode(self, x):
        self.calls["encode"] += 1
        self.calls["enc_images"] += x.shape[0]
        return super().encode(x)

    def decode(self, f):
        self.calls["decode"] += 1
        self.calls["dec_images"] += f[0].shape[0]
        return super().decode(f)


@pytest.mark.parametrize("algo_cls, enc, dec, enc_img, dec_img", [
    # CrossMatch: mix group (B enc, 3B dec), weak group (2B enc, 4B dec), strong group (2B enc, 4B dec)
    (CrossMatch, 3, 3, 5, 11),
    # UniMatch: mix (B, B), main (2B enc, 3B dec), strong (2B, 2B)
    (UniMatch, 3, 3, 5, 6),
    (FixMatch, 3, 3, 4, 4),
])
def test_executor_makes_the_planned_passes(algo_cls, enc, dec, enc_img, dec_img):
    algo = algo_cls()
    algo.setup(num_classes=4, dim=2)
    net = CountingNet()
    b = 2
    algo.step(net, make_batch(b), ctx())
    assert net.calls == {"encode": enc, "decode": dec, "enc_images": enc_img * b, "dec_images": dec_img * b}
    assert algo.last_plan["encoder_images"] == enc_img * b



@pytest.mark.parametrize("algo, enc_img, dec_img", [
    # benchmarks/results/acdc-cpu/plans/README.md's table: the four corners of the pass-plan ablation
    ("crossmatch", 5, 11), ("crossmatch-padded", 6, 12), ("crossmatch-split", 6, 11), ("crossmatch@official", 7, 13),
])
def test_the_pass_plan_ablation_makes_the_passes_its_table_states(clean_registry, algo, enc_img, dec_img):
    load_plugin(str(REPO_ROOT / "benchmarks/results/acdc-cpu/plans/ablation.py"))
    name, _, opt = algo.partition("@")
    a = create_algorithm(name, **({"plan": opt} if opt else {}))
    a.setup(num_classes=4, dim=2)
    net, b = CountingNet(), 2
    a.step(net, make_batch(b), ctx())
    assert (net.calls["enc_images"], net.calls["dec_images"]) == (enc_img * b, dec_img * b)
    # the losses are CrossMatch's whatever the plan: the same edges read the same streams
    assert [e.name for e in a.edges] == [e.name for e in CrossMatch().edges]

def minimum_passes(algo: GraphAlgorithm, b: int) -> tuple[int, int]:
    """The fewest encoder and decoder image-passes the losses allow: every stream an edge reads is a distinct
    prediction (a view under a perturbation) so it needs its own decoder pass over its B images; feature
    perturbations act after the encoder, so each distinct view (in each BatchNorm mode) needs only one encoder
    pass."""
    read = {n for e in algo.edges for n in (e.student, e.teacher, e.mix_teacher) if n not in (None, "y")}
    streams = [s for s in algo.streams if s.name in read]
    assert len(streams) == len(algo.streams), "a declared stream that no loss reads is a wasted pass"
    # perturbations draw fresh noise per stream, so only two clean streams of one view would be duplicates
    clean = [(s.view, s.train_mode) for s in streams if s.perturb == "none"]
    assert len(clean) == len(set(clean)), "two unperturbed streams of one view compute one prediction twice"
    return b * len({(s.view, s.train_mode) for s in streams}), b * len(streams)


@pytest.mark.parametrize("algo_cls", [CrossMatch, UniMatch, FixMatch])
def test_passes_equal_the_minimum_the_losses_need(algo_cls):
    """Issue: no redundant pass. The official CrossMatch spends 7B encoder / 13B decoder image-passes
    (an extra no-grad pass of the labeled batch whose output it never uses); the executor spends the minimum."""
    algo = algo_cls()
    algo.setup(num_classes=4, dim=2)
    net = CountingNet()
    b = 3
    algo.step(net, make_batch(b), ctx())
    assert (net.calls["enc_images"], net.calls["dec_images"]) == minimum_passes(algo, b)
    if algo_cls is CrossMatch:
        assert minimum_passes(algo, b) == (5 * b, 11 * b)


def test_batched_streams_equal_unbatched_with_same_masks():
    """Each stream run alone, drawing its dropout masks in the same order, gives the same logits."""
    algo = CrossMatch()
    algo.setup(num_classes=4, dim=2)
    net = TinyNet().eval()  # eval: BatchNorm uses running statistics, so batch composition cannot matter
    batch = make_batch()
    c = ctx()
    c.generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        batched = algo.run_streams(net, batch, c)
    views = algo.build_views(batch)
    from semiseg.algorithms.perturbations import parse_perturbation

    g = torch.Generator().manual_seed(123)
    for _, streams in algo.plan().items():
        for s in streams:  # the executor perturbs streams in declaration order within each group
            with torch.no_grad():
                f = net.encode(views[s.view])
                pert = parse_perturbation(s.perturb)
                single = net.decode(f if pert is None else pert(f, g))
            assert torch.allclose(batched[s.name], single, atol=1e-5), s.name


def test_unknown_stream_in_edge_is_a_clear_error():
    class Bad(GraphAlgorithm):
        name = "bad"

        def __init__(self):
            super().__init__()
            self.streams = [Stream("P_x", "x")]
            self.edges = [Edge("P_x", "P_nope", 1.0)]
            self.check_graph()

    with pytest.raises(ConfigError, match="unknown stream 'P_nope'"):
        Bad()


def test_bad_perturbation_spec():
    from semiseg.algorithms.perturbations import parse_perturbation

    with pytest.raises(ConfigError, match="rate"):
        parse_perturbation("drop:1.5")
    with pytest.raises(ConfigError, match="Unknown feature perturbation"):
        parse_perturbation("dorp:0.5")
