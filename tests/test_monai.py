"""MONAI networks as backbones (encode/decode split along their own forward) and MONAI's sliding window.

Skipped without the ``monai`` extra, except in CI (CI=true), where its absence is a failure.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

try:
    import monai  # noqa: F401
except ImportError as e:
    if os.environ.get("CI") == "true":
        raise ImportError('CI must install the monai extra (pip install -e ".[monai]").') from e
    pytest.skip("the monai extra is not installed", allow_module_level=True)

import torch

import semiseg.backbones.monai  # noqa: F401  (registers "monai" until semiseg.backbones imports it)
from semiseg.backbones import SegBackbone
from semiseg.backbones.monai import ARCHS, monai_backbone
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError
from semiseg.evaluation.inference import sliding_window, window_starts
from semiseg.evaluation.monai_inferer import MonaiSlidingWindowInferer, monai_sliding_window, overlap_for_stride
from semiseg.evaluation.protocol import predictor
from semiseg.registry import create_backbone

# (options, spatial side): tiny nets; SwinUNETR needs 2 voxels at its /32 level (instance norm), hence 64.
SMALL = {
    "BasicUNet": ({"width": 0.25}, {2: 32, 3: 32}),
    "UNet": ({"width": 0.25, "num_res_units": 1}, {2: 32, 3: 32}),
    "SegResNet": ({"width": 0.5}, {2: 32, 3: 16}),
    "DynUNet": ({"width": 0.25}, {2: 32, 3: 32}),
    "SwinUNETR": ({"width": 0.5, "depths": [1, 1, 1, 1], "window_size": 4}, {2: 64, 3: 64}),
}
CASES = [(a, d) for a in ARCHS for d in (2, 3)]


def build(arch: str, dim: int, num_classes: int = 3, **kw) -> tuple[SegBackbone, torch.Tensor]:
    opts, sides = SMALL[arch]
    torch.manual_seed(0)
    m = monai_backbone(arch=arch, dim=dim, in_channels=1, num_classes=num_classes, **{**opts, **kw})
    batch = 1 if arch == "SwinUNETR" and dim == 3 else 2
    return m, torch.randn(batch, 1, *([sides[dim]] * dim))


@pytest.mark.parametrize("arch, dim", CASES)
def test_encode_decode_equals_monai_forward(arch, dim):
    m, x = build(arch, dim)
    assert isinstance(m, SegBackbone) and (m.dim, m.in_channels, m.num_classes) == (dim, 1, 3)
    assert all(s % m.divisor == 0 for s in x.shape[2:])
    m.eval()
    with torch.no_grad():
        feats = m.encode(x)
        y = m.decode(feats)
        assert torch.equal(m(x), y)
        assert torch.equal(m.model(x), y)  # the split computes exactly MONAI's own forward
    assert y.shape == (x.shape[0], 3, *x.shape[2:])
    assert isinstance(feats, list) and len(feats) >= 4
    sizes = [f.shape[2:].numel() for f in feats]
    assert sizes[-1] == min(sizes) and sizes[0] == max(sizes)  # shallowest first, deepest last
    # state_dict keys are MONAI's own under "model.": a MONAI checkpoint loads, nothing is registered twice
    assert set(m.state_dict()) == {f"model.{k}" for k in m.model.state_dict()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_feature_reaches_the_output_and_gets_gradients(arch):
    """Dropping any one feature map changes the logits: decode really consumes the whole feature list."""
    m, x = build(arch, 2)
    m.train()
    feats = m.encode(x)
    y = m.decode(feats)
    for i in range(len(feats)):
        changed = [f * 0.5 if j == i else f for j, f in enumerate(feats)]
        assert not torch.allclose(m.decode(changed), y), f"{arch}: feature {i} does not reach the output"
    (y * torch.randn_like(y)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{arch}: no gradient for {name}"


@pytest.mark.parametrize("algo, arch, dim, side", [
    ("unimatch", "BasicUNet", 2, 32),
    ("unimatch", "UNet", 2, 32),
    ("unimatch", "DynUNet", 2, 32),
    ("unimatch", "SwinUNETR", 2, 64),
    ("crossmatch", "SegResNet", 3, 16),
])
def test_feature_perturbing_algorithm_trains(tmp_path, algo, arch, dim, side):
    """Three steps of UniMatch / CrossMatch (feature dropout between encode and decode) on synthetic phantoms."""
    opts = {"arch": arch, "dim": dim, **SMALL[arch][0]}
    cfg = TrainConfig(algo=algo, backbone="monai", backbone_options=opts, data="synthetic",
                      data_options={"dim": dim, "n_train": 8, "n_val": 1, "size": [side] * dim, "num_classes": 2},
                      patch_size=[side] * dim, labeled=2, iterations=3, batch_size=2, optimizer="adamw", lr=0.01,
                      val_every=3, log_every=1, out=str(tmp_path / "run"), seed=0)
    summary = Trainer(cfg, quiet=True).fit()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(k.startswith("loss/") and k != "loss/sup" for k in rows[0])  # unsupervised terms ran
    assert summary["iteration"] == 3


def test_registry_options_and_divisors():
    m = create_backbone("monai", arch="segresnet", dim=3, width=0.5, num_classes=2)  # case-insensitive
    assert m.arch == "SegResNet" and m.divisor == 8 and m.model.init_filters == 4
    assert create_backbone("monai", arch="SwinUNETR", width=0.5).model.patch_size == 2
    assert create_backbone("monai", arch="SwinUNETR", width=0.5).divisor == 32
    assert create_backbone("monai", arch="DynUNet", strides=[1, 2, 2]).divisor == 4
    aniso = create_backbone("monai", arch="UNet", dim=3, channels=[4, 8, 16], strides=[[2, 2, 1], [2, 2, 2]])
    assert aniso.divisor == 4  # the largest axis's total; encode checks each axis with its own
    assert aniso.encode(torch.randn(1, 1, 8, 8, 2))[-1].shape[2:] == (2, 2, 1)
    unet = create_backbone("monai", arch="UNet", width=0.25)
    twin = copy.deepcopy(unet)  # an EMA teacher: the unrolled levels must be the copy's own modules
    assert twin._unet[0][0][0] is twin.model.model[0] and twin._unet[0][0][0] is not unet.model.model[0]
    thin, wide = (sum(p.numel() for p in monai_backbone(arch="BasicUNet", width=w).parameters()) for w in (0.25, 1))
    assert thin < wide
    with pytest.raises(ValueError, match="not divisible by 16 in every axis.*pad to \\(32, 32\\)"):
        monai_backbone(arch="BasicUNet", width=0.25).encode(torch.randn(1, 1, 24, 32))
    with pytest.raises(ValueError, match="C=1"):
        monai_backbone(arch="BasicUNet", width=0.25).encode(torch.randn(1, 2, 32, 32))


def test_clear_errors():
    with pytest.raises(ConfigError, match="Unknown MONAI architecture 'SegResNett' \\(did you mean 'SegResNet'\\?\\); "
                                          "known: BasicUNet, UNet, SegResNet, DynUNet, SwinUNETR\\."):
        monai_backbone(arch="SegResNett")
    with pytest.raises(ConfigError, match="does not take option 'init_filter' \\(did you mean 'init_filters'\\?\\)"):
        monai_backbone(arch="SegResNet", init_filter=8)
    with pytest.raises(ConfigError, match="give either width=0.5 or features"):
        monai_backbone(arch="BasicUNet", width=0.5, features=[8, 8, 16, 32, 64, 8])
    with pytest.raises(ConfigError, match="deep_supervision"):
        monai_backbone(arch="DynUNet", deep_supervision=True)
    with pytest.raises(ConfigError, match="dim=2 or dim=3"):
        monai_backbone(dim=1)
    with pytest.raises(ConfigError, match="'width' must be float"):
        create_backbone("monai", width="thin")


def test_monai_missing_is_one_sentence(monkeypatch):
    for name in [n for n in sys.modules if n == "monai" or n.startswith("monai.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises ImportError
    monkeypatch.setitem(sys.modules, "monai", None)
    hint = 'MONAI is not installed; install it with `pip install "semiseg\\[monai\\]"`\\.'
    with pytest.raises(ConfigError, match=hint):
        monai_backbone(arch="BasicUNet")
    with pytest.raises(ConfigError, match=hint):
        monai_sliding_window(torch.nn.Identity(), np.zeros((2, 8, 8), np.float32), (8, 8))


def test_importing_the_modules_does_not_import_monai():
    probe = ("import sys, semiseg.backbones.monai, semiseg.evaluation.monai_inferer; "
             "print('monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_local_weights_load_into_the_monai_network(tmp_path):
    a, x = build("SegResNet", 2)
    torch.save({"state_dict": a.model.state_dict()}, tmp_path / "w.pt")
    b = monai_backbone(arch="SegResNet", dim=2, num_classes=3, width=0.5, weights=str(tmp_path / "w.pt"))
    assert b.weights_report["loaded"] == len(a.model.state_dict()) and not b.weights_report["missing"]
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(ConfigError, match="does not exist"):
        monai_backbone(weights=str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------------------------------------
# MONAI sliding window against semiseg's
# --------------------------------------------------------------------------------------------------------


def test_window_placement_is_semiseg_rule_for_every_integer_stride():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size in range(1, 48):
        for patch in range(1, 33):
            for stride in range(1, patch + 1):
                full = max(size, patch)  # both pad an image smaller than the patch up to it
                interval = _get_scan_interval((full,), (patch,), 1, overlap_for_stride([patch], [stride]))
                starts = [s[0].start for s in dense_patch_slices((full,), (patch,), interval)]
                assert starts == window_starts(full, patch, stride), (size, patch, stride)
    with pytest.raises(ValueError, match="larger than the patch"):
        overlap_for_stride([8, 8], [4, 9])


@pytest.mark.parametrize("dim, shape, patch, stride", [
    (3, (1, 21, 30, 13), (16, 16, 16), (5, 7, 3)),   # several windows per axis, the last one shifted back
    (3, (1, 12, 40, 16), (16, 16, 16), None),         # x smaller than the patch: padded, then cropped
    (2, (2, 45, 37), (32, 32), (9, 32)),              # 2D, two input channels, one window along y
])
def test_monai_inferer_matches_semiseg_sliding_window(dim, shape, patch, stride):
    torch.manual_seed(0)
    model = monai_backbone(arch="SegResNet", dim=dim, in_channels=shape[0], num_classes=3, width=0.5)
    model.train()
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    labels, probs = sliding_window(model, image, patch, stride=stride, num_classes=3, return_probs=True)
    mprobs = monai_sliding_window(model, image, patch, num_classes=3, stride=stride, sw_batch_size=3)
    assert model.training and all(m.training for m in model.modules())  # train flags restored
    assert mprobs.shape == probs.shape == (3, *shape[1:]) and mprobs.dtype == np.float32
    np.testing.assert_allclose(mprobs, probs, atol=1e-6)
    assert np.array_equal(mprobs.argmax(0), labels)
    inferer = MonaiSlidingWindowInferer(patch, stride=stride, num_classes=3)
    assert np.array_equal(inferer(model, image), labels)
    if dim == 3:  # the evaluation protocol's --inferer monai gives the published protocol's labels here
        cpu = torch.device("cpu")
        for name in ("semiseg", "monai"):
            assert np.array_equal(predictor(model, 3, patch, 3, cpu, stride=stride, inferer=name)(image), labels)
    # Gaussian blending: the same windows, weights that differ by rounding and the 1e-3 floor
    _, gprobs = sliding_window(model, image, patch, stride=stride, weighting="gaussian", return_probs=True)
    np.testing.assert_allclose(monai_sliding_window(model, image, patch, stride=stride, mode="gaussian"), gprobs,
                               atol=0.02)


def test_monai_inferer_checks_the_class_count():
    model = monai_backbone(arch="SegResNet", dim=2, num_classes=3, width=0.5)
    with pytest.raises(ValueError, match="expected num_classes=2"):
        monai_sliding_window(model, np.zeros((1, 16, 16), np.float32), (16, 16), num_classes=2)


def test_eval_with_monai_inferer_and_mirroring(tmp_path):
    """`semiseg eval --inferer monai` scores a 3D run as semiseg's own window does (same windows, same labels);
    `--tta flip` runs through the same report and says so."""
    from semiseg.evaluation.runs import evaluate_run

    out = tmp_path / "run3d"
    cfg = TrainConfig(algo="supervised", backbone="vnet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 3, "n_train": 4, "n_val": 2, "size": [32, 32, 32], "num_classes": 2},
                      patch_size=[32, 32, 16], labeled=2, iterations=2, batch_size=2, val_every=2, out=str(out))
    Trainer(cfg, quiet=True).fit()
    ours = evaluate_run(out, split="val", save_pred=None, montage=0)
    theirs = evaluate_run(out, split="val", save_pred=None, montage=0, inferer="monai")
    assert theirs["inferer"] == "monai" and theirs["mean_dice"] == pytest.approx(ours["mean_dice"], abs=1e-9)
    flipped = evaluate_run(out, split="val", save_pred=None, montage=0, tta=True)
    assert flipped["tta"] == "flip" and 0.0 <= flipped["mean_dice"] <= 1.0
