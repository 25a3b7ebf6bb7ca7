"""The run configuration: one dataclass, saved as ``config.yaml`` in the run directory so the run can be rerun."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semiseg.errors import ConfigError


@dataclass
class TrainConfig:
    algo: str = "supervised"
    recipe: str = "default"  # default: the settings below; official: the algorithm's official ones (engine/recipes.py)
    algo_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "auto"  # auto: unet for 2D data, vnet for 3D
    backbone_options: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    data_root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    labeled: float | None = None  # count (>= 1) or fraction (< 1); None = the dataset's default
    patch_size: list[int] | None = None
    policy: str | None = None  # None = the dataset's default augmentation policy
    policy_options: dict[str, Any] = field(default_factory=dict)
    iterations: int = 200
    batch_size: int = 4  # labeled images per step (per process)
    unlabeled_batch_size: int | None = None  # default: batch_size
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.01 for SGD, 1e-3 for AdamW
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "poly"
    poly_total: int | None = None  # poly decay horizon (CrossMatch LA decays over 17000 whatever the length)
    warmup: int = 0
    amp: bool = False
    clip_grad: float | None = None
    channels_last: bool | None = None  # None: auto, on where measured to win (engine/perf.py)
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # None: 0 on CPU, 4 on CUDA
    val_every: int = 100
    val_split: str | None = None
    val_max_cases: int | None = None
    log_every: int = 10
    loggers: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow
    diagnostics: bool = False  # log pseudo-label accuracy against the unlabeled images' true labels
    out: str = "runs/run"
    ema_decay: float | None = None  # override the algorithm's EMA decay
    eval_net: str | None = None  # the network validation evaluates ("model", "teacher", "a+b" ensemble...)
    sync_bn: bool = False
    nproc: int = 1  # processes (torchrun); --batch-size is per process, so this keeps the global batch
    plugins: list[str] = field(default_factory=list)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{source} has unknown keys {bad}; known keys are: {', '.join(sorted(known))}.")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist; pass a YAML file written by `semiseg train`.")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{p}' is not valid YAML ({e}); fix the syntax.") from e
        if not isinstance(d, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping of keys to values.")
        return cls.from_dict(d, source=f"Config file '{p}'")

    def validate(self) -> None:
        """Every option's type and range, in one sentence naming the option, the value and what is accepted."""
        from semiseg.validation import check_value

        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), f.type if isinstance(f.type, str) else None, "The config")
        ranges = [  # (option, value, ok, accepted)
            ("--unlabeled-batch-size", self.unlabeled_batch_size, lambda v: v is None or v >= 1, "at least 1"),
            ("--val-every", self.val_every, lambda v: v >= 1, "at least 1"),
            ("--log-every", self.log_every, lambda v: v >= 1, "at least 1"),
            ("--workers", self.workers, lambda v: v is None or v >= 0, "0 or more"),
            ("--warmup", self.warmup, lambda v: v >= 0, "0 or more"),
            ("--clip-grad", self.clip_grad, lambda v: v is None or v > 0, "a positive norm"),
            ("--poly-total", self.poly_total, lambda v: v is None or v >= 1, "at least 1"),
            ("--ema-decay", self.ema_decay, lambda v: v is None or 0 <= v <= 1, "in [0, 1]"),
            ("--momentum", self.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("--weight-decay", self.weight_decay, lambda v: v >= 0, "0 or more"),
            ("--seed", self.seed, lambda v: v >= 0, "0 or more"),
            ("--nproc", self.nproc, lambda v: v >= 1, "at least 1"),
            ("--val-max-cases", self.val_max_cases, lambda v: v is None or v >= 1, "at least 1"),
            ("--patch-size", self.patch_size, lambda v: v is None or (len(v) in (2, 3) and min(v) >= 1),
             "2 or 3 positive sizes"),
            ("--width", self.backbone_options.get("width"),
             lambda v: v is None or (isinstance(v, (int, float)) and v > 0), "a positive multiplier"),
        ]
        for flag, value, ok, accepted in ranges:
            if not ok(value):
                raise ConfigError(f"{flag} {value} is out of range; it must be {accepted}.")
        if self.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1, got {self.iterations}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.recipe not in ("default", "official"):
            raise ConfigError(f"--recipe '{self.recipe}' is unknown; use default or official.")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer '{self.optimizer}' is unknown; use sgd or adamw.")
        from semiseg.schedules import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule '{self.schedule}' is unknown; use one of {', '.join(SCHEDULES)}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device '{self.device}' is unknown; use auto, cpu or cuda.")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}.")
        if self.labeled is not None and self.labeled <= 0:
            raise ConfigError(f"--labeled must be a positive count or a fraction in (0, 1), got {self.labeled}.")


# Flags of `semiseg train` (and keywords of `semiseg.train`) that are backbone options, not config fields.
BACKBONE_SHORTCUTS = ("arch", "encoder", "weights", "width")


def default_synthetic_dim(cfg: TrainConfig) -> None:
    """Synthetic data without a ``dim``: the backbone decides (vnet/unet3d want volumes, the rest images)."""
    if cfg.data == "synthetic" and "dim" not in cfg.data_options:
        cfg.data_options["dim"] = 3 if cfg.backbone in ("vnet", "unet3d") or cfg.backbone_options.get("dim") == 3 else 2


def parse_value(text: str) -> Any:
    """'0.3' -> 0.3, 'true' -> True, '[64,64,32]' and '64,64' -> lists; anything else stays a string."""
    t = text.strip()
    if "," in t and not t.startswith(("[", "{", "'", '"')):
        return [parse_value(p) for p in t.split(",") if p.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_options(pairs: tuple[str, ...] | list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"{flag} expects key=value, got '{p}'; e.g. {flag} eta=0.3.")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_value(v)
    return out
