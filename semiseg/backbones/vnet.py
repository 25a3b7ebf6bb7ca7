"""3D V-Net of UA-MT / BCP / CrossMatch ``networks/vnet.py`` (normalization='batchnorm').

Encoder stages of 1/2/3/3/3 conv3-BN-ReLU at 16/32/64/128/256 x width, joined by conv k2 s2
(+BN+ReLU); decoder stages of 3/3/2/1 convs after ConvTranspose k2 s2 (+BN+ReLU); skips are added,
not concatenated; head is a 1x1x1 conv. ``has_dropout`` puts Dropout3d(0.5) on the bottleneck
(inside ``encode``) and before the head (inside ``decode``), as the reference does. ``decode(features, drop)``
applies the head dropout only to the samples where ``drop`` is True: the CrossMatch LA code decodes its
feature-perturbed batches with ``no_drop=True`` (head dropout off, bottleneck dropout on), and a stream graph
declares that per stream (``Stream.decoder_dropout``).

Two options add heads; off (the default) the module, its parameters and state-dict keys are unchanged:

- ``aux_decoders=N``: N more decoders of the main decoder's architecture (block_five_up ... block_nine,
  out_conv) with their own weights, ``aux_decoder1`` ... ``aux_decoderN``, reached by
  ``decode(features, head=k)``; each keeps the head dropout (the shared Dropout3d(0.5) module) and ``drop``.
  No official 3D CCT network exists; this is the 2D UNet_CCT layout on the V-Net.
- ``deep_supervision=True``: SSL4MIS ``unet_3D_dv_semi``'s deep-supervision heads on the V-Net's decoder. Its
  ``dsv4``, ``dsv3``, ``dsv2`` (1x1x1 conv, then trilinear upsampling by 8, 4, 2) sit on the outputs of
  block_six (1/8), block_seven (1/4) and block_eight (1/2), the stages at the resolutions of its
  ``up_concat4/3/2``; its ``dsv1`` (1x1x1 at full resolution) is the V-Net's own ``out_conv``.
  ``decode_pyramid(features)`` returns [main, 1/2, 1/4, 1/8] logits, main first; ``decode`` and ``forward``
  still return the main logits alone.

Inputs must be divisible by 16 in every axis (four stride-2 downsamplings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.backbones.unet import LevelPerturbations, check_head, check_head_options, check_input
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


def add_decoder(m: nn.Module, c: list[int], num_classes: int) -> None:
    """The V-Net decoder's modules under the reference names, in the reference order (so the initial weights
    drawn for them do not change): the main decoder, and each auxiliary one."""
    m.block_five_up = up(c[4], c[3])
    m.block_six = conv_stage(3, c[3], c[3])
    m.block_six_up = up(c[3], c[2])
    m.block_seven = conv_stage(3, c[2], c[2])
    m.block_seven_up = up(c[2], c[1])
    m.block_eight = conv_stage(2, c[1], c[1])
    m.block_eight_up = up(c[1], c[0])
    m.block_nine = conv_stage(1, c[0], c[0])
    m.out_conv = nn.Conv3d(c[0], num_classes, 1)


class _DecoderStages(nn.Module):
    """An auxiliary V-Net decoder: the main decoder's modules under the same names."""

    def __init__(self, c: list[int], num_classes: int) -> None:
        super().__init__()
        add_decoder(self, c, num_classes)


class _Dsv(nn.Module):
    """unet_3D_dv_semi's UnetDsv3: 1x1x1 conv, then trilinear upsampling (align_corners False) to full size."""

    def __init__(self, in_ch: int, num_classes: int, scale: int) -> None:
        super().__init__()
        self.dsv = nn.Sequential(nn.Conv3d(in_ch, num_classes, 1),
                                 nn.Upsample(scale_factor=scale, mode="trilinear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dsv(x)


def decoder_stages(m: nn.Module, features: list[torch.Tensor],
                   tap: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The decoder stages of ``m`` (the V-Net itself or an auxiliary decoder) up to block_nine's output.
    ``tap(level, x)`` sees each stage's output (level 3 = 1/8 ... 0 = full size) and returns what goes on."""
    x1, x2, x3, x4, x5 = features
    x = x5
    for upsample, block, skip, level in ((m.block_five_up, m.block_six, x4, 3), (m.block_six_up, m.block_seven, x3, 2),
                                         (m.block_seven_up, m.block_eight, x2, 1),
                                         (m.block_eight_up, m.block_nine, x1, 0)):
        x = block(upsample(x) + skip)
        if tap is not None:
            x = tap(level, x)
    return x


class VNet(SegBackbone):
    """UA-MT V-Net. ``aux_decoders`` adds extra decoders (``decode(features, head=k)``), ``deep_supervision``
    unet_3D_dv_semi's per-scale heads (``decode_pyramid``); both off by default."""

    dim = 3
    divisor = DIVISOR  # the heads add no downsampling

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: float = 1.0,
                 has_dropout: bool = True, aux_decoders: int = 0, deep_supervision: bool = False) -> None:
        super().__init__()
        check_head_options(aux_decoders, deep_supervision, "vnet")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.aux_decoders = aux_decoders
        self.deep_supervision = deep_supervision
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
        add_decoder(self, c, num_classes)
        self.dropout = nn.Dropout3d(p=0.5)
        # The optional heads come last, so every module above draws the same initial weights as without them.
        if deep_supervision:  # unet_3D_dv_semi's names and scale factors
            self.dsv4 = _Dsv(c[3], num_classes, 8)
            self.dsv3 = _Dsv(c[2], num_classes, 4)
            self.dsv2 = _Dsv(c[1], num_classes, 2)
        for k in range(1, aux_decoders + 1):
            self.add_module(f"aux_decoder{k}", _DecoderStages(c, num_classes))

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

    def decode(self, features: list[torch.Tensor], drop: torch.Tensor | None = None,
               head: int = 0) -> torch.Tensor:
        """The main decoder's logits (``head=0``), or auxiliary decoder ``head`` (1..aux_decoders)."""
        check_head(head, self.aux_decoders, "vnet")
        m = self if head == 0 else getattr(self, f"aux_decoder{head}")
        return m.out_conv(self._head_dropout(decoder_stages(m, features), drop))

    def decode_pyramid(self, features: list[torch.Tensor], perturb: LevelPerturbations | None = None,
                       in_path: bool = False, drop: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-scale logits [main, 1/2, 1/4, 1/8], each at the input's size (``deep_supervision=True``).

        ``perturb[level]`` (main first) is applied to that level's stage output before its head; with
        ``in_path`` the perturbed map also goes on to the next stage, as unet_3D_dv_semi's Dropout3d after each
        up-block does. The main level keeps the V-Net's own head dropout (``drop`` as in ``decode``).
        """
        if not self.deep_supervision:
            raise ValueError("decode_pyramid needs the per-scale heads; build the vnet with deep_supervision=True.")
        heads = {3: self.dsv4, 2: self.dsv3, 1: self.dsv2}
        outs: dict[int, torch.Tensor] = {}

        def tap(level: int, x: torch.Tensor) -> torch.Tensor:
            fn = perturb[level] if perturb is not None else None
            h = x if fn is None else fn(x)
            if level:
                outs[level] = heads[level](h)
            return h if in_path or level == 0 else x

        outs[0] = self.out_conv(self._head_dropout(decoder_stages(self, features, tap), drop))
        return [outs[level] for level in range(4)]

    def _head_dropout(self, x9: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if not self.has_dropout:
            return x9
        dropped = self.dropout(x9)
        # Dropout3d draws each sample's channel mask independently, so selecting samples afterwards is the
        # same as dropping only those
        return dropped if drop is None else torch.where(drop.view(-1, *(1,) * (x9.dim() - 1)), dropped, x9)

    def describe(self) -> dict:
        return {**super().describe(), "aux_decoders": self.aux_decoders, "deep_supervision": self.deep_supervision,
                "divisor": self.divisor}


@register_backbone("vnet")
def vnet(in_channels: int = 1, num_classes: int = 2, width: float = 1.0, has_dropout: bool = True,
         aux_decoders: int = 0, deep_supervision: bool = False) -> VNet:
    """UA-MT V-Net (n_filters 16 x width, BatchNorm, ~9.44 M parameters at width 1); ``aux_decoders`` adds extra
    decoders, ``deep_supervision`` unet_3D_dv_semi's per-scale heads."""
    return VNet(in_channels=in_channels, num_classes=num_classes, width=width, has_dropout=has_dropout,
                aux_decoders=aux_decoders, deep_supervision=deep_supervision)
