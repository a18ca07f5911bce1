"""Run a pretraining study from a spec: shapes x schemes x learning rates x seeds, each run a
`dslm pretrain` process, scheduled over the visible GPUs (or CPU jobs), resumable, with results
tables, plots and the spec's decision rules.

Rerunning the same command continues a study: finished runs (their records in OUT/records/) are
never run again, interrupted ones resume from their checkpoint in WORK. See docs/study.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from dslm.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study spec (.toml or .json), e.g. studies/quick.toml")
    parser.add_argument("--out", default=None,
                        help="results folder: records/, results.{json,csv,md} and the plots "
                             "(default outputs/studies/<spec name>)")
    parser.add_argument("--work", default=None,
                        help="run folders with checkpoints and logs (default outputs/studies/<spec name>/runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where runs go: auto = the visible GPUs, else the CPU")
    parser.add_argument("--gpus", type=int, default=None, help="use at most this many visible GPUs (default all)")
    parser.add_argument("--per-gpu", type=int, default=1,
                        help="concurrent runs per GPU (more than 1 only where measured faster for your shapes)")
    parser.add_argument("--jobs", type=int, default=1, help="concurrent runs on the CPU")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no run that would not end within this time (judged by the runs of its shape "
                             "so far); at the limit, running runs checkpoint and stop; rerun to continue")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="stop after this many runs in a row whose process failed (a broken setup)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run again the runs whose process failed (not those that diverged)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would start now and exit")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the records and exit")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _check(args) -> None:
    for name in ("gpus", "per_gpu", "jobs", "max_failures"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit {args.time_limit}: must be > 0")


def _ensure_data(spec) -> None:
    data = Path(spec.data)
    if (data / "dataset.json").is_file():
        return
    if spec.prepare == "embedded":
        from dslm.data import ensure_embedded_dataset

        ensure_embedded_dataset(data)
        return
    hint = f"; make it with: {spec.prepare}" if spec.prepare else ""
    raise UsageError(f"{data}: no prepared dataset (spec {spec.path}){hint}")


def _machine(slots) -> dict:
    import torch

    from dslm import __version__

    gpu = None
    if slots and slots[0][0] == "cuda":
        gpu = torch.cuda.get_device_name(0)
    return {"machine": {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "cuda": torch.version.cuda, "dslm": __version__},
            "command": "dslm study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None}


def run(args) -> int:
    from dslm.data.evalset import FrozenEvalSet, unigram_cross_entropy
    from dslm.study.report import write_results
    from dslm.study.runner import (StudyRunner, check_same_data, dataset_fingerprint, read_records, slots_for,
                                   summary_line)
    from dslm.study.spec import as_argv, load_spec, pretrain_flags, stall_line

    _check(args)
    spec = load_spec(args.spec)
    out = Path(args.out or Path("outputs") / "studies" / spec.name)
    work = Path(args.work or Path("outputs") / "studies" / spec.name / "runs")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    slots = slots_for(args.device, args.gpus, args.per_gpu, args.jobs)
    meta = _machine(slots)
    _ensure_data(spec)
    valid = FrozenEvalSet(spec.data, "valid", spec.train["seq_len"])
    FrozenEvalSet(spec.data, "test", spec.train["seq_len"])   # built once here, not by every run
    unigram = unigram_cross_entropy(spec.data, valid)
    meta["valid_predicted_tokens"] = valid.predicted_tokens
    if args.report_only:
        records = read_records(out)
        check_same_data(records, dataset_fingerprint(spec.data), out)   # the reference line needs their data
        write_results(spec, out, records, unigram, meta, plots=not args.no_plots)
        print(f"results: {out / 'results.md'}")
        return 0
    runner = StudyRunner(spec, out, work, slots, args.time_limit, args.retry_failed, args.max_failures,
                         stall_line=stall_line(unigram))
    print(f"study {spec.name}: {summary_line(runner.records, len(runner.pending()))}; "
          f"{len(slots)} slot(s) on {slots[0][0]}; unigram valid loss {unigram:.3f}", flush=True)
    if args.dry_run:
        for r in runner.pending():
            print(f"{r.id}: dslm pretrain {' '.join(as_argv(pretrain_flags(spec, r, slots[0][0])))}")
        return 0
    start = time.time()
    code = runner.run(on_record=lambda _: write_results(spec, out, runner.records, unigram, meta, plots=False))
    result = write_results(spec, out, runner.records, unigram, meta, plots=not args.no_plots)
    print(f"study {spec.name}: {summary_line(runner.records, len(runner.pending()))} "
          f"after {time.time() - start:.0f} s; results in {out / 'results.md'}")
    v = result.get("verdict") or {}
    for name, key in (("DSLM enables depth", "enables_depth"), ("deeper is better", "deeper_is_better")):
        if v:
            print(f"  {name}: {({None: 'incomplete', True: 'holds', False: 'does not hold'})[v[key]]}")
    if code:
        why = runner.stop_reason or "the time limit left no room for the next runs"
        print(f"stopped ({why}); run the same command again to continue", flush=True)
    return code
