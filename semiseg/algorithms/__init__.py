"""Algorithms: importing this package registers the built-in ones."""

from semiseg.algorithms import (  # noqa: F401
    abd,
    admt,
    bcp,
    cct,
    cps,
    crossmatch,
    em,
    fixmatch,
    ict,
    meanteacher,
    perturbations,
    supervised,
    uamt,
    unimatch,
    urpc,
)
from semiseg.algorithms.base import Algorithm, PseudoLabel, Recipe, Stage, StepContext, StepResult
from semiseg.algorithms.graph import Edge, GraphAlgorithm, MixView, Stream

__all__ = ["Algorithm", "Edge", "GraphAlgorithm", "MixView", "PseudoLabel", "Recipe", "Stage", "StepContext",
           "StepResult", "Stream"]
