"""--recipe official (each algorithm's official optimizer, schedule, length, batch sizes) and BCP's stages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from semiseg.algorithms.bcp import BCP
from semiseg.cli import cli
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.recipes import apply_recipe
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError


def fake_data(dim: int, labeled: int, unlabeled: int) -> SimpleNamespace:
    return SimpleNamespace(dim=dim, labeled=[0] * labeled, unlabeled=[0] * unlabeled)


ACDC3 = fake_data(2, 68, 1244)  # 3 ACDC patients: 68 labeled slices, 1244 unlabeled
LA8 = fake_data(3, 8, 72)


@pytest.mark.parametrize("algo, data, expected", [
    # UniMatch / CrossMatch ACDC: 300 epochs of 1244 // 12 = 103 iterations, 12 + 12
    ("crossmatch", ACDC3, dict(optimizer="sgd", lr=0.01, nesterov=True, schedule="poly", iterations=30900,
                               batch_size=12, unlabeled_batch_size=12)),
    ("unimatch", ACDC3, dict(optimizer="sgd", nesterov=False, schedule="poly", iterations=30900, batch_size=12)),
    ("fixmatch", ACDC3, dict(optimizer="sgd", nesterov=False, iterations=30900)),
    # the supervised baseline's epochs run over the labeled loader: 300 * (68 // 12)
    ("supervised", ACDC3, dict(optimizer="sgd", schedule="poly", iterations=1500, batch_size=12)),
    ("meanteacher", ACDC3, dict(schedule="poly", iterations=30000, batch_size=12, unlabeled_batch_size=12)),
    ("uamt", ACDC3, dict(schedule="poly", iterations=30000, batch_size=12)),
    ("bcp", ACDC3, dict(schedule="constant", iterations=40000, batch_size=12, val_every=200,
                        algo_options={"pretrain_iterations": 10000})),
    ("crossmatch", LA8, dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="poly", poly_total=17000,
                             iterations=14000, batch_size=2, unlabeled_batch_size=2)),
    ("unimatch", LA8, dict(optimizer="adamw", poly_total=17000, iterations=14000)),  # CrossMatch's LA port
    ("uamt", LA8, dict(optimizer="sgd", lr=0.01, schedule="step", iterations=6000, batch_size=2)),
    ("supervised", LA8, dict(optimizer="sgd", schedule="step", iterations=6000, batch_size=4)),
    ("meanteacher", LA8, dict(schedule="poly", iterations=30000, batch_size=2)),
    ("bcp", LA8, dict(schedule="constant", iterations=17000, batch_size=4, unlabeled_batch_size=4,
                      algo_options={"pretrain_iterations": 2000, "selftrain_schedule": "step"})),
])
def test_each_algorithm_gets_its_official_recipe(algo, data, expected):
    cfg = TrainConfig(algo=algo, recipe="official")
    applied = apply_recipe(cfg, data, explicit=set())
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert applied["source"]


def test_flags_given_by_the_user_win_over_the_recipe():
    cfg = TrainConfig(algo="crossmatch", recipe="official", lr=0.05, batch_size=6, unlabeled_batch_size=6,
                      algo_options={"eta": 0.5})
    apply_recipe(cfg, ACDC3, explicit={"lr", "batch_size", "unlabeled_batch_size"})
    # the epoch count follows the user's batch: 300 * (1244 // 6)
    assert (cfg.lr, cfg.batch_size, cfg.nesterov, cfg.iterations) == (0.05, 6, True, 300 * (1244 // 6))
    bcp = TrainConfig(algo="bcp", recipe="official", algo_options={"pretrain_iterations": 7})
    apply_recipe(bcp, LA8, explicit=set())
    assert bcp.algo_options == {"pretrain_iterations": 7, "selftrain_schedule": "step"}


def test_python_callers_keep_every_value_they_changed():
    """Without an explicit list, fields that differ from TrainConfig's defaults count as given."""
    cfg = TrainConfig(algo="uamt", recipe="official", iterations=5)
    apply_recipe(cfg, LA8)
    assert (cfg.iterations, cfg.schedule) == (5, "step")


def test_default_recipe_changes_nothing_and_unknown_recipe_is_one_sentence():
    cfg = TrainConfig(algo="crossmatch")
    assert apply_recipe(cfg, ACDC3) == {} and cfg == TrainConfig(algo="crossmatch")
    with pytest.raises(ConfigError, match="--recipe 'paper' is unknown"):
        TrainConfig(recipe="paper").validate()


def test_cli_recipe_fills_only_what_the_command_line_did_not_give(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, [
        "train", "--algo", "crossmatch", "--recipe", "official", "--backbone", "unet", "--width", "0.25",
        "--data-opt", "n_train=16", "--data-opt", "n_val=2", "--data-opt", "size=[32,32]", "--patch-size", "32,32",
        "--iterations", "2", "--batch-size", "2", "--lr", "0.02", "--val-every", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "recipe official (CrossMatch ACDC" in r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["iterations"], saved["batch_size"], saved["lr"]) == (2, 2, 0.02)  # the flags
    assert (saved["nesterov"], saved["unlabeled_batch_size"], saved["recipe"]) == (True, 12, "official")
    # the saved config reruns the same run: every key of a config file counts as given
    again = CliRunner().invoke(cli, ["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "b"),
                                     "--quiet"])
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == {**saved, "out": str(tmp_path / "b")}


# -- BCP stages -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, total, pre, fresh", [(2, 40000, 10000, False), (3, 17000, 2000, True)])
def test_bcp_stage_lengths_per_variant(dim, total, pre, fresh):
    """Official shares: ACDC 10 000 of 40 000; LA 2 000 of 17 000. Self-training starts from the best
    pre-training checkpoint, with its optimizer state on ACDC and a fresh optimizer on LA."""
    algo = BCP()
    algo.setup(num_classes=4 if dim == 2 else 2, dim=dim)
    stages = algo.stages(total)
    assert [(s.name, s.iterations) for s in stages] == [("pretrain", pre), ("selftrain", total - pre)]
    assert (stages[1].start_from, stages[1].fresh_optimizer) == ("best", fresh)
    last = BCP(selftrain_from="last")
    last.setup(num_classes=2, dim=3)
    assert last.stages(100)[1].start_from is None
    with pytest.raises(ConfigError, match="selftrain_from='top' is unknown"):
        BCP(selftrain_from="top")


def bcp_cfg(tmp_path, **opts) -> TrainConfig:
    return TrainConfig(algo="bcp", algo_options={"pretrain_iterations": 4, **opts}, backbone="unet",
                       backbone_options={"width": 0.25}, data="synthetic",
                       data_options={"dim": 2, "n_train": 16, "n_val": 2, "size": [32, 32], "num_classes": 2},
                       patch_size=[32, 32], labeled=6, iterations=6, batch_size=2, val_every=1, lr=0.05,
                       out=str(tmp_path / "run"))


def test_selftraining_starts_from_the_best_pretraining_checkpoint(tmp_path, monkeypatch):
    seen = {}
    original = BCP.on_stage_start

    def spy(self, stage, model, ctx):
        if stage.name == "selftrain":
            seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            seen["step"] = ctx.iteration
        original(self, stage, model, ctx)

    monkeypatch.setattr(BCP, "on_stage_start", spy)
    t = Trainer(bcp_cfg(tmp_path), quiet=True)
    summary = t.fit()
    best = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best-pretrain.pt")
    assert seen["step"] == 4 and best["iteration"] <= 4
    assert all(torch.equal(seen["weights"][k], v) for k, v in best["model"].items())
    assert any("starts from the best 'pretrain' checkpoint" in n for n in summary["notes"])


@pytest.mark.parametrize("fresh", [True, False])
def test_stage_schedule_restarts_at_the_stage_and_fresh_optimizer(tmp_path, fresh):
    cfg = bcp_cfg(tmp_path, selftrain_schedule="step", fresh_optimizer=fresh)
    cfg.schedule = "constant"
    t = Trainer(cfg, quiet=True)
    # constant in pre-training; the step schedule counts from the self-training stage's first step
    t.stages[1].iterations = 6000
    assert t.lr_at(3) == t.lr_at(4 + 2499) == 0.05 and t.lr_at(4 + 2500) == pytest.approx(0.005)
    t.stages[1].iterations = 2
    before = t.optimizer
    t.fit()
    assert (t.optimizer is not before) == fresh


# -- schedules the official codes time for their own length ------------------------------------------------------
@pytest.mark.parametrize("algo, dim, iterations, opts, expected", [
    ("meanteacher", 2, 1200, {}, "--opt rampup_every=6 compresses"),  # 150 x 1200 / 30 000
    ("em", 2, 1200, {}, "--opt rampup_every=6 compresses"),
    ("cps", 2, 1200, {}, "--opt rampup_every=6 compresses"),
    ("uamt", 3, 120, {}, "--opt rampup_every=3 compresses"),  # LA: 150 x 120 / 6000
    ("urpc", 2, 120, {}, "--opt rampup_every=1 --opt consistency_rampup=120 compresses"),  # 200 x 150 x 120 / 30 000
    ("admt", 2, 1200, {}, "--opt consistency_rampup=2 compresses"),  # R also times its EMA: 50 x 1200 / 30 000
    ("meanteacher", 2, 1200, {"rampup_every": 6, "consistency_start": 40}, None),
    ("ict", 2, 30000, {}, None),  # the official length reaches the full weight
    ("cct", 2, 21000, {}, None),  # sigmoid_rampup(20999 // 150, 200) = exp(-5 x 0.305^2) = 0.63: past half
])
def test_a_run_too_short_for_the_official_consistency_ramp_is_told_the_compressing_option(algo, dim, iterations,
                                                                                          opts, expected):
    from semiseg import registry

    alg = registry.ALGORITHMS.get(algo)(**opts)
    alg.setup(num_classes=4, dim=dim)
    notes = alg.notes(iterations)
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(f"{algo}: the consistency weight reaches only ")
        assert f"this {iterations}-iteration run" in notes[0] and notes[0].endswith(
            f"{expected} it by the same factor as the run.")


def test_mean_teachers_late_start_and_the_ramp_reach_the_runs_notes(tmp_path):
    cfg = TrainConfig(algo="meanteacher", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 2, "n_train": 8, "n_val": 2, "size": [32, 32], "num_classes": 2},
                      patch_size=[32, 32], labeled=4, iterations=800, batch_size=2, out=str(tmp_path / "run"))
    notes = Trainer(cfg, quiet=True).notes
    assert any("--opt rampup_every=4" in n for n in notes)  # 150 x 800 / 30 000
    assert any("starts at iteration 1000" in n and "--opt consistency_start=26" in n for n in notes)
