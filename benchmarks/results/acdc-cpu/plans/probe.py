"""Probes of trained CrossMatch runs: where could the official and the minimal pass plans differ?

For each run directory given (the last checkpoint), on ACDC slices resized to the 128 x 128 training patch:

1. BatchNorm running statistics: validation Dice (val split, the test protocol) before and after re-estimating
   every BatchNorm layer's running mean and variance on clean training slices (cumulative average).
2. The teacher's decoder batch (train mode, as the teachers run): foreground Dice against the true labels of the
   clean teacher decoded alone, stacked with its weak and strong feature-dropout copies (the minimal plan's mix
   pass), and stacked after a padding batch of other slices (the official plan's f_fp(cat(x, u_w_mix)) pass).
3. The confident share (max probability >= 0.95) of the weak and strong feature-dropout teachers in either
   grouping.

    python benchmarks/results/acdc-cpu/plans/probe.py --data-root ../shared/data/acdc RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import semiseg
from semiseg.algorithms.perturbations import parse_perturbation
from semiseg.data.acdc import load_volume
from semiseg.engine.diagnostics import foreground_dice
from semiseg.evaluation.inference import predict_slices
from semiseg.evaluation.metrics import dice

SIZE = 128


def volumes(root: Path, listname: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (D, H, W), label (D, H, W)) of every case a split list names, read as the ACDC dataset reads them."""
    names = [line.strip() for line in (root / listname).read_text().splitlines() if line.strip()]
    return [(image[0], label) for image, label in (load_volume(root / "data" / f"{n}.h5") for n in names)]


def resized_slices(vols: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for image, label in vols:
        zoom = (SIZE / image.shape[1], SIZE / image.shape[2])
        out += [(ndimage.zoom(image[i], zoom, order=0), ndimage.zoom(label[i], zoom, order=0))
                for i in range(image.shape[0])]
    return out


def val_dice(net: torch.nn.Module, val: list[tuple[np.ndarray, np.ndarray]]) -> float:
    scores = []
    for image, label in val:
        pred = predict_slices(net, image, num_classes=4, size=(SIZE, SIZE), mode="nearest", device="cpu")
        scores.append(np.mean([dice(pred == c, label == c) for c in (1, 2, 3)]))
    return float(np.mean(scores))


def recalibrated(net: torch.nn.Module, slices: list[tuple[np.ndarray, np.ndarray]]) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch below
    net.train()
    with torch.no_grad():
        for s in range(0, len(slices), 8):
            net(torch.from_numpy(np.stack([x for x, _ in slices[s:s + 8]]))[:, None].float())
    return net.eval()


def teacher_probes(net: torch.nn.Module, slices: list[tuple[np.ndarray, np.ndarray]],
                   batches: int = 60, b: int = 4) -> dict[str, float]:
    weak, strong = parse_perturbation("drop:0.25"), parse_perturbation("drop:0.75")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the encoder's own dropout, active in train mode
    acc: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        acc.setdefault(key, []).append(value)

    def confident(logits: torch.Tensor) -> float:
        return float((logits.softmax(1).amax(1) >= 0.95).float().mean())

    net.train()
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.choice(len(slices), 2 * b, replace=False)
            u = torch.from_numpy(np.stack([slices[i][0] for i in idx[:b]]))[:, None].float()
            pad = torch.from_numpy(np.stack([slices[i][0] for i in idx[b:]]))[:, None].float()
            y = torch.from_numpy(np.stack([slices[i][1] for i in idx[:b]])).long()
            keep = torch.ones_like(y, dtype=torch.bool)
            f = net.encode(u)
            add("clean alone", foreground_dice(net.decode(f).argmax(1), y, keep, 4))
            out = net.decode([torch.cat([t, tw, ts]) for t, tw, ts in zip(f, weak(f, gen), strong(f, gen))])
            add("clean stacked (minimal)", foreground_dice(out[:b].argmax(1), y, keep, 4))
            add("weak confident (minimal)", confident(out[b:2 * b]))
            add("strong confident (minimal)", confident(out[2 * b:]))
            fp = net.encode(torch.cat([pad, u]))
            fu = [t[b:] for t in fp]
            out = net.decode([torch.cat([t[:b], tu, tw, ts])
                              for t, tu, tw, ts in zip(fp, fu, weak(fu, gen), strong(fu, gen))])
            add("clean padded (official)", foreground_dice(out[b:2 * b].argmax(1), y, keep, 4))
            add("weak confident (official)", confident(out[2 * b:3 * b]))
            add("strong confident (official)", confident(out[3 * b:]))
    return {k: float(np.nanmean(v)) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/acdc"))
    ap.add_argument("--calibration-cases", type=int, default=40, help="train.list volumes for BatchNorm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    val = volumes(args.data_root, "val.list")
    train = resized_slices(volumes(args.data_root, "train.list")[:args.calibration_cases])
    np.random.default_rng(0).shuffle(train)
    print(f"| run | val Dice | after BatchNorm re-estimation ({len(train)} slices) | teacher probes (train mode) |")
    print("|---|---|---|---|")
    for run in args.runs:
        net = semiseg.load(run, device="cpu").network
        before = val_dice(net, val)
        probes = teacher_probes(net, train)
        after = val_dice(recalibrated(net, train), val)
        text = ", ".join(f"{k} {100 * v:.1f}" for k, v in probes.items())
        print(f"| {run.name} | {100 * before:.1f} | {100 * after:.1f} | {text} |", flush=True)


if __name__ == "__main__":
    main()
