"""Supervised baseline: labeled images only, L_sup = (CE + Dice) / 2 (docs/algorithms.md, "supervised")."""

from semiseg.algorithms.base import OFFICIAL_SGD, Recipe
from semiseg.algorithms.graph import Edge, GraphAlgorithm, Stream
from semiseg.registry import register_algorithm


@register_algorithm("supervised")
class Supervised(GraphAlgorithm):
    name = "supervised"
    paper = "labeled data only (lower bound)"
    needs = ("labeled",)

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # 300 epochs over the labeled loader at batch 12 (1 500 iterations for 3 ACDC patients)
            return Recipe("UniMatch more-scenarios/medical/supervised.py",
                          {**OFFICIAL_SGD, "schedule": "poly", "batch_size": 12}, epochs=300, epoch_over="labeled")
        return Recipe("UA-MT code/train_LA.py",
                      {**OFFICIAL_SGD, "schedule": "step", "iterations": 6000, "batch_size": 4})

    def __init__(self) -> None:
        super().__init__()
        self.streams = [Stream("P_x", view="x")]
        self.edges = [Edge("P_x", teacher="y", loss="sup", weight=1.0, name="sup")]
