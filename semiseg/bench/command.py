"""`semiseg bench`: run a preset's grid (or time it) and write results.csv, results.md and the plots."""

from __future__ import annotations

import shlex
import sys

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from semiseg.errors import ConfigError, SemisegError

console = Console(stderr=True)


def _csv_list(text: str | None, kind: type, flag: str) -> list | None:
    if not text:
        return None
    try:
        return [kind(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} '{text}' is not a comma-separated list of {kind.__name__}s; "
                          f"write e.g. {flag} {'0,1,2' if kind is int else '3,7'}.") from e


def _command_line(ctx: click.Context) -> str:
    """The command as typed (options given on the command line only), whatever called it. ``--runs-dir`` is
    written as RUNS: the runs' scratch folder decides nothing in a row, and its absolute path (a home folder,
    a cluster's scratch) does not belong in results that get committed and shared."""
    args = ["semiseg", "bench"]
    for p in ctx.command.params:
        if ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE:
            continue
        v = ctx.params[p.name]
        flag = p.opts[0]
        if isinstance(p, click.Option) and p.is_flag:
            if v:
                args.append(flag)
            elif p.secondary_opts:
                args.append(p.secondary_opts[0])
        else:
            args += [flag, "RUNS" if p.name == "runs_dir" else str(v)]
    return shlex.join(args)


def _plugins(ctx: click.Context) -> list[str]:
    root = ctx.find_root()
    return list((root.obj or {}).get("plugins", [])) if isinstance(root.obj, dict) else []


@click.command()
@click.option("--preset", required=True, help="Preset name (see `semiseg list`) or path/to/preset.yaml.")
@click.option("--algos", help="Comma-separated algorithms (default: the preset's).")
@click.option("--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the preset's).")
@click.option("--labeled", help="Comma-separated labeled counts or fractions, e.g. 3,7 (default: the preset's).")
@click.option("--iterations", type=int, help="Override the iteration budget (for quick tries; part of the run key).")
@click.option("--out", help="Results folder (default bench/<preset>).")
@click.option("--runs-dir", help="Where run directories go (default OUT/runs).")
@click.option("--data-root", help="Folder of the dataset (overrides the preset's data_root).")
@click.option("--device", help="auto, cpu or cuda (default: the preset's, usually auto).")
@click.option("--timing-warmup", type=int, help="Untimed warm-up iterations before timing (default: preset's).")
@click.option("--timing-iters", type=int, help="Timed iterations (default: the preset's).")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's; 1 can be faster on a busy CPU).")
@click.option("--amp/--no-amp", default=None, help="Mixed precision for every run (default: the preset's).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last memory format for every run (default: the preset's, else auto).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the backbone (default: off).")
@click.option("--workers", type=int, help="Loader worker processes (default: the preset's, else 0 on CPU).")
@click.option("--jobs", type=int,
              help="Grid cells trained at once, each with an equal share of --threads (one GPU each where there "
                   "are several); new cells are then timed one at a time. Default: 2 on a CPU with 2 or more "
                   "cores (measured x1.14 faster on 2 cores), else the number of GPUs.")
@click.option("--reuse", is_flag=True,
              help="Take over rows of the committed results (benchmarks/results/<preset>) instead of running "
                   "them again (default: a fresh --out runs the whole grid on this machine).")
@click.option("--print-commands", is_flag=True,
              help="Print one `semiseg train` command per remaining cell (for a scheduler) and exit; rerun the "
                   "bench afterwards to evaluate and record them.")
@click.option("--time-only", is_flag=True, help="Only time one run per algorithm (no training) and print ms/iter.")
@click.option("--dry-run", is_flag=True, help="Show the grid and which runs are already done; run nothing.")
@click.option("--quiet", is_flag=True, help="No progress view.")
@click.pass_context
def bench(ctx: click.Context, preset: str, algos: str | None, seeds: str | None, labeled: str | None,
          iterations: int | None, out: str | None, runs_dir: str | None, data_root: str | None,
          device: str | None, timing_warmup: int | None, timing_iters: int | None, threads: int | None,
          amp: bool | None, channels_last: bool | None, compile_: bool | None, workers: int | None,
          jobs: int | None, reuse: bool, print_commands: bool, time_only: bool, dry_run: bool,
          quiet: bool) -> None:
    """Run algorithms x labeled splits x seeds at an equal budget; write results.csv/.md and plots.

    Example: semiseg bench --preset smoke --out benchmarks/results/smoke. Finished runs (in OUT/results.csv)
    are skipped, so an interrupted bench resumes; --reuse also takes over the committed rows of
    benchmarks/results/<preset>/results.csv.
    The speed options (--amp, --channels-last, --compile, --workers) make a variant of the preset, named
    e.g. acdc-cpu+channels_last, so its rows never mix with the preset's own.
    """
    speed = {k: v for k, v in (("amp", amp), ("channels_last", channels_last), ("compile", compile_),
                                ("workers", workers)) if v is not None}
    try:
        _bench(ctx, preset, algos, seeds, labeled, iterations, out, runs_dir, data_root, device, timing_warmup,
               timing_iters, threads, speed, time_only, dry_run, quiet, jobs, print_commands, reuse)
    except SemisegError as e:
        # the semiseg group prints these too; this keeps the command usable on its own
        if isinstance(ctx.find_root().command, click.Group) and ctx.find_root().command is not ctx.command:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume the grid", highlight=False)
        sys.exit(130)


def _bench(ctx: click.Context, preset_name: str, algos: str | None, seeds: str | None, labeled: str | None,
           iterations: int | None, out: str | None, runs_dir: str | None, data_root: str | None,
           device: str | None, timing_warmup: int | None, timing_iters: int | None, threads: int | None,
           speed: dict[str, bool | int], time_only: bool, dry_run: bool, quiet: bool, jobs: int | None = None,
           print_commands: bool = False, reuse: bool = False) -> None:
    from dataclasses import replace
    from pathlib import Path

    from semiseg import registry
    from semiseg.bench import results as res
    from semiseg.bench.presets import get_preset
    from semiseg.bench.runner import committed_results, grid_commands, plan, run_bench, time_grid

    plugins = _plugins(ctx)
    for p in plugins:
        registry.load_plugin(p)
    preset = get_preset(preset_name)
    if speed:
        if speed.get("workers", 0) < 0:
            raise ConfigError(f"--workers must be 0 or more, got {speed['workers']}.")
        suffix = "".join(f"+{k}" if v is True else f"+no-{k}" if v is False else f"+{k}{v}" for k, v in speed.items())
        preset = replace(preset, name=preset.name + suffix, train={**preset.train, **speed})
    algo_list = _csv_list(algos, str, "--algos")
    seed_list = _csv_list(seeds, int, "--seeds")
    lab_list = _csv_list(labeled, float, "--labeled")
    timing = dict(preset.timing)
    if timing_warmup is not None:
        timing["warmup"] = timing_warmup
    if timing_iters is not None:
        timing["iters"] = timing_iters
    if timing["iters"] < 1 or timing["warmup"] < 0:
        raise ConfigError("--timing-iters must be at least 1 and --timing-warmup at least 0.")

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}.")
        import torch

        torch.set_num_threads(threads)
    if time_only:
        rows = time_grid(preset, algo_list, lab_list[0] if lab_list else None,
                         seed_list[0] if seed_list else None, iterations, data_root, device, plugins, timing, threads)
        t = Table(title=f"{preset.name}: ms per iteration (batch to device .. end of backward), "
                        f"{timing['warmup']} warm-up + {timing['iters']} timed")
        for col in ("algo", "ms/iter", "std", "peak MB", "params (M)", "GMACs", "hours for the budget"):
            t.add_column(col, justify="left" if col == "algo" else "right")
        for r in rows:
            t.add_row(r["algo"], f"{r['ms_per_iter']:.1f}", f"{r['ms_per_iter_std']:.1f}",
                      f"{r['peak_mem_mb']:.0f}", f"{r['params_m']:.3f}", f"{r['gmacs']:.3f}",
                      f"{r['train_h_estimate']:.2f} ({r['iterations']} it)")
        Console().print(t)
        console.print(f"{rows[0]['machine']}; {rows[0]['device']}; torch {rows[0]['torch']}" if rows else "",
                      highlight=False)
        if out and rows:
            res.write_rows(Path(out) / "timing.csv", rows, columns=list(rows[0]))
            console.print(f"wrote {Path(out) / 'timing.csv'}", highlight=False)
        return

    from semiseg.bench.runner import default_jobs

    jobs = default_jobs(device or preset.train.get("device", "auto")) if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}.")
    out_dir = Path(out) if out else Path("bench") / preset.name
    if print_commands:
        for line in grid_commands(preset, out_dir, algo_list, seed_list, lab_list, iterations, data_root, device,
                                  runs_dir, plugins, reuse):
            click.echo(line)
        return
    if dry_run:
        specs = plan(preset, algo_list, seed_list, lab_list, iterations, data_root)
        done = {res.row_key(r) for r in res.read_rows(out_dir / "results.csv")}
        committed = {res.row_key(r) for r in res.read_rows(committed_results(preset))}
        t = Table(title=f"{preset.name}: {len(specs)} runs -> {out_dir}")
        for col in ("algo", "labeled", "seed", "iterations", "status"):
            t.add_column(col)
        for s in specs:
            k = s.key(preset.name)
            status = "done" if k in done else ("committed" if k in committed and reuse else
                                               "to run (committed: --reuse)" if k in committed else "to run")
            t.add_row(s.algo, res.fmt_labeled(s.labeled), str(s.seed), str(s.iterations), status)
        Console().print(t)
        return

    result = run_bench(preset, out_dir, algo_list, seed_list, lab_list, iterations, data_root, device, runs_dir,
                       plugins, quiet, timing, _command_line(ctx), threads, jobs=jobs, reuse=reuse)
    console.print(f"{len(result.ran)} run(s) finished, {len(result.skipped) + len(result.copied)} skipped; "
                  f"{out_dir / 'results.csv'}, {out_dir / 'results.md'}", highlight=False)
    if result.interrupted:
        sys.exit(130)

