"""What a reported number means: empty-mask policies, missing counts, split and checkpoint named in every table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from semiseg.bench.results import evaluation_rule, write_markdown
from semiseg.cli import _fmt, cli
from semiseg.evaluation.metrics import case_metrics, image_diagonal, summarize


def square(shape=(10, 10), at=(2, 2), size=3) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[at[0]:at[0] + size, at[1]:at[1] + size] = 1
    return m


def test_penalize_scores_a_missed_structure_as_dice_0_and_the_image_diagonal():
    empty, gt = np.zeros((10, 10), np.uint8), square()
    row = case_metrics(empty, gt, num_classes=2, empty="penalize")[1]
    assert (row["dice"], row["jaccard"]) == (0.0, 0.0)
    assert row["hd95"] == row["asd"] == pytest.approx(math.hypot(9, 9))
    # a structure predicted where there is none is penalized the same way; in mm the diagonal follows spacing
    fp = case_metrics(gt, empty, num_classes=2, empty="penalize", spacing=(2.0, 1.0))[1]
    assert fp["hd95"] == pytest.approx(math.hypot(18, 9)) == image_diagonal((10, 10), (2.0, 1.0))
    both = case_metrics(empty, empty, num_classes=2, empty="penalize")[1]
    assert (both["dice"], both["hd95"]) == (1.0, 0.0)


def test_missing_counts_and_means_under_each_policy():
    """4 cases: 3 segmented with HD95 0 (exact), 1 missed. nan: the mean comes from 3 values and 1 is counted
    missing; penalize: 4 values, the miss at the image diagonal."""
    gt = square()
    cases = [(gt, gt)] * 3 + [(np.zeros_like(gt), gt)]
    nan = summarize([case_metrics(p, g, 2, empty="nan") for p, g in cases])
    assert nan["per_class"]["1"]["hd95"]["missing"] == 1 and nan["per_class"]["1"]["hd95"]["n"] == 3
    assert nan["mean_hd95"] == 0.0 and nan["mean_dice"] == pytest.approx(0.75)
    assert _fmt(nan["per_class"]["1"]["hd95"]) == "0.0000 ± 0.0000 (1 missing)"  # as `semiseg eval` prints it
    pen = summarize([case_metrics(p, g, 2, empty="penalize") for p, g in cases])
    assert pen["per_class"]["1"]["hd95"]["missing"] == 0
    assert pen["mean_hd95"] == pytest.approx(math.hypot(9, 9) / 4)


def test_bench_markdown_names_split_checkpoint_and_missing_values(tmp_path):
    rows = [{"preset": "p", "algo": "a", "labeled": "3", "seed": "0", "iterations": "10", "eval_split": "valtest",
             "eval_checkpoint": "last", "eval_empty": "nan", "mean_dice": "0.5", "hd95_missing": "4"},
            {"preset": "p", "algo": "b", "labeled": "3", "seed": "0", "iterations": "10", "eval_split": "valtest",
             "eval_checkpoint": "last", "eval_empty": "nan", "mean_dice": "0.6", "hd95_missing": "0"}]
    rule = evaluation_rule(rows)
    assert rule.startswith("split valtest, last checkpoint, empty masks: nan")
    assert "a seed 0: 4" in rule and "b seed 0" not in rule
    longer = {**rows[0], "iterations": "20", "hd95_missing": "2"}  # a second block: each run named fully
    rule = evaluation_rule(rows + [longer])
    assert "a seed 0 (3 labeled, 10 it): 4" in rule and "a seed 0 (3 labeled, 20 it): 2" in rule
    write_markdown(tmp_path / "r.md", rows, "t")
    text = (tmp_path / "r.md").read_text()
    assert "Evaluated: split valtest, last checkpoint" in text and "medpy's definitions" in text
    assert "Machine" not in text  # neither row is timed yet, so neither names a machine
    rows[1].update(machine="Linux, Xeon, 2 CPUs", device="cpu (2 torch threads)", torch="2.14.1")
    write_markdown(tmp_path / "r.md", rows, "t")
    assert "Machine:\n\n- Linux, Xeon, 2 CPUs; cpu (2 torch threads); torch 2.14.1\n" in (tmp_path / "r.md").read_text()


def test_eval_on_la_uses_the_official_stride_and_names_what_it_reports(tmp_path, shared_data):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, [
        "train", "--algo", "supervised", "--data", "la", "--data-root", str(shared_data / "la-half"),
        "--labeled", "2", "--width", "0.25", "--patch-size", "32,32,16", "--iterations", "1", "--batch-size", "2",
        "--val-every", "1", "--out", str(run), "--quiet"], env={"SEMISEG_DEBUG": "1"})
    assert r.exit_code == 0, r.output
    out = CliRunner().invoke(cli, ["eval", str(run), "--max-cases", "1", "--save-pred", "none",
                                   "--empty", "penalize"], terminal_width=200)
    assert out.exit_code == 0, out.output
    summary = json.loads((run / "eval" / "test-last" / "summary.json").read_text())
    assert summary["stride"] == [18, 18, 4]
    assert (summary["split"], summary["checkpoint_rule"], summary["empty_policy"]) == ("test", "last", "penalize")
    assert "medpy" in summary["metric_definitions"]
    assert "split 'test', last checkpoint" in out.output and "stride 18,18,4" in out.output
