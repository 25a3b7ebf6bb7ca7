"""The command line: parses, calls the library, prints. Errors a user can act on print one line, no traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from semiseg import __version__, registry
from semiseg.errors import ConfigError, SemisegError

console = Console(stderr=True)


def _parse_size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        return [int(p) for p in parts if p.strip()]
    except ValueError as e:
        raise ConfigError(f"Size '{text}' is not a list of integers; write e.g. 128,128 or 64x64x32.") from e


class SemisegGroup(click.Group):
    """Turns SemisegError into one red sentence and exit code 2 (--debug shows the traceback). Commands in
    ``LAZY`` are imported only when run, so `semiseg --help` and `--version` never import torch."""

    LAZY = {"bench": ("semiseg.bench.command", "Run algorithms x labeled splits x seeds; write results and plots."),
            "export": ("semiseg.export",
                       "Write the network as ONNX, TorchScript or safetensors with its preprocessing plan.")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            import importlib

            self.add_command(getattr(importlib.import_module(self.LAZY[name][0]), name))
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, self.LAZY[n][1] if n in self.LAZY and n not in self.commands
                 else self.commands[n].get_short_help_str(limit=200)) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SemisegError as e:
            if ctx.obj and ctx.obj.get("debug") or os.environ.get("SEMISEG_DEBUG"):
                raise
            # soft_wrap: one line even when stderr is a file or a pipe (rich would wrap it at 80 columns)
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=SemisegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="semiseg")
@click.option("--plugin", "plugins", multiple=True, help="Load a plugin: path/to/file.py or a module name.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, plugins: tuple[str, ...], debug: bool) -> None:
    """semiseg: semi-supervised medical image segmentation, one trainer for every algorithm."""
    ctx.obj = {"debug": debug, "plugins": list(plugins)}
    for p in plugins:
        registry.load_plugin(p)


# -- train ----------------------------------------------------------------------------------------------------
TRAIN_FLAGS = {
    # cli name -> config key
    "algo": "algo", "backbone": "backbone", "data": "data", "data_root": "data_root", "labeled": "labeled",
    "iterations": "iterations", "batch_size": "batch_size", "unlabeled_batch_size": "unlabeled_batch_size",
    "lr": "lr", "optimizer": "optimizer", "schedule": "schedule", "warmup": "warmup", "nesterov": "nesterov",
    "weight_decay": "weight_decay", "amp": "amp", "clip_grad": "clip_grad", "seed": "seed", "device": "device",
    "out": "out", "val_every": "val_every", "log_every": "log_every", "workers": "workers", "policy": "policy",
    "channels_last": "channels_last", "compile": "compile", "sync_bn": "sync_bn", "val_split": "val_split",
    "poly_total": "poly_total", "ema_decay": "ema_decay", "recipe": "recipe", "diagnostics": "diagnostics",
    "nproc": "nproc", "eval_net": "eval_net",
}


@cli.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML config (a run's config.yaml reruns it).")
@click.option("--algo", default="supervised", show_default=True, help="Algorithm (see `semiseg list`).")
@click.option("--recipe", type=click.Choice(["default", "official"]), default="default", show_default=True,
              help="official: the algorithm's official optimizer, schedule, length and batch sizes (flags win).")
@click.option("--opt", "algo_opts", multiple=True, help="Algorithm option key=value, e.g. --opt eta=0.3.")
@click.option("--backbone", default="auto", show_default=True,
              help="unet, vnet, unet3d, smp, monai; auto picks by data.")
@click.option("--arch", help="smp architecture (Unet, FPN, DeepLabV3Plus...) or MONAI network (BasicUNet, UNet, "
                            "SegResNet, DynUNet, SwinUNETR).")
@click.option("--encoder", help="smp/timm encoder, e.g. resnet34 or tu-resnet10t (with --backbone smp).")
@click.option("--weights", help="Local weights file for the smp encoder (no downloads).")
@click.option("--width", type=float, help="Width multiplier for thinner networks (e.g. 0.5 on CPU).")
@click.option("--backbone-opt", "backbone_opts", multiple=True, help="Backbone option key=value.")
@click.option("--data", default="synthetic", show_default=True, help="Dataset (see `semiseg list`).")
@click.option("--data-root", help="Folder of the dataset's files.")
@click.option("--data-opt", "data_opts", multiple=True, help="Dataset option key=value, e.g. --data-opt dim=3.")
@click.option("--dim", type=click.Choice(["2", "3"]), help="Synthetic/NIfTI data: 2D or 3D (default from backbone).")
@click.option("--labeled", type=float, help="Labeled count (>= 1) or fraction (< 1).")
@click.option("--iterations", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Labeled images per step.")
@click.option("--unlabeled-batch-size", type=int, help="Unlabeled images per step (default: --batch-size).")
@click.option("--lr", type=float, help="Learning rate (default 0.01 SGD, 1e-3 AdamW).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--schedule", type=click.Choice(["poly", "constant", "step", "cosine"]), default="poly",
              show_default=True)
@click.option("--poly-total", type=int, help="Poly decay horizon (default: the run length).")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up iterations.")
@click.option("--nesterov/--no-nesterov", default=False, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--amp/--no-amp", default=False, show_default=True, help="Mixed precision (bf16 CPU, fp16 CUDA).")
@click.option("--clip-grad", type=float, help="Clip the gradient norm to this value.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last memory format (default: auto, on for the CPU where it was measured to win).")
@click.option("--compile/--no-compile", "compile", default=False, show_default=True)
@click.option("--sync-bn/--no-sync-bn", default=False, show_default=True, help="SyncBatchNorm under torchrun.")
@click.option("--patch-size", "--crop-size", "patch_size", help="Training crop/patch, e.g. 128,128 or 64x64x32.")
@click.option("--policy", help="Augmentation policy (default: the dataset's).")
@click.option("--policy-opt", "policy_opts", multiple=True,
              help="Policy option key=value, e.g. --policy-opt foreground=0.33 (3D: share of organ-centred patches).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="Loader worker processes (default 0 on CPU, 4 on CUDA).")
@click.option("--val-every", type=int, default=100, show_default=True)
@click.option("--val-split", help="Split used for validation (default: the dataset's).")
@click.option("--eval-net", help="Network that validation evaluates, for algorithms with several (e.g. model, "
                                 "model2, teacher, or model+model2 for their ensemble; default: the algorithm's).")
@click.option("--ema-decay", type=float, help="Override the EMA teacher decay.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--logger", "loggers", multiple=True, type=click.Choice(["tensorboard", "wandb", "mlflow"]),
              help="Experiment tracker (may be given several times); pip install \"semiseg[tracking]\".")
@click.option("--diagnostics/--no-diagnostics", default=False, show_default=True,
              help="Log each pseudo-label edge's accuracy against the unlabeled images' true labels (where the "
                   "data has them; never used by a loss).")
@click.option("--out", help="Run directory (default runs/<algo>-<data>-s<seed>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.pt.")
@click.option("--plugin", "plugins", multiple=True, help="Load a plugin: path/to/file.py or a module name.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Processes (shortcut for torchrun).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx: click.Context, **kw: Any) -> None:
    """Train an algorithm. Example: semiseg train --algo crossmatch --backbone vnet"""
    from semiseg.engine.config import BACKBONE_SHORTCUTS, TrainConfig, default_synthetic_dim, parse_options

    for p in kw["plugins"]:
        registry.load_plugin(p)
    cfg = TrainConfig.load(kw["config_file"]) if kw["config_file"] else TrainConfig()
    # what the user chose (the recipe fills the rest): flags typed on the command line, keys of the config file
    explicit = {key for flag, key in TRAIN_FLAGS.items()
                if ctx.get_parameter_source(flag) == ParameterSource.COMMANDLINE}
    if kw["config_file"]:
        explicit |= set(yaml_keys(kw["config_file"]))

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE or not kw["config_file"]

    for flag, key in TRAIN_FLAGS.items():
        if given(flag) and kw[flag] is not None:
            setattr(cfg, key, kw[flag])
    if kw["data_root"] and given("data_root"):
        # absolute, so that `semiseg eval RUN` works from any directory
        cfg.data_root = str(Path(kw["data_root"]).expanduser().resolve())
    if kw["patch_size"]:
        cfg.patch_size = _parse_size(kw["patch_size"])
    # option groups given on the command line count as chosen too (recipe, resume)
    for key, given_now in (("algo_options", kw["algo_opts"]), ("patch_size", kw["patch_size"]),
                           ("backbone_options", kw["backbone_opts"] or any(kw[k] is not None for k in
                                                                          BACKBONE_SHORTCUTS)),
                           ("data_options", kw["data_opts"] or kw["dim"]), ("loggers", kw["loggers"]),
                           ("policy_options", kw["policy_opts"])):
        if given_now:
            explicit.add(key)
    if kw["loggers"]:
        cfg.loggers = list(dict.fromkeys([*cfg.loggers, *kw["loggers"]]))
    cfg.algo_options.update(parse_options(kw["algo_opts"], "--opt"))
    cfg.backbone_options.update(parse_options(kw["backbone_opts"], "--backbone-opt"))
    cfg.data_options.update(parse_options(kw["data_opts"], "--data-opt"))
    cfg.policy_options.update(parse_options(kw["policy_opts"], "--policy-opt"))
    for k in BACKBONE_SHORTCUTS:
        if kw[k] is not None:
            cfg.backbone_options[k] = kw[k]
    if kw["dim"]:
        cfg.data_options["dim"] = int(kw["dim"])
    default_synthetic_dim(cfg)
    cfg.plugins = sorted(set(cfg.plugins) | set(kw["plugins"]) | set((ctx.obj or {}).get("plugins", [])))
    if not cfg.out or (given("out") and kw["out"] is None):
        cfg.out = f"runs/{cfg.algo}-{cfg.data}-s{cfg.seed}"
    if cfg.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {cfg.nproc}.")
    from semiseg.engine.lock import check_run_dir

    check_run_dir(Path(cfg.out), kw["resume"])
    stored = Path(cfg.out) / "config.yaml"
    if kw["resume"] and stored.is_file():
        cfg, explicit = _stored_config(cfg, TrainConfig.load(stored), explicit, stored), TrainConfig.field_names()
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_torchrun(cfg.nproc)  # a config written by an --nproc N run reruns on N processes too

    from semiseg.engine.runlog import log_only, run_log

    # train.log holds everything from here on, the error sentence or traceback of a failed run included
    with run_log(Path(cfg.out) / "train.log", enabled=int(os.environ.get("RANK", "0")) == 0):
        try:
            _train(cfg, kw, explicit)
        except SemisegError as e:
            log_only(f"error: {e}")  # the group prints the same sentence on the terminal
            raise


def _train(cfg: Any, kw: dict[str, Any], explicit: set[str]) -> None:
    from semiseg.engine.trainer import Trainer

    trainer = Trainer(cfg, quiet=kw["quiet"], explicit=explicit)
    if trainer.dist.is_main and trainer.recipe:
        r = dict(trainer.recipe)
        console.print(f"recipe official ({r.pop('source')}): " + ", ".join(f"{k}={v}" for k, v in r.items()),
                      highlight=False, soft_wrap=True, markup=False)
    if trainer.dist.is_main:
        d = trainer.data
        console.print(f"[bold]semiseg[/] {cfg.algo} on {d.name} ({d.dim}D, {d.num_classes} classes, "
                      f"{len(d.labeled)} labeled / {len(d.unlabeled)} unlabeled), backbone "
                      f"{trainer.meta['backbone']} ({sum(p.numel() for p in trainer.model.parameters()):,} "
                      f"parameters), {trainer.total} iterations on {trainer.device} -> {escape(cfg.out)}",
                      highlight=False,
                      soft_wrap=True)
    summary = trainer.fit(resume=kw["resume"])
    if trainer.dist.is_main and summary.get("last"):
        console.print(f"done: last val dice {summary['last']['dice']:.4f}, best {summary['best']['dice']:.4f} "
                      f"at step {summary['best']['iteration']}; {escape(cfg.out)}", highlight=False, soft_wrap=True)


# what may change when a run is resumed: how it runs, and its length (--iterations extends a run; the poly
# schedule then decays over the new length from where the run is)
RESUME_MAY_CHANGE = ("device", "workers", "log_every", "val_every", "loggers", "out", "plugins", "iterations")


def _stored_config(cfg: Any, stored: Any, explicit: set[str], path: Path) -> Any:
    """--resume continues the run's stored config (its data included); a flag that contradicts it is refused.
    The processes may change when the global batch (per-process batch x processes) stays the same."""
    world = int(os.environ.get("WORLD_SIZE", cfg.nproc))
    same_global = all((getattr(cfg, k) or cfg.batch_size) * world == (getattr(stored, k) or stored.batch_size)
                      * stored.nproc for k in ("batch_size", "unlabeled_batch_size"))
    movable = {"batch_size", "unlabeled_batch_size", "nproc"} if same_global else set()
    clash = [f"{k} {getattr(cfg, k)!r} (the run has {getattr(stored, k)!r})" for k in sorted(explicit)
             if k not in RESUME_MAY_CHANGE and k not in movable and getattr(cfg, k) != getattr(stored, k)]
    if clash:
        raise ConfigError(f"--resume continues the run stored in '{path}', but the command line changes "
                          f"{'; '.join(clash)}; drop those flags or start a new --out.")
    for k in (*RESUME_MAY_CHANGE, *movable):
        if k in explicit or k == "out":
            setattr(stored, k, getattr(cfg, k))
    if movable & explicit:
        stored.nproc = world
    return stored


def yaml_keys(path: str) -> list[str]:
    import yaml

    d = yaml.safe_load(Path(path).read_text()) or {}
    return list(d) if isinstance(d, dict) else []


def _relaunch_torchrun(nproc: int) -> None:
    import subprocess

    args = [a for a in sys.argv[1:]]
    i = args.index("--nproc") if "--nproc" in args else None
    if i is not None:
        del args[i:i + 2]
    else:
        args = [a for a in args if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "semiseg", *args]
    sys.exit(subprocess.call(cmd))


# -- eval / predict -----------------------------------------------------------------------------------------------
@cli.command(name="eval")
@click.argument("run", type=click.Path())
@click.option("--split", default="test", show_default=True, help="Evaluation split (val, test, valtest...).")
@click.option("--checkpoint", "which", default="last", show_default=True,
              help="last or best checkpoint of a run directory (the CrossMatch paper reports last), or a file.")
@click.option("--data-root", help="Where the data lives now, if it moved since training.")
@click.option("--out", help="Report directory (default RUN/eval/<split>-<checkpoint>, e.g. RUN/eval/test-last).")
@click.option("--save-pred", type=click.Choice(["nifti", "h5", "none"]), default="nifti", show_default=True)
@click.option("--empty", type=click.Choice(["nan", "zero", "penalize"]), default="nan", show_default=True,
              help="One-sided empty masks: nan leaves their HD95/ASD out (counted as missing); zero scores "
                   "everything 0; penalize scores Dice 0 and HD95/ASD the image diagonal.")
@click.option("--spacing", type=click.Choice(["voxel", "mm"]), default="voxel", show_default=True)
@click.option("--stride", help="Sliding-window stride for 3D, e.g. 18,18,4 (default: the dataset's official "
                                "test stride, 18,18,4 on LA; else half the patch).")
@click.option("--max-cases", type=int, help="Evaluate only the first N cases.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: average the predictions of every mirrored copy (4 in 2D, 8 in 3D).")
@click.option("--inferer", type=click.Choice(["semiseg", "monai"]), default="semiseg", show_default=True,
              help="3D sliding window: semiseg's (the published LA protocol) or MONAI's (needs semiseg[monai]).")
@click.option("--eval-net", help="Network to evaluate, for algorithms with several (e.g. model2, or model+model2 "
                                 "for their ensemble; default: the one the run validated).")
@click.option("--device", default="auto", show_default=True)
def eval_cmd(run: str, split: str, which: str, data_root: str | None, out: str | None, save_pred: str,
             empty: str, spacing: str, stride: str | None, max_cases: int | None, tta: str, inferer: str,
             eval_net: str | None, device: str) -> None:
    """Evaluate RUN (a run directory or a .pt checkpoint): Dice, Jaccard, HD95, ASD per case and class."""
    from semiseg.evaluation.runs import evaluate_run

    st = tuple(_parse_size(stride)) if stride else None
    s = evaluate_run(run, split=split, data_root=data_root, out=out, which=which, device=device,
                     save_pred=None if save_pred == "none" else save_pred, empty=empty, spacing=spacing,
                     max_cases=max_cases, stride=st, tta=tta == "flip", inferer=inferer, network=eval_net)
    unit = "mm" if spacing == "mm" else "vox"
    stride_text = f", stride {','.join(map(str, s['stride']))}" if s.get("stride") else ""
    t = Table(title=f"split '{split}', {s['checkpoint_rule']} checkpoint (step {s['iteration']}, {s['checkpoint']}): "
                    f"{s['num_cases']} cases{stride_text}",
              caption=f"HD95 and ASD: medpy's definitions, in {unit} (ASD: prediction to ground truth). "
                      f"Empty masks: {empty}" + ("; '(k missing)': values left out of that mean"
                                                 if empty == "nan" else ""))
    for col in ("class", "dice", "jaccard", f"hd95 ({unit})", f"asd ({unit})"):
        t.add_column(col, justify="right" if col != "class" else "left")
    names = s.get("class_names") or []
    rows = [(names[int(c) - 1] if 0 < int(c) <= len(names) else c, st) for c, st in s["per_class"].items()]
    rows.append(("mean", s["overall"]))
    for name, stats in rows:
        t.add_row(str(name), *(_fmt(stats.get(m)) for m in ("dice", "jaccard", "hd95", "asd")))
    Console().print(t)
    console.print(f"report: {escape(str(s['out_dir']))}", highlight=False, soft_wrap=True)


def _fmt(stat: Any) -> str:
    if isinstance(stat, dict):
        mean, std, missing = stat.get("mean"), stat.get("std"), stat.get("missing") or 0
        gap = f" ({missing} missing)" if missing else ""
        if mean is None or mean != mean:  # None in JSON, NaN in memory
            return "-" + gap
        return (f"{mean:.4f} ± {std:.4f}" if std is not None and std == std else f"{mean:.4f}") + gap
    return "-" if stat is None else f"{stat:.4f}"


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for the predicted label maps.")
@click.option("--format", "fmt", type=click.Choice(["nifti", "h5", "png"]), help="Default: png for 2D, nifti else.")
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint", "which", default="last", show_default=True,
              help="last or best checkpoint of a run directory (as `semiseg eval`), or a checkpoint file.")
@click.option("--save-prob", is_flag=True, help="Also write class probabilities (<case>_prob.nii.gz, 4D on the "
                                                 "input's grid; .npz for other inputs).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: average the predictions of every mirrored copy (4 in 2D, 8 in 3D).")
@click.option("--inferer", type=click.Choice(["semiseg", "monai"]), default="semiseg", show_default=True,
              help="3D sliding window: semiseg's or MONAI's (needs semiseg[monai]).")
@click.option("--overwrite", is_flag=True, help="Replace existing files in --out (never an input).")
def predict(checkpoint: str, inputs: tuple[str, ...], out: str, fmt: str | None, device: str, which: str,
            save_prob: bool, tta: str, inferer: str, overwrite: bool) -> None:
    """Predict label maps for new images (NIfTI, h5, PNG/JPG/TIFF files, or folders of them) with a run directory
    or a checkpoint file. NIfTI inputs go through the model's stored preprocessing and come back on their own
    grid with their own affine; nnU-Net channel files (case_0000, case_0001...) form one case."""
    from semiseg.evaluation.predict import predict_files

    for p in predict_files(checkpoint, list(inputs), out, device=device, fmt=fmt, which=which,
                           overwrite=overwrite, save_prob=save_prob, tta=tta == "flip", inferer=inferer,
                           progress=True):
        console.print(f"wrote {escape(str(p))}", highlight=False, soft_wrap=True)


# -- list -----------------------------------------------------------------------------------------------------
def _doc(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else str(getattr(obj, "paper", "") or "")


@cli.command(name="list")
def list_cmd() -> None:
    """Show every registered algorithm, backbone, dataset, policy, perturbation and preset (plugins too)."""
    out = Console()
    for title, table in registry.TABLES.items():
        t = Table(title=title, title_justify="left", show_lines=False)
        t.add_column("name", style="bold cyan")
        t.add_column("from")
        t.add_column("description")
        for name in table.names():
            t.add_row(name, table.origin(name), _doc(table.get(name)))
        out.print(t)
    plugins = registry.loaded_plugins()
    out.print(f"plugins loaded: {', '.join(plugins) if plugins else 'none'}")




def main() -> None:
    cli(prog_name="semiseg")


if __name__ == "__main__":
    main()
