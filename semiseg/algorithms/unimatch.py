"""UniMatch (Yang et al., CVPR 2023), medical branch of the official code (docs/algorithms.md, "unimatch").

Two strong CutMixed views and one feature-perturbed weak stream (channel dropout 0.5 on every encoder level)
learn from the weak view's hard pseudo-label:
L = (L_sup + 0.25 D(P_s1, pl_1) + 0.25 D(P_s2, pl_2) + 0.5 D(P_w_fp, pl_w)) / 2, D = Dice with pixels of
confidence < 0.95 ignored. The official decoder also computes an unused perturbed copy of the labeled batch; we
skip that pass (it only shifts BatchNorm statistics), see docs/algorithms.md and the stream-graph note in graph.py.
"""

from semiseg.algorithms.base import OFFICIAL_SGD, Recipe
from semiseg.algorithms.crossmatch import crossmatch_la_recipe
from semiseg.algorithms.graph import Edge, GraphAlgorithm, MixView, Stream
from semiseg.registry import register_algorithm


@register_algorithm("unimatch")
class UniMatch(GraphAlgorithm):
    name = "unimatch"
    paper = "UniMatch (Yang et al.)"
    year = 2023
    needs = ("labeled", "unlabeled", "strong", "mix")

    @classmethod
    def official_recipe(cls, dim: int) -> Recipe:
        if dim == 2:  # 300 epochs of |U| // 12 iterations, 12 labeled + 12 unlabeled (+ 12 mix partner)
            return Recipe("UniMatch more-scenarios/medical/unimatch.py",
                          {**OFFICIAL_SGD, "schedule": "poly", "batch_size": 12, "unlabeled_batch_size": 12},
                          epochs=300)
        return crossmatch_la_recipe("no official 3D code; CrossMatch's LA port of UniMatch")

    def __init__(self, threshold: float = 0.95, fp: str = "drop:0.5") -> None:
        super().__init__()
        self.views = [MixView("s1", "u_s1", "u_s1_mix", "box1"), MixView("s2", "u_s2", "u_s2_mix", "box2")]
        self.streams = [
            Stream("P_mix", view="u_w_mix", grad=False, train_mode=False),
            Stream("P_x", view="x", group="main"),
            Stream("P_w", view="u_w", group="main"),
            Stream("P_w_fp", view="u_w", perturb=fp, group="main"),
            Stream("P_s1", view="s1", group="strong"),
            Stream("P_s2", view="s2", group="strong"),
        ]
        tau = threshold
        self.edges = [
            Edge("P_x", teacher="y", loss="sup", weight=0.5, name="sup"),
            Edge("P_s1", "P_w", weight=0.125, threshold=tau, box="box1", mix_teacher="P_mix", name="s1"),
            Edge("P_s2", "P_w", weight=0.125, threshold=tau, box="box2", mix_teacher="P_mix", name="s2"),
            Edge("P_w_fp", "P_w", weight=0.25, threshold=tau, name="fp"),
        ]
        self.check_graph()
