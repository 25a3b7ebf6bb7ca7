"""2D U-Net of SSL4MIS ``networks/unet.py`` (also UniMatch-medical and CrossMatch ``model/unet.py``).

Layer for layer the same module so parameter counts and initialisation (PyTorch defaults) match:
ConvBlock = Conv3x3-BN-LeakyReLU-Dropout-Conv3x3-BN-LeakyReLU; four max-pool levels; decoder
UpBlocks do 1x1 conv -> bilinear x2 (align_corners=True) -> concat [skip, up] -> ConvBlock(p=0).

Inputs must have H and W divisible by 16 (four poolings); anything else raises ValueError rather
than being padded, so the caller decides how to resize or pad (ACDC slices are zoomed to 256x256).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.registry import register_backbone

BASE_CHANNELS = (16, 32, 64, 128, 256)
ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)
DIVISOR = 16


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout_p: float) -> None:
        super().__init__()
        self.conv_conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout_p),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(0.01),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout_p: float) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), ConvBlock(in_ch, out_ch, dropout_p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class UpBlock(nn.Module):
    """The reference's bilinear branch (the one its U-Net runs): 1x1 conv, then bilinear x2."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(deep_ch, skip_ch, kernel_size=1)
        self.conv = ConvBlock(skip_ch * 2, out_ch, 0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.conv1x1(deep), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, ch: list[int], p: tuple[float, ...]) -> None:
        super().__init__()
        self.in_conv = ConvBlock(in_channels, ch[0], p[0])
        self.down1 = DownBlock(ch[0], ch[1], p[1])
        self.down2 = DownBlock(ch[1], ch[2], p[2])
        self.down3 = DownBlock(ch[2], ch[3], p[3])
        self.down4 = DownBlock(ch[3], ch[4], p[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.in_conv(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        return [x0, x1, x2, x3, self.down4(x3)]


class _Decoder(nn.Module):
    def __init__(self, ch: list[int], num_classes: int) -> None:
        super().__init__()
        self.up1 = UpBlock(ch[4], ch[3], ch[3])
        self.up2 = UpBlock(ch[3], ch[2], ch[2])
        self.up3 = UpBlock(ch[2], ch[1], ch[1])
        self.up4 = UpBlock(ch[1], ch[0], ch[0])
        self.out_conv = nn.Conv2d(ch[0], num_classes, kernel_size=3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = features
        x = self.up4(self.up3(self.up2(self.up1(x4, x3), x2), x1), x0)
        return self.out_conv(x)


class UNet2D(SegBackbone):
    dim = 2
    divisor = DIVISOR

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: float = 1.0,
                 dropout: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        ch = [scaled(c, width) for c in BASE_CHANNELS]
        p = ENCODER_DROPOUT if dropout else (0.0,) * len(ENCODER_DROPOUT)
        # Submodule names mirror the reference (encoder.in_conv.conv_conv.0, decoder.up1.conv1x1, ...)
        # so its checkpoints load with load_state_dict as they are.
        self.encoder = _Encoder(in_channels, ch, p)
        self.decoder = _Decoder(ch, num_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_channels, 2, DIVISOR)
        return self.encoder(x)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(features)


def check_input(x: torch.Tensor, in_channels: int, dim: int, divisor: int) -> None:
    """Fail early with a sentence instead of a shape mismatch deep inside the decoder."""
    if x.ndim != dim + 2 or x.shape[1] != in_channels:
        layout = "(B, C, H, W)" if dim == 2 else "(B, C, D, H, W)"
        raise ValueError(
            f"Expected input of layout {layout} with C={in_channels}, got shape {tuple(x.shape)}."
        )
    size = tuple(x.shape[2:])
    if any(s % divisor for s in size):
        fixed = tuple(-(-s // divisor) * divisor for s in size)
        raise ValueError(
            f"Input spatial size {size} is not divisible by {divisor} in every axis; "
            f"resize, crop or pad it (e.g. pad to {fixed})."
        )


@register_backbone("unet")
def unet(in_channels: int = 1, num_classes: int = 4, width: float = 1.0, dropout: bool = True) -> UNet2D:
    """SSL4MIS 2D U-Net (16-32-64-128-256 x width, ~1.81 M parameters at width 1)."""
    return UNet2D(in_channels=in_channels, num_classes=num_classes, width=width, dropout=dropout)
