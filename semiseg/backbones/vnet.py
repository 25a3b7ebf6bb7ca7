"""3D V-Net of UA-MT / BCP / CrossMatch ``networks/vnet.py`` (normalization='batchnorm').

Encoder stages of 1/2/3/3/3 conv3-BN-ReLU at 16/32/64/128/256 x width, joined by conv k2 s2
(+BN+ReLU); decoder stages of 3/3/2/1 convs after ConvTranspose k2 s2 (+BN+ReLU); skips are added,
not concatenated; head is a 1x1x1 conv. ``has_dropout`` puts Dropout3d(0.5) on the bottleneck
(inside ``encode``) and before the head (inside ``decode``), as the reference does. ``decode(features, drop)``
applies the head dropout only to the samples where ``drop`` is True: the CrossMatch LA code decodes its
feature-perturbed batches with ``no_drop=True`` (head dropout off, bottleneck dropout on), and a stream graph
declares that per stream (``Stream.decoder_dropout``).

Inputs must be divisible by 16 in every axis (four stride-2 downsamplings).
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.backbones.unet import check_input
from semiseg.registry import register_backbone

BASE_CHANNELS = (16, 32, 64, 128, 256)
DIVISOR = 16


class _Block(nn.Module):
    """Holds its layers under ``.conv`` like the reference blocks, so checkpoint keys match."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_stage(n_convs: int, in_ch: int, out_ch: int) -> _Block:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1),
                   nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)]
    return _Block(layers)


def down(in_ch: int, out_ch: int) -> _Block:
    return _Block([nn.Conv3d(in_ch, out_ch, 2, stride=2), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)])


def up(in_ch: int, out_ch: int) -> _Block:
    return _Block([nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2), nn.BatchNorm3d(out_ch),
                   nn.ReLU(inplace=True)])


class VNet(SegBackbone):
    dim = 3
    divisor = DIVISOR

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: float = 1.0,
                 has_dropout: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.has_dropout = has_dropout
        self.decoder_dropout = has_dropout
        c = [scaled(ch, width) for ch in BASE_CHANNELS]
        # Names follow the reference (block_one.conv.0 ... out_conv) so its checkpoints load as they are.
        self.block_one = conv_stage(1, in_channels, c[0])
        self.block_one_dw = down(c[0], c[1])
        self.block_two = conv_stage(2, c[1], c[1])
        self.block_two_dw = down(c[1], c[2])
        self.block_three = conv_stage(3, c[2], c[2])
        self.block_three_dw = down(c[2], c[3])
        self.block_four = conv_stage(3, c[3], c[3])
        self.block_four_dw = down(c[3], c[4])
        self.block_five = conv_stage(3, c[4], c[4])
        self.block_five_up = up(c[4], c[3])
        self.block_six = conv_stage(3, c[3], c[3])
        self.block_six_up = up(c[3], c[2])
        self.block_seven = conv_stage(3, c[2], c[2])
        self.block_seven_up = up(c[2], c[1])
        self.block_eight = conv_stage(2, c[1], c[1])
        self.block_eight_up = up(c[1], c[0])
        self.block_nine = conv_stage(1, c[0], c[0])
        self.out_conv = nn.Conv3d(c[0], num_classes, 1)
        self.dropout = nn.Dropout3d(p=0.5)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_channels, 3, DIVISOR)
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]

    def decode(self, features: list[torch.Tensor], drop: torch.Tensor | None = None) -> torch.Tensor:
        x1, x2, x3, x4, x5 = features
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)
        if self.has_dropout:
            dropped = self.dropout(x9)
            # Dropout3d draws each sample's channel mask independently, so selecting samples afterwards is the
            # same as dropping only those
            x9 = dropped if drop is None else torch.where(drop.view(-1, *(1,) * (x9.dim() - 1)), dropped, x9)
        return self.out_conv(x9)


@register_backbone("vnet")
def vnet(in_channels: int = 1, num_classes: int = 2, width: float = 1.0, has_dropout: bool = True) -> VNet:
    """UA-MT V-Net (n_filters 16 x width, BatchNorm, ~9.44 M parameters at width 1)."""
    return VNet(in_channels=in_channels, num_classes=num_classes, width=width, has_dropout=has_dropout)
