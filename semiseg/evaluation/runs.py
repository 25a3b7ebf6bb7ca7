"""Evaluate a trained run or checkpoint (`semiseg eval`), and rebuild its network (also for predict and export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from semiseg import registry
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine.config import TrainConfig
from semiseg.engine.perf import to_channels_last, use_channels_last
from semiseg.errors import CheckpointError, ConfigError
from semiseg.evaluation.metrics import METRIC_DEFINITIONS
from semiseg.evaluation.protocol import foreground_names, predictor
from semiseg.evaluation.report import evaluate_cases


def _build(meta: dict[str, Any], backbone: str, options: dict[str, Any]) -> torch.nn.Module:
    opts = dict(options or {})
    opts.pop("weights", None)  # the trained weights replace any pre-trained encoder file
    opts.setdefault("in_channels", meta["in_channels"])
    opts.setdefault("num_classes", meta["num_classes"])
    if "dim" in registry.accepted_kwargs(registry.BACKBONES.get(backbone))[0]:
        opts.setdefault("dim", int(meta.get("dim", 2)))  # dimension-generic backbones (monai)
    return registry.create_backbone(backbone, **opts)


def load_model(ckpt: dict[str, Any], device: torch.device, network: str | None = None) -> torch.nn.Module:
    """Rebuild the network a checkpoint evaluates (``network``: a name, ``a+b`` for the ensemble of several; default
    the one the run validated) and load its weights (eval mode)."""
    from semiseg.engine.networks import Ensemble, resolve_eval

    meta = ckpt["meta"]
    nets = meta.get("networks") or {"model": {"backbone": meta["backbone"],
                                              "backbone_options": meta.get("backbone_options") or {}}}
    names = resolve_eval(network, meta.get("eval_network") or "model", list(nets))
    members = []
    for name in names:
        spec = nets[name]
        model = _build(meta, spec["backbone"], spec.get("backbone_options") or {})
        model.load_state_dict(ckpt["model"] if name == "model" else ckpt["networks"][name])
        members.append(model)
    model = (members[0] if len(members) == 1 else Ensemble(members)).to(device).eval()
    dim = int(meta.get("dim", 2))
    return to_channels_last(model, dim) if use_channels_last(None, dim, device) else model  # as in training


def evaluate_run(path: str | Path, split: str = "test", data_root: str | None = None, out: str | Path | None = None,
                 which: str = "last", device: str = "auto", save_pred: str | None = "nifti", empty: str = "nan",
                 spacing: str = "voxel", max_cases: int | None = None, stride: tuple[int, ...] | None = None,
                 montage: int = 4, tta: bool = False, inferer: str = "semiseg",
                 network: str | None = None) -> dict[str, Any]:
    """Evaluate a run directory or checkpoint on ``split`` with the test protocol; write the report.

    ``which`` is ``last`` or ``best`` (of a run directory) or a checkpoint file. A model trained on data with a
    preprocessing plan (NIfTI) is evaluated with that stored plan, on each case's own grid."""
    from semiseg.engine.trainer import build_data, pick_device

    if which in ("last", "best"):
        ck_path = ckpt_io.resolve(path, prefer=which)
    else:
        ck_path, path = Path(which), Path(which)
        if not ck_path.is_file():
            raise CheckpointError(f"Checkpoint '{ck_path}' does not exist; give last, best or a checkpoint file.")
    ck = ckpt_io.load(ck_path)
    cfg = TrainConfig.from_dict(ck["config"], source=f"Checkpoint '{ck_path}'")
    registry.require_plugins(cfg.plugins, f"Checkpoint '{ck_path}'")
    if data_root is not None:
        cfg.data_root = data_root
    if ck["meta"].get("preprocessing") is not None:  # the plan stored with the model, not a new one
        cfg.data_options = {**cfg.data_options, "plan": ck["meta"]["preprocessing"]}
    data = build_data(cfg)
    if data.num_classes != ck["meta"]["num_classes"]:
        raise ConfigError(f"Dataset '{data.name}' has {data.num_classes} classes but checkpoint '{ck_path}' was "
                          f"trained for {ck['meta']['num_classes']}; evaluate on the data it was trained on.")
    dev = pick_device(device)
    model = load_model(ck, dev, network)
    cases = data.cases(split)
    if max_cases:
        cases = cases[:max_cases]
    if stride is None and data.info.get("eval_stride") is not None:
        stride = tuple(int(s) for s in data.info["eval_stride"])  # the dataset's official test stride
    predict = predictor(model, data.dim, data.patch_size, data.num_classes, dev, mode="test", stride=stride,
                        tta=tta, inferer=inferer)
    if save_pred is not None and out is not None and cfg.data_root:
        check_output_folder(Path(out), [Path(cfg.data_root)], "the dataset root")
    # every report is kept under a name that says what it measured: RUN/eval/<split>-<checkpoint>
    rule = which if Path(path).is_dir() else ck_path.stem
    base = ck_path.parent.parent if ck_path.parent.name == "checkpoints" else ck_path.parent
    out_dir = Path(out) if out else base / "eval" / f"{split}-{rule}"
    # what the numbers mean travels with them (the printed table and summary.json name each)
    about = {"split": split, "checkpoint_rule": which if Path(path).is_dir() else "file",
             "checkpoint": str(ck_path), "iteration": ck["iteration"],
             "stride": list(stride) if stride is not None else None, "metric_definitions": METRIC_DEFINITIONS,
             "tta": "flip" if tta else None, "inferer": inferer,
             "network": network or ck["meta"].get("eval_network") or "model"}
    summary = evaluate_cases(predict, cases, data.num_classes, spacing_mode=spacing, empty=empty, out_dir=out_dir,
                             save_pred=save_pred, montage=montage, class_names=foreground_names(data), about=about)
    summary["out_dir"] = str(out_dir)
    return summary


def check_output_folder(out: Path, protected: list[Path], what: str) -> None:
    """Refuse an output folder that is, or lies inside, a folder the user gave as input (or the data root)."""
    o = out.expanduser().resolve()
    for folder in protected:
        f = folder.expanduser().resolve()
        if o == f or f in o.parents:
            raise ConfigError(f"--out '{out}' lies inside {what} '{folder}'; write predictions elsewhere, so that "
                              f"nothing you gave is overwritten.")
