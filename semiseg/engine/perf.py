"""Speed options and their measured defaults: channels_last (auto: on on the CPU), the bf16-on-CPU warning,
``--compile``. The measurements behind the defaults are made by ``semiseg.bench.speed`` (benchmarks/perf.md).

``torch.compile`` is applied to the backbone's ``encode`` and ``decode`` rather than to the whole step: the
step holds Python control flow (stream groups, perturbations drawn per call, loss bookkeeping) that would only
break graphs, while encoder and decoder are pure tensor programs that every algorithm calls. Compilation is
lazy, so it is guarded: if the first compiled call fails (no C++ compiler, an unsupported operator), the
backbone warns once and runs eagerly from then on. Measurements on CPU are in ``benchmarks/perf.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class GuardedCompile:
    """Calls ``torch.compile(fn)``; on the first failure falls back to ``fn`` for good, with one warning."""

    def __init__(self, fn: Callable[..., Any], name: str, **options: Any) -> None:
        self.fn, self.name = fn, name
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.compiled = None
                warnings.warn(f"torch.compile of {self.name} failed ({type(e).__name__}: {str(e)[:200]}); "
                              f"running it eagerly.", RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)


def use_channels_last(option: bool | None, dim: int, device: torch.device) -> bool:
    """``channels_last`` resolved: True/False as given; None (auto) turns it on where it was measured to win:
    on the CPU, where a training step of the acdc-cpu (2D U-Net) and la-half-cpu (3D V-Net) presets is x1.10-1.17
    faster in the geometric mean over the seven algorithms and inference x1.2-1.3 (benchmarks/perf.md). GPUs
    were not measured, so they stay contiguous."""
    if option is not None:
        return bool(option)
    return device.type == "cpu" and dim in (2, 3)


def channels_last_format(dim: int) -> torch.memory_format:
    """The channels_last memory format of 2D (NHWC) or 3D (NDHWC) tensors."""
    return torch.channels_last if dim == 2 else torch.channels_last_3d


def to_channels_last(model: nn.Module, dim: int) -> nn.Module:
    """``model`` in the channels_last memory format of its dimension (weights only; inputs follow per call)."""
    return model.to(memory_format=channels_last_format(dim))


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86); None where it cannot be told.
    Without it, bf16 autocast on CPU is emulated and far slower than float32 (x0.03-x0.06 per step on an
    AVX2-only EPYC, benchmarks/perf.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_slow_cpu_amp(device: torch.device, amp: bool) -> None:
    """One warning when ``--amp`` asks for bf16 on a CPU that would emulate it."""
    if amp and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("--amp on this CPU runs bf16 without hardware support (no AVX512-BF16/AMX), which was "
                      "measured 16-32x slower than float32 (benchmarks/perf.md); drop --amp unless you train "
                      "on a GPU.", RuntimeWarning, stacklevel=2)


def compile_backbone(model: nn.Module, **options: Any) -> bool:
    """Compile ``model.encode`` and ``model.decode`` in place (instance attributes shadow the methods, so
    ``model(x)``, the algorithms and validation all use them; state dicts and checkpoints are unchanged).

    Call it after any ``copy.deepcopy`` of the model (EMA teachers): a copy would keep calling the original's
    compiled methods. Returns False when this PyTorch has no ``torch.compile``.
    """
    if not hasattr(torch, "compile") or not hasattr(model, "encode") or not hasattr(model, "decode"):
        return False
    name = type(model).__name__
    model.encode = GuardedCompile(model.encode, f"{name}.encode", **options)  # type: ignore[method-assign]
    model.decode = GuardedCompile(model.decode, f"{name}.decode", **options)  # type: ignore[method-assign]
    return True
