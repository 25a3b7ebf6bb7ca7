"""Iteration timing the way the CrossMatch paper's Table III measures it, plus parameter and FLOP counts.

Table III times "from the beginning of data migration to the CUDA device to the end of backpropagation",
averaged after a warm-up. :func:`time_iterations` does exactly that: the loader's work is outside the timed
region, the optimizer step, the EMA teacher update and logging are outside it too (the paper stops at the end
of the backward pass). ``#Params`` / ``#FLOPs`` in Table III are those of *one* backbone forward (thop on a
4x1x112x112x80 V-Net input), not the cost of a training step: :func:`backbone_stats` reports the same thing.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import resource
import sys
import threading
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


# -- memory ---------------------------------------------------------------------------------------------------
def _current_rss_bytes() -> int | None:
    """Resident set size now, or None where it cannot be read (then ru_maxrss is used)."""
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a code block above what was in use when it started, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set size, sampled by a thread (psutil or
    /proc), because tracemalloc does not see torch's allocations. Without either, ``ru_maxrss`` growth is used,
    which reads 0 when an earlier part of the process already peaked higher.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _current_rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        rss = _current_rss_bytes()
        if rss is None:
            self._base = _maxrss_bytes()
        else:
            self._base = self._peak = rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _current_rss_bytes() or 0)
        else:
            peak = _maxrss_bytes()
        self.peak_mb = max(peak - self._base, 0) / 2**20


# -- timing ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(trainer: Any, warmup: int = 5, iters: int = 20, iteration: int | None = None) -> dict[str, Any]:
    """Milliseconds per training iteration of ``trainer``, timed as in Table III.

    For each batch (drawn from ``trainer._loaders`` outside the timed region): t0, move it to the device, run
    the algorithm's step (every forward pass of every stream) and ``backward`` of the summed loss, synchronise
    on CUDA, t1. No optimizer step, EMA update or logging is timed or run, so the weights do not change (BatchNorm
    running statistics and the RNG do: time after training, not before, to leave a run's result untouched).

    ``iteration`` picks the step context (stage, ramps); default: the last iteration of the run, i.e. the
    last stage (BCP's self-training, not its pre-training). Returns ``ms_per_iter`` (mean over ``iters`` after
    ``warmup`` untimed ones), ``std``, ``peak_mem_mb`` (peak above the memory in use before the warm-up) and
    ``iters``.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"time_iterations needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    it = trainer.total - 1 if iteration is None else int(iteration)
    ctx = trainer._ctx(it)
    device = trainer.device
    c = trainer.cfg
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if c.amp else nullcontext
    # Batches beyond the run's range: the loaders are a pure function of the iteration, so any start works,
    # and these are batches the run never trained on.
    loader = iter(trainer._loaders(trainer.total, trainer.total + warmup + iters))
    trainer.networks.train()
    times: list[float] = []
    with PeakMemory(device) as mem:
        for k in range(warmup + iters):
            batch = next(loader)
            trainer.optimizer.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            batch = trainer._to_device(batch)
            with autocast():
                result = trainer.step_model(batch, ctx)
            loss = sum(result.losses.values())
            trainer.scaler.scale(loss).backward()
            _sync(device)
            if k >= warmup:
                times.append(1000.0 * (time.perf_counter() - t0))
            del batch, result, loss
    trainer.optimizer.zero_grad(set_to_none=True)
    t = torch.tensor(times, dtype=torch.float64)
    return {
        "ms_per_iter": float(t.mean()),
        "std": float(t.std()) if len(times) > 1 else 0.0,
        "peak_mem_mb": float(mem.peak_mb),
        "iters": len(times),
        "warmup": warmup,
    }


# -- parameters and FLOPs ------------------------------------------------------------------------------------
def count_flops(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> int:
    """FLOPs of one forward of ``model`` on a zero tensor of ``input_shape`` (torch's FlopCounterMode: 2 per
    multiply-add, convolutions and matrix products only). Runs on the meta device when the model allows it,
    so even a full-size V-Net costs nothing; otherwise on a CPU copy."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(s) for s in input_shape)

    def count_on(dev: str) -> int:
        m = copy.deepcopy(model).to(dev).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m(torch.zeros(shape, device=dev))
        return int(counter.get_total_flops())

    try:
        return count_on("meta")
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on a CPU copy instead
        return count_on("cpu")


def backbone_stats(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """Parameter count and forward FLOPs of one backbone forward on ``input_shape`` (batch, channels, *patch).

    ``gmacs`` = multiply-adds in billions, the unit thop reports and Table III calls "#Flops (G)";
    ``gflops`` = 2 x gmacs."""
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, input_shape)
    return {
        "params": int(params),
        "params_m": params / 1e6,
        "flops": flops,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "flops_input": "x".join(str(int(s)) for s in input_shape),
    }


# -- machine --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """What a timing depends on: platform, CPU model and count, torch threads and version, the GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        device_s = f"cuda ({name})"
    else:
        n = torch.get_num_threads()
        device_s = f"cpu ({n} torch thread{'s' if n != 1 else ''})"
    return {
        "machine": f"{platform.platform()}, {_cpu_model()}, {os.cpu_count()} CPUs, python "
                   f"{platform.python_version()}",
        "device": device_s,
        "torch": torch.__version__,
    }


def flops_input_shape(trainer: Any) -> tuple[int, ...]:
    """Table III's FLOP-count input for a trainer: one step's images (labeled + unlabeled batch) of one patch."""
    c, d = trainer.cfg, trainer.data
    return (c.batch_size + (c.unlabeled_batch_size or c.batch_size), d.in_channels, *d.patch_size)


def time_trainer(trainer: Any, warmup: int = 5, iters: int = 20) -> dict[str, Any]:
    """:func:`time_iterations` + :func:`backbone_stats` on the preset's batch and patch + :func:`machine_info`."""
    out = time_iterations(trainer, warmup=warmup, iters=iters)
    # every trained network counts (CPS trains two); EMA and frozen copies are not trained, so they do not
    stats = [backbone_stats(m, flops_input_shape(trainer)) for m in trainer.networks.trained().values()]
    def total(k: str) -> Any:
        values = [s[k] for s in stats]
        return values[0] if k == "flops_input" or None in values else sum(values)

    out.update({k: total(k) for k in stats[0]})
    out.update(machine_info(trainer.device))
    return out


# -- timing in a fresh process ------------------------------------------------------------------------------------
def time_config(config: dict[str, Any], warmup: int = 5, iters: int = 20, threads: int | None = None,
                resume: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """Build a Trainer from a TrainConfig dict in a fresh Python process and time it there.

    A fresh process is what makes the CPU peak-memory figure mean something: in a process that has already
    trained or evaluated, freed heap pages are reused without any growth of the resident set. ``resume``
    loads the run's ``checkpoints/last.pt`` first (times the trained model). Returns :func:`time_iterations`'
    dict plus :func:`backbone_stats` and :func:`machine_info`.
    """
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="semiseg-timing-") as tmp:
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(config, f)
        cmd = [sys.executable, "-m", "semiseg.bench.timing", cfg_path, str(warmup), str(iters),
               str(threads or torch.get_num_threads()), "1" if resume else "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        from semiseg.errors import TrainingError

        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise TrainingError(f"Timing the run {config.get('out')} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _worker(argv: list[str]) -> None:
    import json

    cfg_path, warmup, iters, threads, resume = argv
    torch.set_num_threads(int(threads))
    from semiseg.engine.config import TrainConfig
    from semiseg.engine.trainer import Trainer

    with open(cfg_path) as f:
        cfg = TrainConfig.from_dict(json.load(f), source="timing config")
    from semiseg import registry

    for p in cfg.plugins:  # named by the user on the bench's command line, handed to this timing process
        registry.load_plugin(p)
    trainer = Trainer(cfg, quiet=True, explicit=TrainConfig.field_names())  # a resolved config
    if resume == "1":
        trainer.resume()
    print(json.dumps(time_trainer(trainer, int(warmup), int(iters))), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
