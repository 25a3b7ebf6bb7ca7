"""Learning-rate and ramp-up schedules as plain functions (reused by the engine and by algorithms)."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(current, 0, length) / length (Laine & Aila; UA-MT, SSL4MIS)."""
    if length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    """Linear from 0 to 1 over ``length``, then 1."""
    if length == 0:
        return 1.0
    return min(max(float(current), 0.0), float(length)) / float(length)


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """base * (1 - it/total)^power, the UniMatch/CrossMatch schedule."""
    return base_lr * max(0.0, 1.0 - iteration / max(total, 1)) ** power


def step_lr(base_lr: float, iteration: int, every: int = 2500, gamma: float = 0.1) -> float:
    """UA-MT/BCP LA schedule: lr x gamma every ``every`` iterations."""
    return base_lr * gamma ** (iteration // every)


def learning_rate(schedule: str, base_lr: float, iteration: int, total: int, warmup: int = 0,
                  poly_total: int | None = None, step_every: int = 2500) -> float:
    """The lr of ``iteration`` under a named schedule, with an optional linear warm-up."""
    if warmup and iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    if schedule == "poly":
        return poly_lr(base_lr, iteration, poly_total or total)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return step_lr(base_lr, iteration, step_every)
    if schedule == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    raise ValueError(f"unknown schedule {schedule!r}; use poly, constant, step or cosine")


SCHEDULES = ("poly", "constant", "step", "cosine")
