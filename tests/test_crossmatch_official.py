"""CrossMatch as the official code runs it: head dropout per stream (V-Net) and the official pass plan."""

from __future__ import annotations

import pytest
import torch

from semiseg import registry
from semiseg.algorithms.base import StepContext
from semiseg.algorithms.crossmatch import CrossMatch
from semiseg.algorithms.graph import GraphAlgorithm, Stream
from semiseg.errors import ConfigError


def vnet_batch(b: int = 2, s: tuple[int, int, int] = (16, 16, 16)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(b, 1, *s, generator=g) for k in
             ("x", "u_w", "u_s1", "u_s2", "u_w_mix", "u_s1_mix", "u_s2_mix")}
    batch["y"] = torch.randint(0, 2, (b, *s), generator=g)
    batch["box1"] = batch["box2"] = torch.zeros(b, *s, dtype=torch.uint8)
    return batch


def small_vnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.create_backbone("vnet", in_channels=1, num_classes=2, width=0.25).train()


def test_clean_teacher_has_no_head_dropout_but_the_mix_partner_has():
    """Two decodes of the same features in train mode: the clean teacher's logits agree (its head dropout is
    off, as the official no_drop=True), the plain mix-partner forward's do not (its head dropout is on)."""
    net = small_vnet()
    views = {"u_w": torch.randn(2, 1, 16, 16, 16), "u_w_mix": torch.randn(2, 1, 16, 16, 16)}
    streams = [Stream("P_mix", "u_w_mix"), Stream("P_w", "u_w", decoder_dropout=False)]
    with torch.no_grad():
        feats = net.encode(torch.cat([views["u_w_mix"], views["u_w"]]))
        first = GraphAlgorithm._decode(net, feats, streams, views)
        second = GraphAlgorithm._decode(net, feats, streams, views)
    assert torch.equal(first[2:], second[2:])  # P_w
    assert not torch.allclose(first[:2], second[:2])  # P_mix: Dropout3d(0.5) draws fresh masks


def test_head_dropout_off_equals_the_network_without_it():
    """Switching the head dropout off for a sample gives exactly what a V-Net without head dropout computes."""
    net = small_vnet()
    with torch.no_grad():
        feats = net.encode(torch.randn(2, 1, 16, 16, 16))
        off = net.decode(feats, drop=torch.tensor([False, False]))
        net.has_dropout = False
        plain = net.decode(feats)
    assert torch.equal(off, plain)


class RecordingVNet(torch.nn.Module):
    """Wraps a V-Net and records, for every decoder call, which samples could be dropped."""

    decoder_dropout = True

    def __init__(self) -> None:
        super().__init__()
        self.net = small_vnet()
        self.drops: list[list[bool] | None] = []
        self.encoded: list[int] = []

    def encode(self, x):
        self.encoded.append(x.shape[0])
        return self.net.encode(x)

    def decode(self, f, drop=None):
        self.drops.append(None if drop is None else drop.tolist())
        return self.net.decode(f, drop=drop)


@pytest.mark.parametrize("plan, encoded, drops", [
    # mix group [P_mix, P_mix_w, P_mix_s]; weak group [x, u_w, u_w weak, u_w strong]; strong group [s1, s2, ...]
    ("minimal", [2, 4, 4], [[True] * 2 + [False] * 4, [False] * 8, [False] * 8]),
    # official: plain mix forward (head dropout on, no mask passed), then f_fp(cat(x, u_w_mix)) with no_drop
    ("official", [2, 4, 4, 4], [None, [False] * 8, [False] * 8, [False] * 8]),
])
def test_only_the_plain_mix_forward_keeps_head_dropout(plan, encoded, drops):
    algo = CrossMatch(plan=plan)
    algo.setup(num_classes=2, dim=3)
    net = RecordingVNet()
    algo.step(net, vnet_batch(), StepContext(iteration=3, total_iterations=10))
    assert net.encoded == encoded
    assert net.drops == drops


def test_official_plan_pads_like_the_official_forward():
    """f_fp(cat(x, u_w_mix)) decodes [x, u_w_mix, weak(u_w_mix), strong(u_w_mix)]: labeled and clean outputs
    pad the batch (so BatchNorm sees the official batch) and no loss reads them."""
    algo = CrossMatch(plan="official")
    algo.setup(num_classes=4, dim=2)
    groups = algo.plan()
    assert [(s.view, s.perturb) for s in groups["mix"]] == [("u_w_mix", "none")]
    assert [(s.view, s.perturb) for s in groups["mix_fp"]] == [
        ("x", "none"), ("u_w_mix", "none"), ("u_w_mix", "drop:0.25"), ("u_w_mix", "drop:0.75")]
    read = {n for e in algo.edges for n in (e.student, e.teacher, e.mix_teacher)}
    assert {"P_pad_x", "P_pad_mix"}.isdisjoint(read)
    assert CrossMatch().edges == algo.edges  # same losses, only the passes differ


def test_unknown_plan_is_one_sentence():
    with pytest.raises(ConfigError, match="plan 'fast' is unknown"):
        CrossMatch(plan="fast")
