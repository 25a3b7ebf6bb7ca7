"""The Python API: semiseg.train with the CLI's options, semiseg.load(...).predict, in-memory arrays."""

from __future__ import annotations

import numpy as np
import pytest

import semiseg
from semiseg.errors import ConfigError, DataError


def disks(n: int, size: int = 32, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bright disks of random centre and radius on noise: an easy 2-class problem."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(5, 9)
        y = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.int64)
        images.append((0.7 * y + 0.15 * rng.standard_normal((size, size))).astype(np.float32))
        labels.append(y)
    return images, labels


def test_train_on_arrays_then_load_and_predict(tmp_path):
    images, labels = disks(12)
    data = semiseg.arrays(images[:4], labels[:4], unlabeled=images[4:10], val_images=images[10:],
                          val_labels=labels[10:])
    assert (data.dim, data.num_classes, tuple(data.patch_size)) == (2, 2, (32, 32))
    run = semiseg.train(algo="fixmatch", data=data, iterations=40, batch_size=2, width=0.25, lr=0.05,
                        optimizer="adamw", val_every=20, out=tmp_path / "run")
    assert run.dir == tmp_path / "run" and run.config.algo == "fixmatch" and run.config.data == "arrays"
    assert run.summary["iteration"] == 40
    model = semiseg.load(run.dir)
    pred = model.predict(images[10])
    assert pred.shape == (32, 32) and set(np.unique(pred)) <= {0, 1}
    # batched-equals-unbatched style check: (H, W) and (1, H, W) are the same image
    assert np.array_equal(pred, model.predict(images[10][None]))
    assert run.summary["last"]["dice"] > 0.5  # bright disks on noise are learned in 40 AdamW steps


def test_train_takes_the_cli_options_and_refuses_unknown_ones(tmp_path):
    run = semiseg.train(algo="supervised", iterations=2, batch_size=2, width=0.25, patch_size="32,32",
                        data_options={"n_train": 8, "n_val": 2, "size": [32, 32]}, val_every=2,
                        out=tmp_path / "r")
    assert run.config.backbone_options == {"width": 0.25} and run.config.patch_size == [32, 32]
    with pytest.raises(ConfigError, match="unknown keys \\['iters'\\]"):
        semiseg.train(algo="supervised", iters=3, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="already holds a run .*; pass resume=True"):
        semiseg.train(algo="supervised", iterations=2, out=tmp_path / "r")


def test_predict_refuses_the_wrong_dimensionality_in_one_sentence(tmp_path):
    images, labels = disks(3)
    run = semiseg.train(data=semiseg.arrays(images, labels), iterations=1, batch_size=2, width=0.25,
                        val_every=1, out=tmp_path / "r")
    model = run.load()
    with pytest.raises(DataError, match="2D model with 1 input channel\\(s\\) takes \\(H, W\\) or \\(C, H, W\\)"):
        model.predict(np.zeros((2, 8, 8, 8), np.float32))
    with pytest.raises(DataError, match="NaN"):
        model.predict(np.full((32, 32), np.nan, np.float32))


def test_arrays_refuse_bad_input_in_one_sentence():
    images, labels = disks(2)
    with pytest.raises(DataError, match="label 1 has values 0..3 outside 0..1"):
        semiseg.arrays(images, [labels[0], labels[1] * 3], num_classes=2)
    with pytest.raises(DataError, match="as many labels as images"):
        semiseg.arrays(images, labels[:1])
    with pytest.raises(DataError, match="label 0 has shape"):
        semiseg.arrays(images[:1], [labels[0][:10]])
