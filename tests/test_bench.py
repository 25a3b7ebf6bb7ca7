"""semiseg bench: the grid, resuming, committed rows, timing, FLOPs, aggregation, presets and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from semiseg import registry
from semiseg.bench import results as res
from semiseg.bench import runner
from semiseg.bench.command import bench
from semiseg.bench.presets import PRESET_DIR, get_preset, parse_preset
from semiseg.bench.timing import backbone_stats, count_flops, time_iterations
from semiseg.errors import ConfigError

TINY = {
    "data": "synthetic",
    "data_options": {"dim": 2, "size": [32, 32], "n_train": 8, "n_val": 2, "num_classes": 2},
    "backbone": "unet",
    "backbone_options": {"width": 0.25},
    "iterations": 4,
    "batch_size": 2,
    "unlabeled_batch_size": 2,
    "val_every": 2,
    "log_every": 1,
    "device": "cpu",
    "algos": ["supervised", "fixmatch"],
    "seeds": [0],
    "labeled": [2],
    "eval_split": "test",
    "timing": {"warmup": 1, "iters": 2},
}


def tiny_preset(name: str = "tiny"):
    return parse_preset(dict(TINY), name, "test preset")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One tiny grid (2 algorithms x 1 seed, 4 iterations), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench") / "tiny"
    # one torch thread and in-process timing keep the test quick on a small, shared CPU
    result = runner.run_bench(tiny_preset(), out, quiet=True, command="semiseg bench --preset tiny", threads=1,
                              fresh_process=False)
    return out, result


@pytest.fixture
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "run_one", fail)
    monkeypatch.setattr("semiseg.engine.trainer.Trainer.fit", fail)


def test_grid_writes_csv_md_and_plots(grid):
    out, result = grid
    assert len(result.ran) == 2 and not result.skipped
    rows = res.read_rows(out / "results.csv")
    assert [r["algo"] for r in rows] == ["supervised", "fixmatch"]
    expected = {"preset", "algo", "labeled", "seed", "iterations", "mean_dice", "mean_jaccard", "mean_hd95",
                "mean_asd", "dice_organ", "ms_per_iter", "peak_mem_mb", "params_m", "gflops", "gmacs", "wall_s",
                "machine", "device", "torch", "date", "command"}
    assert expected <= set(rows[0])
    for r in rows:
        assert (r["preset"], r["labeled"], r["seed"], r["iterations"]) == ("tiny", "2", "0", "4")
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
        assert float(r["ms_per_iter"]) > 0 and float(r["params_m"]) > 0
        assert r["command"] == "semiseg bench --preset tiny"
    md = (out / "results.md").read_text()
    assert "**" in md and "supervised" in md and "fixmatch" in md and "semiseg bench --preset tiny" in md
    for png in ("dice_vs_iter.png", "dice_vs_time.png", "ms_per_iter.png"):
        assert (out / png).stat().st_size > 1000
    curves = res.read_rows(out / "curves.csv")
    assert {c["iter"] for c in curves} == {"2", "4"}  # val_every 2 over 4 iterations, per algorithm
    # pseudo-label quality during training: one point per validation window, for fixmatch's one edge only
    diag = res.read_rows(out / "diagnostic_curves.csv")
    assert {(d["algo"], d["edge"], d["iter"]) for d in diag} == {("fixmatch", "strong", "2"),
                                                                  ("fixmatch", "strong", "4")}
    assert all(0 <= float(d[m]) <= 1 for d in diag for m in ("acc_all", "kept"))  # acc_kept: none kept, none
    assert (out / "pseudo_labels.png").stat().st_size > 1000
    assert (out / ".gitignore").read_text().count("runs/") == 1


def test_diagnostic_curve_averages_each_window_and_the_last_entry_of_a_resume_wins(tmp_path):
    logs = [{"iter": 1, "loss": 1.0, "diag/e/acc_kept": 0.5, "diag/e/kept": 0.2},
            {"iter": 2, "loss": 1.0, "diag/e/acc_kept": 0.1, "diag/e/kept": 0.4},
            {"iter": 2, "val/dice": 0.3},  # a validation entry: no diagnostics
            {"iter": 2, "loss": 1.0, "diag/e/acc_kept": 0.7, "diag/e/kept": 0.6},  # logged again after a resume
            {"iter": 3, "loss": 1.0, "diag/e/acc_kept": float("nan"), "diag/e/kept": 1.0,
             "diag/f/dice_kept": 0.25}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in logs))
    points = runner.diagnostic_curve(metrics, window=2)
    assert points == [{"iter": 2, "edge": "e", "acc_kept": pytest.approx(0.6), "kept": pytest.approx(0.4)},
                      {"iter": 4, "edge": "e", "kept": 1.0}, {"iter": 4, "edge": "f", "dice_kept": 0.25}]


def test_final_diagnostics_average_the_last_steps_once_each_after_a_resume(tmp_path):
    # iterations 1-4 logged, the run resumed from iteration 2 and logged 3-4 again with other values
    logs = [{"iter": i, "loss": 1.0, "diag/e/kept": v} for i, v in ((1, 0.1), (2, 0.2), (3, 0.9), (4, 0.9))]
    logs += [{"iter": 3, "val/dice": 0.5}]
    logs += [{"iter": i, "loss": 1.0, "diag/e/kept": v} for i, v in ((3, 0.3), (4, 0.5))]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in logs))
    # the last half of the 4 distinct steps: iterations 3 and 4 as logged after the resume
    assert runner.final_diagnostics(metrics, share=0.5) == {"diag/e/kept": pytest.approx(0.4)}


def test_a_rerun_backfills_missing_diagnostic_curves_from_the_run_directories(grid, tmp_path, monkeypatch):
    out, _ = grid
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "curves.csv", "diagnostics.csv"):
        (copy / name).write_text((out / name).read_text())
    _no_training(monkeypatch)
    runner.run_bench(tiny_preset(), copy, runs_dir=out / "runs", quiet=True, command="again")
    assert res.read_rows(copy / "diagnostic_curves.csv") == res.read_rows(out / "diagnostic_curves.csv")
    assert (copy / "pseudo_labels.png").is_file()


def test_rerun_skips_finished_runs(grid, monkeypatch):
    out, _ = grid
    before = (out / "results.csv").read_text()
    _no_training(monkeypatch)
    result = runner.run_bench(tiny_preset(), out, quiet=True, command="again")
    assert not result.ran and len(result.skipped) == 2
    assert (out / "results.csv").read_text() == before


def test_committed_row_is_skipped_and_copied(grid, tmp_path, monkeypatch):
    out, _ = grid
    committed = tmp_path / "committed" / "results.csv"
    committed.parent.mkdir()
    sup = [r for r in res.read_rows(out / "results.csv") if r["algo"] == "supervised"]
    res.write_rows(committed, sup)
    monkeypatch.setattr(runner, "committed_results", lambda preset: committed)
    _no_training(monkeypatch)
    new_out = tmp_path / "elsewhere"
    result = runner.run_bench(tiny_preset(), new_out, algos=["supervised"], quiet=True, command="x", reuse=True)
    assert [s.algo for s in result.copied] == ["supervised"] and not result.ran
    rows = res.read_rows(new_out / "results.csv")
    assert len(rows) == 1 and rows[0]["mean_dice"] == sup[0]["mean_dice"]
    assert (new_out / "results.md").is_file()


def test_iterations_override_is_a_new_key(grid, monkeypatch):
    out, _ = grid
    calls = []
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a[1]) or None)  # None = interrupted
    result = runner.run_bench(tiny_preset(), out, algos=["supervised"], iterations=3, quiet=True, command="x")
    assert result.interrupted and [s.iterations for s in calls] == [3]


def test_time_iterations_and_backbone_stats(tmp_path, one_thread):
    from semiseg.engine.trainer import Trainer

    preset = tiny_preset()
    spec = runner.plan(preset, ["fixmatch"])[0]
    trainer = Trainer(runner.run_config(preset, spec, tmp_path / "run"), quiet=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    t = time_iterations(trainer, warmup=1, iters=2)
    assert t["ms_per_iter"] > 0 and t["std"] >= 0 and t["iters"] == 2 and t["peak_mem_mb"] >= 0
    # forward + backward only: no optimizer step, so the weights are unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    st = backbone_stats(trainer.model, (4, 1, 32, 32))
    assert st["params"] == sum(p.numel() for p in trainer.model.parameters())
    assert st["flops"] > 0 and math.isclose(st["gmacs"] * 2, st["gflops"])


def test_flop_counter_counts_a_conv():
    conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: 2 * (8 out channels * 9 taps * 16 * 16 pixels) * batch 2
    assert count_flops(conv, (2, 1, 16, 16)) == 2 * 8 * 9 * 16 * 16 * 2


def test_mean_std_aggregation_and_bold_best():
    rows = [
        {"preset": "p", "algo": "a", "labeled": "3", "seed": "0", "iterations": "10", "mean_dice": "0.8",
         "mean_hd95": "4", "ms_per_iter": "10"},
        {"preset": "p", "algo": "a", "labeled": "3", "seed": "1", "iterations": "10", "mean_dice": "0.9",
         "mean_hd95": "6", "ms_per_iter": "12"},
        {"preset": "p", "algo": "b", "labeled": "3", "seed": "0", "iterations": "10", "mean_dice": "0.7",
         "mean_hd95": "2", "ms_per_iter": "30"},
    ]
    groups = {g["algo"]: g for g in res.aggregate(rows)}
    m, s, n = groups["a"]["stats"]["mean_dice"]
    assert (n, round(m, 6), round(s, 6)) == (2, 0.85, round(math.sqrt(0.005), 6))
    assert groups["b"]["stats"]["mean_dice"][2] == 1 and math.isnan(groups["b"]["stats"]["mean_dice"][1])
    md = res.markdown_table(rows)
    line_a = next(ln for ln in md.splitlines() if ln.startswith("| a "))
    line_b = next(ln for ln in md.splitlines() if ln.startswith("| b "))
    assert "**85.00 ± 7.07**" in line_a and "**11.0 ± 1.4**" in line_a  # best Dice, fastest
    assert "**2.00**" in line_b and "70.00" in line_b and "**70.00**" not in line_b  # best (lowest) HD95


def test_seeds_table_lists_each_seed_and_marks_missing_ones(tmp_path):
    rows = [{"preset": "p", "algo": a, "labeled": "3", "seed": str(s), "iterations": "10", "mean_dice": str(d)}
            for a, s, d in (("a", 0, 0.5), ("a", 1, 0.7), ("a", 2, 0.6), ("b", 0, 0.4), ("b", 2, 0.45))]
    md = res.seeds_table(rows)
    assert md.splitlines()[0] == "| Algorithm | Labeled | Iterations | seed 0 | seed 1 | seed 2 | mean ± std |"
    assert "| a | 3 | 10 | 50.0 | 70.0 | 60.0 | 60.0 ± 10.0 |" in md
    assert "| b | 3 | 10 | 40.0 | – | 45.0 | 42.5 ± 3.5 |" in md  # seed 1 not run yet
    res.write_markdown(tmp_path / "r.md", rows, "t")
    assert "## Dice per seed" in (tmp_path / "r.md").read_text()
    res.write_markdown(tmp_path / "one.md", rows[:1], "t")  # one seed: nothing to spread
    assert "## Dice per seed" not in (tmp_path / "one.md").read_text()


def test_the_recorded_command_keeps_no_private_runs_path():
    from semiseg.bench.command import _command_line

    ctx = bench.make_context("bench", ["--preset", "tiny", "--runs-dir", "/home/me/scratch/runs", "--jobs", "2"])
    assert _command_line(ctx) == "semiseg bench --preset tiny --runs-dir RUNS --jobs 2"


def test_an_algorithm_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    # block 10 has only b and c, block 20 all three: a reader compares b across the panels by its colour
    rows = [{"preset": "p", "algo": a, "labeled": "3", "seed": "0", "iterations": it, "ms_per_iter": "5"}
            for a, it in (("b", "10"), ("c", "10"), ("a", "20"), ("b", "20"), ("c", "20"))]
    curves = [{**r, "iter": str(i), "val_dice": str(0.1 * i)} for r in rows for i in (1, 2)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    res.plot_dice_vs_iter(tmp_path / "i.png", curves, rows)
    res.plot_dice_vs_time(tmp_path / "t.png", curves, rows)
    for fig in figures:
        panels = [{ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in fig.axes]
        assert sorted(panels[0]) == ["b", "c"] and sorted(panels[1]) == ["a", "b", "c"]
        assert panels[0]["b"] == panels[1]["b"] and panels[0]["c"] == panels[1]["c"]
        assert len(set(panels[1].values())) == 3
        assert [ax.get_title() for ax in fig.axes] == ["p: 3 labeled, 10 iterations", "p: 3 labeled, 20 iterations"]


def test_scaled_options_follow_a_shorter_grid(tmp_path):
    """Options the preset counts in its own iterations are scaled by --iterations' share; others are not."""
    p = parse_preset({**TINY, "iterations": 100, "algos": ["meanteacher", "admt"], "scaled_options": [
        "rampup_every", "consistency_start", "consistency_rampup"], "algo_options": {
        "meanteacher": {"rampup_every": 10, "consistency_start": 40, "consistency": 0.2},
        "admt": {"consistency_rampup": 4.0}}}, "t", "test preset")
    assert p.config("meanteacher", 2, 0, tmp_path).algo_options == {
        "rampup_every": 10, "consistency_start": 40, "consistency": 0.2}  # the preset's own length
    half = p.config("meanteacher", 2, 0, tmp_path, iterations=50)
    assert half.iterations == 50
    assert half.algo_options == {"rampup_every": 5, "consistency_start": 20, "consistency": 0.2}
    assert p.config("meanteacher", 2, 0, tmp_path, iterations=1).algo_options["rampup_every"] == 1  # never 0
    assert p.config("admt", 2, 0, tmp_path, iterations=25).algo_options == {"consistency_rampup": 1.0}
    spec = runner.plan(p, iterations=50)[0]
    cfg = runner.run_config(p, spec, tmp_path / "run")
    assert (cfg.iterations, cfg.algo_options["rampup_every"]) == (50, 5)
    with pytest.raises(ConfigError, match="set 'iterations'"):
        parse_preset({k: v for k, v in {**TINY, "scaled_options": ["rampup_every"]}.items() if k != "iterations"},
                     "t", "test preset")


def test_bad_preset_name_lists_known():
    with pytest.raises(ConfigError) as e:
        get_preset("smok")
    assert "smoke" in str(e.value) and "acdc-cpu" in str(e.value)


def test_builtin_presets_parse_and_register():
    names = {p.stem for p in PRESET_DIR.glob("*.yaml")}
    assert {"smoke", "acdc-cpu", "la-half-cpu", "acdc-paper", "la-paper"} <= names
    for n in names:
        p = get_preset(n)
        assert p.seeds and p.timing["iters"] >= 1
        if p.train.get("data_root"):
            assert Path(p.train["data_root"]).is_absolute()  # resolved against the repository root
    assert names <= set(registry.PRESETS.names())
    assert get_preset("acdc-paper").train["recipe"] == get_preset("la-paper").train["recipe"] == "official"


def test_recipe_preset_gives_each_algorithm_its_official_length(shared_data):
    """acdc-paper: 300 epochs of 1244 // 12 for CrossMatch (3 cases), 300 * (68 // 12) for supervised, BCP's
    10 000 + 30 000 steps."""
    specs = runner.plan(get_preset("acdc-paper"), ["crossmatch", "supervised", "bcp"], [0], [3],
                        data_root=str(shared_data / "acdc"))
    assert {s.algo: s.iterations for s in specs} == {"crossmatch": 30900, "supervised": 1500, "bcp": 40000}


def test_an_all_grid_with_official_recipes_leaves_out_algorithms_without_official_code(shared_data, capsys):
    """la-paper expands 'all': ABD has no official 3D code, so it is left out with a note; named, it refuses."""
    specs = runner.plan(get_preset("la-paper"), seeds=[0], labeled=[8], data_root=str(shared_data / "la-half"))
    algos = {s.algo for s in specs}
    assert "abd" not in algos and {"crossmatch", "bcp", "cps"} <= algos
    assert "'abd' has no official 3D recipe" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no official 3D recipe"):
        runner.plan(get_preset("la-paper"), ["abd"], [0], [8], data_root=str(shared_data / "la-half"))


def test_preset_rejects_per_run_and_unknown_keys():
    with pytest.raises(ConfigError, match="algo"):
        parse_preset({**TINY, "algo": "fixmatch"}, "x", "p")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_preset({**TINY, "itertions": 3}, "x", "p")


def test_command_dry_run_and_errors(grid, tmp_path):
    out, _ = grid
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    r = CliRunner().invoke(bench, ["--preset", str(path), "--out", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.count("done") == 2
    r = CliRunner().invoke(bench, ["--preset", "nope", "--dry-run"])
    assert r.exit_code == 2 and "Known:" in r.output and "smoke" in r.output
    r = CliRunner().invoke(bench, ["--preset", str(path), "--seeds", "a,b", "--dry-run"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_timing_worker_prints_one_json_line(tmp_path, capsys, one_thread):
    """The fresh-process timing's worker (run here in-process: a new interpreter costs seconds)."""
    import json

    from semiseg.bench import timing

    preset = tiny_preset()
    cfg = runner.run_config(preset, runner.plan(preset, ["supervised"])[0], tmp_path / "run")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    timing._worker([str(path), "0", "1", "1", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ms_per_iter"] > 0 and out["params"] > 0 and out["flops_input"] == "4x1x32x32"
    assert {"machine", "device", "torch"} <= set(out)


def test_speed_options_make_a_separate_variant(grid, tmp_path, monkeypatch):
    """--channels-last etc. apply to every run and rename the preset, so the variant's rows are never taken
    for the preset's finished ones."""
    out, _ = grid
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    r = CliRunner().invoke(bench, ["--preset", str(path), "--out", str(out), "--channels-last", "--no-amp",
                                   "--workers", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "tiny+no-amp+channels_last+workers1" in r.output.replace("\n", "")
    assert r.output.count("to run") == 2 and "done" not in r.output
    seen = {}

    def fake_time_grid(preset, *a, **k):
        seen.update(preset.train)
        return []

    monkeypatch.setattr(runner, "time_grid", fake_time_grid)
    r = CliRunner().invoke(bench, ["--preset", str(path), "--compile", "--time-only"])
    assert r.exit_code == 0, r.output
    assert seen["compile"] is True and "channels_last" not in seen
    r = CliRunner().invoke(bench, ["--preset", str(path), "--workers", "-1", "--dry-run"])
    assert r.exit_code == 2 and "--workers must be 0 or more" in r.output


# -- concurrent cells and scheduler commands ----------------------------------------------------------------------
SAME_RESULT = ("mean_dice", "mean_jaccard", "mean_hd95", "mean_asd", "dice_organ", "val_last_dice", "val_best_dice",
               "val_best_iter", "params_m", "gmacs")


def test_jobs_2_gives_the_rows_of_jobs_1(grid, tmp_path):
    """Two cells trained at once in worker processes (one thread each) give the rows one at a time gives,
    timings aside; the new cells are timed afterwards, and the diagnostics are written for each."""
    out, _ = grid
    par = tmp_path / "par"
    result = runner.run_bench(tiny_preset(), par, quiet=True, command="par", threads=2, jobs=2)
    assert len(result.ran) == 2
    seq = {r["algo"]: r for r in res.read_rows(out / "results.csv")}
    for r in res.read_rows(par / "results.csv"):
        assert {k: r[k] for k in SAME_RESULT} == {k: seq[r["algo"]][k] for k in SAME_RESULT}
        assert float(r["ms_per_iter"]) > 0  # timed, alone, after training
    def curves(folder):
        return sorted(tuple(c.values()) for c in res.read_rows(folder / "curves.csv"))

    assert curves(par) == curves(out)
    diag = res.read_rows(par / "diagnostics.csv")
    assert {d["algo"] for d in diag} == {"fixmatch"} and all(0 <= float(d["acc_all"]) <= 1 for d in diag)
    assert "Pseudo-label diagnostics" in (par / "results.md").read_text()


def test_print_commands_lists_exactly_the_remaining_cells_and_the_bench_merges_them(grid, tmp_path):
    out, _ = grid
    part = tmp_path / "part"
    part.mkdir()
    # one cell already recorded: only the other remains
    (part / "results.csv").write_text((out / "results.csv").read_text().splitlines()[0] + "\n" +
                                      (out / "results.csv").read_text().splitlines()[1] + "\n")
    commands = runner.grid_commands(tiny_preset(), part)
    assert len(commands) == 1 and "fixmatch-l2-s0-it4" in commands[0] and commands[0].startswith("semiseg train")
    assert "configs/" in (part / ".gitignore").read_text().splitlines()  # this machine's paths: never committed
    # run it as a scheduler would, then the same bench records it without training again
    args = commands[0].split()[2:]
    from semiseg.cli import cli

    assert CliRunner().invoke(cli, ["train", *args]).exit_code == 0
    result = runner.run_bench(tiny_preset(), part, quiet=True, command="merge", threads=1, fresh_process=False)
    assert [s.algo for s in result.ran] == ["fixmatch"] and len(result.skipped) == 1
    merged = {r["algo"]: r for r in res.read_rows(part / "results.csv")}
    seq = {r["algo"]: r for r in res.read_rows(out / "results.csv")}
    assert merged["fixmatch"]["mean_dice"] == seq["fixmatch"]["mean_dice"]
    assert runner.grid_commands(tiny_preset(), part) == []


def test_variant_rows_train_the_registered_algorithm_with_their_options():
    """`crossmatch@official` is a row of its own that trains crossmatch with --opt plan=official, and `all`
    inside a list still means every registered algorithm."""
    p = parse_preset({**TINY, "algos": ["all", "crossmatch@official"],
                      "algo_options": {"crossmatch": {"eta": 0.5}, "crossmatch@official": {"plan": "official"}}},
                     "v", "test preset")
    assert p.resolve_algos() == registry.ALGORITHMS.names() + ["crossmatch@official"]
    cfg = p.config("crossmatch@official", 2, 0, "out")
    assert (cfg.algo, cfg.algo_options) == ("crossmatch", {"eta": 0.5, "plan": "official"})
    assert p.config("crossmatch", 2, 0, "out").algo_options == {"eta": 0.5}
    assert runner.plan(p, ["crossmatch@official"])[0].dirname == "crossmatch@official-l2-s0-it4"


def test_fresh_out_runs_the_users_own_grid(grid, tmp_path, monkeypatch):
    """Without --reuse, committed rows are neither copied nor skipped: the user's --out gets its own runs."""
    out, _ = grid
    committed = tmp_path / "committed" / "results.csv"
    committed.parent.mkdir()
    res.write_rows(committed, [r for r in res.read_rows(out / "results.csv") if r["algo"] == "supervised"])
    monkeypatch.setattr(runner, "committed_results", lambda preset: committed)
    ran = []
    monkeypatch.setattr(runner, "run_one", lambda preset, spec, *a, **k: ran.append(spec.algo) or None)
    result = runner.run_bench(tiny_preset(), tmp_path / "mine", algos=["supervised"], quiet=True, command="x")
    assert ran == ["supervised"] and not result.copied
    assert runner.grid_commands(tiny_preset(), tmp_path / "mine2", algos=["supervised"]) != []


def test_no_bold_best_when_a_column_is_all_equal():
    rows = [{"preset": "p", "algo": a, "labeled": "3", "seed": "0", "iterations": "4", "mean_dice": "0",
             "mean_hd95": h} for a, h in (("a", "3"), ("b", "5"))]
    md = res.markdown_table(rows)
    lines = [ln for ln in md.splitlines() if ln.startswith("| a") or ln.startswith("| b")]
    dice_cells = [ln.split("|")[5].strip() for ln in lines]
    assert dice_cells == ["0.00", "0.00"]  # all zero: nothing bold
    assert "**3.00**" in md  # a real best is still bold
