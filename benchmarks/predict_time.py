"""Predict time per LA case through the NIfTI pipeline, with and without mirroring (`--tta flip`).

Writes LA-half volumes (../shared/data/la-half, about 92 x 70 x 44 at 1.25 mm) as a NIfTI dataset, trains a V-Net
for one step (the time does not depend on the weights), then times `semiseg predict` on a folder of test cases:
reading, the stored plan, the sliding window, the way back to the file's grid and writing, per case.

    python benchmarks/predict_time.py --out /tmp/predict-time [--width 0.5 --patch 64,64,32] [--cases 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_la(root: Path, n_train: int, n_test: int) -> None:
    src = REPO.parent / "shared" / "data" / "la-half"
    ids = (src / "train.list").read_text().split()[:n_train] + (src / "test.list").read_text().split()[:n_test]
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    for i, case in enumerate(ids):
        with h5py.File(src / case / "mri_norm2.h5", "r") as f:
            image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"], np.uint8)
        part = "Tr" if i < n_train else "Ts"
        for folder, data in ((f"images{part}", image), (f"labels{part}", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"la_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left atrium": 1},
                                                   "channel_names": {"0": "MRI"}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", default="0.5")
    ap.add_argument("--patch", default="64,64,32")
    ap.add_argument("--cases", type=int, default=4)
    a = ap.parse_args()
    out = Path(a.out)
    data = out / "data"
    if not data.is_dir():
        write_la(data, 4, a.cases)
    semiseg = [sys.executable, "-m", "semiseg"]
    run = out / f"run-w{a.width}"
    if not (run / "checkpoints" / "last.pt").is_file():
        subprocess.run([*semiseg, "train", "--algo", "supervised", "--data", "nifti", "--data-root", str(data),
                        "--labeled", "2", "--backbone", "vnet", "--width", a.width, "--patch-size", a.patch,
                        "--iterations", "1", "--val-every", "1", "--batch-size", "2", "--quiet", "--out", str(run)],
                       check=True)
    shape = nib.load(str(sorted((data / "imagesTs").iterdir())[0])).shape
    one = out / "one"
    one.mkdir(exist_ok=True)
    first = sorted((data / "imagesTs").iterdir())[0]
    if not (one / first.name).exists():
        (one / first.name).symlink_to(first.resolve())

    def timed(folder: Path, tta: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([*semiseg, "predict", str(run), str(folder), "--out", str(out / f"pred-{tta}-{folder.name}"),
                        "--tta", tta, "--overwrite"], check=True, capture_output=True)
        return time.perf_counter() - t0

    for tta in ("none", "flip"):
        total, single = timed(data / "imagesTs", tta), timed(one, tta)
        # the difference between n cases and one case is the time of n - 1 cases without the process start
        per_case = (total - single) / (a.cases - 1)
        print(json.dumps({"tta": tta, "cases": a.cases, "case_shape": list(shape), "width": a.width,
                          "patch": a.patch, "command_seconds": round(total, 2),
                          "one_case_command_seconds": round(single, 2), "seconds_per_case": round(per_case, 2)}))


if __name__ == "__main__":
    main()
