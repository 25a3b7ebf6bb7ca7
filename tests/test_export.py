"""`semiseg export`: ONNX, TorchScript and safetensors files of a tiny 2D U-Net and 3D V-Net run give the PyTorch
network's logits, their JSON sidecar says how to use them, and bad requests are refused in one sentence."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semiseg import registry
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer
from semiseg.errors import CheckpointError, ConfigError
from semiseg.evaluation.runs import load_model
from semiseg.export import export, export_model

ATOL = 1e-4


def optional(module: str) -> types.ModuleType:
    """The module; the test is skipped without it (the `export` extra), except in CI, where CI=true must test it."""
    if os.environ.get("CI") == "true":
        try:
            return __import__(module)
        except ImportError as e:
            pytest.fail(f"{module} is not installed; CI must install semiseg[export] ({e})")
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 32x32 patches, quarter-width U-Net, 2 steps: the weights only need to be some trained ones."""
    out = tmp_path_factory.mktemp("export") / "run2d"
    cfg = TrainConfig(algo="supervised", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 2, "n_train": 8, "n_val": 2, "size": [32, 32], "num_classes": 3},
                      patch_size=[32, 32], labeled=4, iterations=2, batch_size=2, optimizer="adamw", lr=0.01,
                      val_every=2, log_every=1, out=str(out), seed=0)
    Trainer(cfg, quiet=True).fit()
    return out


@pytest.fixture(scope="module")
def run3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """V-Net at width 0.125 on 32x32x16 patches, 2 steps."""
    out = tmp_path_factory.mktemp("export") / "run3d"
    cfg = TrainConfig(algo="supervised", backbone="vnet", backbone_options={"width": 0.125}, data="synthetic",
                      data_options={"dim": 3, "n_train": 4, "n_val": 1, "size": [32, 32, 32], "num_classes": 2},
                      patch_size=[32, 32, 16], labeled=2, iterations=2, batch_size=1, optimizer="adamw", lr=0.01,
                      val_every=2, log_every=1, out=str(out), seed=0)
    Trainer(cfg, quiet=True).fit()
    return out


def pytorch(run: Path) -> tuple[torch.nn.Module, dict]:
    ck = ckpt_io.load(ckpt_io.resolve(run))
    return load_model(ck, torch.device("cpu")), ck


def reference(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def inputs(meta: dict) -> list[np.ndarray]:
    """The patch, and a batch of 3 at another size in every axis (a multiple of 16): dynamic axes at work."""
    rng = np.random.default_rng(1)
    patch = meta["patch_size"]
    other = [p + 16 if i % 2 == 0 else max(16, p - 16) for i, p in enumerate(patch)]
    return [rng.standard_normal((1, meta["in_channels"], *patch)).astype(np.float32),
            rng.standard_normal((3, meta["in_channels"], *other)).astype(np.float32)]


SIDECAR_KEYS = {"format", "semiseg_version", "dim", "in_channels", "num_classes", "class_names", "patch_size",
                "backbone", "backbone_options", "checkpoint", "iteration", "input", "output", "preprocessing", "check"}


@pytest.mark.parametrize("which", ["run2d", "run3d"])
def test_onnx_runs_in_onnxruntime_like_pytorch_at_any_batch_and_size(which, request, tmp_path):
    optional("onnx")
    ort = optional("onnxruntime")
    run = request.getfixturevalue(which)
    model, ck = pytorch(run)
    out = tmp_path / "model.onnx"
    r = export_model(run, "onnx", out)
    assert r["path"] == str(out) and r["format"] == "onnx" and r["max_abs_diff"] < ATOL
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("model.onnx", "model.onnx.json")]  # one file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for x in inputs(ck["meta"]):
        got = session.run(["logits"], {"image": x})[0]
        assert got.shape == (x.shape[0], ck["meta"]["num_classes"], *x.shape[2:])
        np.testing.assert_allclose(got, reference(model, x), atol=ATOL, rtol=0)
    side = json.loads(Path(f"{out}.json").read_text())
    assert SIDECAR_KEYS <= set(side)
    assert side["format"] == "onnx" and side["onnx_opset"] >= 13
    assert side["input"]["dynamic_axes"]["0"] == "batch" and len(side["input"]["dynamic_axes"]) == 1 + side["dim"]
    assert side["check"]["max_abs_diff"] == r["max_abs_diff"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # recent torch marks TorchScript deprecated
@pytest.mark.parametrize("which", ["run2d", "run3d"])
def test_torchscript_loads_with_jit_and_gives_the_same_logits(which, request, tmp_path):
    run = request.getfixturevalue(which)
    model, ck = pytorch(run)
    out = tmp_path / "model.ts"
    r = export_model(run, "torchscript", out)
    assert r["max_abs_diff"] < ATOL
    loaded = torch.jit.load(str(out))
    for x in inputs(ck["meta"]):
        with torch.no_grad():
            got = loaded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, reference(model, x), atol=ATOL, rtol=0)
    assert json.loads(Path(f"{out}.json").read_text())["format"] == "torchscript"


@pytest.mark.parametrize("which", ["run2d", "run3d"])
def test_safetensors_rebuild_from_the_sidecar_gives_the_same_logits(which, request, tmp_path):
    from safetensors.torch import load_file

    run = request.getfixturevalue(which)
    model, ck = pytorch(run)
    out = tmp_path / "weights.safetensors"
    r = export_model(run, "safetensors", out)
    assert r["max_abs_diff"] == 0.0
    side = json.loads(Path(f"{out}.json").read_text())
    # only the sidecar: the backbone's name and options rebuild the network the weights belong to
    fresh = registry.create_backbone(side["backbone"], **side["backbone_options"])
    fresh.load_state_dict(load_file(str(out)))
    fresh.eval()
    for x in inputs(ck["meta"]):
        with torch.no_grad():
            got = fresh(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, reference(model, x), atol=ATOL, rtol=0)


def test_sidecar_describes_the_network_and_passes_the_preprocessing_plan_through(run2d, tmp_path):
    ck = ckpt_io.load(ckpt_io.resolve(run2d))
    plan = {"intensity": "minmax", "percentiles": [0.5, 99.5], "resize": [32, 32], "steps": [{"op": "clip"}]}
    ck["meta"] = {**ck["meta"], "preprocessing": plan, "class_names": ["liver", "tumour"],
                  "backbone_options": {"width": 0.25, "weights": "/nowhere/encoder.pth"}}
    path = tmp_path / "tagged.pt"
    ckpt_io.save_atomic(ck, path)
    out = tmp_path / "net.safetensors"
    export_model(path, "safetensors", out)
    side = json.loads((tmp_path / "net.safetensors.json").read_text())
    assert side["preprocessing"] == plan
    assert side["class_names"] == ["liver", "tumour"]
    assert side["backbone"] == "unet"
    # the pre-trained encoder file is not needed (nor wanted) to rebuild trained weights
    assert side["backbone_options"] == {"width": 0.25, "in_channels": 1, "num_classes": 3}
    assert (side["dim"], side["in_channels"], side["num_classes"], side["patch_size"]) == (2, 1, 3, [32, 32])
    assert side["checkpoint"] == str(path.resolve()) and side["iteration"] == 2
    assert side["input"]["name"] == "image" and side["input"]["layout"] == "NCHW"
    assert side["input"]["shape"] == ["batch", 1, "spatial_0", "spatial_1"]
    assert side["output"]["name"] == "logits" and side["output"]["kind"] == "logits"
    assert "softmax over axis 1" in side["output"]["note"]
    assert side["spatial_divisor"] == 16 and side["semiseg_version"]
    # without a plan in the checkpoint: null, not a guess
    export_model(run2d, "safetensors", tmp_path / "plain.safetensors")
    assert json.loads((tmp_path / "plain.safetensors.json").read_text())["preprocessing"] is None


@pytest.mark.parametrize("fmt,name,needle", [
    ("tflite", "m.tflite", "not known"),
    ("onnx", "m.pt", "does not end in .onnx"),
    ("torchscript", "m.onnx", "does not end in .pt or .ts"),
    ("safetensors", "m.pt", "does not end in .safetensors"),
])
def test_bad_format_or_suffix_is_one_sentence(run2d, tmp_path, fmt, name, needle):
    with pytest.raises(ConfigError, match=needle):
        export_model(run2d, fmt, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_names_the_extra(run2d, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ConfigError) as e:
        export_model(run2d, "onnx", tmp_path / "m.onnx")
    assert "'onnxruntime'" in str(e.value) and 'pip install "semiseg[export]"' in str(e.value)
    assert str(tmp_path / "m.onnx") in str(e.value)


def test_existing_output_needs_overwrite_and_the_checkpoint_is_never_replaced(run2d, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_model(run2d, "safetensors", out)
    assert out.read_text() == "keep me"
    export_model(run2d, "safetensors", out, overwrite=True)
    assert out.stat().st_size > 1000
    with pytest.raises(ConfigError, match="is the checkpoint being exported"):
        export_model(run2d, "torchscript", run2d / "checkpoints" / "last.pt", overwrite=True)
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        export_model(tmp_path, "safetensors", tmp_path / "x.safetensors")


def test_an_export_that_does_not_reproduce_pytorch_is_refused_and_not_written(run2d, tmp_path, monkeypatch):
    real_load = torch.jit.load

    class Off(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 0.5

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Off(real_load(*a, **k)))
    with pytest.raises(CheckpointError, match=r"up to 0\.5 away from PyTorch's .* was not written"):
        export_model(run2d, "torchscript", tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())  # neither the file, its sidecar, nor a temporary


def test_auto_falls_back_to_the_dynamo_exporter_when_the_classic_one_fails(run2d, tmp_path, monkeypatch):
    optional("onnxruntime")
    from semiseg import export as ex

    calls = []
    real = ex._onnx_export

    def fake(model, path, dim, opset, kind, axes, example):
        calls.append(kind)
        if kind == "classic":
            raise RuntimeError("unsupported operator")
        return real(model, path, dim, opset, "classic", axes, example)  # stands in for dynamo (seconds faster)

    monkeypatch.setattr(ex, "_onnx_export", fake)
    r = export_model(run2d, "onnx", tmp_path / "m.onnx")
    assert calls == ["classic", "classic", "classic", "dynamo"] and r["exporter"] == "dynamo"
    assert json.loads((tmp_path / "m.onnx.json").read_text())["onnx_exporter"] == "dynamo"


def test_command_prints_what_it_wrote_and_the_difference(run2d, tmp_path):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(export, [str(run2d), "--format", "torchscript", "--out", str(out), "--checkpoint", "best"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"wrote {out} (torchscript;") and "best.pt, step 2" in lines[0]
    assert lines[1] == f"wrote {out}.json"
    assert lines[2].startswith("max abs logits difference to PyTorch: ")
    r = CliRunner().invoke(export, [str(run2d), "--format", "keras", "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 2 and "keras" in r.output


def test_no_working_onnx_exporter_is_one_sentence_and_writes_nothing(run2d, tmp_path, monkeypatch):
    optional("onnxruntime")
    from semiseg import export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator 'aten::frobnicate'")

    monkeypatch.setattr(ex, "_onnx_export", broken)
    out = tmp_path / "m.onnx"
    with pytest.raises(CheckpointError) as e:
        export_model(run2d, "onnx", out)
    msg = str(e.value)
    assert f"No ONNX exporter could write '{out}'" in msg and "frobnicate" in msg and "dynamo exporter" in msg
    assert msg.endswith("export to torchscript or safetensors instead.")
    assert not list(tmp_path.iterdir())


def test_one_network_of_several_or_their_ensemble(tmp_path_factory):
    """CPS trains two U-Nets: safetensors writes the one asked for (rebuilt and checked), TorchScript also the
    ensemble; safetensors of an ensemble is refused in one sentence."""
    out = tmp_path_factory.mktemp("export") / "cps"
    cfg = TrainConfig(algo="cps", backbone="unet", backbone_options={"width": 0.25}, data="synthetic",
                      data_options={"dim": 2, "n_train": 8, "n_val": 2, "size": [32, 32], "num_classes": 2},
                      patch_size=[32, 32], labeled=4, iterations=2, batch_size=2, optimizer="adamw", lr=0.01,
                      val_every=2, out=str(out), seed=0)
    Trainer(cfg, quiet=True).fit()
    from safetensors.torch import load_file

    r = export_model(out, "safetensors", tmp_path_factory.mktemp("e") / "m2.safetensors", network="model2")
    ck = ckpt_io.load(out / "checkpoints" / "last.pt")
    weights = load_file(r["path"])
    assert all(torch.equal(weights[k], v) for k, v in ck["networks"]["model2"].items())
    assert json.loads(Path(r["sidecar"]).read_text())["network"] == "model2"
    r = export_model(out, "torchscript", tmp_path_factory.mktemp("e") / "both.pt", network="model+model2")
    assert r["max_abs_diff"] <= r["tolerance"]
    with pytest.raises(ConfigError, match="holds one backbone's weights"):
        export_model(out, "safetensors", tmp_path_factory.mktemp("e") / "both.safetensors", network="model+model2")
