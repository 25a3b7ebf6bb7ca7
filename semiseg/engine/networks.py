"""The networks of a run: what an algorithm declares with ``Algorithm.networks()`` (docs/design.md, "Several
networks"), built, initialised, averaged, saved and restored here, so the trainer handles one or five alike.

Roles: ``trained`` networks are optimised (one parameter group each, ``lr_scale`` x the run's rate); ``ema``
networks follow another network by an exponential moving average after each optimizer step the algorithm allows
(``Algorithm.update_ema``); ``frozen`` networks are copies taken before training. The first network, ``model``,
is the run's backbone as ever, so a one-network algorithm builds exactly what it built before; the EMA teacher of
Mean Teacher, UA-MT and BCP is the ``ema`` network ``teacher``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from semiseg.algorithms.base import PRIMARY, Algorithm, Network
from semiseg.engine.ema import EMATeacher
from semiseg.errors import CheckpointError, ConfigError

ROLES = ("trained", "ema", "frozen")
INITS = ("kaiming", "xavier", "fresh")


def check_specs(specs: dict[str, Network], algo: str) -> None:
    """The declaration makes sense: ``model`` is trained, every ``of`` names an earlier network."""
    if PRIMARY not in specs or specs[PRIMARY].role != "trained":
        raise ConfigError(f"Algorithm '{algo}' must declare a trained network named '{PRIMARY}' first.")
    seen: list[str] = []
    for name, spec in specs.items():
        if spec.role not in ROLES:
            raise ConfigError(f"Algorithm '{algo}': network '{name}' has role '{spec.role}'; use one of {ROLES}.")
        if spec.role != "trained" and spec.of not in seen:
            raise ConfigError(f"Algorithm '{algo}': network '{name}' ({spec.role}) follows '{spec.of}', which is "
                              f"not a network declared before it ({', '.join(seen)}).")
        if spec.init is not None and spec.init not in INITS:
            raise ConfigError(f"Algorithm '{algo}': network '{name}' has init '{spec.init}'; use one of {INITS}.")
        if spec.init == "fresh" and spec.role == "trained":
            raise ConfigError(f"Algorithm '{algo}': network '{name}' is trained, so it is built fresh anyway; "
                              f"init='fresh' is for ema and frozen networks.")
        if "+" in name or not name:
            raise ConfigError(f"Algorithm '{algo}': network name '{name}' may not be empty or contain '+'.")
        seen.append(name)


@torch.no_grad()
def initialise(model: nn.Module, scheme: str) -> None:
    """Convolutions kaiming- or xavier-normal, BatchNorm weight 1 and bias 0 (SSL4MIS's CPS 3D initialisers)."""
    fill = nn.init.kaiming_normal_ if scheme == "kaiming" else nn.init.xavier_normal_
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            fill(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.weight.fill_(1)
            m.bias.zero_()


class Ensemble(nn.Module):
    """The average of the networks' softmax, returned as log-probabilities (a softmax of the output gives the
    average back, so every inferer treats it as logits)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([_main(m(x)).float().softmax(1) for m in self.members]).mean(0)
        return p.clamp_min(1e-12).log()


def _main(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Networks:
    """The run's networks by name (``modules``), with their EMA averagers and declarations."""

    def __init__(self, specs: dict[str, Network], modules: dict[str, nn.Module],
                 emas: dict[str, EMATeacher], backbones: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self.specs, self.modules, self.emas, self.backbones = specs, modules, emas, backbones

    @property
    def primary(self) -> nn.Module:
        return self.modules[PRIMARY]

    def trained(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.modules.items() if self.specs[n].role == "trained"}

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer parameter group per trained network (its own learning-rate scale)."""
        return [{"params": [p for p in m.parameters() if p.requires_grad], "network": n,
                 "lr_scale": float(self.specs[n].lr_scale)} for n, m in self.trained().items()]

    @torch.no_grad()
    def copy_trained(self, src: str, dst: str, optimizer: torch.optim.Optimizer) -> None:
        """Trained network ``dst`` takes ``src``'s weights and, parameter by parameter, its optimizer state
        (momentum, Adam moments); both must be trained networks of one architecture."""
        for n in (src, dst):
            if n not in self.modules or self.specs[n].role != "trained":
                raise ConfigError(f"A stage copies network '{src}' into '{dst}', but '{n}' is not a trained network "
                                  f"of this algorithm ({', '.join(self.trained())}).")
        a, b = self.modules[src], self.modules[dst]
        b.load_state_dict(a.state_dict())
        for p_src, p_dst in zip(a.parameters(), b.parameters()):
            state = optimizer.state.get(p_src)
            if state:
                optimizer.state[p_dst] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            else:
                optimizer.state.pop(p_dst, None)

    def update_emas(self, algo: Algorithm, iteration: int) -> dict[str, float]:
        """Moves the EMA networks after a step; returns the weight ``a`` each moved one gave its old value. The
        network's decay (its spec's, or ``--ema-decay``) caps every rule, the default min(1 - 1/(t+1), decay)
        as an algorithm's own warm-up (AD-MT), so ``--ema-decay`` reaches both."""
        moved = {}
        for name, ema in self.emas.items():
            rule = algo.update_ema(name, iteration)
            if rule is False:
                continue
            alpha = None if rule is True else min(float(rule), ema.decay)
            moved[name] = ema.update(self.modules[self.specs[name].of], iteration, alpha)
        return moved

    def train(self) -> None:
        for m in self.trained().values():
            m.train()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every network but ``model`` (stored on its own, as ever), by name."""
        return {n: m.state_dict() for n, m in self.modules.items() if n != PRIMARY}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], legacy_teacher: Any = None) -> None:
        state = dict(state or {})
        if "teacher" in self.modules and "teacher" not in state and legacy_teacher is not None:
            state["teacher"] = legacy_teacher  # checkpoints written before networks were declared
        missing = [n for n in self.modules if n != PRIMARY and n not in state]
        if missing:
            raise CheckpointError(f"The checkpoint has no weights for the network(s) {', '.join(missing)}; resume "
                                  f"with the algorithm and options it was trained with.")
        for n, sd in state.items():
            if n in self.modules and n != PRIMARY:
                self.modules[n].load_state_dict(sd)

    def meta(self) -> dict[str, dict[str, Any]]:
        """What eval needs to rebuild each network: its role and backbone."""
        return {n: {"role": s.role, "of": s.of, "backbone": self.backbones[n][0],
                    "backbone_options": dict(self.backbones[n][1])} for n, s in self.specs.items()}


def build_networks(algo: Algorithm, primary: nn.Module, primary_backbone: tuple[str, dict[str, Any]],
                   build: Callable[[str | None, dict[str, Any] | None], tuple[nn.Module, str, dict[str, Any]]],
                   ema_decay: float | None = None) -> Networks:
    """The algorithm's networks around the already-built ``primary``. ``build(backbone, options)`` builds a
    trained network (the run's backbone where None) and returns it with its resolved backbone name and options.
    Trained networks after the first are built in declaration order, so each draws its own initialisation."""
    specs = dict(algo.networks())
    check_specs(specs, algo.name)
    if ema_decay is not None and not any(s.role == "ema" for s in specs.values()):
        raise ConfigError(f"--ema-decay {ema_decay} has nothing to act on: {algo.name} keeps no EMA network "
                          f"({', '.join(specs)}); drop the flag.")
    modules: dict[str, nn.Module] = {}
    emas: dict[str, EMATeacher] = {}
    backbones: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, spec in specs.items():
        if spec.role == "trained":
            if name == PRIMARY:
                net, backbone = primary, primary_backbone
            else:
                net, b, o = build(spec.backbone, spec.backbone_options)
                backbone = (b, o)
        else:
            backbone = backbones[spec.of]
            # "fresh": built again from the source's backbone (its own random initialisation), else a copy
            source = build(*backbone)[0] if spec.init == "fresh" else modules[spec.of]
            if spec.role == "ema":
                ema = EMATeacher(source, decay=ema_decay if ema_decay is not None else spec.decay,
                                 warmup=spec.warmup, buffers=spec.buffers)
                emas[name], net = ema, ema.model
            else:
                net = copy.deepcopy(source)
                for p in net.parameters():
                    p.requires_grad_(False)
        if spec.init in ("kaiming", "xavier"):
            initialise(net, spec.init)
        modules[name], backbones[name] = net, backbone
    return Networks(specs, modules, emas, backbones)


def resolve_eval(name: str | None, algo_default: str, available: list[str]) -> list[str]:
    """The network names that ``--eval-net`` (or the algorithm's default) names: one, or ``a+b`` for the
    ensemble of several."""
    chosen = name or algo_default
    parts = [p.strip() for p in chosen.split("+")]
    bad = [p for p in parts if p not in available]
    if bad:
        raise ConfigError(f"--eval-net '{chosen}' names no network of this algorithm ({', '.join(bad)}); choose "
                          f"from {', '.join(available)}, or join several with '+' for their ensemble.")
    return parts
