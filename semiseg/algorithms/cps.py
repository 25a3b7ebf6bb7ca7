"""Cross pseudo supervision (Chen et al., CVPR 2021), as SSL4MIS ``train_cross_pseudo_supervision_2D.py`` /
``_3D.py`` (docs/algorithms.md, "cps").

Two networks of one architecture, started from different initialisations, learn from the labels and from each
other: each one's hard pseudo-label of an unlabeled image supervises the other.

    p_k = softmax f_k(cat(x, u))                       k = 1, 2: one pass per network over the whole batch
    L   = L_sup(f_1(x), y) + L_sup(f_2(x), y)
        + lambda(t) * [ CE(f_1(u), argmax p_2(u)) + CE(f_2(u), argmax p_1(u)) ]
    L_sup = (CE + Dice) / 2,   lambda(t) = 0.1 * sigmoid_rampup(t // 150, 200)

The pseudo-labels are detached (no gradient flows into the network that made them) and every pixel counts (no
confidence threshold). Initialisation: in 2D two successive default initialisations of the U-Net; in 3D the
first network's convolutions kaiming-normal and the second's xavier-normal (BatchNorm 1 and 0), as the 3D script.

Declared as a stream graph: four streams, two per network, each network's pair in one encoder pass (so its
BatchNorm sees labeled and unlabeled images together, as the official forward), two ground-truth edges and two
cross edges. Validation evaluates the first network, as the official scripts test ``model1``;
``--eval-net model2`` or ``--eval-net model+model2`` (their averaged softmax) choose otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.algorithms.base import (
    PRIMARY,
    Network,
    Recipe,
    StepContext,
    StepResult,
    ramp_notes,
    ssl4mis_recipe,
)
from semiseg.algorithms.graph import Edge, GraphAlgorithm, Stream
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm
from semiseg.schedules import sigmoid_rampup

SECOND = "model2"


@register_algorithm("cps")
class CPS(GraphAlgorithm):
    name = "cps"
    paper = "Cross pseudo supervision (Chen et al., CVPR)"
    year = 2021
    needs = ("labeled", "unlabeled")

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        return ssl4mis_recipe(f"SSL4MIS code/train_cross_pseudo_supervision_{dim}D.py", dim)

    def __init__(self, consistency: float = 0.1, consistency_rampup: float = 200.0, rampup_every: int = 150) -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or rampup_every < 1:
            raise ConfigError(f"Algorithm '{self.name}': consistency and consistency_rampup must be >= 0 and "
                              f"rampup_every >= 1 (got {consistency}, {consistency_rampup}, {rampup_every}).")
        self.consistency, self.consistency_rampup, self.rampup_every = consistency, consistency_rampup, rampup_every
        self.streams = [
            Stream("P1_x", "x", group="net1"),
            Stream("P1_u", "u_w", group="net1"),
            Stream("P2_x", "x", group="net2", network=SECOND),
            Stream("P2_u", "u_w", group="net2", network=SECOND),
        ]
        self.edges = [
            Edge("P1_x", "y", 1.0, loss="sup", name="sup1"),
            Edge("P2_x", "y", 1.0, loss="sup", name="sup2"),
            # each network's hard pseudo-label supervises the other (CE on every pixel)
            Edge("P1_u", "P2_u", self.consistency_weight, loss="ce", name="cps1"),
            Edge("P2_u", "P1_u", self.consistency_weight, loss="ce", name="cps2"),
        ]
        self.check_graph()

    def networks(self) -> dict[str, Network]:
        # 3D: the official script re-initialises the two networks differently; 2D: two random constructions
        first, second = ("kaiming", "xavier") if self.dim == 3 else (None, None)
        return {PRIMARY: Network(init=first), SECOND: Network(init=second)}

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        result = super().step(model, batch, ctx)
        result.logs["consistency_weight"] = self.consistency_weight(ctx)
        return result

    def notes(self, iterations: int) -> list[str]:
        return ramp_notes(self, iterations)

    def consistency_weight(self, ctx: StepContext) -> float:
        """lambda(t) = consistency * sigmoid_rampup(t // 150, 200)."""
        return self.consistency * sigmoid_rampup(ctx.iteration // self.rampup_every, self.consistency_rampup)
