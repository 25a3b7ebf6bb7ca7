"""Plain 3D U-Net: four max-pool levels, two conv3-BN-ReLU per level, transposed-conv upsampling,
concatenated skips, 1x1x1 head. Channels 16-32-64-128-256 x width.

Inputs must be divisible by 16 in every axis (four poolings).
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.backbones.unet import check_input
from semiseg.registry import register_backbone

BASE_CHANNELS = (16, 32, 64, 128, 256)
DIVISOR = 16


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True),
        nn.Conv3d(out_ch, out_ch, 3, padding=1), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True),
    )


class Up3D(nn.Module):
    def __init__(self, deep_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(deep_ch, skip_ch, 2, stride=2)
        self.conv = double_conv(skip_ch * 2, skip_ch)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


class UNet3D(SegBackbone):
    dim = 3
    divisor = DIVISOR

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: float = 1.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        c = [scaled(ch, width) for ch in BASE_CHANNELS]
        self.in_conv = double_conv(in_channels, c[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(2), double_conv(c[i], c[i + 1])) for i in range(4)
        )
        self.ups = nn.ModuleList(Up3D(c[i + 1], c[i]) for i in reversed(range(4)))
        self.out_conv = nn.Conv3d(c[0], num_classes, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_channels, 3, DIVISOR)
        feats = [self.in_conv(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        return self.out_conv(x)


@register_backbone("unet3d")
def unet3d(in_channels: int = 1, num_classes: int = 2, width: float = 1.0) -> UNet3D:
    """Plain 3D U-Net (16-32-64-128-256 x width)."""
    return UNet3D(in_channels=in_channels, num_classes=num_classes, width=width)
