"""The one interface every backbone keeps (docs/design.md, "Backbones: encode / decode").

    features = backbone.encode(x)        # list of tensors, deepest last (skips included)
    logits   = backbone.decode(features) # same spatial size as x
    backbone(x) == backbone.decode(backbone.encode(x))

Feature perturbations are functions over the feature list applied between the two calls.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn


class SegBackbone(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses set ``dim`` (2 or 3), ``in_channels``, ``num_classes``; implement encode/decode
    (a subclass without them cannot be instantiated)."""

    dim: int = 2
    in_channels: int = 1
    num_classes: int = 2
    # Leading feature maps that feature perturbations leave alone (smp encoders return the input image first).
    unperturbed_levels: int = 0
    # True when ``decode`` holds dropout of its own and takes ``drop``, a (B,) bool tensor saying which samples
    # it may drop; a stream graph passes it when some of its streams switch that dropout off.
    decoder_dropout: bool = False
    # Every spatial size of an input must be a multiple of this (2^downsamplings); the trainer checks the patch.
    divisor: int = 1

    @abstractmethod
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``x``, shallowest first, deepest last."""

    @abstractmethod
    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits at the input's spatial size from ``encode``'s feature list."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def describe(self) -> dict:
        return {
            "class": type(self).__name__,
            "dim": self.dim,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


def scaled(channels: int, width: float) -> int:
    """Width multiplier for thin CPU networks; at least 4 channels so BatchNorm stays meaningful."""
    return max(4, int(round(channels * width)))
