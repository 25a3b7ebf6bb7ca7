"""Any segmentation-models-pytorch architecture and encoder as a 2D SegBackbone.

    encode(x)  = model.encoder(x)                         # list of features, deepest last
    decode(fs) = model.segmentation_head(model.decoder(fs))

Notes:
- Encoders start from random init; ``weights`` may name a local state_dict (encoder or whole model).
- Most smp encoders put the input itself (stride 1) first in the feature list.
- DPT is built with ``decoder_readout="ignore"`` so the feature list is the whole interface
  (the ViT prefix tokens are not carried between encode and decode).
- Architectures that need it (all but Unet in smp 0.5+) require H and W divisible by the encoder's
  output stride (32 by default); other sizes raise ValueError.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from semiseg.backbones.base import SegBackbone
from semiseg.errors import CheckpointError, ConfigError
from semiseg.registry import register_backbone


def _lib() -> ModuleType:
    # Imported lazily: segmentation_models_pytorch (and timm) add seconds to every CLI start.
    import segmentation_models_pytorch

    return segmentation_models_pytorch


def _close(name: str, choices: list[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:n]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def resolve_arch(arch: str) -> type[nn.Module]:
    table: dict[str, type[nn.Module]] = _lib().MODEL_ARCHITECTURES_MAPPING
    cls = table.get(arch.lower())
    if cls is None:
        names = sorted(c.__name__ for c in table.values())
        hint = _close(arch, names)
        raise ConfigError(f"Unknown smp architecture '{arch}'.{hint} Known: {', '.join(names)}.")
    return cls


def check_encoder(encoder: str) -> None:
    lib = _lib()
    if encoder.startswith("tu-"):
        import timm

        base = encoder[3:].split(".")[0]  # "tu-convnext_tiny.fb_in1k" names a pretrained tag after the dot
        if not timm.is_model(base):
            hint = _close(base, timm.list_models())
            raise ConfigError(f"Unknown timm encoder '{encoder}'.{hint} Use 'tu-<timm model name>'.")
        return
    names = lib.encoders.get_encoder_names()
    legacy = getattr(lib.encoders, "is_equivalent_to_timm_universal", lambda _: False)
    if encoder not in names and not legacy(encoder):
        hint = _close(encoder, names)
        raise ConfigError(
            f"Unknown smp encoder '{encoder}'.{hint} Any timm model also works as 'tu-<name>' "
            f"(e.g. 'tu-resnet10t')."
        )


# Head upsampling that brings the decoder output back to input size, as a function of encoder_depth:
# smp's defaults are only right for one depth (PSPNet: 3, FPN: 5).
_UPSAMPLING = {"PSPNet": lambda d: 2**d, "FPN": lambda d: 2 ** (d - 3)}


def _decoder_kwargs(cls: type[nn.Module], encoder_depth: int) -> dict[str, Any]:
    """Per-architecture extras so a non-default depth or DPT builds without further options."""
    params = inspect.signature(cls.__init__).parameters
    extra: dict[str, Any] = {}
    if cls.__name__ in _UPSAMPLING and "upsampling" in params:
        extra["upsampling"] = _UPSAMPLING[cls.__name__](encoder_depth)
    chans = params.get("decoder_channels")
    # Unet-style decoders take one channel count per encoder stage; cut the default to the depth.
    if chans is not None and isinstance(chans.default, (list, tuple)) and len(chans.default) != encoder_depth:
        if encoder_depth > len(chans.default):
            raise ConfigError(
                f"{cls.__name__} supports encoder_depth up to {len(chans.default)}, got {encoder_depth}."
            )
        extra["decoder_channels"] = tuple(chans.default[:encoder_depth])
    if "decoder_readout" in params:  # DPT: ViT encoder; any image size, prefix tokens unused
        extra["decoder_readout"] = "ignore"
        extra["dynamic_img_size"] = True
    return extra


class SMPBackbone(SegBackbone):
    dim = 2

    def __init__(self, in_channels: int = 1, num_classes: int = 4, arch: str = "Unet",
                 encoder: str = "resnet34", weights: str | None = None, encoder_depth: int = 5) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        cls = resolve_arch(arch)
        check_encoder(encoder)
        kwargs = _decoder_kwargs(cls, encoder_depth)
        try:
            self.model = cls(encoder_name=encoder, encoder_weights=None, encoder_depth=encoder_depth,
                             in_channels=in_channels, classes=num_classes, **kwargs)
        except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
            own = inspect.signature(cls.__init__).parameters["encoder_depth"].default
            hint = "" if own == encoder_depth else f" ({cls.__name__} defaults to encoder_depth={own})"
            raise ConfigError(
                f"smp cannot build {cls.__name__} with encoder '{encoder}' and encoder_depth={encoder_depth}"
                f"{hint}: {e}"
            ) from e
        self.arch = cls.__name__
        self.encoder_name = encoder
        # DPT's encoder returns (features, prefix_tokens) and its decoder takes both.
        self._with_prefix_tokens = "prefix_tokens" in inspect.signature(self.model.decoder.forward).parameters
        self._star_features = any(p.kind == p.VAR_POSITIONAL
                                  for p in inspect.signature(self.model.decoder.forward).parameters.values())
        # Most smp encoders return the input image as their first "feature"; perturbing it would be image
        # dropout, not feature dropout, so the stream graph leaves it alone.
        out_ch = list(getattr(self.model.encoder, "out_channels", []))
        self.unperturbed_levels = 1 if out_ch and out_ch[0] == in_channels else 0
        self.weights_report: dict[str, Any] | None = None
        if weights:
            self.weights_report = load_weights(self.model, weights)

    @property
    def divisor(self) -> int:
        """What H and W must be divisible by (1 when the architecture resizes internally)."""
        if not getattr(self.model, "requires_divisible_input_shape", True):
            return 1
        return int(getattr(self.model.encoder, "output_stride", 32))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Expected input of layout (B, C, H, W) with C={self.in_channels}, "
                f"got shape {tuple(x.shape)}."
            )
        d = self.divisor
        h, w = x.shape[-2:]
        if h % d or w % d:
            raise ValueError(
                f"smp {self.arch} with encoder '{self.encoder_name}' needs H and W divisible by {d}, got "
                f"{h}x{w}; resize, crop or pad it (e.g. pad to {-(-h // d) * d}x{-(-w // d) * d})."
            )
        out = self.model.encoder(x)
        if self._with_prefix_tokens:
            out = out[0]  # prefix tokens unused: the decoder is built with readout "ignore"
        return list(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decode(self.encode(x))
        if y.shape[-2:] != x.shape[-2:]:  # guard against an smp head whose upsampling does not fit the depth
            raise RuntimeError(
                f"smp {self.arch} returned {tuple(y.shape[-2:])} for input {tuple(x.shape[-2:])}; "
                f"try its default encoder_depth."
            )
        return y

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        dec = self.model.decoder
        if self._with_prefix_tokens:
            y = dec(features, [None] * len(features))
        elif self._star_features:  # smp < 0.5 decoders take decoder(*features)
            y = dec(*features)
        else:
            y = dec(features)
        return self.model.segmentation_head(y)


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "encoder"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' does not hold a state_dict (a mapping of names to tensors).")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _adapt_in_channels(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fit a first conv trained on k input channels to n channels, as smp does for pretrained encoders."""
    k, n = w.shape[1], target.shape[1]
    if n == 1:
        return w.sum(dim=1, keepdim=True)
    idx = torch.arange(n) % k
    return w[:, idx] * (k / n)


def load_weights(model: nn.Module, path: str) -> dict[str, Any]:
    """Load a local state_dict into the whole model or its encoder, whichever its keys fit best."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"Weights file '{path}' does not exist; pass a local state_dict file (nothing is downloaded)."
        )
    from semiseg.engine.checkpoint import safe_load

    state = _unwrap(safe_load(p, what="Weights file"), path)  # weights-only: a file cannot run code

    targets: list[tuple[str, nn.Module]] = [("model", model), ("encoder", model.encoder)]
    inner = getattr(model.encoder, "model", None)
    if isinstance(inner, nn.Module):  # timm encoders: a raw timm checkpoint fits encoder.model
        targets.append(("encoder.model", inner))
    name, target = max(targets, key=lambda t: len(state.keys() & t[1].state_dict().keys()))
    own = target.state_dict()
    matched = state.keys() & own.keys()
    if not matched:
        raise CheckpointError(
            f"None of the {len(state)} tensors in '{path}' match the model or its encoder "
            f"(file keys start {sorted(state)[:3]}, model keys start {sorted(model.state_dict())[:3]})."
        )

    fitted, adapted, mismatched = {}, [], []
    for k in sorted(matched):
        v, t = state[k], own[k]
        if v.shape == t.shape:
            fitted[k] = v
        elif v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
            fitted[k] = _adapt_in_channels(v, t)
            adapted.append(k)
        else:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(t.shape)}")
    # nn.Module's own method: smp encoders override load_state_dict (dropping 'fc.*', returning None).
    nn.Module.load_state_dict(target, fitted, strict=False)
    missing = sorted(own.keys() - fitted.keys())
    unexpected = sorted(state.keys() - own.keys())
    report = {"path": str(p), "into": name, "loaded": len(fitted), "missing": missing,
              "unexpected": unexpected, "shape_mismatch": mismatched, "adapted_in_channels": adapted}
    if missing or unexpected or mismatched:
        def head(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (", ..." if len(xs) > 5 else "")

        warnings.warn(
            f"Loaded {len(fitted)} tensors from '{path}' into the {name}; "
            f"missing {len(missing)} [{head(missing)}], "
            f"unexpected {len(unexpected)} [{head(unexpected)}], "
            f"shape mismatch {len(mismatched)} [{head(mismatched)}].",
            stacklevel=3,
        )
    return report


@register_backbone("smp")
def smp(in_channels: int = 1, num_classes: int = 4, arch: str = "Unet", encoder: str = "resnet34",
        weights: str | None = None, encoder_depth: int = 5) -> SMPBackbone:
    """A segmentation-models-pytorch model (random init unless ``weights`` names a local file)."""
    return SMPBackbone(in_channels=in_channels, num_classes=num_classes, arch=arch, encoder=encoder,
                       weights=weights, encoder_depth=encoder_depth)
