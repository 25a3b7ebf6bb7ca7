"""Algorithms as stream graphs (docs/design.md, "Algorithms as stream graphs").

A *stream* is one prediction: an image view through the encoder, an optional feature perturbation, and the
decoder. An *edge* says that a teacher stream (or the ground truth) supervises a student stream. The executor
plans the fewest passes: one encoder pass per group of views, every perturbation of the group stacked in the
batch dimension into one decoder pass, teacher targets computed once and detached.

Streams in one group share BatchNorm batch statistics (the model stays in train mode), so an algorithm that
wants to reproduce its official code declares the same groups the official forward calls use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from semiseg.algorithms.base import PRIMARY, Algorithm, PseudoLabel, StepContext, StepResult
from semiseg.algorithms.losses import ce_loss, dice_loss, kl_loss, masked_mse, supervised_loss
from semiseg.algorithms.perturbations import parse_perturbation
from semiseg.augment.mixing import cutmix, cutmix_target
from semiseg.errors import ConfigError

Threshold = float | Callable[[StepContext], float] | None
Weight = float | Callable[[StepContext], float]
LOSSES = ("sup", "dice", "ce", "mse", "kl")


@dataclass(frozen=True)
class MixView:
    """A view built by pasting ``partner`` into ``base`` inside ``box`` (CutMix with the mix-partner batch)."""

    name: str
    base: str
    partner: str
    box: str


@dataclass(frozen=True)
class Stream:
    """One prediction: ``view`` -> encoder -> ``perturb`` -> decoder."""

    name: str
    view: str
    perturb: str = "none"
    grad: bool = True
    group: str | None = None  # streams of one group share an encoder pass (default: one group per view)
    train_mode: bool = True  # False runs the group in model.eval() (FixMatch/UniMatch mix teacher)
    # Whether the backbone's own decoder dropout (the V-Net's Dropout3d before its head) acts on this stream.
    # Official codes that decode feature-perturbed batches with dropout switched off (CrossMatch LA's
    # ``no_drop=True``) declare False; backbones without decoder dropout ignore it.
    decoder_dropout: bool = True
    # The network the stream runs on (one of the algorithm's ``networks()``; CPS streams run on two).
    network: str = PRIMARY


@dataclass(frozen=True)
class Edge:
    """``teacher`` supervises ``student``. ``teacher='y'`` is the ground truth. ``weight`` is a float or a
    function of the step (a ramp).

    loss: ``sup`` (CE+Dice)/2 on ground truth; ``dice`` Dice_ign on hard pseudo-labels; ``ce`` masked CE on
    hard pseudo-labels; ``mse`` on probabilities; ``kl`` KL(teacher || student). ``threshold`` masks target pixels
    whose confidence is below it (a float or a function of the step). With ``box``, the target inside the CutMix
    box comes from ``mix_teacher`` (the student's view was CutMixed with the mix partner there).
    """

    student: str
    teacher: str
    weight: Weight
    loss: str = "dice"
    threshold: Threshold = None
    box: str | None = None
    mix_teacher: str | None = None
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or f"{self.teacher}->{self.student}"


@dataclass
class Target:
    label: torch.Tensor  # (B, *S) hard pseudo-label
    conf: torch.Tensor  # (B, *S) max softmax
    probs: torch.Tensor  # (B, C, *S) soft target (box-mixed like the label)


class GraphAlgorithm(Algorithm):
    """An algorithm declared as views, streams and edges. Subclasses fill the three lists in ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[MixView] = []
        self.streams: list[Stream] = []
        self.edges: list[Edge] = []
        self.last_plan: dict[str, int] = {}

    # -- validation -----------------------------------------------------------------------------------------
    def check_graph(self) -> None:
        names = {s.name for s in self.streams}
        if len(names) != len(self.streams):
            raise ConfigError(f"Algorithm '{self.name}' declares two streams with the same name.")
        for e in self.edges:
            for ref in (e.student, e.mix_teacher) + ((e.teacher,) if e.teacher != "y" else ()):
                if ref is not None and ref not in names:
                    raise ConfigError(f"Algorithm '{self.name}': edge {e.key} names unknown stream '{ref}'.")
            if e.loss not in LOSSES:
                raise ConfigError(f"Algorithm '{self.name}': edge {e.key} has loss '{e.loss}'; use one of {LOSSES}.")
            if (e.box is None) != (e.mix_teacher is None):
                raise ConfigError(f"Algorithm '{self.name}': edge {e.key} needs both box and mix_teacher or neither.")
        for group, streams in self.plan().items():
            if len({s.network for s in streams}) > 1:
                raise ConfigError(f"Algorithm '{self.name}': group '{group}' mixes networks; one encoder pass runs "
                                  f"on one network, so give each network's streams their own group.")

    # -- planning and execution -----------------------------------------------------------------------------
    def plan(self) -> dict[str, list[Stream]]:
        groups: dict[str, list[Stream]] = {}
        for s in self.streams:
            groups.setdefault(s.group or (s.view if s.network == PRIMARY else f"{s.network}:{s.view}"), []).append(s)
        return groups

    def _network(self, model: nn.Module, name: str, ctx: StepContext) -> nn.Module:
        if name == PRIMARY:
            return model
        if name not in ctx.networks:
            raise ConfigError(f"Algorithm '{self.name}' has streams on network '{name}', which its networks() does "
                              f"not declare ({', '.join(ctx.networks) or PRIMARY}).")
        return ctx.networks[name]

    def build_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = dict(batch)
        for v in self.views:
            views[v.name] = cutmix(batch[v.base], batch[v.partner], batch[v.box])
        return views

    def run_streams(self, model: nn.Module, batch: dict[str, torch.Tensor],
                    ctx: StepContext) -> dict[str, torch.Tensor]:
        """Every stream's logits, with one encoder and one decoder call per group."""
        views = self.build_views(batch)
        out: dict[str, torch.Tensor] = {}
        plan = {"encoder_calls": 0, "decoder_calls": 0, "encoder_images": 0, "decoder_images": 0}
        primary = model
        for streams in self.plan().values():
            model = self._network(primary, streams[0].network, ctx)
            was_training = model.training
            grad = any(s.grad for s in streams)
            # groups marked train_mode=False run in eval mode; others keep the mode the engine set
            model.train(was_training and all(s.train_mode for s in streams))
            order = list(dict.fromkeys(s.view for s in streams))
            sizes = [views[v].shape[0] for v in order]
            if not (hasattr(model, "encode") and hasattr(model, "decode")):
                out.update(self._run_plain(model, streams, views, order, grad))
                plan["encoder_calls"] += 1
                plan["encoder_images"] += sum(sizes)
                model.train(was_training)
                continue
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                feats = model.encode(torch.cat([views[v] for v in order]))
                per_view = {v: [f_.split(sizes)[i] for f_ in feats] for i, v in enumerate(order)}
                keep = getattr(model, "unperturbed_levels", 0)
                dec_in: list[list[torch.Tensor]] = []
                for s in streams:
                    f = per_view[s.view]
                    pert = parse_perturbation(s.perturb)
                    dec_in.append(f if pert is None else f[:keep] + pert(f[keep:], ctx.generator))
                stacked = [torch.cat([d[level] for d in dec_in]) for level in range(len(feats))]
                logits = self._decode(model, stacked, streams, views)
            plan["encoder_calls"] += 1
            plan["decoder_calls"] += 1
            plan["encoder_images"] += sum(sizes)
            plan["decoder_images"] += logits.shape[0]
            dec_sizes = [views[s.view].shape[0] for s in streams]
            for s, lg in zip(streams, logits.split(dec_sizes)):
                out[s.name] = lg if s.grad else lg.detach()
            model.train(was_training)
        self.last_plan = plan
        return out

    def _run_plain(self, model: nn.Module, streams: list[Stream], views: dict[str, torch.Tensor],
                   order: list[str], grad: bool) -> dict[str, torch.Tensor]:
        """A backbone with only ``forward``: fine for streams without feature perturbation (one forward per
        group); a graph that perturbs features needs ``encode``/``decode``, and says so."""
        perturbed = [s.name for s in streams if parse_perturbation(s.perturb) is not None]
        if perturbed:
            raise ConfigError(f"Algorithm '{self.name}' perturbs features between encoder and decoder (streams "
                              f"{', '.join(perturbed)}), but the backbone {type(model).__name__} has no "
                              f"encode/decode; subclass semiseg.backbones.SegBackbone and implement both, or "
                              f"choose an algorithm without feature perturbation (supervised, fixmatch, "
                              f"meanteacher, uamt, bcp, em, ict).")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            logits = model(torch.cat([views[v] for v in order]))
        per_view = dict(zip(order, logits.split([views[v].shape[0] for v in order])))
        return {s.name: per_view[s.view] if s.grad else per_view[s.view].detach() for s in streams}

    @staticmethod
    def _decode(model: nn.Module, stacked: list[torch.Tensor], streams: list[Stream],
                views: dict[str, torch.Tensor]) -> torch.Tensor:
        """One decoder call over the stacked streams; when some of them switch the backbone's decoder dropout
        off, the backbone gets a per-sample mask of the samples it may drop (see ``SegBackbone.decode``)."""
        if all(s.decoder_dropout for s in streams) or not getattr(model, "decoder_dropout", False):
            return model.decode(stacked)
        drop = torch.cat([torch.full((views[s.view].shape[0],), s.decoder_dropout, dtype=torch.bool)
                          for s in streams]).to(stacked[0].device)
        return model.decode(stacked, drop=drop)

    def targets(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                teacher: str, box: str | None, mix_teacher: str | None) -> Target:
        probs = logits[teacher].detach().float().softmax(1)
        conf, label = probs.max(1)
        if box is not None:
            assert mix_teacher is not None
            mprobs = logits[mix_teacher].detach().float().softmax(1)
            mconf, mlabel = mprobs.max(1)
            inside = batch[box].bool()
            label = torch.where(inside, mlabel, label)
            conf = torch.where(inside, mconf, conf)
            probs = torch.where(inside.unsqueeze(1), mprobs, probs)
        return Target(label, conf, probs)

    def edge_losses(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                    ctx: StepContext) -> StepResult:
        """Weighted loss of every edge; logs each edge's raw loss and the ratio of confident target pixels."""
        cache: dict[tuple, Target] = {}
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        pseudo: dict[str, PseudoLabel] = {}
        for e in self.edges:
            student = logits[e.student]
            if e.teacher == "y":
                if e.loss != "sup":
                    raise ConfigError(f"Edge {e.key}: ground-truth edges use loss 'sup'.")
                raw = supervised_loss(student, batch["y"], classes=self.dice_classes)
            else:
                k = (e.teacher, e.box, e.mix_teacher)
                if k not in cache:
                    cache[k] = self.targets(logits, batch, *k)
                t = cache[k]
                tau = e.threshold(ctx) if callable(e.threshold) else e.threshold
                ignore = None if tau is None else (t.conf < tau)
                pseudo[e.key] = PseudoLabel(t.label, None if ignore is None else ~ignore,
                                            self._target_truth(e, batch))
                if ignore is not None:
                    logs[f"mask/{e.key}"] = float(1 - ignore.float().mean())
                if e.loss == "dice":
                    raw = dice_loss(student.float().softmax(1), t.label, ignore, classes=self.dice_classes)
                elif e.loss == "ce":
                    raw = ce_loss(student, t.label, ignore)
                elif e.loss == "mse":
                    mask = None if ignore is None else (~ignore).float().unsqueeze(1)
                    raw = masked_mse(student.float().softmax(1), t.probs, mask)
                else:
                    raw = kl_loss(student, t.probs, ignore)
            losses[e.key] = (e.weight(ctx) if callable(e.weight) else e.weight) * raw
            logs[f"loss/{e.key}"] = float(raw.detach())
        return StepResult(losses, logs, pseudo)

    def view_truth(self, view: str, truth: dict[str, torch.Tensor],
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The true label map of a view: the raw unlabeled views' labels, CutMixed like the view."""
        for v in self.views:
            if v.name == view:
                return cutmix_target(self.view_truth(v.base, truth, batch), self.view_truth(v.partner, truth, batch),
                                     batch[v.box])
        if view == "x":
            return batch["y"]
        return truth["u_y_mix" if view.endswith("_mix") else "u_y"]

    def _target_truth(self, e: Edge, batch: dict[str, torch.Tensor]):
        """What the target of edge ``e`` should have been: the teacher's view's true labels, with the mix
        teacher's inside the box."""
        by_name = {s.name: s for s in self.streams}
        teacher, mix = by_name[e.teacher].view, by_name[e.mix_teacher].view if e.mix_teacher else None
        box = batch[e.box] if e.box else None

        def truth(t: dict[str, torch.Tensor]) -> torch.Tensor:
            label = self.view_truth(teacher, t, batch)
            if mix is None:
                return label
            return cutmix_target(label, self.view_truth(mix, t, batch), box)

        return truth

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepResult:
        logits = self.run_streams(model, batch, ctx)
        return self.edge_losses(logits, batch, ctx)

    def describe(self) -> dict[str, Any]:
        return {
            "streams": [s.__dict__ for s in self.streams],
            "edges": [{k: v for k, v in e.__dict__.items() if not callable(v)} for e in self.edges],
            "networks": sorted({s.network for s in self.streams}),
        }
