"""Run a finetuning sweep (learning rates x seeds, THEORY.md section 4: lr {1,2,3,4,5}e-5 x 5 seeds)
and write its results table.

Each run is one `dslm finetune` process (under torchrun on all visible GPUs when there are several)
writing into <out>/lr<lr>_seed<seed>/; a run whose final_metrics.json exists is not run again, one
with a checkpoint but no final metrics is resumed. Flags after `--` go to every `dslm finetune` run.
The table (results.md, results.csv, results.json in <out>) has, per metric and learning rate, the
mean, median and sample standard deviation over the seeds, and the best learning rate by mean.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from dslm.errors import UsageError
from dslm.files import write_json_atomic, write_text_atomic

REFERENCE_LRS = (1e-5, 2e-5, 3e-5, 4e-5, 5e-5)
REFERENCE_SEEDS = (1, 2, 3, 4, 5)
RESERVED = ("--lr", "--seed", "--out-dir", "--task", "--load")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=("mnli", "qqp", "race", "demo"), help="the finetuning task")
    parser.add_argument("--lrs", type=_floats, default=list(REFERENCE_LRS), metavar="LR,LR,...",
                        help="learning rates (default: 1e-5,2e-5,3e-5,4e-5,5e-5)")
    parser.add_argument("--seeds", type=_ints, default=list(REFERENCE_SEEDS), metavar="S,S,...",
                        help="seeds (default: 1,2,3,4,5)")
    parser.add_argument("--out", metavar="DIR", default=None, help="sweep folder (default outputs/finetune/<task>_sweep)")
    parser.add_argument("--nproc", default="auto",
                        help="processes per run: 'auto' = the visible GPUs (torchrun when > 1), or a number")
    parser.add_argument("--aggregate-only", action="store_true", help="only (re)write the table from finished runs")
    parser.add_argument("--keep-optimizer", action="store_true",
                        help="keep each finished run's optimizer state (trainer.pt); by default only its weights stay")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER, metavar="-- FINETUNE FLAGS",
                        help="flags passed to every `dslm finetune` run (after --)")


def run_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}_seed{seed}"


def _nproc(value: str) -> int:
    if value == "auto":
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except Exception:  # noqa: BLE001
            return 1
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--nproc {value!r}: expected 'auto' or a number") from None
    if n < 1:
        raise UsageError(f"--nproc {n}: must be >= 1")
    return n


def run_command(task: str, lr: float, seed: int, run_dir: Path, extra: list[str], nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "dslm"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dslm"]
    cmd = launcher + ["finetune", "--task", task, "--lr", f"{lr:g}", "--seed", str(seed), "--out-dir", str(run_dir)]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")):
        cmd += ["--load", str(run_dir)]
    elif run_dir.is_dir():   # a run that ended before its first checkpoint starts over
        cmd += ["--overwrite"]
    return cmd + list(extra)


# ---- aggregation ---------------------------------------------------------------------------------
def flatten_metrics(final: dict) -> dict[str, float]:
    """``{"<split>/<metric>": value}`` of a run's final_metrics.json evaluation results."""
    out = {}
    for split, metrics in (final.get("eval") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{split}/{name}"] = float(value)
    return out


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1].startswith("loss")


def aggregate(runs: list[dict]) -> dict:
    """Per metric and lr: n, mean, median, std (sample, n - 1; 0 for one seed), min, max; and the
    best lr by mean (highest; lowest for losses). ``runs``: ``{"lr", "seed", "metrics"}`` each."""
    table: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        for metric, value in r["metrics"].items():
            table.setdefault(metric, {}).setdefault(r["lr"], []).append(value)
    result = {}
    for metric in sorted(table):
        rows = {}
        for lr in sorted(table[metric]):
            v = table[metric][lr]
            rows[lr] = {"n": len(v), "mean": statistics.fmean(v), "median": statistics.median(v),
                        "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)}
        pick = min if lower_is_better(metric) else max
        best = pick(rows, key=lambda lr: rows[lr]["mean"])
        result[metric] = {"rows": rows, "best_lr": best}
    return result


def _headline(metric: str) -> bool:
    return not lower_is_better(metric)


def to_markdown(agg: dict, title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| metric | lr | seeds | mean | median | std | min | max | |",
              "|---|---|---|---|---|---|---|---|---|"]
    for metric, entry in agg.items():
        if not _headline(metric):
            continue
        for lr, row in entry["rows"].items():
            mark = "best" if lr == entry["best_lr"] else ""
            lines.append(f"| {metric} | {lr:g} | {row['n']} | {100 * row['mean']:.2f} | {100 * row['median']:.2f} | "
                         f"{100 * row['std']:.2f} | {100 * row['min']:.2f} | {100 * row['max']:.2f} | {mark} |")
    lines += ["", "Values in %. Best lr per metric by mean over seeds; std is the sample standard deviation.", ""]
    best = [f"- {metric}: lr {entry['best_lr']:g} ({100 * entry['rows'][entry['best_lr']]['mean']:.2f} mean, "
            f"{100 * entry['rows'][entry['best_lr']]['median']:.2f} median)"
            for metric, entry in agg.items() if _headline(metric)]
    return "\n".join(lines + ["Best learning rates:", *best]) + "\n"


def to_csv(agg: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "lr", "n", "mean", "median", "std", "min", "max", "best"])
    for metric, entry in agg.items():
        for lr, row in entry["rows"].items():
            w.writerow([metric, f"{lr:g}", row["n"], repr(row["mean"]), repr(row["median"]), repr(row["std"]),
                        repr(row["min"]), repr(row["max"]), int(lr == entry["best_lr"])])
    return buf.getvalue()


def collect(out: Path, lrs: list[float] | None = None, seeds: list[int] | None = None) -> tuple[list[dict], list[str]]:
    """Finished runs under ``out`` (restricted to the grid when given) and the names of missing ones."""
    runs, missing = [], []
    dirs = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("lr")) if out.is_dir() else []
    wanted = {run_name(lr, s) for lr in lrs for s in seeds} if lrs is not None and seeds is not None else None
    for d in dirs:
        if wanted is not None and d.name not in wanted:
            continue
        path = d / "final_metrics.json"
        try:
            final = json.loads(path.read_text())
        except (OSError, ValueError):
            missing.append(d.name)
            continue
        if final.get("stopped"):
            missing.append(d.name)
            continue
        runs.append({"lr": float(final["lr"]), "seed": int(final["seed"]), "metrics": flatten_metrics(final)})
    if wanted is not None:
        have = {run_name(r["lr"], r["seed"]) for r in runs}
        missing = sorted(wanted - have)
    return runs, missing


def write_tables(out: Path, task: str, runs: list[dict]) -> dict:
    agg = aggregate(runs)
    write_text_atomic(out / "results.md", to_markdown(agg, f"{task}: {len(runs)} runs"))
    write_text_atomic(out / "results.csv", to_csv(agg))
    serial = {m: {"best_lr": e["best_lr"], "rows": {f"{lr:g}": row for lr, row in e["rows"].items()}}
              for m, e in agg.items()}
    write_json_atomic(out / "results.json", {"task": task, "runs": runs, "table": serial})
    return agg


def _prune(run_dir: Path) -> None:
    """Drop optimizer and RNG state of a finished run (3x the weights); the weights stay."""
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        for name in ("trainer.pt",):
            (ckpt / name).unlink(missing_ok=True)
        for rng in ckpt.glob("rng_rank*.pt"):
            rng.unlink(missing_ok=True)


def run(args) -> int:
    extra = list(args.finetune_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    for flag in extra:
        if flag.split("=", 1)[0] in RESERVED:
            raise UsageError(f"{flag.split('=', 1)[0]}: set by the sweep (use --lrs, --seeds, --out, --task)")
    out = Path(args.out or f"outputs/finetune/{args.task}_sweep")
    lrs, seeds = args.lrs, args.seeds
    failed = []
    if not args.aggregate_only:
        nproc = _nproc(args.nproc)
        out.mkdir(parents=True, exist_ok=True)
        total = len(lrs) * len(seeds)
        k = 0
        for lr in lrs:
            for seed in seeds:
                k += 1
                run_dir = out / run_name(lr, seed)
                if (run_dir / "final_metrics.json").is_file():
                    try:
                        if not json.loads((run_dir / "final_metrics.json").read_text()).get("stopped"):
                            print(f"[{k}/{total}] {run_dir.name}: done already", flush=True)
                            continue
                    except (OSError, ValueError):
                        pass
                cmd = run_command(args.task, lr, seed, run_dir, extra, nproc)
                print(f"[{k}/{total}] {run_dir.name}: {' '.join(cmd)}", flush=True)
                if args.dry_run:
                    continue
                rc = subprocess.call(cmd)
                if rc == 2:  # a usage error repeats for every run: stop at the first
                    raise UsageError(f"run {run_dir.name} rejected its flags (see above); sweep stopped")
                if rc > 128:  # stopped by a signal with a checkpoint: the sweep stops too, resumable
                    raise UsageError(f"run {run_dir.name} stopped by signal {rc - 128} (checkpointed); run the "
                                     "same sweep again to resume")
                if rc != 0:
                    failed.append(run_dir.name)
                    print(f"[{k}/{total}] {run_dir.name}: failed (exit {rc})", flush=True)
                elif not args.keep_optimizer:
                    _prune(run_dir)
        if args.dry_run:
            return 0
    runs, missing = collect(out, lrs, seeds)
    if not runs:
        raise UsageError(f"{out}: no finished runs (final_metrics.json) to aggregate")
    agg = write_tables(out, args.task, runs)
    print(to_markdown(agg, f"{args.task}: {len(runs)} runs"), end="")
    if missing:
        print(f"missing runs ({len(missing)}): {', '.join(missing)}")
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}", flush=True)
    return 1 if failed else 0
