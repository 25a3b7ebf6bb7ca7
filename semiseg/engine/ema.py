"""The EMA teacher the engine keeps for algorithms that ask for one (Mean Teacher, UA-MT, BCP)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(iteration: int, decay: float, warmup: bool = True) -> float:
    """alpha = min(1 - 1/(t+1), decay) with warm-up (Mean Teacher, UA-MT), else ``decay`` (BCP)."""
    return min(1.0 - 1.0 / (iteration + 1), decay) if warmup else decay


class EMATeacher:
    def __init__(self, model: nn.Module, decay: float = 0.99, warmup: bool = True, buffers: bool = False) -> None:
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.buffers = decay, warmup, buffers

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int, alpha: float | None = None) -> float:
        """teacher = a * teacher + (1 - a) * student, on parameters (and float buffers if ``buffers``); ``a`` is
        ``alpha`` where the algorithm gives its own rule (AD-MT), else :func:`ema_decay`."""
        a = ema_decay(iteration, self.decay, self.warmup) if alpha is None else float(alpha)
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)
        if self.buffers:
            for t, s in zip(self.model.buffers(), student.buffers()):
                if t.dtype.is_floating_point:
                    t.mul_(a).add_(s.detach(), alpha=1 - a)
                else:
                    t.copy_(s)
        return a

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        self.model.load_state_dict(student.state_dict())

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
