"""Seconds per training iteration of every algorithm at the reference shapes of the CrossMatch paper's
Table III (its timing: batch to device -> end of backward, after a warm-up), written to benchmarks/step_time.md.

    python benchmarks/step_time.py [--warmup 2] [--iters 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile

import torch

from semiseg.bench.timing import time_iterations
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer

ALGOS = ["supervised", "fixmatch", "unimatch", "crossmatch", "meanteacher", "uamt", "bcp"]
SETUPS = {
    "unet 128x128, 4 labeled + 4 unlabeled": dict(
        backbone="unet", patch_size=[128, 128], batch_size=4,
        data_options={"dim": 2, "n_train": 40, "n_val": 1, "size": [128, 128]}),
    "vnet 64^3, 2 labeled + 2 unlabeled": dict(
        backbone="vnet", patch_size=[64, 64, 64], batch_size=2,
        data_options={"dim": 3, "n_train": 20, "n_val": 1, "size": [64, 64, 64]}),
    "supervised reference: unet 128x128, batch 8": dict(
        backbone="unet", patch_size=[128, 128], batch_size=8,
        data_options={"dim": 2, "n_train": 40, "n_val": 1, "size": [128, 128]}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/step_time.md")
    ap.add_argument("--setups", default="all", help="comma-separated setup prefixes (unet,vnet,supervised)")
    ap.add_argument("--algos", default=",".join(ALGOS))
    a = ap.parse_args()
    lines = [
        "# Seconds per training iteration",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {datetime.date.today()}; load average at start "
        f"{os.getloadavg()[0]:.1f} (other jobs shared the cores, so treat these as upper bounds).",
        "Timing as the CrossMatch paper's Table III: from moving the batch to the device to the end of the",
        f"backward pass, mean of {a.iters} iterations after {a.warmup} warm-up iterations.",
        f"Command: `python benchmarks/step_time.py --warmup {a.warmup} --iters {a.iters} --setups {a.setups}`",
        "",
        "| setup | algorithm | s / iteration | it / s | encoder images | decoder images |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    for name, setup in SETUPS.items():
        if a.setups != "all" and not any(name.startswith(p) for p in a.setups.split(",")):
            continue
        algos = ["supervised"] if name.startswith("supervised") else a.algos.split(",")
        for algo in algos:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(algo=algo, data="synthetic", labeled=4, iterations=100, out=tmp, **setup)
                t = Trainer(cfg, quiet=True)
                r = time_iterations(t, warmup=a.warmup, iters=a.iters)
                plan = getattr(t.algo, "last_plan", {}) or {}
            s = r["ms_per_iter"] / 1000
            lines.append(f"| {name} | {algo} | {s:.3f} | {1 / s:.2f} | {plan.get('encoder_images', '-')} | "
                         f"{plan.get('decoder_images', '-')} |")
            print(lines[-1], flush=True)
            with open(a.out, "a") as f:  # one row at a time: a long 3D sweep keeps what it measured
                f.write(lines[-1] + "\n")


if __name__ == "__main__":
    main()
