"""The speed measurements behind ``benchmarks/perf.md``: ``python -m semiseg.bench.speed suite|one|report``.

Training steps with and without each speed option (``semiseg.engine.perf``), the time a step waits for data
with 0-2 loader workers, CrossMatch with the official pass plan against ours, and inference per case. Each
configuration runs in a fresh process (peak RSS and compile caches are per process), configurations are
interleaved across repeats so that a change in the machine's load hits every configuration alike.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from semiseg.engine.perf import channels_last_format, compile_backbone, to_channels_last


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


TRAIN_SETUPS: dict[str, dict[str, Any]] = {
    # 2D: ACDC-like, 4 classes, U-Net width 1, 128x128, 4 labeled + 4 unlabeled
    "unet2d": {"backbone": "unet", "width": 1.0, "dim": 2, "num_classes": 4, "patch_size": [128, 128], "batch": 4},
    # 3D: LA-like, binary, V-Net width 0.5, 64x64x32, 2 labeled + 2 unlabeled
    "vnet3d": {"backbone": "vnet", "width": 0.5, "dim": 3, "num_classes": 2, "patch_size": [64, 64, 32],
               "batch": 2},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "workers=1": {"workers": 1},
    "workers=2": {"workers": 2},
    "channels_last": {"channels_last": True},
    "amp (bf16)": {"amp": True},
    "compile": {"compile": True},
}


def perf_config(setup: str, algo: str, out: str, **overrides: Any) -> Any:
    """The TrainConfig of one measurement: a ``TRAIN_SETUPS`` entry (synthetic data at a preset's shapes) or a
    benchmark preset on its real data (data_root relative to the working directory); CPU, loading in the main
    process, no in-training validation, then ``overrides``."""
    from semiseg.engine.config import TrainConfig

    if setup in TRAIN_SETUPS:
        s = TRAIN_SETUPS[setup]
        cfg = TrainConfig(algo=algo, backbone=s["backbone"], backbone_options={"width": s["width"]},
                          data="synthetic", data_options={"dim": s["dim"], "num_classes": s["num_classes"],
                                                           "n_val": 1},
                          patch_size=list(s["patch_size"]), batch_size=s["batch"], seed=0)
    else:
        from semiseg.bench.presets import get_preset

        cfg = get_preset(setup).config(algo, None, 0, out)
    cfg.out, cfg.device, cfg.workers, cfg.val_every = out, "cpu", 0, 10**9
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def bench_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec`` for a few iterations with the real trainer; per-step times come from metrics.jsonl."""
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from semiseg.engine.progress import read_metrics
    from semiseg.engine.trainer import Trainer

    opts = VARIANTS[spec["variant"]]
    with tempfile.TemporaryDirectory(prefix="semiseg-perf-") as tmp:
        cfg = perf_config(spec["setup"], spec["algo"], str(Path(tmp) / "run"), iterations=spec["iterations"],
                          log_every=1, workers=opts.get("workers", 0), amp=opts.get("amp", False),
                          channels_last=opts.get("channels_last", False), compile=opts.get("compile", False))
        t = Trainer(cfg, quiet=True)
        t.validate = lambda: {"dice": 0.0}  # type: ignore[method-assign]  # training steps are what is timed
        cpu_ms: list[float] = []
        step = t.train_step

        def timed_step(batch: dict[str, torch.Tensor], it: int) -> dict[str, float]:
            # CPU time of all this process's threads: on a shared machine far steadier than wall time
            c0 = time.process_time()
            row = step(batch, it)
            cpu_ms.append(1000 * (time.process_time() - c0))
            return row

        t.train_step = timed_step  # type: ignore[method-assign]
        rss_before = peak_rss_mib()
        t0 = time.perf_counter()
        t.fit()
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if "step_ms" in r]
    warm = spec["warmup"]
    steady = rows[warm:]
    return {
        **spec,
        "step_ms": statistics.median(r["step_ms"] for r in steady),
        "data_ms": statistics.median(r["data_ms"] for r in steady),
        "iter_ms": statistics.median(r["step_ms"] + r["data_ms"] for r in steady),
        "cpu_ms": statistics.median(cpu_ms[warm:]),
        "first_steps_ms": [round(r["step_ms"]) for r in rows[:warm]],
        "wall_s": wall,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_train_mib": rss_before,
        "plan": dict(getattr(t.algo, "last_plan", {})),
        "batch": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "load1": os.getloadavg()[0],
    }


OPTIONS = ("channels_last", "amp", "compile")


def bench_paired(spec: dict[str, Any]) -> dict[str, Any]:
    """One speed option against the baseline, alternating ``Trainer.train_step`` calls in one process.

    On a shared machine the load drifts within seconds; consecutive baseline/option steps see about the same
    load, so the median of their ratios is far steadier than two separate runs. Batches are drawn first, so
    data loading is left out. The option is toggled in place: ``amp`` is read by every ``train_step``;
    ``channels_last`` converts the model and the inputs (``_to_device``); ``compile`` swaps the backbone's
    ``encode``/``decode`` between the compiled wrappers and the class methods.
    """
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from semiseg.engine.trainer import Trainer

    option, rounds, warm = spec["option"], spec["rounds"], spec["warmup"]
    if option not in OPTIONS:
        raise ValueError(f"option must be one of {OPTIONS}, got {option!r}")
    with tempfile.TemporaryDirectory(prefix="semiseg-perf-") as tmp:
        cfg = perf_config(spec["setup"], spec["algo"], str(Path(tmp) / "run"), iterations=1000,
                          channels_last=False)
        t = Trainer(cfg, quiet=True)
        loader = iter(t._loaders(0, 8))
        batches = [next(loader) for _ in range(8)]
        model = t.model
        compiled: tuple[Any, Any] | None = None
        if option == "compile":
            compile_backbone(model)
            compiled = (model.encode, model.decode)

        def use(on: bool) -> None:
            if option == "amp":
                t.cfg.amp = on
            elif option == "channels_last":
                t.channels_last = on
                model.to(memory_format=channels_last_format(t.data.dim) if on else torch.contiguous_format)
            elif on:
                assert compiled is not None
                model.encode, model.decode = compiled
            else:  # eager: without the instance attributes the class methods apply again
                model.__dict__.pop("encode", None)
                model.__dict__.pop("decode", None)

        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        warm_ms: list[float] = []  # the option's warm-up steps (compilation shows here)
        it = 0
        # warm-up steps of each (the compiled one compiles here), then rounds alternating which goes first
        order = [False, True] * warm + [x for r in range(rounds) for x in ((False, True) if r % 2 == 0
                                                                          else (True, False))]
        for n, on in enumerate(order):
            use(on)
            batch = t._to_device(batches[it % len(batches)])
            w0, c0 = time.perf_counter(), time.process_time()
            t.train_step(batch, it)
            w, c = 1000 * (time.perf_counter() - w0), 1000 * (time.process_time() - c0)
            if on:
                use(False)
            it += 1
            if n >= 2 * warm:
                times[on].append((w, c))
            elif on:
                warm_ms.append(w)
    base, opt = times[False], times[True]
    ratios = [b[0] / o[0] for b, o in zip(base, opt)]
    return {
        **spec,
        "base_ms": statistics.median(b[0] for b in base),
        "option_ms": statistics.median(o[0] for o in opt),
        "speedup": statistics.median(ratios),  # > 1: the option is faster
        "speedup_cpu": statistics.median(b[1] / o[1] for b, o in zip(base, opt)),
        "option_warmup_ms": [round(w) for w in warm_ms],
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "load1": os.getloadavg()[0],
    }


def bench_passes(spec: dict[str, Any]) -> dict[str, Any]:
    """CrossMatch training steps with the official pass plan against semiseg's, alternating in one process on a
    preset's real data (``spec``: preset, rounds, warmup). Same batches, same losses; only the dead passes
    differ."""
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from semiseg.engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="semiseg-perf-") as tmp:
        cfg = perf_config(spec["setup"], "crossmatch", str(Path(tmp) / "run"), iterations=1000)
        t = Trainer(cfg, quiet=True)
        loader = iter(t._loaders(0, 8))
        batches = [t._to_device(next(loader)) for _ in range(8)]
        from semiseg.algorithms.crossmatch import CrossMatch

        official = CrossMatch(**{**t.cfg.algo_options, "plan": "official"})
        official.setup(num_classes=t.data.num_classes, dim=t.data.dim)
        plans = {"semiseg": list(t.algo.streams), "official": official.streams}
        times: dict[str, list[float]] = {"semiseg": [], "official": []}
        counts: dict[str, dict[str, int]] = {}
        warm, rounds = spec["warmup"], spec["rounds"]
        order = ["semiseg", "official"] * warm + [x for r in range(rounds) for x in
                                                  (("semiseg", "official") if r % 2 == 0 else ("official", "semiseg"))]
        for n, name in enumerate(order):
            t.algo.streams = plans[name]
            t0 = time.perf_counter()
            t.train_step(batches[n % len(batches)], n)
            if n >= 2 * warm:
                times[name].append(1000 * (time.perf_counter() - t0))
            counts[name] = dict(t.algo.last_plan)
    return {**spec, "semiseg_ms": statistics.median(times["semiseg"]),
            "official_ms": statistics.median(times["official"]),
            "speedup": statistics.median(o / m for o, m in zip(times["official"], times["semiseg"])),
            "plans": counts, "batch": cfg.batch_size, "threads": torch.get_num_threads(),
            "peak_rss_mib": peak_rss_mib(), "load1": os.getloadavg()[0]}


def bench_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per case of the evaluation protocol (``semiseg.evaluation.protocol.predictor``)."""
    import os
    import statistics
    import time

    import numpy as np

    from semiseg import registry
    from semiseg.evaluation.protocol import predictor

    setup = TRAIN_SETUPS[spec["setup"]]
    torch.manual_seed(0)
    model = registry.create_backbone(setup["backbone"], in_channels=1, num_classes=setup["num_classes"],
                                     width=setup["width"])
    if spec.get("channels_last"):
        model = to_channels_last(model, setup["dim"])
    image = np.random.default_rng(0).random([1, *spec["case"]], dtype=np.float32)
    predict = predictor(model, setup["dim"], tuple(setup["patch_size"]), setup["num_classes"],
                        torch.device("cpu"), mode=spec["mode"])
    predict(image)  # warm-up: first-call allocations
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        predict(image)
        times.append(time.perf_counter() - t0)
    return {**spec, "s_per_case": statistics.median(times), "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(), "load1": os.getloadavg()[0]}


INFER_CASES: list[dict[str, Any]] = [
    # an ACDC-sized volume: 10 slices of 256x216, each resized to the 128x128 patch and back
    {"setup": "unet2d", "case": [10, 256, 216], "mode": "val"},
    {"setup": "unet2d", "case": [10, 256, 216], "mode": "test"},
    # a synthetic 3D case and an LA-sized volume, sliding window over the 64x64x32 patch, stride patch/2
    {"setup": "vnet3d", "case": [64, 64, 48], "mode": "val"},
    {"setup": "vnet3d", "case": [88, 72, 44], "mode": "val"},  # an la-half case
    {"setup": "vnet3d", "case": [176, 144, 88], "mode": "val"},
]


def _run_child(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    import json
    import subprocess

    cmd = [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "semiseg.bench.speed", "one", kind,
           json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out: {kind} {spec}", file=sys.stderr, flush=True)
        return None
    if p.returncode != 0:
        print(f"failed: {kind} {spec}\n{p.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def suite(out: str, repeats: int, iterations: int, warmup: int, algos: list[str], setups: list[str],
          variants: list[str], options: list[str], rounds: int, infer: bool) -> None:
    """Every (setup, algo, variant) fit and (setup, algo, option) pairing ``repeats`` times, interleaved;
    one JSON line per run appended to ``out``."""
    import json

    for r in range(repeats):
        jobs: list[tuple[str, dict[str, Any]]] = [
            ("train", {"setup": s, "algo": a, "variant": v, "iterations": iterations, "warmup": warmup,
                       "repeat": r}) for s in setups for a in algos for v in variants if v]
        jobs += [("paired", {"setup": s, "algo": a, "option": o, "rounds": rounds, "warmup": 2 if o == "compile"
                             else 1, "repeat": r}) for s in setups for a in algos for o in options]
        if infer:
            jobs += [("infer", {**c, "repeats": 3, "repeat": r}) for c in INFER_CASES]
        for kind, spec in jobs:
            res = _run_child(kind, spec, timeout=3600)
            if res is not None:
                res["kind"] = kind
                with open(out, "a") as f:
                    f.write(json.dumps(res) + "\n")
                print(json.dumps(res), flush=True)


def report(path: str) -> str:
    """Markdown tables of the medians over repeats of ``suite``'s JSON lines."""
    import json
    import statistics

    rows = [json.loads(line) for line in open(path) if line.strip()]
    out: list[str] = []

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    train = [r for r in rows if r["kind"] == "train"]
    variants = [v for v in dict.fromkeys(r["variant"] for r in train) if v != "baseline"]
    if train:  # the summary: how long each step waits for data, and the step with loader workers
        out.append("\n| setup | algo | baseline step ms | waits for data ms | share of the iteration | "
                   + " | ".join(f"{v}: step / wait ms" for v in variants) + " |")
        out.append("|---|---|---|---|---|" + "---|" * len(variants))
        speedups: dict[tuple[str, str], list[float]] = {}
        for setup, algo in dict.fromkeys((r["setup"], r["algo"]) for r in train):
            by = {v: [r for r in train if (r["setup"], r["algo"], r["variant"]) == (setup, algo, v)]
                  for v in ["baseline", *variants]}
            if not by["baseline"]:
                continue
            b = {k: med([r[k] for r in by["baseline"]]) for k in ("step_ms", "data_ms", "iter_ms")}
            cells = []
            for v in variants:
                if by[v]:
                    cells.append(f"{med([r['step_ms'] for r in by[v]]):.0f} / {med([r['data_ms'] for r in by[v]]):.0f}")
                    speedups.setdefault((setup, v), []).append(b["iter_ms"] / med([r["iter_ms"] for r in by[v]]))
                else:
                    cells.append("-")
            out.append(f"| {setup} | {algo} | {b['step_ms']:.0f} | {b['data_ms']:.0f} | "
                       f"{100 * b['data_ms'] / b['iter_ms']:.1f} % | " + " | ".join(cells) + " |")
        for (setup, v), xs in speedups.items():
            out.append(f"\n{setup}, {v}: (step + data) speed-up against the baseline x{min(xs):.2f}-x{max(xs):.2f}, "
                       f"geometric mean x{statistics.geometric_mean(xs):.2f} over {len(xs)} algorithms")
    for setup in dict.fromkeys(r["setup"] for r in train):
        for algo in dict.fromkeys(r["algo"] for r in train if r["setup"] == setup):
            sel = [r for r in train if r["setup"] == setup and r["algo"] == algo]
            base = med([r["iter_ms"] for r in sel if r["variant"] == "baseline"])
            out.append(f"\n**{setup} / {algo}**\n")
            cbase = med([r["cpu_ms"] for r in sel if r["variant"] == "baseline"])
            out.append("| variant | ms/iter (step + data) | step ms | data ms | wall vs baseline | step CPU ms "
                       "| CPU vs baseline | first steps ms | peak RSS MiB (before training) | runs |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for v in dict.fromkeys(r["variant"] for r in sel):
                rs = [r for r in sel if r["variant"] == v]
                it = med([r["iter_ms"] for r in rs])
                first = rs[0]["first_steps_ms"]
                cpu = med([r["cpu_ms"] for r in rs])
                out.append(f"| {v} | {it:.0f} | {med([r['step_ms'] for r in rs]):.0f} | "
                           f"{med([r['data_ms'] for r in rs]):.0f} | x{base / it:.2f} | {cpu:.0f} | "
                           f"x{cbase / cpu:.2f} | {first} | {med([r['peak_rss_mib'] for r in rs]):.0f} "
                           f"({med([r['rss_before_train_mib'] for r in rs]):.0f}) | {len(rs)} |")
    paired = [r for r in rows if r["kind"] == "paired"]
    if paired:
        out.append("\n| setup | algo | option | baseline ms/step | with option ms/step | speed-up (wall) "
                   "| speed-up (CPU) | option warm-up steps ms | runs |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for key in dict.fromkeys((r["setup"], r["algo"], r["option"]) for r in paired):
            rs = [r for r in paired if (r["setup"], r["algo"], r["option"]) == key]
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {med([r['base_ms'] for r in rs]):.0f} | "
                       f"{med([r['option_ms'] for r in rs]):.0f} | x{med([r['speedup'] for r in rs]):.2f} | "
                       f"x{med([r['speedup_cpu'] for r in rs]):.2f} | {rs[0]['option_warmup_ms']} | {len(rs)} |")
    inf = [r for r in rows if r["kind"] == "infer"]
    if inf:
        out.append("\n| inference | case (D/H/W) | mode | memory format | s per case | peak RSS MiB | runs |")
        out.append("|---|---|---|---|---|---|---|")

        def ikey(r: dict[str, Any]) -> tuple[Any, ...]:
            return r["setup"], tuple(r["case"]), r["mode"], bool(r.get("channels_last", False))

        for s, c, m, cl in dict.fromkeys(ikey(r) for r in inf):
            rs = [r for r in inf if ikey(r) == (s, c, m, cl)]
            out.append(f"| {s} | {'x'.join(map(str, c))} | {m} | {'channels_last' if cl else 'contiguous'} | "
                       f"{med([r['s_per_case'] for r in rs]):.3f} | {med([r['peak_rss_mib'] for r in rs]):.0f} | "
                       f"{len(rs)} |")
    passes = [r for r in rows if r["kind"] == "passes"]
    if passes:
        out.append("\n| CrossMatch | B | pairs | ours: enc / dec images | official: enc / dec images | ours ms | "
                   "official ms | speed-up (median of pairs) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in passes:
            o, f = r["plans"]["semiseg"], r["plans"]["official"]
            out.append(f"| {r['setup']} | {r['batch']} | {r['rounds']} | {o['encoder_images']} / "
                       f"{o['decoder_images']} | {f['encoder_images']} / {f['decoder_images']} | "
                       f"{r['semiseg_ms']:.0f} | {r['official_ms']:.0f} | x{r['speedup']:.2f} |")
    loads = [r["load1"] for r in rows]
    if loads:
        out.append(f"\nload average (1 min) during the runs: median {med(loads):.1f}, "
                   f"range {min(loads):.1f}-{max(loads):.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m semiseg.bench.speed", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="one configuration in this process; prints one JSON line")
    one.add_argument("kind", choices=["train", "paired", "passes", "infer"])
    one.add_argument("spec")
    s = sub.add_parser("suite", help="all configurations, each in a fresh process")
    s.add_argument("--out", required=True, help="JSON-lines file to append to")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--iterations", type=int, default=6)
    s.add_argument("--warmup", type=int, default=2, help="leading steps left out of the medians")
    s.add_argument("--algos", default="supervised,crossmatch")
    s.add_argument("--setups", default=",".join(TRAIN_SETUPS),
                   help="synthetic setups (unet2d, vnet3d) or benchmark presets on real data (acdc-cpu, ...)")
    s.add_argument("--variants", default="baseline,workers=1,workers=2", help="separate runs through fit")
    s.add_argument("--options", default=",".join(OPTIONS), help="paired against the baseline in one process")
    s.add_argument("--rounds", type=int, default=4, help="baseline/option step pairs per paired run")
    s.add_argument("--no-infer", action="store_true")
    r = sub.add_parser("report", help="Markdown tables (medians over repeats) from a suite's JSON lines")
    r.add_argument("path")
    a = p.parse_args(argv)
    if a.cmd == "one":
        spec = json.loads(a.spec)
        res = {"train": bench_train, "paired": bench_paired, "passes": bench_passes,
               "infer": bench_infer}[a.kind](spec)
        res["kind"] = a.kind  # so that `report` reads any mix of `one` and `suite` lines
        print(json.dumps(res, default=float))
    elif a.cmd == "suite":
        suite(a.out, a.repeats, a.iterations, a.warmup, a.algos.split(","), a.setups.split(","),
              a.variants.split(","), [o for o in a.options.split(",") if o], a.rounds, not a.no_infer)
    else:
        print(report(a.path))


if __name__ == "__main__":
    main()
