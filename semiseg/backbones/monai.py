"""MONAI networks (BasicUNet, UNet, SegResNet, DynUNet, SwinUNETR) as 2D or 3D SegBackbones.

Each network is MONAI's own module, built by its own constructor; ``encode`` and ``decode`` call its submodules
in the order its ``forward`` does, so ``model(x) == model.decode(model.encode(x))`` and a feature perturbation
between the two calls (UniMatch, CrossMatch) sees real encoder features. The splits (features shallowest first,
deepest last):

==========  ===============================================================  ====================================
arch        encode -> features                                               decode
==========  ===============================================================  ====================================
BasicUNet   conv_0, down_1 .. down_4 outputs (5 maps)                         upcat_4 .. upcat_1, final_conv
UNet        each level's down layer output, then the bottom layer's          per level: SkipConnection's combine
            (walked from the nested ``model`` Sequential/SkipConnection)     (cat/add/mul), then the up layer
SegResNet   MONAI's own ``SegResNet.encode`` skip list (convInit, dropout,   MONAI's own ``SegResNet.decode``
            down_layers)
DynUNet     input_block, downsamples, bottleneck                             upsamples (deep first), output_block
SwinUNETR   encoder1(x), encoder2..4(swinViT stages 0..2), swinViT stage 3,  decoder5 .. decoder1, out
            encoder10(swinViT stage 4)
==========  ===============================================================  ====================================

Notes:
- MONAI is imported lazily (inside functions), so importing semiseg or ``semiseg --version`` does not load it.
- ``width`` scales the architecture's default channel counts for thin CPU networks (BasicUNet ``features``, UNet
  ``channels``, SegResNet ``init_filters``, DynUNet ``filters``, SwinUNETR ``feature_size``, rounded to a multiple
  of 12 as SwinUNETR requires). Giving both ``width`` and the channel option itself is refused.
- MONAI's ``UNet`` has no defaults for ``channels``/``strides``; semiseg uses (16, 32, 64, 128, 256) x width and
  (2, 2, 2, 2). Its first down layer is strided, so its first feature map is at half resolution; the bottom
  layer keeps the deepest level's resolution.
- ``DynUNet`` defaults to five levels: kernel 3, strides (1, 2, 2, 2, 2); given only ``strides``, kernels are 3 and
  ``upsample_kernel_size`` is ``strides[1:]``. Deep supervision is refused (semiseg's losses take one output).
- ``divisor`` is the total downsampling. With anisotropic strides (UNet, DynUNet) it is the largest axis's
  product, because the interface has one divisor for all axes; ``encode`` checks each axis with its own.
- Dropout that MONAI puts inside decoder blocks (e.g. BasicUNet's or DynUNet's ``dropout`` option) is ordinary
  train-mode dropout: ``decoder_dropout`` is false, so a stream graph cannot switch it off per stream.
- SwinUNETR: MONAI >= 1.5 has no ``img_size``; with an older MONAI that still requires it, ``img_size`` (default:
  one divisor-sized side) is passed through. Inputs must be divisible by ``patch_size ** 5``.
- Instance norm (the default of most of these) refuses a 1-voxel feature map in training: patches must leave at
  least 2 voxels per axis at the deepest level (e.g. 32 for BasicUNet, 64 for SwinUNETR).

Usage and the flags: docs/monai.md.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from semiseg.backbones.base import SegBackbone, scaled
from semiseg.errors import CheckpointError, ConfigError
from semiseg.registry import register_backbone

ARCHS = ("BasicUNet", "UNet", "SegResNet", "DynUNet", "SwinUNETR")
INSTALL_HINT = 'MONAI is not installed; install it with `pip install "semiseg[monai]"`.'


def _nets() -> ModuleType:
    """monai.networks.nets, imported on first use (it takes seconds and is an optional extra)."""
    try:
        import monai  # noqa: F401  (the parent first, so a missing package gives our sentence)
        from monai.networks import nets
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return nets


def resolve_arch(arch: str) -> str:
    """The canonical name of ``arch`` (case-insensitive), or a one-sentence ConfigError."""
    table = {a.lower(): a for a in ARCHS}
    name = table.get(str(arch).lower())
    if name is None:
        close = difflib.get_close_matches(str(arch), ARCHS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"Unknown MONAI architecture '{arch}'{hint}; known: {', '.join(ARCHS)}.")
    return name


def _axis_products(strides: Any, dim: int) -> tuple[int, ...]:
    """Total downsampling per axis from a list of int or per-axis strides."""
    out = [1] * dim
    for s in strides:
        per_axis = [int(s)] * dim if isinstance(s, (int, float)) else [int(v) for v in s]
        out = [a * b for a, b in zip(out, per_axis)]
    return tuple(out)


def _width_default(options: dict[str, Any], key: str, value: Any, width: float, arch: str) -> None:
    """Fill a channel option from the width multiplier unless the user gave it (both at once is ambiguous)."""
    if key in options:
        if width != 1.0:
            raise ConfigError(f"MONAI {arch}: give either width={width} or {key}={options[key]!r}, not both.")
        return
    options[key] = value


def _build_kwargs(arch: str, dim: int, in_channels: int, num_classes: int, width: float,
                  img_size: int | list[int] | None, options: dict[str, Any], cls: type) -> dict[str, Any]:
    """Constructor keywords for ``cls``: semiseg's defaults, then the user's passthrough options."""
    o = dict(options)
    if arch == "BasicUNet":
        _width_default(o, "features", [scaled(c, width) for c in (32, 32, 64, 128, 256, 32)], width, arch)
    elif arch == "UNet":
        _width_default(o, "channels", [scaled(c, width) for c in (16, 32, 64, 128, 256)], width, arch)
        o.setdefault("strides", [2] * (len(o["channels"]) - 1))
    elif arch == "SegResNet":
        _width_default(o, "init_filters", scaled(8, width), width, arch)
        groups = int(o.get("num_groups", 8))
        if "norm" not in o and o["init_filters"] % groups:
            # GroupNorm needs groups | channels; a thin net keeps group norm with the largest group count that fits
            o["norm"] = ("GROUP", {"num_groups": math.gcd(int(o["init_filters"]), groups)})
    elif arch == "DynUNet":
        o.setdefault("strides", [1, 2, 2, 2, 2])
        o.setdefault("kernel_size", [3] * len(o["strides"]))
        o.setdefault("upsample_kernel_size", list(o["strides"])[1:])
        if o.get("deep_supervision"):
            raise ConfigError("MONAI DynUNet with deep_supervision=True returns several outputs; semiseg trains "
                              "one, so leave deep_supervision off.")
        default = [min(2 ** (5 + i), 320 if dim == 3 else 512) for i in range(len(o["strides"]))]  # MONAI's own
        if width != 1.0 or "filters" in o:
            _width_default(o, "filters", [scaled(c, width) for c in default], width, arch)
    elif arch == "SwinUNETR":
        _width_default(o, "feature_size", max(12, int(round(24 * width / 12)) * 12), width, arch)
    params = inspect.signature(cls.__init__).parameters
    if "img_size" in params:  # MONAI < 1.5 requires it (used only for a divisibility check)
        side = int(o.get("patch_size", 2)) ** 5
        o.setdefault("img_size", img_size if img_size is not None else [side] * dim)
    o.update(spatial_dims=dim, in_channels=in_channels, out_channels=num_classes)
    return o


def _constructor_error(cls: type, kwargs: dict[str, Any], err: Exception) -> ConfigError:
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    bad = [k for k in kwargs if k not in params]
    if bad:
        close = {b: difflib.get_close_matches(b, params, n=1) for b in bad}
        parts = [f"'{b}'" + (f" (did you mean '{close[b][0]}'?)" if close[b] else "") for b in bad]
        return ConfigError(f"MONAI {cls.__name__} does not take option {', '.join(parts)}; it takes: "
                           f"{', '.join(params)}.")
    return ConfigError(f"MONAI cannot build {cls.__name__} with {kwargs}: {err}")


class MonaiBackbone(SegBackbone):
    """A MONAI network with ``encode``/``decode`` split along its own forward (see the module docstring)."""

    weights_report: dict[str, Any] | None = None

    def __init__(self, in_channels: int = 1, num_classes: int = 2, arch: str = "BasicUNet", dim: int = 2,
                 width: float = 1.0, img_size: int | list[int] | None = None, **options: Any) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ConfigError(f"MONAI backbones take dim=2 or dim=3, got dim={dim}.")
        if width <= 0:
            raise ConfigError(f"width must be positive, got {width}.")
        self.arch = resolve_arch(arch)
        nets = _nets()
        cls = getattr(nets, self.arch)
        kwargs = _build_kwargs(self.arch, dim, in_channels, num_classes, width, img_size, options, cls)
        try:
            self.model = cls(**kwargs)
        except (TypeError, ValueError, AssertionError, KeyError) as e:
            raise _constructor_error(cls, kwargs, e) from e
        self.dim, self.in_channels, self.num_classes = dim, in_channels, num_classes
        self._axis_divisors = self._divisors(kwargs)
        self.divisor = max(self._axis_divisors)
        if self.arch == "UNet":
            self._walk_unet()

    def _divisors(self, kw: dict[str, Any]) -> tuple[int, ...]:
        d = self.dim
        if self.arch == "BasicUNet":
            return (16,) * d  # four max-poolings
        if self.arch == "UNet":
            return _axis_products(list(kw["strides"])[: len(kw["channels"]) - 1], d)
        if self.arch == "SegResNet":
            return (2 ** (len(self.model.blocks_down) - 1),) * d
        if self.arch == "DynUNet":
            return _axis_products(kw["strides"], d)
        return (int(self.model.patch_size) ** 5,) * d  # SwinUNETR: patch embedding, then four mergings

    def _walk_unet(self) -> None:
        """Unroll MONAI UNet's nested Sequential(down, SkipConnection(sub), up) into per-level modules.

        The modules are registered under the MONAI model only (``self.model``); these are plain references, so
        state_dict keys stay MONAI's own.
        """
        from monai.networks.layers.simplelayers import SkipConnection

        levels: list[tuple[nn.Module, Any, nn.Module]] = []
        node: nn.Module = self.model.model
        while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
            levels.append((node[0], node[1], node[2]))
            node = node[1].submodule
        # A tuple, not attributes: nn.Module would register the modules a second time under new state_dict keys.
        self._unet = (levels, node)

    # ---------------------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            layout = "(B, C, H, W)" if self.dim == 2 else "(B, C, D, H, W)"
            raise ValueError(f"Expected input of layout {layout} with C={self.in_channels}, got shape "
                             f"{tuple(x.shape)}.")
        size = tuple(x.shape[2:])
        if any(s % d for s, d in zip(size, self._axis_divisors)):
            fixed = tuple(-(-s // d) * d for s, d in zip(size, self._axis_divisors))
            need = self.divisor if len(set(self._axis_divisors)) == 1 else self._axis_divisors
            raise ValueError(f"MONAI {self.arch}: input spatial size {size} is not divisible by {need} in every "
                             f"axis; resize, crop or pad it (e.g. pad to {fixed}).")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check(x)
        m = self.model
        if self.arch == "BasicUNet":
            feats = [m.conv_0(x)]
            for down in (m.down_1, m.down_2, m.down_3, m.down_4):
                feats.append(down(feats[-1]))
            return feats
        if self.arch == "UNet":
            feats, h = [], x
            levels, bottom = self._unet
            for down, _, _ in levels:
                h = down(h)
                feats.append(h)
            feats.append(bottom(h))
            return feats
        if self.arch == "SegResNet":
            _, down_x = m.encode(x)  # its first return value is down_x[-1]
            return list(down_x)
        if self.arch == "DynUNet":
            feats = [m.input_block(x)]
            for down in m.downsamples:
                feats.append(down(feats[-1]))
            feats.append(m.bottleneck(feats[-1]))
            return feats
        hidden = m.swinViT(x, m.normalize)  # SwinUNETR
        return [m.encoder1(x), m.encoder2(hidden[0]), m.encoder3(hidden[1]), m.encoder4(hidden[2]), hidden[3],
                m.encoder10(hidden[4])]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        if self.arch == "BasicUNet":
            x0, x1, x2, x3, x4 = features
            u = m.upcat_4(x4, x3)
            u = m.upcat_3(u, x2)
            u = m.upcat_2(u, x1)
            u = m.upcat_1(u, x0)
            return m.final_conv(u)
        if self.arch == "UNet":
            y = features[-1]
            for (_, skip, up), f in zip(reversed(self._unet[0]), reversed(features[:-1])):
                y = up(_combine(skip, f, y))
            return y
        if self.arch == "SegResNet":
            return m.decode(features[-1], list(reversed(features)))
        if self.arch == "DynUNet":
            y = features[-1]
            for up, skip in zip(m.upsamples, reversed(features[:-1])):
                y = up(y, skip)
            return m.output_block(y)
        enc0, enc1, enc2, enc3, hid3, dec4 = features  # SwinUNETR
        y = m.decoder5(dec4, hid3)
        y = m.decoder4(y, enc3)
        y = m.decoder3(y, enc2)
        y = m.decoder2(y, enc1)
        y = m.decoder1(y, enc0)
        return m.out(y)

    def describe(self) -> dict:
        return {**super().describe(), "arch": self.arch, "divisor": self.divisor}


def _combine(skip: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SkipConnection.forward's combine of its input ``x`` with its submodule's output ``y``."""
    if skip.mode == "cat":
        return torch.cat([x, y], dim=skip.dim)
    if skip.mode == "add":
        return torch.add(x, y)
    if skip.mode == "mul":
        return torch.mul(x, y)
    # MONAI's SkipConnection knows these three modes; a newer one would need its combine here
    raise ConfigError(f"MONAI SkipConnection mode '{skip.mode}' is not one semiseg splits into encode/decode (cat, "
                      f"add, mul); build the UNet with the default mode.")


def load_weights(model: nn.Module, path: str) -> dict[str, Any]:
    """Load a local state_dict (MONAI keys, optionally under 'state_dict'/'model'/...) into the MONAI network."""
    from semiseg.backbones.smp import _unwrap
    from semiseg.engine.checkpoint import safe_load

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Weights file '{path}' does not exist; pass a local state_dict file "
                          f"(nothing is downloaded).")
    state = _unwrap(safe_load(p, what="Weights file"), path)
    own = model.state_dict()
    fitted = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitted:
        raise CheckpointError(f"None of the {len(state)} tensors in '{path}' fit the MONAI network "
                              f"(file keys start {sorted(state)[:3]}, model keys start {sorted(own)[:3]}).")
    model.load_state_dict(fitted, strict=False)
    missing = sorted(own.keys() - fitted.keys())
    skipped = sorted(state.keys() - fitted.keys())
    if missing or skipped:
        warnings.warn(f"Loaded {len(fitted)} tensors from '{path}'; {len(missing)} model tensors kept their "
                      f"initialisation, {len(skipped)} file tensors did not fit (name or shape).", stacklevel=3)
    return {"path": str(p), "loaded": len(fitted), "missing": missing, "unexpected": skipped}


@register_backbone("monai")
def monai_backbone(in_channels: int = 1, num_classes: int = 2, arch: str = "BasicUNet", dim: int = 2,
                   width: float = 1.0, img_size: int | list[int] | None = None, weights: str | None = None,
                   **options: Any) -> MonaiBackbone:
    """A MONAI network, 2D or 3D: BasicUNet, UNet, SegResNet, DynUNet or SwinUNETR (needs semiseg[monai]).

    Keywords other than these go to the MONAI constructor (``num_res_units``, ``norm``, ``depths``...)."""
    model = MonaiBackbone(in_channels=in_channels, num_classes=num_classes, arch=arch, dim=dim, width=width,
                          img_size=img_size, **options)
    if weights:
        model.weights_report = load_weights(model.model, weights)
    return model
