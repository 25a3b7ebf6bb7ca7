"""`semiseg export`: a trained network as ONNX, TorchScript or safetensors, with a JSON sidecar that says how
to feed it (layout, patch, preprocessing plan) and what comes out (logits).

Every export is checked before it is kept: the written file is run (onnxruntime, ``torch.jit.load``, or a fresh
backbone with the loaded weights) on a random input and compared with the PyTorch network. The file is written
under a temporary name and renamed only once that check passes, so a failed export leaves nothing behind.

ONNX uses torch's TorchScript-based exporter by default (``exporter="auto"``): on the built-in U-Net and V-Net it
gives the same logits as the dynamo exporter, with dynamic batch and spatial axes, exists in every torch that
semiseg supports (>= 2.1; 2.14 measured) and takes about a second where the dynamo exporter takes 10-15 s on 2 CPU
cores. Where it fails (a backbone it cannot trace, or a torch without it) the dynamo exporter is tried next.
Formats, sidecar fields and measured differences: docs/export.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from semiseg import __version__, registry
from semiseg.engine import checkpoint as ckpt_io
from semiseg.errors import CheckpointError, ConfigError

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "safetensors": (".safetensors",)}
EXPORTERS = ("auto", "classic", "dynamo")
INPUT_NAME, OUTPUT_NAME = "image", "logits"
INSTALL = 'pip install "semiseg[export]"'
# ONNX keeps weights inside the one file up to protobuf's 2 GiB limit; semiseg's backbones are far below it
ONNX_SINGLE_FILE_BYTES = 2**31 - 2**26


def export_model(run: str | Path, fmt: str, out: str | Path, which: str = "last", opset: int | None = None,
                 overwrite: bool = False, exporter: str = "auto", tolerance: float = 1e-3,
                 seed: int = 0, network: str | None = None) -> dict[str, Any]:
    """Write the network of ``run`` (a run directory or a checkpoint file) as ``fmt`` to ``out`` and its JSON
    sidecar to ``out + ".json"``; return the paths, the format and the measured round-trip difference.

    ``tolerance`` is relative to the logits' scale: the export is refused when the largest absolute difference
    between the exported file's logits and PyTorch's exceeds ``tolerance * max(1, max |logits|)``. ``network``
    picks one of an algorithm's networks (default: the one the run evaluates; ``a+b``, their ensemble, exports
    as ONNX or TorchScript only, since safetensors holds one backbone's weights).
    """
    out = Path(out)
    _check_request(fmt, out, which, exporter, overwrite)
    ck_path = ckpt_io.resolve(run, prefer=which)
    if out.expanduser().resolve() == ck_path.expanduser().resolve():  # never replace the source, even with overwrite
        raise ConfigError(f"--out '{out}' is the checkpoint being exported; write the export to another file.")
    ck = ckpt_io.load(ck_path)
    registry.require_plugins(list((ck.get("config") or {}).get("plugins") or []), f"Checkpoint '{ck_path}'")
    from semiseg.engine.networks import resolve_eval
    from semiseg.evaluation.runs import load_model

    nets = ck["meta"].get("networks") or {"model": {"backbone": ck["meta"]["backbone"],
                                                    "backbone_options": ck["meta"].get("backbone_options") or {}}}
    names = resolve_eval(network, ck["meta"].get("eval_network") or "model", list(nets))
    if fmt == "safetensors" and len(names) > 1:
        raise ConfigError(f"safetensors holds one backbone's weights, but the network to export is the ensemble "
                          f"{'+'.join(names)}; choose one with --eval-net (e.g. {names[0]}) or export onnx.")
    # the chosen network's backbone, where the algorithm has several (CPS's model2, a teacher...)
    meta = {**ck["meta"], "network": "+".join(names), "backbone": nets[names[0]]["backbone"],
            "backbone_options": nets[names[0]].get("backbone_options") or {}}
    ck = {**ck, "meta": meta}
    # load_model may return channels_last weights (faster on the CPU); exported files get the plain layout,
    # which every runtime reads and which safetensors needs (contiguous tensors)
    model = load_model(ck, torch.device("cpu"), meta["network"]).to(memory_format=torch.contiguous_format).eval()
    dim = int(meta.get("dim", 2))
    patch = [int(p) for p in meta["patch_size"]]
    in_channels = int(meta["in_channels"])
    divisor = int(getattr(model, "divisor", 1) or 1)
    gen = torch.Generator().manual_seed(seed)

    def sample(batch: int, spatial: list[int]) -> torch.Tensor:
        return torch.randn(batch, in_channels, *spatial, generator=gen)

    # inputs the export is checked on: the patch, a batch of 2, and a batch of 2 at another size in every
    # spatial axis (smaller where it can be, to keep the check cheap for big 3D patches; still a multiple of
    # the backbone's divisor): the last two show whether the batch and spatial axes are really free
    patch_input = sample(1, patch)
    other = [p - divisor if p > divisor else p + divisor for p in patch]
    batch_input, free_input = sample(2, patch), sample(2, other)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "onnx":
            info = _write_onnx(model, tmp, out, dim, opset, exporter, tolerance,
                               [patch_input, batch_input, free_input])
        elif fmt == "torchscript":
            info = _write_torchscript(model, tmp, tolerance, [patch_input, batch_input, free_input])
        else:
            info = _write_safetensors(model, tmp, meta, tolerance, patch_input)
        if info["max_abs_diff"] > info["tolerance"]:
            raise CheckpointError(
                f"The {fmt} export of '{ck_path}' gives logits up to {info['max_abs_diff']:.3g} away from PyTorch's "
                f"(tolerance {info['tolerance']:.3g}), so '{out}' was not written; "
                + ("try exporter='dynamo' (--exporter dynamo)." if fmt == "onnx" and exporter == "classic"
                   else "export to another format, or report it with the backbone's name.")
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    sidecar = _sidecar(fmt, out, ck_path, ck, dim, patch, divisor, info)
    side = Path(f"{out}.json")
    _write_text_atomic(side, json.dumps(sidecar, indent=2) + "\n")
    return {"path": str(out), "sidecar": str(side), "format": fmt, "checkpoint": str(ck_path),
            "iteration": ck.get("iteration"), "max_abs_diff": info["max_abs_diff"], "tolerance": info["tolerance"],
            "checked_shapes": info["checked_shapes"], "dynamic_axes": info["dynamic_axes"],
            **({"opset": info["opset"], "exporter": info["exporter"]} if fmt == "onnx" else {})}


# -- checks before any work ---------------------------------------------------------------------------------------
def _check_request(fmt: str, out: Path, which: str, exporter: str, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"Export format '{fmt}' is not known; use {', '.join(FORMATS)}.")
    if which not in ("last", "best"):
        raise ConfigError(f"Checkpoint choice '{which}' is not known; use last or best.")
    if exporter not in EXPORTERS:
        raise ConfigError(f"ONNX exporter '{exporter}' is not known; use {', '.join(EXPORTERS)}.")
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise ConfigError(f"Output '{out}' does not end in {' or '.join(SUFFIXES[fmt])}, the suffix of {fmt} files; "
                          f"name it e.g. '{out.with_suffix(SUFFIXES[fmt][0]).name}'.")
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime") + (("onnxscript",) if exporter == "dynamo" else ()):
            _require(module, out)
    side = Path(f"{out}.json")
    for path in (out, side):
        if path.is_dir():
            raise ConfigError(f"Output '{path}' is a folder; pass a file name such as "
                              f"'{path / ('model' + SUFFIXES[fmt][0])}'.")
        if path.exists() and not overwrite:
            raise ConfigError(f"Output '{path}' already exists; pass --overwrite (overwrite=True) to replace it, "
                              f"or choose another --out.")


def _require(module: str, out: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"Writing '{out}' needs the Python package '{module}', which is not installed; "
                          f"run: {INSTALL}") from e


# -- writers: each writes ``path`` and measures it against the PyTorch model ----------------------------------------
@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing warns where the backbones check the input's shape in Python (a constant in the trace, which is
    right: the check is for callers of the PyTorch model) and about torch's deprecations of TorchScript; neither
    is something the user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _measure(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |exported - PyTorch|, max |PyTorch logits|) on ``x``; a wrong output shape or a NaN counts as
    infinitely far (a NaN would pass any comparison with the tolerance)."""
    with torch.no_grad():
        ref = model(x)
    got = run(x)
    if tuple(got.shape) != tuple(ref.shape):
        return math.inf, float(ref.abs().max())
    diff = float((got.float() - ref).abs().max())
    return (diff if math.isfinite(diff) else math.inf), float(ref.abs().max())


def _check_levels(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                  inputs: list[torch.Tensor]) -> tuple[float, float, list[list[int]]]:
    """Max difference and max |logits| over ``inputs``; the first input's failure is raised as it is, a later
    one (another batch or size) shows the axis is not free and is returned as inf."""
    worst, scale, shapes = 0.0, 0.0, []
    for i, x in enumerate(inputs):
        try:
            diff, s = _measure(run, model, x)
        except Exception:
            if i == 0:
                raise
            diff, s = math.inf, scale
        worst, scale = max(worst, diff), max(scale, s)
        shapes.append(list(x.shape))
    return worst, scale, shapes


# which axes may vary, tried from the most free to fixed; each level is checked on its inputs
LEVELS = (("batch", "spatial"), ("batch",), ())


def _axes(level: tuple[str, ...], dim: int) -> dict[int, str]:
    axes = {0: "batch"} if "batch" in level else {}
    if "spatial" in level:
        axes.update({2 + i: f"spatial_{i}" for i in range(dim)})
    return axes


def _level_inputs(level: tuple[str, ...], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    patch_input, batch_input, free_input = inputs
    return [patch_input] + ([batch_input] if "batch" in level else []) + ([free_input] if "spatial" in level else [])


def _write_onnx(model: nn.Module, path: Path, target: Path, dim: int, opset: int | None, exporter: str,
                rel_tol: float, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Export to ``path`` (``target`` is the name the user asked for, for messages) with the first exporter and
    the most free axes whose file reproduces the PyTorch network."""
    import onnx
    import onnxruntime as ort

    kinds = ["classic", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    best: dict[str, Any] | None = None
    for kind in kinds:
        if kind == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            errors.append(f"the dynamo exporter needs onnxscript ({INSTALL})")
            continue
        for level in LEVELS:
            axes = _axes(level, dim)
            try:
                _onnx_export(model, path, dim, opset, kind, axes, inputs[0] if "spatial" not in level
                             else inputs[2])
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - an exporter fails in many ways; the next level or kind may work
                errors.append(f"{kind} exporter with free axes {sorted(axes.values()) or 'none'}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue

            def run(x: torch.Tensor, session: Any = session) -> torch.Tensor:
                return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

            try:
                diff, scale, shapes = _check_levels(run, model, _level_inputs(level, inputs))
            except Exception as e:  # noqa: BLE001 - the file does not even run on the patch
                errors.append(f"{kind} exporter: onnxruntime failed on the patch ({type(e).__name__})")
                continue
            tol = rel_tol * max(1.0, scale)
            info = {"max_abs_diff": diff, "tolerance": tol, "checked_shapes": shapes, "dynamic_axes": axes,
                    "exporter": kind}
            if diff <= tol:
                proto = onnx.load(str(path), load_external_data=False)
                info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
                return info
            if best is None or diff < best["max_abs_diff"]:
                best = info
            errors.append(f"{kind} exporter with free axes {sorted(axes.values()) or 'none'}: "
                          f"difference {diff:.3g}")
    if best is not None:  # written but too far from PyTorch: the caller refuses it with the numbers
        best.setdefault("opset", opset)
        return best
    raise CheckpointError(f"No ONNX exporter could write '{target}' for this network ({'; '.join(errors)}); "
                          f"export to torchscript or safetensors instead.")


def _onnx_export(model: nn.Module, path: Path, dim: int, opset: int | None, kind: str, axes: dict[int, str],
                 example: torch.Tensor) -> None:
    if kind == "classic":
        names = {INPUT_NAME: axes, OUTPUT_NAME: axes}
        # torch >= 2.5 takes `dynamo` (and from 2.9 defaults it to True); older ones are classic only
        choose = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        with _quiet_tracing():
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=names or None, opset_version=opset, do_constant_folding=True, **choose)
        return
    from torch.export import Dim

    divisor = int(getattr(model, "divisor", 1) or 1)
    # spatial sizes are multiples of the backbone's divisor: saying so lets torch.export prove its shape checks
    shapes = {ax: (Dim("batch", min=1) if ax == 0 else divisor * Dim(name, min=1)) for ax, name in axes.items()}
    # an example whose deepest feature map is 1 wide would make torch.export fix that axis to 1: use 2 at least
    if "spatial_0" in axes.values():
        example = torch.randn(max(2, example.shape[0]), example.shape[1],
                              *[max(s, 2 * divisor) for s in example.shape[2:]])
    elif axes:
        example = torch.cat([example, example])
    with _quiet_tracing(), contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter prints progress
        program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=((shapes,) if axes else None), opset_version=opset,
                                    dynamo=True, verbose=False)
        program.save(str(path), external_data=_param_bytes(model) > ONNX_SINGLE_FILE_BYTES)


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _write_torchscript(model: nn.Module, path: Path, rel_tol: float, inputs: list[torch.Tensor]) -> dict[str, Any]:
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(model, inputs[0])
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with _quiet_tracing(), torch.no_grad():
            return loaded(x)

    # a trace is one program; which axes it leaves free is what the checks show, from the most free down
    dim = inputs[0].ndim - 2
    info: dict[str, Any] = {}
    for level in LEVELS:
        diff, scale, shapes = _check_levels(run, model, _level_inputs(level, inputs))
        info = {"max_abs_diff": diff, "tolerance": rel_tol * max(1.0, scale), "checked_shapes": shapes,
                "dynamic_axes": _axes(level, dim)}
        if diff <= info["tolerance"]:
            break
    return info


def _write_safetensors(model: nn.Module, path: Path, meta: dict[str, Any], rel_tol: float,
                       x: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    # safetensors stores plain contiguous tensors that share no memory
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "semiseg_backbone": str(meta["backbone"])})
    fresh = registry.create_backbone(meta["backbone"], **_backbone_options(meta))
    fresh.load_state_dict(load_file(str(path), device="cpu"))
    fresh.eval()

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fresh(t)

    diff, scale, shapes = _check_levels(run, model, [x])
    # the rebuilt PyTorch module takes any batch and any size the backbone accepts
    return {"max_abs_diff": diff, "tolerance": rel_tol * max(1.0, scale), "checked_shapes": shapes,
            "dynamic_axes": _axes(LEVELS[0], x.ndim - 2)}


def _backbone_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that rebuild the trained backbone (as ``load_model`` does): no pre-trained encoder
    file, since the exported weights replace it."""
    opts = dict(meta.get("backbone_options") or {})
    opts.pop("weights", None)
    opts.setdefault("in_channels", meta["in_channels"])
    opts.setdefault("num_classes", meta["num_classes"])
    return opts


# -- the sidecar ------------------------------------------------------------------------------------------------
def _sidecar(fmt: str, out: Path, ck_path: Path, ck: dict[str, Any], dim: int, patch: list[int], divisor: int,
             info: dict[str, Any]) -> dict[str, Any]:
    meta = ck["meta"]
    in_channels, num_classes = int(meta["in_channels"]), int(meta["num_classes"])
    axes: dict[int, str] = info["dynamic_axes"]
    spatial = [axes.get(2 + i, patch[i]) for i in range(dim)]
    layout = "NCHW" if dim == 2 else "NCDHW"
    shape_in = [axes.get(0, 1), in_channels, *spatial]
    shape_out = [axes.get(0, 1), num_classes, *spatial]
    fixed = [k for k in ("batch", "spatial") if not any(v.startswith(k) for v in axes.values())]
    return {
        "format": fmt,
        "file": out.name,
        "semiseg_version": __version__,
        "torch_version": torch.__version__,
        **({"onnx_opset": info.get("opset"), "onnx_exporter": info.get("exporter")} if fmt == "onnx" else {}),
        "dim": dim,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "class_names": meta.get("class_names"),
        "patch_size": patch,
        "spatial_divisor": divisor,
        "backbone": meta["backbone"],
        "backbone_options": _backbone_options(meta),
        "algo": meta.get("algo"),
        "network": meta.get("network", "model"),
        "checkpoint": str(ck_path.expanduser().resolve()),
        "iteration": ck.get("iteration"),
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": layout, "shape": shape_in,
            "dynamic_axes": {str(k): v for k, v in axes.items()},
            "note": (f"(N, C, *patch_size): the spatial axes in the order of patch_size; every spatial size must be "
                     f"a multiple of {divisor}" + (f"; {' and '.join(fixed)} fixed as in 'shape'" if fixed else "")),
        },
        "output": {
            "name": OUTPUT_NAME, "dtype": "float32", "layout": layout, "shape": shape_out, "kind": "logits",
            "note": "raw logits: softmax over axis 1 gives class probabilities, argmax over axis 1 the label map "
                    "(0 = background)",
        },
        "preprocessing": meta.get("preprocessing"),
        "check": {"max_abs_diff": info["max_abs_diff"], "tolerance": info["tolerance"],
                  "input_shapes": info["checked_shapes"],
                  "against": "the checkpoint's PyTorch network in eval mode, on random normal inputs"},
    }


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- command ----------------------------------------------------------------------------------------------------
@click.command()
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), required=True,
              help="onnx (any runtime), torchscript (torch.jit.load) or safetensors (weights; rebuild the backbone).")
@click.option("--out", required=True, help="File to write: .onnx, .pt/.ts or .safetensors; FILE.json goes beside it.")
@click.option("--checkpoint", "which", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Which checkpoint of a run directory (as `semiseg eval`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE and FILE.json.")
@click.option("--eval-net", "network", help="Which network of an algorithm with several (default: the one the run "
                                            "evaluates; a+b exports their ensemble, ONNX or TorchScript).")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--exporter", type=click.Choice(list(EXPORTERS)), default="auto", show_default=True,
              help="ONNX exporter: classic (TorchScript-based), dynamo, or auto (classic, then dynamo).")
def export(run: str, fmt: str, out: str, which: str, overwrite: bool, network: str | None, opset: int | None,
           exporter: str) -> None:
    """Write the network of RUN (a run directory or a .pt checkpoint) as ONNX, TorchScript or safetensors, with a
    JSON sidecar holding its input layout, classes and preprocessing plan."""
    r = export_model(run, fmt, out, which=which, opset=opset, overwrite=overwrite, exporter=exporter,
                     network=network)
    extra = f", opset {r['opset']}" if fmt == "onnx" else ""
    click.echo(f"wrote {r['path']} ({fmt}{extra}; {r['checkpoint']}, step {r['iteration']})")
    click.echo(f"wrote {r['sidecar']}")
    shapes = ", ".join("x".join(str(s) for s in shape) for shape in r["checked_shapes"])
    click.echo(f"max abs logits difference to PyTorch: {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}; "
               f"inputs {shapes})")
