"""An example semiseg plugin: one feature perturbation (``gauss``) and one algorithm (``cps``).

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


# --------------------------------------------------------------------------- an algorithm

@register_algorithm("cps")
class CrossPseudoSupervision(GraphAlgorithm):
    """Cross Pseudo Supervision (Chen et al., CVPR 2021), one-network two-perturbation variant.

    Original CPS trains two networks of the same architecture, initialised separately, on the same batch. The
    hard pseudo-label (argmax) of each network supervises the other with cross-entropy:

        L = L_sup(A) + L_sup(B) + lambda * (CE(P_A, argmax P_B) + CE(P_B, argmax P_A)),   lambda = 1.5

    This is NOT that method exactly. semiseg trains one backbone, so here the two "networks" are two streams
    of the same backbone on the same weakly augmented unlabeled view ``u_w``. They differ only in the feature
    perturbation between encoder and decoder (channel dropout ``drop:0.5`` and the std-scaled Gaussian noise
    ``gauss:0.3`` above). The two members are therefore far more alike than two separately initialised
    networks, and only the clean labeled stream gets the supervised loss, (CE + Dice) / 2.

    Streams: ``P_x`` (labeled, clean), ``P_a`` (u_w, perturbation A), ``P_b`` (u_w, perturbation B), all three
    in one encoder pass and one decoder pass. Edges: y -> P_x (``sup``), P_b -> P_a and P_a -> P_b (hard-label
    CE, weight ``cps_weight`` each, no confidence threshold unless ``threshold`` is given). Targets are
    detached, so each stream learns only as a student. Options (``--opt key=value``): ``cps_weight`` (1.5),
    ``perturb_a`` ("drop:0.5"), ``perturb_b`` ("gauss:0.3"), ``threshold`` (None), ``sup_weight`` (1.0).
    """

    name = "cps"
    paper = "CPS (Chen et al.), one-network variant"
    year = 2021
    needs = ("labeled", "unlabeled")

    def __init__(self, cps_weight: float = 1.5, perturb_a: str = "drop:0.5", perturb_b: str = "gauss:0.3",
                 threshold: float | None = None, sup_weight: float = 1.0) -> None:
        super().__init__()
        for key, value in (("cps_weight", cps_weight), ("sup_weight", sup_weight)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"CPS option {key}={value!r} must be a non-negative number (CPS uses "
                                  f"cps_weight=1.5).")
        if threshold is not None and not 0.0 <= float(threshold) < 1.0:
            raise ConfigError(f"CPS option threshold={threshold!r} must lie in [0, 1) or be left unset.")
        for spec in (perturb_a, perturb_b):
            if parse_perturbation(spec) is None:  # also fails early on an unknown kind or a bad rate
                raise ConfigError(f"CPS needs two feature perturbations; '{spec}' is none. Use e.g. "
                                  f"--opt perturb_a=drop:0.5 --opt perturb_b=gauss:0.3.")
        self.cps_weight = float(cps_weight)
        self.views = []
        self.streams = [
            Stream("P_x", view="x", group="main"),
            Stream("P_a", view="u_w", perturb=perturb_a, group="main"),
            Stream("P_b", view="u_w", perturb=perturb_b, group="main"),
        ]
        self.edges = [
            Edge("P_x", teacher="y", loss="sup", weight=float(sup_weight), name="sup"),
            Edge("P_a", teacher="P_b", loss="ce", weight=self.cps_weight, threshold=threshold, name="cps_b_to_a"),
            Edge("P_b", teacher="P_a", loss="ce", weight=self.cps_weight, threshold=threshold, name="cps_a_to_b"),
        ]
        self.check_graph()
