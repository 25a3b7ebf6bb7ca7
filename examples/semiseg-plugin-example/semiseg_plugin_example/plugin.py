"""An example semiseg plugin: one feature perturbation (``gauss``) and one algorithm with two networks
(``mutual``).

Nothing in semiseg is edited: importing this module runs two registry decorators, and that is all a plugin is.
semiseg imports it in either of two ways, and the file is written to work under both:

* installed (``pip install -e examples/semiseg-plugin-example``): the package advertises this module under the
  ``semiseg.plugins`` entry-point group, so every ``semiseg`` command imports it at start-up;
* not installed: ``semiseg --plugin path/to/plugin.py ...`` (or ``semiseg train --plugin ...``) executes the
  file directly.

That is why it imports from ``semiseg`` (and torch) with absolute imports only, never from its own package.
"""

from __future__ import annotations

import math

import torch

from semiseg.algorithms.base import Network
from semiseg.algorithms.graph import Edge, GraphAlgorithm, Stream
from semiseg.algorithms.perturbations import parse_perturbation
from semiseg.errors import ConfigError
from semiseg.registry import register_algorithm, register_perturbation

Features = list[torch.Tensor]


# --------------------------------------------------------------------------- a feature perturbation

@register_perturbation("gauss")
def std_scaled_gaussian_noise(rate: float):
    """Additive Gaussian noise scaled by each feature map's per-channel std: f + N(0, 1) * rate * std(f).

    The std is taken per sample and channel over the spatial axes (``(B, C, 1, 1)`` for 2D features), so the
    noise is equally strong, relative to the signal, at every encoder level whatever its scale. It is used as
    a spec string ``gauss:RATE``, e.g. ``gauss:0.3``.
    """
    sigma = float(rate)
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(f"Perturbation 'gauss:{rate}' needs a non-negative rate; e.g. 'gauss:0.3'.")

    def fn(features: Features, generator: torch.Generator | None = None) -> Features:
        out = []
        for f in features:
            spatial = tuple(range(2, f.dim())) or (1,)
            # correction=0: a 1x1 map (the deepest level of a small input) gets std 0, not NaN
            std = f.detach().float().std(dim=spatial, keepdim=True, correction=0).to(f.dtype)
            noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
            out.append(f + noise * (sigma * std))
        return out

    return fn


# --------------------------------------------------------------------------- an algorithm with two networks

@register_algorithm("mutual")
class MutualLearning(GraphAlgorithm):
    """Deep mutual learning (Zhang et al., CVPR 2018) for semi-supervised segmentation: two networks teach
    each other.

    Two separately initialised networks, ``model`` and ``partner`` (the partner may be thinner or wider:
    ``partner_width``), each learn from the labels and from the other's softened prediction:

        L = L_sup(A(x), y) + L_sup(B(x), y) + w * [KL(p_B(u) || p_A(u)) + KL(p_A(u) || p_B(u))]

    where the partner sees the unlabeled images through a feature perturbation (``gauss:0.3`` above), so the
    two views of each image differ in more than the weights. Each network's pair of streams runs in one
    encoder pass on that network; targets are detached, so each network learns only as a student.
    Validation evaluates the ensemble (the average of both softmaxes): ``--eval-net model`` or ``partner``
    evaluates one. Options (``--opt key=value``): ``kl_weight`` (1.0), ``partner_perturb`` ("gauss:0.3"),
    ``partner_width`` (None: the run's width).

    The two networks are declared in ``networks()``; the engine builds, optimises, checkpoints, resumes and
    evaluates both, with no change to semiseg.
    """

    name = "mutual"
    paper = "Deep mutual learning (Zhang et al.), semi-supervised"
    year = 2018
    needs = ("labeled", "unlabeled")
    eval_network = "model+partner"

    def __init__(self, kl_weight: float = 1.0, partner_perturb: str = "gauss:0.3",
                 partner_width: float | None = None) -> None:
        super().__init__()
        if not isinstance(kl_weight, (int, float)) or not math.isfinite(kl_weight) or kl_weight < 0:
            raise ConfigError(f"mutual option kl_weight={kl_weight!r} must be a non-negative number.")
        if partner_width is not None and not (isinstance(partner_width, (int, float)) and partner_width > 0):
            raise ConfigError(f"mutual option partner_width={partner_width!r} must be a positive number.")
        parse_perturbation(partner_perturb)  # fails early on an unknown kind or a bad rate
        self.partner_width = partner_width
        self.streams = [
            Stream("A_x", view="x", group="a"),
            Stream("A_u", view="u_w", group="a"),
            Stream("B_x", view="x", group="b", network="partner"),
            Stream("B_u", view="u_w", perturb=partner_perturb, group="b", network="partner"),
        ]
        self.edges = [
            Edge("A_x", teacher="y", loss="sup", weight=1.0, name="sup_a"),
            Edge("B_x", teacher="y", loss="sup", weight=1.0, name="sup_b"),
            Edge("A_u", teacher="B_u", loss="kl", weight=float(kl_weight), name="kl_b_to_a"),
            Edge("B_u", teacher="A_u", loss="kl", weight=float(kl_weight), name="kl_a_to_b"),
        ]
        self.check_graph()

    def networks(self) -> dict[str, Network]:
        partner = {"width": float(self.partner_width)} if self.partner_width is not None else None
        return {"model": Network(), "partner": Network(backbone_options=partner)}
