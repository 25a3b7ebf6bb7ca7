"""torchrun support on PyTorch's own engine: process group, device per rank, DistributedDataParallel.

The whole algorithm step (all encoder/decoder calls of every stream, with or without gradient) runs inside one
``forward`` of a ``StepModule``, so DDP sees one forward and one backward per step whatever the stream graph
looks like. What a run of ``world`` processes with batch B computes, against one process with batch world*B:

- the loaders give each rank its slice of the same global batch (``engine.loaders``);
- DDP averages the gradients, which is exactly the gradient of the global mean for every loss that is a
  mean of per-sample terms (cross-entropy); a Dice whose sums run over the whole batch is not such a mean, so
  the average of per-rank Dice gradients only approximates the batch-global Dice gradient;
- BatchNorm normalises with per-rank batch statistics unless ``--sync-bn``; ``SyncBatchNorm`` below then uses
  the statistics of the global batch (on CPU/gloo too, where ``torch.nn.SyncBatchNorm`` refuses to run);
- with plain BatchNorm, DDP broadcasts rank 0's running statistics at every forward, so checkpoints (rank 0)
  hold rank 0's estimate;
- stochastic layers (dropout, feature perturbations) draw from torch's generator, reseeded before every step
  from (seed, iteration, rank) by ``seed_step``: ranks draw different masks, and a resumed run draws what an
  uninterrupted one would. With dropout on, 2 x B and 1 x 2B are therefore different random realisations.

Rank 0 alone validates, logs, prints and writes checkpoints; every rank loads ``last.pt`` on resume, and
``agree`` stops all of them with one sentence if they did not reach the same step. ``SEMISEG_DIST_TIMEOUT``
(seconds, default 3600) bounds every collective, the barrier included: the other ranks wait there while rank 0
validates and writes checkpoints, so it must exceed the longest validation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from semiseg.algorithms.base import PRIMARY, Algorithm, StepContext, StepResult
from semiseg.errors import TrainingError

DEFAULT_TIMEOUT_S = 3600
RNG_STREAM = 7  # distinct from the loaders' stream ids (1-3), so step noise never repeats augmentation noise


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("SEMISEG_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def init() -> DistInfo:
    """Join the process group that torchrun describes in the environment; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout())
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    if info.enabled and device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def seed_step(info: DistInfo, seed: int, iteration: int) -> None:
    """Reseed torch's generators from (seed, iteration, rank) before a distributed step.

    Every rank starts from the same seed (so the models are built identically), and without this every rank
    would then draw the same dropout and feature-perturbation masks for its slice of the batch. Seeding per
    step rather than once also keeps resume exact: the checkpoint holds rank 0's generator state only.
    One process keeps the plain global generator (its state is in the checkpoint).
    """
    if not info.enabled:
        return
    torch.manual_seed(int(np.random.SeedSequence([seed, RNG_STREAM, iteration, info.rank]).generate_state(1)[0]))


# -- SyncBatchNorm that also runs on CPU (gloo) --------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: every rank's loss depends on the sum, so the backward sums the gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch that also runs on CPU/gloo (``nn.SyncBatchNorm`` raises there, and DDP
    refuses CPU modules holding one, hence a separate class).

    Same parameters, buffers and state-dict keys as ``BatchNorm*d``. Training-mode statistics are those of the
    global batch: mean from all-reduced sums, biased variance from all-reduced squared deviations (two passes,
    as accurate as one process's), running variance unbiased with the global count. Eval mode and a world of
    one are plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float()  # statistics in fp32 under bf16 autocast
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """Replace every BatchNorm*d inside ``module`` by ``SyncBatchNorm``, in place (the root is returned as is,
    so the trainer's ``model``, its checkpoints and validation see the converted layers)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (SyncBatchNorm,
                                                                                         nn.SyncBatchNorm)):
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, group)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.running_mean = child.running_mean
            new.running_var = child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, group)
    return module


# -- one module per step --------------------------------------------------------------------------------------
class StepModule(nn.Module):
    """The trained networks and the algorithm's step as one module, so DDP can wrap a whole training step (and
    average the gradients of every trained network)."""

    def __init__(self, networks: dict[str, nn.Module], algorithm: Algorithm) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self.algorithm = algorithm

    def forward(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> tuple[dict, dict, dict]:
        r = self.algorithm.step(self.networks[PRIMARY], batch, ctx)
        return r.losses, r.logs, r.pseudo_labels


class StepRunner:
    """Calls the (possibly DDP-wrapped) step module and returns a StepResult."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        losses, logs, pseudo = self.module(batch, ctx)
        return StepResult(losses, logs, pseudo)


def wrap(networks: dict[str, nn.Module], algorithm: Algorithm, info: DistInfo, sync_bn: bool = False) -> StepRunner:
    """The step runner over the trained networks: plain for one process; DDP over a StepModule for several
    (construction broadcasts rank 0's parameters and buffers; every forward broadcasts rank 0's buffers again)."""
    step = StepModule(networks, algorithm)
    if not info.enabled:
        return StepRunner(step)
    first = next(step.parameters())
    if sync_bn:
        if first.is_cuda:
            # PyTorch's CUDA kernels; converts in place since no network's root is a BatchNorm
            for net in step.networks.values():
                nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            # A group of its own keeps the statistics' all-reduces apart from DDP's gradient buckets.
            convert_sync_batchnorm(step.networks, dist.new_group(backend="gloo"))
    ids = [info.local_rank] if first.is_cuda else None
    # a network idle in some steps leaves parameters without gradients, which DDP must be told to expect
    ddp = nn.parallel.DistributedDataParallel(step, device_ids=ids,
                                              find_unused_parameters=bool(algorithm.idle_networks))
    return StepRunner(ddp)


def agree(info: DistInfo, value: Any, what: str) -> None:
    """Stop with a clear error when the ranks disagree on ``value``; they would otherwise hang in a collective
    (e.g. a rank that found no checkpoints/last.pt on its own disk would start again from step 0)."""
    if not info.enabled:
        return
    values: list[Any] = [None] * info.world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise TrainingError(f"The processes disagree on the {what} ({seen}); every process must see the same "
                            f"run directory (--out).")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (the others wait here while rank 0 validates and writes; bounded by ``timeout()``)."""
    if info.enabled:
        # NCCL wants to know the rank's device; gloo has none
        ids = [info.local_rank] if dist.get_backend() == "nccl" else None
        dist.barrier(device_ids=ids, timeout=timeout())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
