"""The training loop. It knows no particular algorithm: it builds the parts from the registries, feeds the
algorithm the batches it asked for, sums its loss terms, steps, validates, logs and checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semiseg import registry
from semiseg.algorithms.base import Algorithm, Stage, StepContext
from semiseg.engine import checkpoint as ckpt_io
from semiseg.engine import distributed as dist_utils
from semiseg.engine.config import TrainConfig
from semiseg.engine.diagnostics import pseudo_label_stats, split_truth
from semiseg.engine.ema import EMATeacher
from semiseg.engine.loaders import ZipLoaders, make_loader
from semiseg.engine.lock import run_lock
from semiseg.engine.networks import Ensemble, build_networks, resolve_eval
from semiseg.engine.perf import (
    channels_last_format,
    compile_backbone,
    to_channels_last,
    use_channels_last,
    warn_slow_cpu_amp,
)
from semiseg.engine.progress import ProgressLog
from semiseg.engine.recipes import apply_recipe
from semiseg.engine.record import resolved_config, write_record
from semiseg.engine.runlog import run_log
from semiseg.engine.tracking import check_loggers, open_trackers
from semiseg.errors import CheckpointError, ConfigError, DataError, TrainingError
from semiseg.evaluation.protocol import validate
from semiseg.schedules import learning_rate

MIN_FREE_BYTES = 200 * 2**20


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(name)


def build_data(cfg: TrainConfig):
    """The dataset named in the config, with the shared options mapped onto the factory's parameters."""
    kwargs = dict(cfg.data_options)
    if cfg.data_root is not None:
        kwargs["root"] = cfg.data_root
    if cfg.labeled is not None:
        kwargs["labeled"] = cfg.labeled
    if cfg.patch_size is not None:
        kwargs["patch_size"] = tuple(cfg.patch_size)
    fn = registry.DATASETS.get(cfg.data)
    names, _ = registry.accepted_kwargs(fn)
    if "seed" in names and "seed" not in kwargs:
        kwargs["seed"] = cfg.seed
    return registry.create_dataset(cfg.data, **kwargs)


def check_cases(data, split: str, max_cases: int | None = None) -> None:
    """The validation cases' images and labels, checked before training like the labeled ones (a bad label
    would otherwise be found at the first validation)."""
    from semiseg.data.checks import check_finite, check_label_values

    cases = data.cases(split)
    for case in cases[:max_cases] if max_cases else cases:
        check_finite(np.asarray(case.image), f"validation case {case.name}")
        if case.label is not None:
            check_label_values(np.asarray(case.label), data.num_classes, f"validation case {case.name}")


def build_model(cfg: TrainConfig, data, required: dict[str, Any] | None = None,
                backbone: str | None = None, options: dict[str, Any] | None = None) -> nn.Module:
    """The run's backbone (or ``backbone`` with ``options`` over the run's, for an algorithm's second network),
    with the options the algorithm needs (``required``: an extra decoder, a multi-scale head)."""
    name = backbone or cfg.backbone
    if name == "auto":
        name = "vnet" if data.dim == 3 else "unet"
    opts = {**cfg.backbone_options, **(options or {})} if backbone is None else dict(options or {})
    accepted, any_kwargs = registry.accepted_kwargs(registry.BACKBONES.get(name))
    missing = [k for k in (required or {}) if k not in accepted and not any_kwargs]
    if missing:
        having = [n for n in registry.BACKBONES.names()
                  if all(k in registry.accepted_kwargs(registry.BACKBONES.get(n))[0] for k in missing)]
        raise ConfigError(f"Algorithm '{cfg.algo}' needs the backbone option {', '.join(missing)}, which backbone "
                          f"'{name}' does not have; use --backbone {' or '.join(having) or 'unet'}.")
    for k, v in (required or {}).items():
        if k in opts and opts[k] != v:
            raise ConfigError(f"Algorithm '{cfg.algo}' needs the backbone option {k}={v!r}, but {k}={opts[k]!r} "
                              f"was given; drop --backbone-opt {k}.")
        opts[k] = v
    opts.setdefault("in_channels", data.in_channels)
    opts.setdefault("num_classes", data.num_classes)
    if "dim" in registry.accepted_kwargs(registry.BACKBONES.get(name))[0]:
        opts.setdefault("dim", data.dim)  # dimension-generic backbones (monai) follow the data
    model = registry.create_backbone(name, **opts)
    bdim = getattr(model, "dim", None)
    if bdim is not None and bdim != data.dim:
        other = "vnet, unet3d or monai" if data.dim == 3 else "unet, smp or monai"
        raise ConfigError(
            f"Backbone '{name}' is {bdim}D but dataset '{data.name}' is {data.dim}D; use --backbone {other}."
        )
    d = int(getattr(model, "divisor", 1) or 1)
    patch = tuple(int(p) for p in data.patch_size)
    if any(p % d for p in patch):
        fixed = ",".join(str(-(-p // d) * d) for p in patch)
        raise ConfigError(f"--patch-size {','.join(map(str, patch))} does not suit backbone '{name}', which needs "
                          f"every side to be a multiple of {d}; use e.g. --patch-size {fixed}.")
    return model


def build_policy(cfg: TrainConfig, data):
    name = cfg.policy or data.policy
    options = dict(data.policy_options) if name == data.policy else {}
    options.update(cfg.policy_options)
    return registry.POLICIES.create(name, patch_size=tuple(data.patch_size), **options)


def build_algorithm(cfg: TrainConfig, data) -> Algorithm:
    algo = registry.create_algorithm(cfg.algo, **cfg.algo_options)
    if not isinstance(algo, Algorithm):
        raise ConfigError(f"Algorithm '{cfg.algo}' does not subclass semiseg.algorithms.Algorithm.")
    algo.setup(num_classes=data.num_classes, dim=data.dim)
    return algo


def check_output_dir(out: Path) -> None:
    """Fail before training, not after hours, when the run cannot be saved."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise TrainingError(
            f"Output directory '{out}' is not writable ({e.strerror}); choose another --out."
        ) from e
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise TrainingError(
            f"Output directory '{out}' has only {free // 2**20} MiB free (need {MIN_FREE_BYTES // 2**20} MiB for "
            f"checkpoints); free some space or choose another --out."
        )


class Trainer:
    """``explicit``: the config fields the user gave, which ``--recipe official`` leaves alone (None: those that
    differ from TrainConfig's defaults; see engine/recipes.py)."""

    def __init__(self, cfg: TrainConfig, quiet: bool = False, explicit: Iterable[str] | None = None,
                 data: Any = None) -> None:
        cfg.validate()
        check_loggers(cfg.loggers)  # a missing tracker package stops the run now, not after building the data
        self.cfg = cfg
        self.quiet = quiet
        registry.require_plugins(cfg.plugins, "The config")  # loaded by whoever named them, never from a file
        self.dist = dist_utils.init()
        self.device = dist_utils.device_for(self.dist, pick_device(cfg.device))
        self.out = Path(cfg.out)
        if self.dist.is_main:
            check_output_dir(self.out)
        self.data = data if data is not None else build_data(cfg)  # data: an in-memory SegData (Python API)
        self.recipe = apply_recipe(cfg, self.data, explicit)
        check_cases(self.data, cfg.val_split or self.data.val_split, cfg.val_max_cases)  # not at step 1000
        cfg.validate()
        seed_everything(cfg.seed)
        self.algo = build_algorithm(cfg, self.data)  # draws no random numbers: the model's init is unchanged
        self.model = build_model(cfg, self.data, self.algo.backbone_options).to(self.device)
        warn_slow_cpu_amp(self.device, cfg.amp)
        self.channels_last = use_channels_last(cfg.channels_last, self.data.dim, self.device)
        if self.channels_last:
            self.model = to_channels_last(self.model, self.data.dim)
        self.policy = build_policy(cfg, self.data)
        self.stages: list[Stage] = self.algo.stages(cfg.iterations)
        self.total = sum(s.iterations for s in self.stages)
        # every network the algorithm declares (model, its EMA teacher, a second trained network...)
        self.networks = build_networks(self.algo, self.model, self._backbone_of(None, None), self._build_net,
                                       ema_decay=cfg.ema_decay)
        self.teacher: EMATeacher | None = self.networks.emas.get("teacher")  # Mean Teacher's, kept by name
        self.eval_names = resolve_eval(cfg.eval_net, self.algo.eval_network, list(self.networks.modules))
        self.step_model = dist_utils.wrap(self.networks.trained(), self.algo, self.dist, cfg.sync_bn)
        if cfg.compile:  # after the EMA deepcopy and the SyncBatchNorm conversion
            for net in self.networks.trained().values():
                compile_backbone(net)
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        self.iteration = 0
        self.best: dict[str, Any] = {"dice": -1.0, "iteration": -1}
        self.stage_best: dict[str, float] = {}  # best validation Dice within each stage (stages start from it)
        # wall-clock seconds spent in fit() over all sessions of this run (None: resumed from a checkpoint that
        # did not record it); a bench reports training time from it, so a resumed run counts its whole length
        self._seconds_before: float | None = 0.0
        self._fit_started: float | None = None
        self.notes: list[str] = []
        if cfg.diagnostics and self.data.unlabeled_truth is None:
            self.note(f"--diagnostics: dataset '{self.data.name}' has no labels for its unlabeled images, so "
                      f"pseudo-labels cannot be scored; training goes on without diagnostics")
        for text in self.algo.notes(self.total):  # e.g. a schedule timed for a longer run than this one
            self.note(text)
        self.meta = {
            "algo": cfg.algo,
            "backbone": cfg.backbone if cfg.backbone != "auto" else ("vnet" if self.data.dim == 3 else "unet"),
            "backbone_options": dict(self._backbone_of(None, None)[1]),
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
            "dim": self.data.dim,
            "patch_size": list(self.data.patch_size),
            "data": cfg.data,
            "class_names": list(self.data.class_names) if self.data.class_names else None,
            # how images were reoriented, resampled and normalised (NIfTI data): replayed by eval and predict
            "preprocessing": self.data.info.get("preprocessing"),
            # each network's role and backbone, and which one (or ensemble) is evaluated
            "networks": self.networks.meta(),
            "eval_network": "+".join(self.eval_names),
        }

    # -- parts ----------------------------------------------------------------------------------------------
    def _backbone_of(self, backbone: str | None, options: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """The resolved backbone name and options of a network (the run's, or a declared other one)."""
        c = self.cfg
        name = backbone or (c.backbone if c.backbone != "auto" else ("vnet" if self.data.dim == 3 else "unet"))
        opts = {**c.backbone_options, **(options or {})} if backbone is None else dict(options or {})
        opts.update(self.algo.backbone_options)
        return name, opts

    def _build_net(self, backbone: str | None, options: dict[str, Any] | None) -> tuple[nn.Module, str, dict]:
        net = build_model(self.cfg, self.data, self.algo.backbone_options, backbone, options).to(self.device)
        if self.channels_last:
            net = to_channels_last(net, self.data.dim)
        return (net, *self._backbone_of(backbone, options))

    def eval_model(self) -> nn.Module:
        """The network validation evaluates (the algorithm's choice or ``--eval-net``; "a+b": their ensemble)."""
        nets = [self.networks.modules[n] for n in self.eval_names]
        return nets[0] if len(nets) == 1 else Ensemble(nets)

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        params = self.networks.param_groups()  # one group per trained network
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr or 0.01, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.nesterov)
        return torch.optim.AdamW(params, lr=c.lr or 1e-3, weight_decay=c.weight_decay)

    @property
    def base_lr(self) -> float:
        return self.cfg.lr or (0.01 if self.cfg.optimizer == "sgd" else 1e-3)

    def _loaders(self, start: int, end: int) -> ZipLoaders:
        c, d, needs = self.cfg, self.data, set(self.algo.needs)
        workers = c.workers if c.workers is not None else (4 if self.device.type == "cuda" else 0)
        ub = c.unlabeled_batch_size or c.batch_size
        common = dict(seed=c.seed, start=start, end=end, workers=workers, rank=self.dist.rank,
                      world=self.dist.world, pin_memory=self.device.type == "cuda")
        truth = d.unlabeled_truth if c.diagnostics else None
        loaders = []
        if "labeled" in needs:
            loaders.append(make_loader(d.labeled, self.policy, "labeled", c.batch_size, strong=False, **common))
        if "unlabeled" in needs:
            if len(d.unlabeled) == 0:
                raise ConfigError(f"Algorithm '{c.algo}' needs unlabeled data but dataset '{d.name}' has none; "
                                  f"lower --labeled or use --algo supervised.")
            loaders.append(make_loader(d.unlabeled, self.policy, "unlabeled", ub, strong="strong" in needs,
                                       truth=truth, **common))
        if "mix" in needs:
            loaders.append(make_loader(d.unlabeled, self.policy, "mix", ub, strong="strong" in needs,
                                       truth=truth, **common))
        return ZipLoaders(loaders)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nb = self.device.type == "cuda"
        out = {k: v.to(self.device, non_blocking=nb) for k, v in batch.items()}
        if self.channels_last:
            fmt = channels_last_format(self.data.dim)
            out = {k: v.contiguous(memory_format=fmt) if v.dim() == self.data.dim + 2 else v
                   for k, v in out.items()}
        return out

    def _stage_at(self, it: int) -> tuple[Stage, int]:
        start = 0
        for s in self.stages:
            if it < start + s.iterations:
                return s, it - start
            start += s.iterations
        return self.stages[-1], self.stages[-1].iterations

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "networks": self.networks.state_dict(),
            "algorithm": self.algo.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "best": dict(self.best),
            "stage_best": dict(self.stage_best),
            "train_seconds": self.train_seconds,
            "config": self.cfg.to_dict(),
            "meta": self.meta,
        }

    @property
    def train_seconds(self) -> float | None:
        """Wall-clock seconds of training so far, summed over interrupted sessions (None when unknown)."""
        if self._seconds_before is None:
            return None
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self._seconds_before + running

    def save(self, name: str = "last") -> Path:
        path = self.out / "checkpoints" / f"{name}.pt"
        if self.dist.is_main:
            ckpt_io.save_atomic(self.state(), path)
        return path

    def resume(self, path: Path | None = None) -> bool:
        path = path or self.out / "checkpoints" / "last.pt"
        if not path.is_file():
            return False
        ck = ckpt_io.load(path)
        ckpt_io.check_compatible(ck["meta"], self.meta, path)
        stored = ck["meta"].get("preprocessing")
        if stored is not None and stored != self.meta.get("preprocessing"):
            raise CheckpointError(f"Checkpoint '{path}' was trained with another preprocessing plan than the one "
                                  f"computed from the data now (spacings, intensities or labels of the training "
                                  f"files changed); resume with the files it was trained on, or use a new --out.")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.networks.load_state_dict(ck.get("networks"), legacy_teacher=ck.get("teacher"))
        self.algo.load_state_dict(ck.get("algorithm") or {})
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.iteration = int(ck["iteration"])
        self.best = dict(ck["best"])
        self.stage_best = dict(ck.get("stage_best") or {})
        self._seconds_before = ck.get("train_seconds")
        return True

    # -- the loop -------------------------------------------------------------------------------------------
    def _ctx(self, it: int) -> StepContext:
        stage, sit = self._stage_at(it)
        return StepContext(iteration=it, total_iterations=self.total, stage=stage.name, stage_iteration=sit,
                           stage_iterations=stage.iterations, teacher=self.networks.modules.get("teacher"),
                           networks=dict(self.networks.modules))

    def lr_at(self, it: int) -> float:
        """The run's schedule over the whole run, or the stage's own schedule restarted at the stage's start."""
        c = self.cfg
        stage, sit = self._stage_at(it)
        if stage.schedule is None:
            return learning_rate(c.schedule, self.base_lr, it, self.total, c.warmup, c.poly_total)
        return learning_rate(stage.schedule, self.base_lr, sit, stage.iterations)

    def start_stage(self, stage: Stage) -> None:
        """At a stage's first step: restore the previous stage's best checkpoint and/or start a new optimizer
        when the stage asks for it, then the algorithm's hook (BCP copies the student into its teacher)."""
        i = self.stages.index(stage)
        if i > 0 and stage.start_from == "best":
            prev = self.stages[i - 1].name
            path = self.out / "checkpoints" / f"best-{prev}.pt"
            ck = ckpt_io.load(path)
            self.model.load_state_dict(ck["model"])
            if not stage.fresh_optimizer:
                self.optimizer.load_state_dict(ck["optimizer"])
            self.note(f"stage '{stage.name}' starts from the best '{prev}' checkpoint (step {ck['iteration']}, "
                      f"validation Dice {self.stage_best.get(prev, float('nan')):.4f} on split "
                      f"'{self.val_split}'){self._val_is_test()}")
        if i > 0 and stage.fresh_optimizer:
            self.optimizer = self._optimizer()
        for dst, src in stage.copy.items():
            self.networks.copy_trained(src, dst, self.optimizer)
        self.algo.on_stage_start(stage, self.model, self._ctx(self.iteration))

    @property
    def val_split(self) -> str:
        return self.cfg.val_split or self.data.val_split

    def _val_is_test(self) -> str:
        if self.val_split != "test" and "test" in self.data.split_names():
            ids = {c.name for c in self.data.cases(self.val_split)}
            if ids != {c.name for c in self.data.cases("test")}:
                return ""
        return "; this dataset's validation split is its test split, so the choice has seen the test cases"

    def note(self, text: str) -> None:
        """A line for the user: printed (unless quiet) and kept in summary.json."""
        self.notes.append(text)
        if self.dist.is_main and not self.quiet:
            print(f"note: {text}")

    def train_step(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, float]:
        c = self.cfg
        lr = self.lr_at(it)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        ctx = self._ctx(it)
        amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        autocast = torch.autocast(self.device.type, dtype=amp_dtype) if c.amp else nullcontext()
        self.networks.train()
        batch, truth = split_truth(batch)  # the unlabeled images' true labels never reach the algorithm
        dist_utils.seed_step(self.dist, c.seed, it)  # distributed: per-rank dropout/perturbation masks
        with autocast:
            result = self.step_model(batch, ctx)
        loss = sum(result.losses.values())
        terms = {k: float(v.detach()) for k, v in result.losses.items()}
        if not math.isfinite(float(loss.detach())):
            raise TrainingError(
                f"Loss is not finite at step {it + 1} ({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); "
                f"lower --lr or enable --clip-grad; the last good checkpoint is kept in "
                f"{self.out / 'checkpoints'}."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if c.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for m in self.networks.trained().values() for p in m.parameters()],
                                     c.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        alphas = {f"ema/{name}": a for name, a in self.networks.update_emas(self.algo, it).items()}
        self.algo.on_step_end(self.model, ctx)
        diag = pseudo_label_stats(result.pseudo_labels, truth, self.data.num_classes)
        return {"loss": float(loss.detach()), "lr": lr, **terms, **result.logs, **alphas, **diag}

    def validate(self) -> dict[str, Any]:
        return validate(self.eval_model(), self.data, self.val_split, self.device,
                        max_cases=self.cfg.val_max_cases)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        try:
            with run_log(self.out / "train.log", enabled=self.dist.is_main), \
                    run_lock(self.out, enabled=self.dist.is_main):
                return self._fit(resume)
        finally:
            dist_utils.cleanup(self.dist)  # distributed: destroy the process group, also after an error

    def _fit(self, resume: bool) -> dict[str, Any]:
        c = self.cfg
        if resume and self.resume() and not self.quiet and self.dist.is_main:
            print(f"resumed from {self.out / 'checkpoints' / 'last.pt'} at step {self.iteration}")
        self._fit_started = time.perf_counter()
        dist_utils.agree(self.dist, self.iteration, "step to resume from")  # distributed: all loaded last.pt
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_record(self, self.out)
        trackers = open_trackers(c.loggers, self.out, resolved_config(self).to_dict()) if self.dist.is_main else []
        log = ProgressLog(self.out / "metrics.jsonl", self.total, self.iteration,
                          enabled=self.dist.is_main, quiet=self.quiet, trackers=trackers)
        interrupted = False
        prev_handler = signal.getsignal(signal.SIGTERM)
        if self.dist.is_main and hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with log:
                start_stage = None
                while self.iteration < self.total:
                    stage, sit = self._stage_at(self.iteration)
                    stage_end = self.iteration - sit + stage.iterations
                    if start_stage != stage.name:
                        start_stage = stage.name
                        if sit == 0:
                            self.start_stage(stage)
                    loader = iter(self._loaders(self.iteration, stage_end))
                    t_wait = time.perf_counter()
                    for batch in loader:
                        it = self.iteration
                        data_s = time.perf_counter() - t_wait
                        t0 = time.perf_counter()
                        batch = self._to_device(batch)
                        with deferred_interrupts():  # a step and its count are saved together or not at all
                            row = self.train_step(batch, it)
                            self.iteration = it + 1
                        row["data_ms"] = 1000 * data_s
                        row["step_ms"] = 1000 * (time.perf_counter() - t0)
                        log.step(self.iteration, row, log_row=self.iteration % c.log_every == 0
                                 or self.iteration == self.total)
                        # every stage ends with a validation, so the next one can start from its best checkpoint
                        if self.iteration % c.val_every == 0 or self.iteration == stage_end:
                            self._validate_and_save(log)
                        t_wait = time.perf_counter()
        except DataError:
            # a bad file found mid-run (an unlabeled image, a validation volume): keep the work done so far
            if self.iteration > 0:
                self.save("last")
            raise
        except KeyboardInterrupt:
            interrupted = True
            self.save("last")
            if not self.quiet and self.dist.is_main:
                print(f"interrupted: saved {self.out / 'checkpoints' / 'last.pt'} at step {self.iteration}; "
                      f"continue with --resume")
        finally:
            if self.dist.is_main and hasattr(signal, "SIGTERM"):
                signal.signal(signal.SIGTERM, prev_handler)
        summary = {"iteration": self.iteration, "total": self.total, "interrupted": interrupted,
                   "best": self.best, "last": self.last_val if hasattr(self, "last_val") else None,
                   "out": str(self.out), "notes": self.notes, "train_seconds": self.train_seconds}
        if self.dist.is_main and not interrupted:
            from semiseg.engine.progress import plot_curves

            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary

    def _validate_and_save(self, log: ProgressLog) -> None:
        if self.dist.is_main:
            res = self.validate()
            self.last_val = res
            log.record({"iter": self.iteration, **{f"val/{k}": v for k, v in res.items()}})
            if res["dice"] > self.best["dice"]:
                self.best = {"dice": res["dice"], "iteration": self.iteration}
                self.save("best")
            stage, _ = self._stage_at(self.iteration - 1)  # the stage of the step just taken
            if len(self.stages) > 1 and res["dice"] > self.stage_best.get(stage.name, -1.0):
                self.stage_best[stage.name] = res["dice"]
                self.save(f"best-{stage.name}")
        self.save("last")
        dist_utils.barrier(self.dist)


def _raise_interrupt(signum, frame):  # SIGTERM (a scheduler's stop) saves like Ctrl-C
    raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a training step takes effect when the step (optimizer, EMA, counter) is done,
    so the state saved on interrupt is always a whole number of steps and resume replays none of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))
