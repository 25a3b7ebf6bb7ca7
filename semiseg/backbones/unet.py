"""2D U-Net of SSL4MIS ``networks/unet.py`` (also UniMatch-medical and CrossMatch ``model/unet.py``).

Layer for layer the same module so parameter counts and initialisation (PyTorch defaults) match:
ConvBlock = Conv3x3-BN-LeakyReLU-Dropout-Conv3x3-BN-LeakyReLU; four max-pool levels; decoder
UpBlocks do 1x1 conv -> bilinear x2 (align_corners=True) -> concat [skip, up] -> ConvBlock(p=0).

Two options add heads; off (the default) the module, its parameters and state-dict keys are unchanged:

- ``aux_decoders=N`` (SSL4MIS ``UNet_CCT``): N more decoders of the main decoder's architecture with their own
  weights, ``aux_decoder1`` ... ``aux_decoderN`` (the reference's names; its ``main_decoder`` is our
  ``decoder``), reached by ``decode(features, head=k)``.
  The feature perturbations CCT puts in front of them are the algorithm's (``algorithms/cct.py``).
- ``deep_supervision=True`` (SSL4MIS ``UNet_URPC`` / ``Decoder_URPC``): 3x3 heads ``decoder.out_conv_dp3``,
  ``dp2``, ``dp1`` on the outputs of ``up1`` (1/8), ``up2`` (1/4) and ``up3`` (1/2), each resized to the
  input's size with nearest interpolation as the reference's ``F.interpolate(x, shape)`` does.
  ``decode_pyramid(features)`` returns [main, 1/2, 1/4, 1/8] logits, main first; ``decode`` and ``forward``
  still return the main logits alone. The reference's ``out_conv_dp4`` is never used there and is left out
  (an unused parameter would stop DDP), so a ``UNet_URPC`` checkpoint loads with ``strict=False``.

Inputs must have H and W divisible by 16 (four poolings); anything else raises ValueError rather
than being padded, so the caller decides how to resize or pad (ACDC slices are zoomed to 256x256).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.errors import ConfigError
from semiseg.registry import register_backbone

# One optional perturbation per pyramid level, main (full resolution) first; None leaves a level alone.
LevelPerturbations = Sequence[Callable[[torch.Tensor], torch.Tensor] | None]

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


class _PyramidDecoder(_Decoder):
    """The main decoder plus Decoder_URPC's per-scale heads (3x3 convs on the up1/up2/up3 outputs)."""

    def __init__(self, ch: list[int], num_classes: int) -> None:
        super().__init__(ch, num_classes)
        # created after the main decoder's modules, so those draw the same initial weights as without the option
        self.out_conv_dp3 = nn.Conv2d(ch[3], num_classes, kernel_size=3, padding=1)
        self.out_conv_dp2 = nn.Conv2d(ch[2], num_classes, kernel_size=3, padding=1)
        self.out_conv_dp1 = nn.Conv2d(ch[1], num_classes, kernel_size=3, padding=1)

    def pyramid(self, features: list[torch.Tensor], perturb: LevelPerturbations | None = None,
                in_path: bool = False) -> list[torch.Tensor]:
        x0, x1, x2, x3, x4 = features
        size = x0.shape[2:]
        outs: dict[int, torch.Tensor] = {}
        x = x4
        for up, skip, head, level in ((self.up1, x3, self.out_conv_dp3, 3), (self.up2, x2, self.out_conv_dp2, 2),
                                      (self.up3, x1, self.out_conv_dp1, 1), (self.up4, x0, self.out_conv, 0)):
            x = up(x, skip)
            fn = perturb[level] if perturb is not None else None
            h = x if fn is None else fn(x)
            if in_path:
                x = h
            # the reference resizes with F.interpolate's default mode, nearest
            outs[level] = head(h) if level == 0 else F.interpolate(head(h), size=size, mode="nearest")
        return [outs[level] for level in range(4)]


class UNet2D(SegBackbone):
    """SSL4MIS 2D U-Net. ``aux_decoders`` adds UNet_CCT's extra decoders (``decode(features, head=k)``),
    ``deep_supervision`` UNet_URPC's per-scale heads (``decode_pyramid``); both off by default."""

    dim = 2
    divisor = DIVISOR  # the heads add no downsampling

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: float = 1.0,
                 dropout: bool = True, aux_decoders: int = 0, deep_supervision: bool = False) -> None:
        super().__init__()
        check_head_options(aux_decoders, deep_supervision, "unet")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.aux_decoders = aux_decoders
        self.deep_supervision = deep_supervision
        ch = [scaled(c, width) for c in BASE_CHANNELS]
        p = ENCODER_DROPOUT if dropout else (0.0,) * len(ENCODER_DROPOUT)
        # Submodule names mirror the reference (encoder.in_conv.conv_conv.0, decoder.up1.conv1x1, ...)
        # so its checkpoints load with load_state_dict as they are.
        self.encoder = _Encoder(in_channels, ch, p)
        self.decoder = _PyramidDecoder(ch, num_classes) if deep_supervision else _Decoder(ch, num_classes)
        for k in range(1, aux_decoders + 1):  # UNet_CCT's names: aux_decoder1, aux_decoder2, ...
            self.add_module(f"aux_decoder{k}", _Decoder(ch, num_classes))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_channels, 2, DIVISOR)
        return self.encoder(x)

    def decode(self, features: list[torch.Tensor], head: int = 0) -> torch.Tensor:
        """The main decoder's logits (``head=0``), or auxiliary decoder ``head`` (1..aux_decoders)."""
        if head == 0:
            return self.decoder(features)
        check_head(head, self.aux_decoders, "unet")
        return getattr(self, f"aux_decoder{head}")(features)

    def decode_pyramid(self, features: list[torch.Tensor], perturb: LevelPerturbations | None = None,
                       in_path: bool = False) -> list[torch.Tensor]:
        """Per-scale logits [main, 1/2, 1/4, 1/8], each at the input's size (``deep_supervision=True``).

        ``perturb[level]`` (main first) is applied to that level's decoder output before its head, as
        Decoder_URPC applies dropout, FeatureDropout and FeatureNoise; ``in_path`` also passes the perturbed
        map on to the next decoder stage (unet_3D_dv_semi's decoder dropouts), otherwise only the head sees it.
        """
        if not isinstance(self.decoder, _PyramidDecoder):
            raise ValueError("decode_pyramid needs the per-scale heads; build the unet with deep_supervision=True.")
        return self.decoder.pyramid(features, perturb, in_path)

    def describe(self) -> dict:
        return {**super().describe(), "aux_decoders": self.aux_decoders, "deep_supervision": self.deep_supervision,
                "divisor": self.divisor}


def check_head_options(aux_decoders: int, deep_supervision: bool, name: str) -> None:
    """The extra-head options of unet and vnet, checked where the backbone is built."""
    if isinstance(aux_decoders, bool) or not isinstance(aux_decoders, int) or not 0 <= aux_decoders <= 16:
        raise ConfigError(f"Backbone '{name}' option aux_decoders={aux_decoders!r} must be an integer from 0 to 16.")
    if not isinstance(deep_supervision, bool):
        raise ConfigError(f"Backbone '{name}' option deep_supervision={deep_supervision!r} must be true or false.")


def check_head(head: int, aux_decoders: int, name: str) -> None:
    if not 0 <= head <= aux_decoders:
        raise ValueError(f"{name} has {aux_decoders} auxiliary decoder(s), so head={head} does not exist; "
                         f"use 0 (the main decoder) to {aux_decoders}, or build it with aux_decoders={head}.")


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
def unet(in_channels: int = 1, num_classes: int = 4, width: float = 1.0, dropout: bool = True,
         aux_decoders: int = 0, deep_supervision: bool = False) -> UNet2D:
    """SSL4MIS 2D U-Net (16-32-64-128-256 x width, ~1.81 M parameters at width 1); ``aux_decoders`` adds
    UNet_CCT's extra decoders, ``deep_supervision`` UNet_URPC's per-scale heads."""
    return UNet2D(in_channels=in_channels, num_classes=num_classes, width=width, dropout=dropout,
                  aux_decoders=aux_decoders, deep_supervision=deep_supervision)
