"""The training engine: loop, loaders, checkpoints, EMA teachers, distributed, progress."""

from semiseg.engine.config import TrainConfig
from semiseg.engine.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
