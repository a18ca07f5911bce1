"""``dslm simulate``: Monte-Carlo check of every component formula (THEORY.md sections 1 and 4)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from dslm.errors import UsageError
from dslm.files import write_text_atomic
from dslm.runtime import resolve_device
from dslm.sim.components import CAUSAL, COMPONENTS
from dslm.sim.runner import (FUSED_MODES, GRIDS, PRECISIONS, format_report, load_grid_file, resolve_fused,
                             resolve_grid, resolve_precision, run_component, warm_up)

def add_arguments(p):
    p.add_argument("--component", nargs="+", default=["all"], metavar="NAME",
                   help=f"components to simulate: all or any of {', '.join(COMPONENTS)}")
    p.add_argument("--grid", default="quick",
                   help="quick (reduced grid, <= 60 s on 2 CPU cores), paper (THEORY.md section 4 grids "
                        "and sample counts) or PATH.json ({component: {axis: [values]}}; axes not given "
                        "take the paper grid's values; only the file's components run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to simulate (auto: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="matmul precision of linear and sha (auto: bf16 on cuda, fp32 on cpu); "
                        "elementwise components always run in fp32")
    p.add_argument("--fused", choices=FUSED_MODES, default="auto",
                   help="layernorm and dropout as one fused Triton kernel each: sampling, layer, backward "
                        "and partial sums in registers, 2.5-2.7x faster on an H100 (auto: on cuda when "
                        "triton is installed; off: the PyTorch path; a seed gives different numbers "
                        "on the two paths)")
    p.add_argument("--causal", action="store_true",
                   help=f"the causal (decoder) forms: query t sees keys 1..t; for {' and '.join(CAUSAL)} only "
                        "(all = these two); compared with dslm.theory.causal")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed + device = same JSON)")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="memory per batched chunk in GiB (default 16 on cuda, 3 on cpu)")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write grids, percentiles and every configuration's predicted and measured values")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _selected(names: list[str], causal: bool = False) -> list[str]:
    table = CAUSAL if causal else COMPONENTS
    if "all" in names:
        return list(table)
    for name in names:
        if name not in COMPONENTS:
            raise UsageError(f"unknown component {name!r}; choose all or any of {', '.join(COMPONENTS)}")
        if name not in table:
            raise UsageError(f"--causal: {name} has no causal form; choose all or any of {', '.join(CAUSAL)}")
    return list(dict.fromkeys(names))


def _check_output(out: Path) -> Path:
    """Before the run: ``out`` can be written (not a folder; its folder exists or can be made, and
    a file can be created there), so a finished run never loses its results."""
    if out.is_dir():
        raise UsageError(f"--json {out}: is a directory; give a file name")
    if out.name in ("", ".", ".."):
        raise UsageError(f"--json {out}: not a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--json {out}: cannot create its folder {out.parent} ({e.strerror or e})") from None
    probe = out.with_name(out.name + ".tmp")
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--json {out}: cannot write there ({e.strerror or e})") from None
    return out


def run(args) -> int:
    table = CAUSAL if args.causal else COMPONENTS
    names = _selected(args.component, args.causal)
    if args.grid in GRIDS:
        specs = {name: args.grid for name in names}
    else:
        file_grid = load_grid_file(args.grid)
        specs = {name: g for name, g in file_grid.items() if name in names}
        if not specs:
            raise UsageError(f"grid file {args.grid} has none of the requested components")
    grids = {name: resolve_grid(table[name], spec) for name, spec in specs.items()}
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UsageError("--budget-gb must be > 0")
    out = _check_output(Path(args.json)) if args.json else None
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    fused = resolve_fused(args.fused, device)
    budget = int(args.budget_gb * 2 ** 30) if args.budget_gb else None

    print(f"dslm simulate: grid {args.grid}, device {device}, precision {precision}, "
          f"fused kernels {'on' if fused else 'off'}, seed {args.seed}{', causal' if args.causal else ''}")
    startup = warm_up(list(grids), device, precision, fused, args.causal)
    if startup:
        print(f"CUDA start-up (context, libraries, kernels{', Triton compiles' if fused else ''}; "
              f"not in the times below): {startup:.1f} s")
    results, start = {}, time.perf_counter()
    for name, grid in grids.items():
        results[name] = run_component(table[name], grid, device, precision, args.seed, budget,
                                      progress=not args.quiet, fused=fused)
        print(format_report(results[name]), flush=True)
    total = time.perf_counter() - start
    print(f"total: {sum(r['configs'] for r in results.values())} configs in {total:.1f} s")
    if out is not None:
        record = {"grid": args.grid, "device": str(device), "precision": precision, "fused": fused,
                  "causal": args.causal, "seed": args.seed,
                  "total_seconds": total, "startup_seconds": startup, "components": results}
        try:
            write_text_atomic(out, json.dumps(record))
        except OSError as e:
            raise UsageError(f"--json {out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {out}")
    return 0
