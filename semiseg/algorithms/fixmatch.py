"""FixMatch (Sohn et al., NeurIPS 2020) in the medical form of the UniMatch code base (docs/algorithms.md, "fixmatch").

A no-grad teacher in eval mode predicts the mix partner; the weak view's hard pseudo-label, with the mix
partner's prediction inside the CutMix box, supervises the strong CutMixed view through Dice with pixels below
the confidence threshold ignored. L = (L_sup + L_u) / 2.
"""

from semiseg.algorithms.base import OFFICIAL_SGD, Recipe
from semiseg.algorithms.crossmatch import crossmatch_la_recipe
from semiseg.algorithms.graph import Edge, GraphAlgorithm, MixView, Stream
from semiseg.registry import register_algorithm


@register_algorithm("fixmatch")
class FixMatch(GraphAlgorithm):
    name = "fixmatch"
    paper = "FixMatch (Sohn et al.)"
    year = 2020
    needs = ("labeled", "unlabeled", "strong", "mix")

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        # UniMatch's medical recipe (the structure of its natural-image fixmatch.py): 300 epochs of |U| // 12
        # iterations, 12 labeled + 12 unlabeled (+ 12 mix partner)
        if dim == 2:
            return Recipe("UniMatch more-scenarios/medical/unimatch.py",
                          {**OFFICIAL_SGD, "schedule": "poly", "batch_size": 12, "unlabeled_batch_size": 12},
                          epochs=300)
        return crossmatch_la_recipe("no official 3D code; CrossMatch's LA port of UniMatch")

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        self.views = [MixView("s1", base="u_s1", partner="u_s1_mix", box="box1")]
        self.streams = [
            Stream("P_mix", view="u_w_mix", grad=False, train_mode=False),
            Stream("P_x", view="x", group="main"),
            Stream("P_w", view="u_w", group="main"),
            Stream("P_s", view="s1"),
        ]
        self.edges = [
            Edge("P_x", teacher="y", loss="sup", weight=0.5, name="sup"),
            Edge("P_s", teacher="P_w", weight=0.5, threshold=threshold, box="box1", mix_teacher="P_mix",
                 name="strong"),
        ]
        self.check_graph()
