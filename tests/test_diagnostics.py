"""Pseudo-label diagnostics: hand-computed values, CutMix-aware truth, and no effect on training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from semiseg.algorithms.base import PseudoLabel, StepContext
from semiseg.algorithms.fixmatch import FixMatch
from semiseg.augment.mixing import cutmix_target
from semiseg.engine.config import TrainConfig
from semiseg.engine.diagnostics import pseudo_label_stats, split_truth
from semiseg.engine.trainer import Trainer, build_data, build_policy


def test_stats_by_hand():
    label = torch.tensor([[[0, 1], [1, 1]]])
    truth = torch.tensor([[[0, 1], [0, 1]]])
    keep = torch.tensor([[[True, True], [False, True]]])
    s = pseudo_label_stats({"e": PseudoLabel(label, keep, lambda t: t["u_y"])}, {"u_y": truth}, num_classes=2)
    # 3 of 4 pixels right; the wrong one is not kept; class 1 on kept pixels: target {(0,1),(1,1)} = truth
    assert s == {"diag/e/acc_all": 0.75, "diag/e/acc_kept": 1.0, "diag/e/dice_kept": 1.0, "diag/e/kept": 0.75}
    none_kept = PseudoLabel(label, torch.zeros_like(keep), lambda t: t["u_y"])
    s = pseudo_label_stats({"e": none_kept}, {"u_y": truth}, num_classes=2)
    assert s["diag/e/kept"] == 0.0 and math.isnan(s["diag/e/acc_kept"])
    assert pseudo_label_stats({"e": none_kept}, {}, num_classes=2) == {}  # no truth, no diagnostics


def test_graph_targets_are_scored_against_the_cutmixed_truth():
    """Inside the CutMix box the target comes from the mix partner, so its truth is the partner's label."""
    algo = FixMatch()
    algo.setup(num_classes=4, dim=2)
    g = torch.Generator().manual_seed(0)
    b, s = 2, 8
    batch = {k: torch.randn(b, 1, s, s, generator=g) for k in ("x", "u_w", "u_s1", "u_s2", "u_w_mix",
                                                              "u_s1_mix", "u_s2_mix")}
    batch["y"] = torch.randint(0, 4, (b, s, s), generator=g)
    batch["box1"] = torch.zeros(b, s, s, dtype=torch.uint8)
    batch["box1"][:, 2:6, 1:5] = 1
    truth = {k: torch.randint(0, 4, (b, s, s), generator=g) for k in ("u_y", "u_y_mix")}
    logits = {n.name: torch.randn(b, 4, s, s, generator=g) for n in algo.streams}
    result = algo.edge_losses(logits, batch, StepContext(iteration=0, total_iterations=1))
    (edge, target), = result.pseudo_labels.items()
    assert torch.equal(target.truth(truth), cutmix_target(truth["u_y"], truth["u_y_mix"], batch["box1"]))
    # the target itself: the teacher's argmax, the mix teacher's inside the box
    expected = cutmix_target(logits["P_w"].argmax(1), logits["P_mix"].argmax(1), batch["box1"])
    assert torch.equal(target.label, expected)


def small_cfg(tmp_path, algo: str, diagnostics: bool) -> TrainConfig:
    return TrainConfig(algo=algo, backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                       data_options={"dim": 2, "n_train": 16, "n_val": 2, "size": [32, 32], "num_classes": 3},
                       patch_size=[32, 32], labeled=4, iterations=3, batch_size=2, val_every=3, log_every=1,
                       diagnostics=diagnostics, out=str(tmp_path / f"{algo}-{diagnostics}"))


@pytest.mark.parametrize("algo", ["crossmatch", "uamt", "bcp"])
def test_diagnostics_never_change_training(tmp_path, algo):
    runs = {}
    for diag in (False, True):
        t = Trainer(small_cfg(tmp_path, algo, diag), quiet=True)  # BCP: 1 pre-training, 2 self-training steps
        t.fit()
        rows = [json.loads(x) for x in (t.out / "metrics.jsonl").read_text().splitlines()]
        runs[diag] = (t.model.state_dict(), [r["loss"] for r in rows if "loss" in r], rows)
    (w0, l0, _), (w1, l1, rows) = runs[False], runs[True]
    assert l0 == l1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    diag = {k: v for r in rows for k, v in r.items() if k.startswith("diag/")}
    assert diag, "the diagnostics are logged"
    assert all(0.0 <= v <= 1.0 for v in diag.values() if not math.isnan(v))


def test_truth_is_removed_before_the_step_and_views_are_unchanged():
    cfg = TrainConfig(data="synthetic", data_options={"dim": 2, "n_train": 8, "size": [32, 32]},
                      patch_size=[32, 32], labeled=2)
    data = build_data(cfg)
    policy = build_policy(cfg, data)
    image, label = data.unlabeled_truth[0]
    assert np.array_equal(image, data.unlabeled[0])
    a = policy.weak_unlabeled(image, np.random.default_rng(5))
    b, y = policy.weak_unlabeled_pair(image, label, np.random.default_rng(5))
    assert np.array_equal(a, b) and y.shape == b.shape[1:]
    batch, truth = split_truth({"u_w": torch.zeros(1), "u_y": torch.ones(1), "u_y_mix": torch.ones(1)})
    assert set(batch) == {"u_w"} and set(truth) == {"u_y", "u_y_mix"}
