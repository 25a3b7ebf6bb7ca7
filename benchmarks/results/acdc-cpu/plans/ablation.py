"""Two more CrossMatch pass plans, to tell apart the two ways the official plan differs from the minimal one.

The CutMix boxes of CrossMatch's strong views take their targets from the mix partner u_w_mix: a clean teacher
P_mix and two feature-dropout teachers P_mix_w, P_mix_s (all without gradient). The two built-in plans compute
those three teachers differently in two respects:

- **independence**: minimal decodes P_mix_w and P_mix_s from the same encoder pass as P_mix (the same encoder
  dropout masks and BatchNorm batch); official runs a second encoder pass for them (fresh masks);
- **padding**: official's second pass also carries the labeled batch x, so its BatchNorm statistics are taken
  over [x, u_w_mix] in the encoder and [x, u_w_mix, weak(u_w_mix), strong(u_w_mix)] in the decoder.

This plugin registers the two remaining corners of that 2 x 2 design; the loss formulas stay CrossMatch's:

    crossmatch-split   independent, unpadded: P_mix alone, then P_mix_w and P_mix_s in a second pass over u_w_mix
    crossmatch-padded  shared, padded: one pass over [x, u_w_mix] whose decoder batch is
                       [x, u_w_mix, weak(u_w_mix), strong(u_w_mix)], P_mix read from it

    semiseg --plugin benchmarks/results/acdc-cpu/plans/ablation.py bench --preset acdc-cpu \
        --algos crossmatch-split,crossmatch-padded --seeds 0 --out benchmarks/results/acdc-cpu/plans --runs-dir RUNS
"""

from __future__ import annotations

from semiseg.algorithms.crossmatch import MIX_FP_TEACHER, CrossMatch
from semiseg.algorithms.graph import Stream
from semiseg.registry import register_algorithm


@register_algorithm("crossmatch-split")
class CrossMatchSplit(CrossMatch):
    """CrossMatch whose mix-partner dropout teachers get their own encoder pass, without the labeled padding."""

    name = "crossmatch-split"

    def _mix_teachers(self, weak: str, strong: str) -> list[Stream]:
        return [Stream("P_mix", "u_w_mix", grad=False, group="mix"),
                Stream("P_mix_w", "u_w_mix", weak, group="mix_fp", **MIX_FP_TEACHER),
                Stream("P_mix_s", "u_w_mix", strong, group="mix_fp", **MIX_FP_TEACHER)]


@register_algorithm("crossmatch-padded")
class CrossMatchPadded(CrossMatch):
    """CrossMatch whose mix-partner teachers share one encoder pass padded with the labeled batch."""

    name = "crossmatch-padded"

    def _mix_teachers(self, weak: str, strong: str) -> list[Stream]:
        return [Stream("P_pad_x", "x", group="mix", **MIX_FP_TEACHER),
                Stream("P_mix", "u_w_mix", grad=False, group="mix"),
                Stream("P_mix_w", "u_w_mix", weak, group="mix", **MIX_FP_TEACHER),
                Stream("P_mix_s", "u_w_mix", strong, group="mix", **MIX_FP_TEACHER)]
