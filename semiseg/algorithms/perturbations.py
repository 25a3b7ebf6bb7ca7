"""Feature perturbations: functions over the whole encoder feature list (skips included).

A perturbation is named by a spec string ``kind:rate`` (``drop:0.25``, ``noise:0.1``...). Each registered
factory takes the rate and returns ``fn(features, generator=None) -> features``. Every level draws its own
mask, as the official UniMatch/CrossMatch code applies an independent Dropout2d/3d per level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.registry import PERTURBATIONS, register_perturbation

Features = list[torch.Tensor]
Perturbation = Callable[..., Features]


def _check_rate(rate: float, kind: str) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0 and kind != "noise":
        raise ConfigError(f"Perturbation '{kind}:{rate}' needs a rate in [0, 1); e.g. '{kind}:0.5'.")
    return rate


@register_perturbation("drop")
def channel_dropout(rate: float) -> Perturbation:
    """Channel-wise dropout (nn.Dropout2d/3d semantics: whole channels zeroed, survivors scaled 1/(1-p))."""
    p = _check_rate(rate, "drop")

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        out = []
        for f in features:
            shape = f.shape[:2] + (1,) * (f.dim() - 2)
            keep = torch.empty(shape, device=f.device, dtype=f.dtype).bernoulli_(1 - p, generator=generator)
            out.append(f * keep / (1 - p))
        return out

    return fn


@register_perturbation("dropout")
def elementwise_dropout(rate: float) -> Perturbation:
    """Element-wise dropout on every feature map."""
    p = _check_rate(rate, "dropout")

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        out = []
        for f in features:
            keep = torch.empty_like(f).bernoulli_(1 - p, generator=generator)
            out.append(f * keep / (1 - p))
        return out

    return fn


@register_perturbation("alpha")
def alpha_dropout(rate: float) -> Perturbation:
    """Alpha dropout (keeps mean and variance of SELU-like activations)."""
    p = _check_rate(rate, "alpha")
    return lambda features, generator=None: [F.alpha_dropout(f, p, training=True) for f in features]


@register_perturbation("falpha")
def feature_alpha_dropout(rate: float) -> Perturbation:
    """Feature (channel-wise) alpha dropout."""
    p = _check_rate(rate, "falpha")
    return lambda features, generator=None: [F.feature_alpha_dropout(f, p, training=True) for f in features]


@register_perturbation("noise")
def gaussian_noise(rate: float) -> Perturbation:
    """Multiplicative Gaussian noise f * (1 + N(0, rate^2)), scale-free across levels."""
    std = float(rate)
    if std < 0:
        raise ConfigError(f"Perturbation 'noise:{rate}' needs a non-negative std; e.g. 'noise:0.1'.")

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        return [f * (1 + std * torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype))
                for f in features]

    return fn


def parse_perturbation(spec: str) -> Perturbation | None:
    """'none' -> None; 'drop:0.25' -> the registered function with that rate."""
    if spec in ("none", "", None):
        return None
    kind, _, rate = spec.partition(":")
    factory = PERTURBATIONS.get(kind)
    if not rate:
        raise ConfigError(f"Perturbation '{spec}' needs a rate, e.g. '{kind}:0.5'.")
    try:
        value = float(rate)
    except ValueError as e:
        raise ConfigError(f"Perturbation '{spec}' has a rate that is not a number; write e.g. '{kind}:0.5'.") from e
    return factory(value)
