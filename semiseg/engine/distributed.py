"""torchrun support on PyTorch's own engine: process group, device per rank, DistributedDataParallel.

The whole algorithm step (all encoder/decoder calls of every stream) runs inside one ``forward`` of a
``StepModule``, so DDP sees one forward and one backward per step whatever the stream graph looks like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from semiseg.algorithms.base import Algorithm, StepContext, StepResult


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


def init() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    if info.enabled and device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


class StepModule(nn.Module):
    """The backbone and the algorithm's step as one module, so DDP can wrap a whole training step."""

    def __init__(self, backbone: nn.Module, algorithm: Algorithm) -> None:
        super().__init__()
        self.backbone = backbone
        self.algorithm = algorithm

    def forward(self, batch: dict[str, torch.Tensor], ctx: StepContext):
        r = self.algorithm.step(self.backbone, batch, ctx)
        return r.losses, r.logs


class StepRunner:
    """Calls the (possibly DDP-wrapped) step module and returns a StepResult."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        losses, logs = self.module(batch, ctx)
        return StepResult(losses, logs)


def wrap(model: nn.Module, algorithm: Algorithm, info: DistInfo, sync_bn: bool = False) -> StepRunner:
    step = StepModule(model, algorithm)
    if not info.enabled:
        return StepRunner(step)
    if sync_bn:
        # converts in place inside ``model`` too, so validation and checkpoints see the same modules
        step.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(step.backbone)
    ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    ddp = nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=False)
    return StepRunner(ddp)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
