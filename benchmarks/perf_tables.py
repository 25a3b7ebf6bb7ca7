"""Before/after tables for benchmarks/perf.md from the `semiseg bench --time-only` CSVs.

Reads benchmarks/results/perf/<preset>/r<repeat>-<variant>/timing.csv (one folder per bench call, see
perf.md for the commands) and prints, per preset, one row per algorithm: ms per iteration and peak memory of
the baseline and of each option, with the speed-up (baseline ms / option ms, > 1 = faster). Repeats are
combined by their median.

    python benchmarks/perf_tables.py [benchmarks/results/perf]
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

VARIANTS = ("baseline", "channels_last", "compile", "amp")


def load(root: Path) -> dict[tuple[str, str, str], list[dict[str, str]]]:
    rows: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for path in sorted(root.glob("*/r*-*/timing.csv")):
        preset = path.parent.parent.name
        repeat, variant = path.parent.name.split("-", 1)
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                rows.setdefault((preset, variant, r["algo"]), []).append({**r, "repeat": repeat})
    return rows


def table(rows: dict[tuple[str, str, str], list[dict[str, str]]], preset: str) -> str:
    def med(key: tuple[str, str, str], col: str) -> float | None:
        rs = rows.get(key)
        return statistics.median(float(r[col]) for r in rs) if rs else None

    variants = [v for v in VARIANTS if any(k[0] == preset and k[1] == v for k in rows)]
    algos = sorted({k[2] for k in rows if k[0] == preset}, key=lambda a: med((preset, "baseline", a),
                                                                              "ms_per_iter") or 0)
    head = ["algorithm"] + [f"{v} ms/iter" for v in variants] + [f"{v} peak MB" for v in variants]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in algos:
        base = med((preset, "baseline", a), "ms_per_iter")
        cells = [a]
        for v in variants:
            ms = med((preset, v, a), "ms_per_iter")
            if ms is None:
                cells.append("-")
            elif v == "baseline" or base is None:
                cells.append(f"{ms:.0f}")
            else:
                cells.append(f"{ms:.0f} (x{base / ms:.2f})")
        for v in variants:
            mb = med((preset, v, a), "peak_mem_mb")
            cells.append("-" if mb is None else f"{mb:.0f}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for v in variants:
        repeats = sorted({r["repeat"] for k, rs in rows.items() if k[:2] == (preset, v) for r in rs})
        if v == "baseline":
            out.append(f"- baseline: {len(repeats)} repeat(s)")
            continue
        means = []
        for rep in repeats:  # each option repeat against the baseline of the same repeat (else the first)
            ratios = []
            for a in algos:
                opt = [r for r in rows.get((preset, v, a), []) if r["repeat"] == rep]
                base = [r for r in rows.get((preset, "baseline", a), []) if r["repeat"] == rep] or \
                    rows.get((preset, "baseline", a), [])[:1]
                if opt and base:
                    ratios.append(float(base[0]["ms_per_iter"]) / float(opt[0]["ms_per_iter"]))
            means.append(f"{rep} x{statistics.geometric_mean(ratios):.2f} ({len(ratios)} algorithms)")
        out.append(f"- {v}: geometric-mean speed-up per repeat: " + ", ".join(means))
    return "\n".join(out)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path(__file__).parent / "results" / "perf"
    rows = load(root)
    for preset in sorted({k[0] for k in rows}):
        print(f"\n### {preset}\n")
        print(table(rows, preset))


if __name__ == "__main__":
    main(sys.argv[1:])
