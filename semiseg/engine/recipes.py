"""``--recipe``: where a run's optimizer, schedule, length and batch sizes come from.

``default`` keeps the settings the run was given (one optimizer for every algorithm, what an equal-budget
comparison wants). ``official`` fills every setting the user did not give from the algorithm's
:meth:`~semiseg.algorithms.base.Algorithm.official_recipe` for the data's dimension (2D: the ACDC scripts, 3D: the
LA scripts); a flag on the command line, a key of a config file or a preset always wins. The resolved values
are written to the run's ``config.yaml``, so rerunning that file reproduces them. docs/algorithms.md lists every
recipe.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any

from semiseg import registry
from semiseg.algorithms.base import Recipe
from semiseg.engine.config import TrainConfig
from semiseg.errors import ConfigError

RECIPES = ("default", "official")


def official_recipe(algo: str, dim: int) -> Recipe:
    """The official recipe of ``algo`` for ``dim``-D data; one sentence where there is none."""
    recipe = registry.ALGORITHMS.get(algo).official_recipe(dim)
    if recipe is None:
        raise ConfigError(f"Algorithm '{algo}' has no official {dim}D recipe; drop --recipe official or give "
                          f"its optimizer, schedule and length as flags.")
    return recipe


def resolved(cfg: TrainConfig, explicit: Iterable[str] | None = None) -> TrainConfig:
    """A copy of ``cfg`` with its recipe applied; builds the dataset to count epochs (the bench resolves each
    run's config once, then every process it starts takes the result as given)."""
    from semiseg.engine.trainer import build_data

    out = copy.deepcopy(cfg)
    if out.recipe != "default":
        apply_recipe(out, build_data(out), explicit)
    return out


def given_fields(cfg: TrainConfig) -> set[str]:
    """The fields of ``cfg`` that differ from TrainConfig's defaults: what a Python caller evidently chose."""
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)}


def apply_recipe(cfg: TrainConfig, data: Any, explicit: Iterable[str] | None = None) -> dict[str, Any]:
    """Fill ``cfg`` in place from its recipe; returns what was set (empty for the default recipe).

    ``explicit`` names the fields the user gave (command line, config file, preset); None takes every field
    that differs from its default. Algorithm options of the recipe fill only options the user did not give.
    """
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe '{cfg.recipe}' is unknown; use one of {', '.join(RECIPES)}.")
    if cfg.recipe == "default":
        return {}
    keep = given_fields(cfg) if explicit is None else set(explicit)
    recipe = official_recipe(cfg.algo, data.dim)
    applied: dict[str, Any] = {}
    for key, value in recipe.settings.items():
        if key == "algo_options":
            for k, v in value.items():
                if k not in cfg.algo_options:
                    cfg.algo_options[k] = v
                    applied[f"algo_options.{k}"] = v
        elif key not in keep:
            setattr(cfg, key, value)
            applied[key] = value
    if recipe.epochs is not None and "iterations" not in keep:
        # a length in epochs counts full batches of the unlabeled (or labeled) set, as the official loops do
        unlabeled = recipe.epoch_over == "unlabeled"
        items = data.unlabeled if unlabeled else data.labeled
        batch = (cfg.unlabeled_batch_size or cfg.batch_size) if unlabeled else cfg.batch_size
        cfg.iterations = applied["iterations"] = recipe.epochs * max(1, len(items) // batch)
    applied["source"] = recipe.source
    return applied
