"""The Algorithm base class: what an algorithm may ask of the engine, and what it returns.

An algorithm turns a batch into named, already-weighted loss terms. It never touches the device, the optimizer,
the loader or the logger: the engine moves the batch, sums the terms, steps, logs and keeps EMA teachers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semiseg.schedules import sigmoid_rampup

# What an algorithm can ask the loaders for (``Algorithm.needs``):
#   "labeled"   -> x (B, C, *S), y (B, *S)
#   "unlabeled" -> u_w: the weakly augmented unlabeled view
#   "strong"    -> u_s1, u_s2 (two independent strong views of u_w) and box1, box2 (CutMix boxes, (B, *S))
#   "mix"       -> the mix-partner batch from a second unlabeled loader: u_w_mix, u_s1_mix, u_s2_mix
NEEDS = ("labeled", "unlabeled", "strong", "mix")


@dataclass
class Stage:
    """A training stage: BCP pre-trains, then self-trains; most algorithms have one stage.

    ``schedule``: None follows the run's learning-rate schedule over the whole run; a schedule name restarts that
    schedule at the stage's first step over the stage's length. ``start_from="best"`` first restores the
    previous stage's best checkpoint (chosen on the validation split), its optimizer state included unless
    ``fresh_optimizer``, which starts a new optimizer. ``copy`` maps trained networks to the trained network whose
    weights and optimizer state they take at the stage's first step (ABD's second student starts self-training
    as the pre-trained first one, momentum included).
    """

    name: str
    iterations: int
    schedule: str | None = None
    start_from: str | None = None  # None (continue) or "best"
    fresh_optimizer: bool = False
    copy: dict[str, str] = field(default_factory=dict)


# The optimizer every official SGD recipe of the field shares (UniMatch, CrossMatch ACDC, SSL4MIS, UA-MT, BCP).
OFFICIAL_SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                                "nesterov": False, "warmup": 0, "poly_total": None}


def ssl4mis_recipe(source: str, dim: int, **settings: Any) -> Recipe:
    """SSL4MIS's shared setup (every one of its semi-supervised scripts): SGD 0.01 with momentum 0.9 and weight
    decay 1e-4, poly decay, 30 000 iterations, 12 labeled + 12 unlabeled images in 2D and 2 + 2 in 3D;
    ``settings`` replace any of these."""
    batch = 12 if dim == 2 else 2
    return Recipe(source, {**OFFICIAL_SGD, "schedule": "poly", "iterations": 30000, "batch_size": batch,
                           "unlabeled_batch_size": batch, **settings})


def ramp_notes(alg: Any, iterations: int, option: str = "rampup_every") -> list[str]:
    """SSL4MIS's consistency ramp, sigmoid_rampup(t // rampup_every, consistency_rampup), is timed by each
    official code for its own length. One line when a run of ``iterations`` ends before the ramp reaches half
    its weight, naming the value that compresses the ramp by the run's share of the official length:
    ``rampup_every`` (steps of fewer iterations) or, where the ramp length also times something else (AD-MT's
    EMA), ``consistency_rampup``. ``alg`` has ``consistency_rampup``, ``rampup_every`` and an official recipe."""
    rampup, every = float(alg.consistency_rampup), int(alg.rampup_every)
    reached = sigmoid_rampup((iterations - 1) // every, rampup)
    recipe = alg.official_recipe(alg.dim)
    official = recipe.settings.get("iterations") if recipe is not None else None
    if reached >= 0.5 or not official:
        return []
    share = iterations / official
    if option == "consistency_rampup":
        fix = f"--opt consistency_rampup={max(1, round(rampup * share))}"
    elif every * share >= 1:
        fix = f"--opt rampup_every={round(every * share)}"
    else:
        fix = f"--opt rampup_every=1 --opt consistency_rampup={max(1, round(rampup * every * share))}"
    return [f"{alg.name}: the consistency weight reaches only {100 * reached:.1f} % of its full value by the end of "
            f"this {iterations}-iteration run (its ramp is timed for the official {official} iterations); {fix} "
            f"compresses it by the same factor as the run."]


@dataclass(frozen=True)
class Recipe:
    """An algorithm's official training settings (``--recipe official``): TrainConfig fields, and optionally a
    length in epochs over the unlabeled (or labeled) set at the recipe's batch size, as the official loops count.
    ``source`` names the official script the values come from."""

    source: str
    settings: dict[str, Any]
    epochs: int | None = None
    epoch_over: str = "unlabeled"  # or "labeled"


PRIMARY = "model"  # the first trained network: the run's backbone, passed to ``step`` as ``model``


@dataclass(frozen=True)
class Network:
    """A network an algorithm owns (``Algorithm.networks()``; docs/design.md, "Several networks").

    ``role``: ``"trained"`` (optimised, in a parameter group of its own at ``lr_scale`` x the run's learning rate;
    built from the run's backbone, or from ``backbone`` with ``backbone_options`` over the run's options), ``"ema"``
    (an exponential moving average of the network ``of``: ``decay``, ``warmup``, ``buffers`` as ``EMATeacher``), or
    ``"frozen"`` (never updated). ``init``: ``"kaiming"`` or ``"xavier"`` re-initialise the network (normal
    convolutions, BatchNorm 1 and 0); ``"fresh"`` builds an ``ema``/``frozen`` network anew, with its own random
    initialisation, instead of copying ``of`` (AD-MT's teachers); None keeps the built or copied weights.
    """

    role: str = "trained"
    of: str | None = None
    lr_scale: float = 1.0
    init: str | None = None
    backbone: str | None = None
    backbone_options: dict[str, Any] | None = None
    decay: float = 0.99
    warmup: bool = True
    buffers: bool = False


@dataclass
class StepContext:
    """What the engine tells the algorithm about the current step."""

    iteration: int  # global, 0-based
    total_iterations: int
    stage: str = "train"
    stage_iteration: int = 0
    stage_iterations: int = 0
    teacher: nn.Module | None = None  # the network named "teacher" (the EMA teacher of ``ema``), if any
    generator: torch.Generator | None = None  # for feature perturbations; None = torch's global RNG
    networks: dict[str, nn.Module] = field(default_factory=dict)  # every network of ``networks()`` by name


@dataclass
class PseudoLabel:
    """A hard target that unlabeled pixels were trained towards, reported for the pseudo-label diagnostics.

    ``keep`` marks the pixels that entered the loss (None: all). ``truth`` rebuilds the true label of those
    pixels from the true labels of the raw unlabeled views (``u_y`` for ``u_w`` and its strong views,
    ``u_y_mix`` for the mix partner); the engine calls it after the step, so an algorithm never sees them.
    """

    label: torch.Tensor  # (B, *S)
    keep: torch.Tensor | None  # (B, *S) bool
    truth: Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # weighted terms; the engine backpropagates their sum
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars: raw losses, mask ratios...
    pseudo_labels: dict[str, PseudoLabel] = field(default_factory=dict)  # per edge, for the diagnostics


class Algorithm(ABC):
    """Base class. Subclasses take their options as explicit keyword arguments of ``__init__``."""

    name: str = "algorithm"
    paper: str = ""
    year: int | None = None
    needs: tuple[str, ...] = ("labeled",)
    # An EMA teacher kept by the engine: {"decay": 0.99, "warmup": True, "buffers": False}; None = no teacher.
    # A shortcut for ``networks()`` = model + an "ema" network "teacher".
    ema: dict[str, Any] | None = None
    # Backbone options the method needs (an extra decoder, a multi-scale head); merged over the user's.
    backbone_options: dict[str, Any] = {}
    # The network (or "a+b" ensemble) that validation, eval and predict use; ``--eval-net`` overrides it.
    eval_network: str = PRIMARY
    # True when some trained network gets no gradient in some steps (ABD's second student while it pre-trains
    # the first): DistributedDataParallel must then look for unused parameters, which costs a graph traversal.
    idle_networks: bool = False

    def __init__(self) -> None:
        self.num_classes = 2
        self.dim = 2
        self.dice_classes = "all"

    def setup(self, num_classes: int, dim: int) -> None:
        """Called by the engine once the dataset is known."""
        self.num_classes = num_classes
        self.dim = dim
        # ACDC-style multi-class Dice averages every class (background included); binary tasks (LA) use the
        # foreground channel only, as the official code of both does.
        self.dice_classes = "foreground" if num_classes == 2 else "all"

    def networks(self) -> dict[str, Network]:
        """The networks this algorithm trains or keeps, by name, ``model`` first (``step`` gets it as
        ``model``, and all of them in ``ctx.networks``). Default: one trained network, plus the EMA teacher
        ``teacher`` when ``ema`` is set."""
        nets = {PRIMARY: Network()}
        if self.ema is not None:
            nets["teacher"] = Network("ema", of=PRIMARY, **self.ema)
        return nets

    def update_ema(self, name: str, iteration: int) -> bool | float:
        """Whether the EMA network ``name`` follows its source after this step: True (with the network's own
        decay rule), False (not this step: AD-MT alternates two teachers), or a float, the weight ``a`` of the
        teacher in ``a * teacher + (1 - a) * source`` for this step (an algorithm's own warm-up), which the
        engine caps at the network's decay (``--ema-decay`` where given). The weight used is logged as
        ``ema/<name>``."""
        return True

    def stages(self, iterations: int) -> list[Stage]:
        return [Stage("train", iterations)]

    def notes(self, iterations: int) -> list[str]:
        """Lines for the user at the start of a run of ``iterations`` steps (printed and kept in summary.json),
        e.g. a schedule of the official code that this run is too short to reach."""
        return []

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe | None:
        """The official code's optimizer, schedule, length and batch sizes for 2D (ACDC) or 3D (LA) data;
        None where the method has no official code to follow (``--recipe official`` then refuses)."""
        return None

    @abstractmethod
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        """One training step's weighted loss terms (the engine sums them, backpropagates and steps)."""

    def on_stage_start(self, stage: Stage, model: nn.Module, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Hook at the start of each stage (BCP re-initialises its teacher here)."""

    def on_step_end(self, model: nn.Module, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Hook after the optimizer step (the engine has already updated the EMA teacher)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        pass
