"""Supervised baseline: labeled images only, L_sup = (CE + Dice) / 2 (ALGORITHMS.md section 1)."""

from semiseg.algorithms.graph import Edge, GraphAlgorithm, Stream
from semiseg.registry import register_algorithm


@register_algorithm("supervised")
class Supervised(GraphAlgorithm):
    name = "supervised"
    paper = "labeled data only (lower bound)"
    needs = ("labeled",)

    def __init__(self) -> None:
        super().__init__()
        self.streams = [Stream("P_x", view="x")]
        self.edges = [Edge("P_x", teacher="y", loss="sup", weight=1.0, name="sup")]
