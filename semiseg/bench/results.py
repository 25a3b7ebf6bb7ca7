"""The bench's outputs: ``results.csv`` (one row per run), ``curves.csv`` (validation Dice during training),
``results.md`` (mean +- std over seeds, best in bold), ``diagnostics.csv`` / ``diagnostic_curves.csv`` (pseudo-label
quality at the end of and during training) and the plots.

Every file is rewritten whole through a temporary file and a rename after each run, so an interrupted bench
never leaves half a row behind, and results from several machines or days merge by row key.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KEY = ("preset", "algo", "labeled", "seed", "iterations")
HEAD = KEY + ("eval_split", "mean_dice", "mean_jaccard", "mean_hd95", "mean_asd")
# per-class Dice columns (dice_<class>) go between HEAD and TAIL, in class order
TAIL = ("val_last_dice", "val_best_dice", "val_best_iter", "ms_per_iter", "ms_per_iter_std", "timing_iters",
        "peak_mem_mb", "params_m", "gflops", "gmacs", "flops_input", "train_s", "eval_s", "wall_s", "resumed",
        "device", "machine", "torch", "date", "command")
CURVE_COLUMNS = KEY + ("iter", "val_dice")
DIAG_METRICS = ("acc_kept", "acc_all", "dice_kept", "kept")
DIAG_COLUMNS = KEY + ("edge",) + DIAG_METRICS
DIAG_CURVE_COLUMNS = KEY + ("iter", "edge") + DIAG_METRICS

# (column, heading, higher is better, scale, decimals) of the Markdown summary; per-class Dice is added per file
MD_METRICS = [
    ("mean_dice", "Dice (%)", True, 100.0, 2),
    ("mean_jaccard", "Jaccard (%)", True, 100.0, 2),
    ("mean_hd95", "HD95 (vox)", False, 1.0, 2),
    ("mean_asd", "ASD (vox)", False, 1.0, 2),
]
MD_COST = [
    ("ms_per_iter", "ms/iter", False, 1.0, 1),
    ("peak_mem_mb", "peak MB", False, 1.0, 0),
    ("train_s", "train (min)", False, 1 / 60, 1),
]


# -- keys and values --------------------------------------------------------------------------------------------
def fmt_labeled(x: Any) -> str:
    """3 -> '3', 3.0 -> '3', 0.1 -> '0.1': labeled counts and fractions written one way in keys."""
    if x is None or x == "":
        return "default"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    return str(int(f)) if f.is_integer() else repr(f)


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """(preset, algo, labeled, seed, iterations) as normalised strings."""
    return (str(row["preset"]), str(row["algo"]), fmt_labeled(row["labeled"]), str(int(float(row["seed"]))),
            str(int(float(row["iterations"]))))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, ".6g")
    return str(v)


def to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# -- CSV files ------------------------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def ordered_columns(rows: Iterable[dict[str, Any]], head: Sequence[str] = HEAD,
                    tail: Sequence[str] = TAIL) -> list[str]:
    seen: list[str] = []
    for r in rows:
        seen.extend(k for k in r if k not in seen)
    middle = [c for c in seen if c.startswith("dice_") and c not in head and c not in tail]
    extra = [c for c in seen if c not in head and c not in tail and c not in middle]
    return list(head) + middle + list(tail) + extra


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` to a CSV atomically (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns) if columns is not None else ordered_columns(rows)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in cols})
    os.replace(tmp, p)


def upsert_rows(path: str | Path, new: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Add ``new`` rows to a CSV, replacing rows with the same key; order of first appearance is kept."""
    rows = read_rows(path)
    index = {row_key(r): i for i, r in enumerate(rows)}
    for r in new:
        k = row_key(r)
        if k in index:
            rows[index[k]] = r
        else:
            index[k] = len(rows)
            rows.append(r)
    write_rows(path, rows, columns)


def replace_diagnostics(path: str | Path, key: tuple[str, ...], diag: dict[str, float]) -> None:
    """Set one run's end-of-training pseudo-label diagnostics (``diag/<edge>/<metric>`` values) in
    ``diagnostics.csv``, one row per edge."""
    rows = [r for r in read_rows(path) if row_key(r) != key]
    edges: dict[str, dict[str, float]] = {}
    for name, value in diag.items():
        _, edge, metric = name.split("/", 2)
        edges.setdefault(edge, {})[metric] = value
    rows += [dict(zip(KEY, key)) | {"edge": e, **vals} for e, vals in edges.items()]
    if rows or Path(path).exists():
        write_rows(path, rows, DIAG_COLUMNS)


def diagnostics_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per algorithm and edge, the diagnostics' mean over seeds (in %)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        k = row_key(r)
        groups.setdefault((k[2], k[4], k[1], r["edge"]), []).append(r)
    lines = ["| Algorithm | Labeled | Iterations | Edge | Seeds | Target accuracy, kept pixels (%) | "
             "Target accuracy, all pixels (%) | Target foreground Dice, kept (%) | Pixels kept (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (labeled, iterations, algo, edge), rs in groups.items():
        cells = [algo, labeled, iterations, edge, str(len(rs))]
        for m in DIAG_METRICS:
            cells.append(_fmt_stat(mean_std(r.get(m) for r in rs), 100.0, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replace_diagnostic_curve(path: str | Path, key: tuple[str, ...], points: Sequence[dict[str, Any]]) -> None:
    """Set one run's pseudo-label diagnostics during training (``{iter, edge, acc_kept, ...}`` points) in
    ``diagnostic_curves.csv``."""
    rows = [r for r in read_rows(path) if row_key(r) != key]
    rows += [dict(zip(KEY, key)) | dict(p) for p in points]
    if rows or Path(path).exists():
        write_rows(path, rows, DIAG_CURVE_COLUMNS)


def replace_curve(path: str | Path, key: tuple[str, ...], points: Sequence[tuple[int, float]]) -> None:
    """Set the validation curve of one run (by key) in ``curves.csv``."""
    rows = [r for r in read_rows(path) if row_key(r) != key]
    rows += [dict(zip(KEY, key)) | {"iter": int(i), "val_dice": float(v)} for i, v in points]
    write_rows(path, rows, CURVE_COLUMNS)


# -- aggregation ----------------------------------------------------------------------------------------------
def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1) of the finite values; std is NaN for fewer than two."""
    xs = [x for x in (to_float(v) for v in values) if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan, 0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan, len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def class_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in ordered_columns(rows) if c.startswith("dice_")]


def aggregate(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One entry per (preset, labeled, iterations, algo), in first-seen order: ``n`` seeds, ``seeds`` and
    ``stats[column] = (mean, std, n)`` over the seeds."""
    cols = list(columns) if columns is not None else (
        [m[0] for m in MD_METRICS] + class_columns(rows) + [m[0] for m in MD_COST]
        + ["ms_per_iter_std", "params_m", "gmacs", "gflops", "wall_s"])
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        k = row_key(r)
        groups.setdefault((k[0], k[2], k[4], k[1]), []).append(r)
    out = []
    for (preset, labeled, iterations, algo), rs in groups.items():
        out.append({
            "preset": preset, "labeled": labeled, "iterations": iterations, "algo": algo, "n": len(rs),
            "seeds": sorted(int(float(r["seed"])) for r in rs),
            "stats": {c: mean_std(r.get(c) for r in rs) for c in cols},
        })
    return out


def block_of(row: dict[str, Any]) -> tuple[str, str, str]:
    """The block a row or curve point belongs to: (preset, labeled, iterations), normalised as in ``row_key``."""
    k = row_key(row)
    return k[0], k[2], k[4]


def _block_order(block: tuple[str, str, str]) -> tuple[str, float, int]:
    return block[0], to_float(block[1]), int(block[2])


def by_block(groups: Sequence[dict[str, Any]]) -> list[tuple[tuple[str, str, str], list[dict[str, Any]]]]:
    """``aggregate``'s entries grouped by (preset, labeled, iterations), blocks in preset, split, length order."""
    blocks: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for g in groups:
        blocks.setdefault((g["preset"], g["labeled"], g["iterations"]), []).append(g)
    return sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))


def _fmt_stat(stat: tuple[float, float, int], scale: float, decimals: int) -> str:
    m, s, n = stat
    if n == 0:
        return "–"
    text = f"{m * scale:.{decimals}f}"
    if n > 1:
        text += f" ± {s * scale:.{decimals}f}"
    return text


def markdown_table(rows: Sequence[dict[str, Any]], class_names: dict[str, str] | None = None) -> str:
    """Mean +- std over seeds, one line per algorithm and labeled split; the best mean of each column within a
    (preset, labeled, iterations) group in bold (ties all bold)."""
    if not rows:
        return "_no finished runs yet_\n"
    per_class = class_columns(rows)
    if len(per_class) == 1:
        per_class = []  # one foreground class: its Dice is the mean Dice (the CSV keeps the column)
    class_names = class_names or {}
    metrics = MD_METRICS + [(c, f"{class_names.get(c, c[5:])} Dice (%)", True, 100.0, 2) for c in per_class]
    groups = aggregate(rows)
    headings = ["Algorithm", "Labeled", "Iterations", "Seeds"] + [m[1] for m in metrics + MD_COST] + \
        ["Params (M)", "GMACs"]
    presets = {g["preset"] for g in groups}
    if len(presets) > 1:
        headings.insert(0, "Preset")
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join(["---"] * len(headings)) + "|"]
    for _, gs in by_block(groups):
        best: dict[str, float] = {}
        for col, _, higher, scale, dec in metrics + MD_COST:
            vals = [g["stats"][col][0] for g in gs if g["stats"][col][2] > 0]
            # a column whose values are all equal (all 0 at a tiny budget, say) has no best
            if len(vals) > 1 and len({round(v * scale, dec) for v in vals}) > 1:
                best[col] = max(vals) if higher else min(vals)
        for g in gs:
            cells = [g["algo"], g["labeled"], g["iterations"], ",".join(str(s) for s in g["seeds"])]
            for col, _, _, scale, dec in metrics + MD_COST:
                text = _fmt_stat(g["stats"][col], scale, dec)
                if col in best and g["stats"][col][2] > 0 and \
                        round(g["stats"][col][0] * scale, dec) == round(best[col] * scale, dec):
                    text = f"**{text}**"
                cells.append(text)
            cells.append(_fmt_stat(g["stats"]["params_m"], 1.0, 3))
            cells.append(_fmt_stat(g["stats"]["gmacs"], 1.0, 3))
            if len(presets) > 1:
                cells.insert(0, g["preset"])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_table(rows: Sequence[dict[str, Any]], column: str = "mean_dice", scale: float = 100.0,
                decimals: int = 1) -> str:
    """One line per (preset, labeled, iterations, algorithm) with ``column`` on each seed of its block (``–``
    where that seed has no row yet), then mean +- std: how far apart the seeds are, which a mean hides."""
    groups = aggregate(rows, [column])
    seeds = sorted({s for g in groups for s in g["seeds"]})
    values = {(*block_of(r), r["algo"], int(float(r["seed"]))): to_float(r.get(column)) for r in rows}
    presets = {g["preset"] for g in groups}
    headings = ["Algorithm", "Labeled", "Iterations"] + [f"seed {s}" for s in seeds] + ["mean ± std"]
    if len(presets) > 1:
        headings.insert(0, "Preset")
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join(["---"] * len(headings)) + "|"]
    for block, gs in by_block(groups):
        for g in gs:
            cells = [g["algo"], g["labeled"], g["iterations"]]
            for seed in seeds:
                v = values.get((*block, g["algo"], seed), math.nan)
                cells.append(f"{v * scale:.{decimals}f}" if math.isfinite(v) else "–")
            cells.append(_fmt_stat(g["stats"][column], scale, decimals))
            if len(presets) > 1:
                cells.insert(0, g["preset"])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluation_rule(rows: Sequence[dict[str, Any]]) -> str:
    """Which split and checkpoint the rows' numbers come from, and how many surface distances they leave out."""
    splits = sorted({str(r.get("eval_split") or "?") for r in rows})
    ckpts = sorted({str(r.get("eval_checkpoint") or "last") for r in rows})  # rows before the column: last
    empties = sorted({str(r.get("eval_empty")) for r in rows if r.get("eval_empty")})
    text = f"split {', '.join(splits)}, {', '.join(ckpts)} checkpoint"
    if empties:
        text += f", empty masks: {', '.join(empties)}"
    # several blocks (lengths or labeled splits) name each run fully; one block keeps it short
    blocks = len({(row_key(r)[2], row_key(r)[4]) for r in rows}) > 1
    missing = [f"{r['algo']} seed {r['seed']}"
               + (f" ({fmt_labeled(r['labeled'])} labeled, {row_key(r)[4]} it)" if blocks else "")
               + f": {int(to_float(r['hd95_missing']))}" for r in rows
               if math.isfinite(to_float(r.get("hd95_missing"))) and to_float(r.get("hd95_missing")) > 0]
    if missing:
        text += ("; HD95/ASD means leave out the values of one-sided empty masks (" + "; ".join(missing)
                 + " class-case values)")
    return text


def write_markdown(path: str | Path, rows: Sequence[dict[str, Any]], title: str, notes: Sequence[str] = (),
                   class_names: dict[str, str] | None = None,
                   diagnostics: Sequence[dict[str, Any]] = ()) -> None:
    """``results.md``: a title, the summary table, then provenance (commands, machines, dates) and notes."""
    commands = sorted({r.get("command", "") for r in rows if r.get("command")})
    # a row gets its machine when it is timed; untimed rows (a grid still running) name none
    machines = sorted({f"{r.get('machine', '')}; {r.get('device', '')}; torch {r.get('torch', '')}"
                       for r in rows if r.get("machine")})
    dates = sorted(r.get("date", "") for r in rows if r.get("date"))
    text = [f"# {title}", ""]
    for note in notes:
        text += [note, ""]
    text += [markdown_table(rows, class_names)]
    text.append((f"Evaluated: {evaluation_rule(rows)}. " if rows else "")
                + "Mean ± sample std over seeds (no ± with one seed); best mean per column and labeled split in "
                "**bold**. Dice and Jaccard in %, HD95 and ASD in voxels with medpy's definitions (HD95: 95th "
                "percentile of both directed surface distances pooled; ASD: prediction surface to ground truth). "
                "ms/iter as in the "
                "CrossMatch paper's Table III: batch to device, every forward, backward; no optimizer step. "
                "peak MB: peak memory of those timed steps above the memory in use before them. Params and "
                "GMACs: one backbone forward on the preset's batch and patch (thop's unit, Table III's "
                "\"#Flops\").")
    text.append("")
    if any(g["n"] > 1 for g in aggregate(rows, ["mean_dice"])):
        text += ["## Dice per seed", "", "Mean Dice (%) of each seed's run, then mean ± sample std as above.", "",
                 seeds_table(rows)]
    finished = {row_key(r) for r in rows}
    diagnostics = [d for d in diagnostics if row_key(d) in finished]
    if diagnostics:
        text += ["## Pseudo-label diagnostics at the end of training", "",
                 "Each pseudo-label edge's target against the unlabeled images' true labels (which training never "
                 "uses), averaged over the last 20 % of the logged training steps, then over seeds. Accuracy "
                 "counts pixels (background included); foreground Dice compares the target's foreground classes "
                 "with the truth on the kept pixels.", "", diagnostics_table(diagnostics)]
    text.append(f"Runs: {len(rows)}" + (f", finished {dates[0]} to {dates[-1]}" if dates else "") + ".")
    text.append("")
    if machines:
        text += ["Machine" + ("s" if len(machines) > 1 else "") + ":", ""]
        text += [f"- {m}" for m in machines] + [""]
    if commands:
        text += ["Command" + ("s" if len(commands) > 1 else "") + ":", "", "```bash", *commands, "```", ""]
    Path(path).write_text("\n".join(text))


# -- plots ----------------------------------------------------------------------------------------------------
def _blocks(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted({block_of(r) for r in rows}, key=_block_order)


def _block_title(block: tuple[str, str, str]) -> str:
    preset, labeled, iterations = block
    return f"{preset}: {labeled} labeled, {iterations} iterations"


def algo_colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One colour per algorithm, the same in every panel and every plot of a results folder (in sorted name
    order, so a new block or seed never repaints a line)."""
    import matplotlib

    algos = sorted({r["algo"] for r in rows})
    cmap = matplotlib.colormaps["tab10" if len(algos) <= 10 else "tab20"]
    return {a: cmap(i % cmap.N) for i, a in enumerate(algos)}


def _band(ax: Any, xs: Sequence[float], values: Sequence[Sequence[float]], label: str, color: Any) -> None:
    """One algorithm's line: the mean over seeds at each x, with a +- std band."""
    stats = [mean_std(v) for v in values]
    mean = [s[0] for s in stats]
    std = [s[1] if math.isfinite(s[1]) else 0.0 for s in stats]
    ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=color, alpha=0.15, linewidth=0)


def _finish_axes(ax: Any, title: str, xlabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel="validation Dice (mean ± std over seeds)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never over the lines


def plot_dice_vs_iter(path: str | Path, curves: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
    """Validation Dice over training, one line per algorithm (mean over seeds), one panel per labeled split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = {row_key(r) for r in rows}
    curves = [c for c in curves if row_key(c) in finished]
    blocks = _blocks(rows) or [("", "", "0")]
    colors = algo_colors(rows)
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.4 * len(blocks), 3.6), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        sel = [c for c in curves if block_of(c) == block]
        for algo in sorted({c["algo"] for c in sel}):
            by_iter: dict[int, list[float]] = {}
            for c in sel:
                if c["algo"] == algo and math.isfinite(to_float(c["val_dice"])):
                    by_iter.setdefault(int(float(c["iter"])), []).append(to_float(c["val_dice"]))
            its = sorted(by_iter)
            _band(ax, its, [by_iter[i] for i in its], algo, colors[algo])
        _finish_axes(ax, _block_title(block), "iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dice_vs_time(path: str | Path, curves: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
    """Time to accuracy: validation Dice against training minutes, one line per algorithm (mean over seeds, band:
    +- std over seeds). A run's validation at iteration i is placed at i x its clean time per iteration
    (``ms_per_iter``, measured alone on the machine), so runs trained side by side (``--jobs``) or resumed are
    placed as one uninterrupted run on an idle machine would be; rows without a timing fall back to
    i / iterations x their training time (``train_s``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def minutes_per_iter(r: dict[str, Any]) -> float:
        ms = to_float(r.get("ms_per_iter"))
        if math.isfinite(ms):
            return ms / 60000
        return to_float(r.get("train_s")) / max(int(float(r.get("iterations") or 0)), 1) / 60

    per_iter = {row_key(r): minutes_per_iter(r) for r in rows}
    blocks = _blocks(rows) or [("", "", "0")]
    colors = algo_colors(rows)
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.4 * len(blocks), 3.8), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        sel = [c for c in curves if block_of(c) == block and math.isfinite(per_iter.get(row_key(c), math.nan))]
        for algo in sorted({c["algo"] for c in sel}):
            by_iter: dict[int, list[tuple[float, float]]] = {}
            for c in sel:
                if c["algo"] == algo and math.isfinite(to_float(c["val_dice"])):
                    it = int(float(c["iter"]))
                    by_iter.setdefault(it, []).append((it * per_iter[row_key(c)], to_float(c["val_dice"])))
            its = sorted(by_iter)
            t = [sum(m for m, _ in by_iter[i]) / len(by_iter[i]) for i in its]
            _band(ax, t, [[d for _, d in by_iter[i]] for i in its], algo, colors[algo])
        _finish_axes(ax, _block_title(block), "training time (min)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pseudo_labels(path: str | Path, curves: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
    """Pseudo-label quality during training, one line per algorithm (mean over its edges, then over seeds): the
    foreground Dice of the targets on the pixels they keep (left) and the share of pixels kept (right), one row
    of panels per labeled split. It tells a method whose targets improve from one that agrees with itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = {row_key(r) for r in rows}
    curves = [c for c in curves if row_key(c) in finished]
    blocks = _blocks(curves) or [("", "", "0")]
    colors = algo_colors(rows)
    panels = (("dice_kept", "targets' foreground Dice (kept pixels)"), ("kept", "share of pixels kept"))
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12.8, 3.6 * len(blocks)), squeeze=False)
    for axs, block in zip(axes, blocks):
        sel = [c for c in curves if block_of(c) == block]
        for ax, (metric, ylabel) in zip(axs, panels):
            for algo in sorted({c["algo"] for c in sel}):
                # per seed and iteration: the mean over the algorithm's edges; then the band over seeds
                per_run: dict[tuple[str, int], list[float]] = {}
                for c in sel:
                    if c["algo"] == algo and math.isfinite(to_float(c.get(metric))):
                        per_run.setdefault((c["seed"], int(float(c["iter"]))), []).append(to_float(c[metric]))
                by_iter: dict[int, list[float]] = {}
                for (_, it), vs in per_run.items():
                    by_iter.setdefault(it, []).append(sum(vs) / len(vs))
                its = sorted(by_iter)
                if its:
                    _band(ax, its, [by_iter[i] for i in its], algo, colors[algo])
            ax.set(title=f"{_block_title(block)}:\n{ylabel}", xlabel="iteration",
                   ylabel="mean ± std over seeds", ylim=(0, 1))
            ax.grid(alpha=0.3)
        if axs[1].get_legend_handles_labels()[0]:
            axs[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ms_per_iter(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Milliseconds per iteration per algorithm (mean over seeds; error bar: std over seeds, or the timing's
    own std with one seed), one bar group per labeled split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(rows, ["ms_per_iter", "ms_per_iter_std"])
    algos = list(dict.fromkeys(g["algo"] for g in groups))
    blocks = _blocks(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(algos) * max(len(blocks), 1)), 3.8))
    width = 0.8 / max(len(blocks), 1)
    for b, block in enumerate(blocks):
        means, errs = [], []
        for algo in algos:
            g = next((g for g in groups if (g["preset"], g["labeled"], g["iterations"]) == block
                      and g["algo"] == algo), None)
            m, s, n = g["stats"]["ms_per_iter"] if g else (math.nan, math.nan, 0)
            if n < 2 and g:
                s = g["stats"]["ms_per_iter_std"][0]
            means.append(m)
            errs.append(0.0 if not math.isfinite(s) else s)
        xs = [i + (b - (len(blocks) - 1) / 2) * width for i in range(len(algos))]
        label = f"{block[1]} labeled" + (f", {block[0]}" if len({bl[0] for bl in blocks}) > 1 else "")
        if len({bl[2] for bl in blocks}) > 1:
            label += f", {block[2]} iterations"
        bars = ax.bar(xs, means, width=width, yerr=errs, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, label_type="center", color="white")
    ax.set_xticks(range(len(algos)), algos, rotation=20)
    presets = ", ".join(sorted({bl[0] for bl in blocks}))
    ax.set(ylabel="ms per iteration", title=f"{presets}: ms/iter (to device .. end of backward)")
    if len(blocks) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
