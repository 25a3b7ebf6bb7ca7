"""Distributed training on CPU (gloo): 2 processes x batch B against 1 process x batch 2B.

Each 2-process run is a real launch (``python -m torch.distributed.run ... -m semiseg train`` and the
``semiseg train --nproc 2`` shortcut); the 1-process references run in this process from the 2-process run's
own ``config.yaml`` with the batch doubled. Both load ``checkpoints/last.pt`` and compare parameter *updates*
(final minus initial parameters), which is what training changed; the parameters themselves would hide
differences under their much larger initial values.

What should agree, and how closely (measured on this machine, 3 SGD steps of a 0.25-width U-Net on 32x32, the
"update gap" being ||update_2proc - update_1proc|| / ||update_1proc||):

- cross-entropy only, with SyncBatchNorm: exact up to float32 rounding. The loaders give each rank its half of
  the same global batch, CE is a mean of per-pixel terms over equally sized halves, so DDP's gradient average
  is the global gradient, and SyncBatchNorm normalises with the global batch statistics. Measured gap 1.2e-6;
  tolerance 1e-4 leaves room for summation-order differences across thread counts and machines.
- supervised (CE + batch Dice) and CrossMatch (Dice terms with confidence masks): approximate. A Dice whose
  sums run over the whole batch is not a mean over samples, so the average of two half-batch Dice gradients
  only approximates the batch-global one. Measured 2.9e-3 (supervised) and 1.3e-3 (CrossMatch); tolerance
  1e-2. The same runs without ``--sync-bn`` (per-rank BatchNorm statistics) are off by 6.8e-2 and 3.0e-2,
  and a gradient summed instead of averaged would be off by about 1, so the tolerance still catches both.
- BatchNorm running statistics (max abs difference): with SyncBatchNorm they come from the global batch,
  measured 1.8e-5 (supervised) and 1.1e-5 (CrossMatch); without, rank 0's estimate is off by 1.8e-2 to
  4.5e-2. Tolerance 1e-3.

Stochastic layers are switched off for the comparison (U-Net encoder dropout off; CrossMatch's channel
dropout replaced by a deterministic channel mask from a test plugin): ranks draw their own masks, so with
dropout the two runs are different random realisations, not the same computation.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import restored_registry

from semiseg import registry
from semiseg.engine import distributed as dist_utils
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer

PLUGIN = '''
import torch
from semiseg.algorithms.base import Algorithm, StepResult
from semiseg.algorithms.losses import ce_loss
from semiseg.registry import register_algorithm, register_perturbation


@register_algorithm("test_ce_only")
class CEOnly(Algorithm):
    """Cross-entropy on labeled images: a mean of per-pixel terms, so DDP's gradient average is exact."""

    name = "test_ce_only"
    needs = ("labeled",)

    def step(self, model, batch, ctx):
        return StepResult({"ce": ce_loss(model(batch["x"]), batch["y"])})


@register_perturbation("test_fixeddrop")
def fixed_drop(rate):
    """Channel dropout with a fixed mask (channel c dropped when frac(0.618 c) < rate): no randomness."""

    def fn(features, generator=None):
        out = []
        for f in features:
            c = torch.arange(f.shape[1], device=f.device, dtype=f.dtype)
            keep = ((c * 0.6180339887) % 1.0 >= rate).to(f.dtype).view(1, -1, *([1] * (f.dim() - 2)))
            out.append(f * keep / (1 - rate))
        return out

    return fn
'''

TINY = ["--backbone", "unet", "--width", "0.25", "--backbone-opt", "dropout=false", "--data", "synthetic",
        "--dim", "2", "--patch-size", "32,32", "--data-opt", "size=[32,32]", "--data-opt", "n_train=16",
        "--data-opt", "n_val=2", "--labeled", "8", "--schedule", "constant", "--val-every", "1000",
        "--workers", "0", "--sync-bn", "--quiet"]
UPDATE_TOL = {"test_ce_only": 1e-4, "supervised": 1e-2, "crossmatch": 1e-2}
BN_TOL = 1e-3
# CrossMatch: a deterministic feature perturbation, and a threshold low enough that every unsupervised term
# is active from the first step (about 92 % of the pixels pass 0.3; at the default 0.95 none would)
ALGO_ARGS = {"supervised": [], "test_ce_only": [],
             "crossmatch": ["--opt", "perturb=test_fixeddrop", "--opt", "threshold=0.3"]}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "ddp_test_plugin.py"
    path.write_text(PLUGIN)
    return path


def launch(args: list[str], nproc_shortcut: bool = False) -> str:
    """Run `semiseg train` in 2 processes; return the combined output (fails the test with it on error)."""
    # a collective that waits for a rank that went astray fails after 2 minutes instead of an hour
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "SEMISEG_DIST_TIMEOUT": "120"}
    env.pop("WORLD_SIZE", None)
    if nproc_shortcut:
        cmd = [sys.executable, "-m", "semiseg", "train", "--nproc", "2", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "semiseg", "train", *args]
    # a session of its own, so that a timeout takes the launcher's workers down with it
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"2-process run timed out:\n{out[-4000:]}")
    assert p.returncode == 0, out[-4000:]
    return out


def train_here(args: list[str]) -> None:
    """`semiseg train` in this process (one process), through the command line's own code."""
    from click.testing import CliRunner

    from semiseg.cli import cli

    with restored_registry():
        r = CliRunner().invoke(cli, ["train", *args])
    assert r.exit_code == 0, (r.output, r.exception)


def one_process_reference(two_proc_run: Path, out: Path, iterations: int | None = None):
    """The 2-process run's config with the per-process batch doubled, trained here in one process.

    Returns (initial parameters, final state dict)."""
    cfg = TrainConfig.load(two_proc_run / "config.yaml")
    cfg.batch_size *= 2
    if cfg.unlabeled_batch_size:
        cfg.unlabeled_batch_size *= 2
    cfg.out = str(out)
    if iterations is not None:
        cfg.iterations = iterations
    with restored_registry():
        for p in cfg.plugins:  # named by the test's command line; a stored config alone loads nothing
            registry.load_plugin(p)
        t = Trainer(cfg, quiet=True)
        init = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        t.fit()
    return init, torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]


def update_gap(two: dict, one: dict, init: dict) -> float:
    """||update_2proc - update_1proc|| / ||update_1proc|| over the learnable parameters."""
    keys = [k for k in one if "running" not in k and one[k].dtype.is_floating_point]
    d1 = torch.cat([(one[k] - init[k]).flatten() for k in keys])
    d2 = torch.cat([(two[k] - init[k]).flatten() for k in keys])
    return float((d2 - d1).norm() / d1.norm())


def bn_gap(two: dict, one: dict) -> float:
    return max(float((two[k] - one[k]).abs().max()) for k in one if "running" in k)


def last_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.parametrize("algo", ["supervised", "crossmatch"])
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, plugin, algo):
    run = tmp_path / "two"
    out = launch(["--algo", algo, *ALGO_ARGS[algo], *TINY, "--plugin", str(plugin), "--batch-size", "2",
                  "--iterations", "3", "--out", str(run)])
    # rank 0 alone prints, logs, validates and writes: one final line, one row per logged step
    assert out.count("done: last val dice") == 1, out
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in r for r in rows) == 1 and sum('"val/dice"' in r for r in rows) == 1, rows
    init, one = one_process_reference(run, tmp_path / "one")
    two = last_state(run)
    gap = update_gap(two, one, init)
    assert gap < UPDATE_TOL[algo], f"{algo}: relative update gap {gap:.2e}"
    assert gap > 0  # sanity: the comparison compares two computations, not one file with itself
    assert bn_gap(two, one) < BN_TOL


def test_cross_entropy_is_exact_and_a_run_resumes_in_two_processes(tmp_path, plugin):
    """CE is a per-sample mean: 2 x B equals 1 x 2B to rounding. A one-process run (batch 4) stops after one
    step and ``semiseg train --nproc 2`` (batch 2 per process: the same global batch, so the same samples)
    resumes it. Every rank must load last.pt (a rank that did not would train from the initial weights and
    move the result far off), so the result must still equal an uninterrupted one-process run."""
    run = tmp_path / "run"
    common = ["--algo", "test_ce_only", *TINY, "--plugin", str(plugin), "--out", str(run), "--log-every", "1"]
    train_here([*common, "--batch-size", "4", "--iterations", "1"])
    launch([*common, "--batch-size", "2", "--iterations", "3", "--resume"], nproc_shortcut=True)
    # one row per step, written by rank 0 only; steps 2 and 3 come from the resumed launch
    steps = [json.loads(r)["iter"] for r in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert steps == [1, 2, 3], steps
    init, one = one_process_reference(run, tmp_path / "one", iterations=3)
    two = last_state(run)
    gap = update_gap(two, one, init)
    assert gap < UPDATE_TOL["test_ce_only"], f"relative update gap {gap:.2e}"
    assert bn_gap(two, one) < BN_TOL


def test_step_seed_differs_per_rank_and_depends_only_on_the_step():
    def draw(rank: int, it: int) -> torch.Tensor:
        dist_utils.seed_step(dist_utils.DistInfo(rank=rank, world=2), seed=0, iteration=it)
        return torch.rand(4)

    state = torch.get_rng_state()
    try:
        assert torch.equal(draw(0, 5), draw(0, 5))  # a resumed run draws what an uninterrupted one did
        assert not torch.equal(draw(0, 5), draw(1, 5))  # ranks draw their own dropout masks
        assert not torch.equal(draw(0, 5), draw(0, 6))
        before = torch.get_rng_state()
        dist_utils.seed_step(dist_utils.DistInfo(), seed=0, iteration=5)  # one process: left alone
        assert torch.equal(before, torch.get_rng_state())
    finally:
        torch.set_rng_state(state)


def test_sync_batchnorm_converts_in_place_and_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2)))
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    out = dist_utils.convert_sync_batchnorm(model)
    assert out is model and list(model.state_dict()) == keys
    assert isinstance(model[1], dist_utils.SyncBatchNorm) and isinstance(model[2][1], dist_utils.SyncBatchNorm)
    x = torch.randn(4, 1, 8, 8)
    np.testing.assert_allclose(model[:2](x).detach().numpy(), ref[:2](x).detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model[1].running_var.numpy(), ref[1].running_var.numpy(), rtol=1e-6)



def _agree_worker(rank: int, store_path: str, results: str) -> None:
    import torch.distributed as tdist

    from semiseg.engine.distributed import DistInfo, agree
    from semiseg.errors import TrainingError

    tdist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world=2)
    agree(info, 7, "step to resume from")  # same value: passes on both ranks
    try:
        agree(info, 7 if rank == 0 else 0, "step to resume from")  # rank 1 found no last.pt
        outcome = "no error"
    except TrainingError as e:
        outcome = str(e)
    Path(results, f"rank{rank}.txt").write_text(outcome)
    tdist.destroy_process_group()


def test_ranks_that_resume_from_different_steps_stop_with_one_sentence(tmp_path):
    import torch.multiprocessing as tmp_mp

    tmp_mp.spawn(_agree_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank 0: 7, rank 1: 0" in text and "same run directory (--out)" in text


def test_two_networks_train_in_two_processes_even_when_one_is_idle(tmp_path, plugin):
    """CPS's two networks are both in the DDP module (their gradients averaged, their weights kept equal on
    every rank); ABD leaves its second student idle while BCP pre-trains the first (``idle_networks``), and
    runs through the stage change."""
    for algo, extra in (("cps", ["--iterations", "2"]),
                        ("abd", ["--iterations", "4", "--opt", "pretrain_iterations=2", "--val-every", "2"])):
        run = tmp_path / algo
        args = [a for a in TINY if a != "--sync-bn"]
        if "--val-every" in extra:
            i = args.index("--val-every")
            del args[i:i + 2]
        out = launch(["--algo", algo, *args, "--batch-size", "2", "--out", str(run), *extra])
        assert out.count("done: last val dice") == 1, out
        ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        assert "model2" in ck["networks"] and ck["iteration"] == int(extra[1])
