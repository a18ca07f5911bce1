"""A study's results: per-cell summaries, the decision rules, tables and plots.

Numbers are final valid MLM losses in nats on the fixed valid set (:mod:`dslm.data.evalset`). A
cell (family, shape, scheme) is summarised at its best learning rate (lowest loss of the search
seed): mean and sample std over the seeds run there. A run is *non-finite* when training stopped on
non-finite losses, *failed* when the process broke, and *stalled* when it finished no lower than
``STALL_MARGIN`` nats under the unigram reference loss (it never left the token-frequency plateau).

The decision rules (``[verdict]`` in the spec; ``method`` is the DSLM scheme under test,
``baselines`` the strong baselines, ``broken`` the scheme expected to fail at depth):

* **enables depth**, in every listed family, at its deepest shape: mean(method) <= mean(best
  baseline) + max(std(method), std(best baseline)), and mean(broken) > mean(method) + 2 max(std(method),
  std(broken)) (a broken run that diverged counts as infinitely worse);
* **deeper is better**, in every listed family, for each pair of consecutive depths: the loss
  differences shallower - deeper of the method, paired by seed, have a mean above 2 sample stds.

Outputs in the study folder: ``results.json`` (cells, verdict, every run record), ``results.csv``
(one row per run), ``results.md`` (the tables) and ``loss_vs_depth.png``, ``loss_vs_lr.png``,
``curves.png``.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from dslm.files import write_json_atomic, write_text_atomic
from dslm.study.spec import STALL_MARGIN, Spec, cell_search, run_loss, stall_line
CSV_COLUMNS = ("id", "family", "shape", "scheme", "layers", "hidden", "non_embedding_params", "lr", "seed",
               "status", "steps", "tokens", "wall_s", "tokens_per_s", "valid_mlm_loss", "valid_mlm_acc",
               "test_mlm_loss", "test_mlm_acc", "train_loss", "skipped_steps")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summarize_cells(spec: Spec, records: dict, unigram: float | None) -> list[dict]:
    """One summary per cell in spec order."""
    cells = []
    for fam in spec.families.values():
        for shape_name, shape in fam.shapes.items():
            for scheme in fam.schemes:
                runs = [r for r in records.values() if (r["family"], r["shape"], r["scheme"]) ==
                        (fam.name, shape_name, scheme)]
                lrs, best = cell_search(spec, fam, shape_name, scheme, records, stall_line(unigram))
                sweep = {f"{r['lr']:g}": run_loss(r) for r in runs if r["seed"] == fam.search_seed}
                at_best = {r["seed"]: run_loss(r) for r in runs if best is not None and r["lr"] == best}
                losses = list(at_best.values())
                cells.append({
                    "family": fam.name, "shape": shape_name, "scheme": scheme, "layers": shape["layers"],
                    "hidden": shape["hidden"], "lr_sweep": sweep, "best_lr": best,
                    "seeds": {str(k): v for k, v in sorted(at_best.items())},
                    "complete": best is not None and set(at_best) >= set(fam.seeds),
                    "mean": statistics.fmean(losses) if losses else None, "std": _std(losses) if losses else None,
                    "n": len(losses),
                    "nonfinite": sum(r["status"] == "nonfinite" for r in runs),
                    "failed": sum(r["status"] == "failed" for r in runs),
                    "stalled": sum(r["status"] == "done" and unigram is not None and
                                   run_loss(r) > unigram - STALL_MARGIN for r in runs),
                    "runs": len(runs),
                })
    return cells


def _cell(cells, family, shape, scheme):
    return next((c for c in cells if (c["family"], c["shape"], c["scheme"]) == (family, shape, scheme)), None)


def _spread(*cells) -> float:
    stds = [c["std"] for c in cells if c["std"] is not None and math.isfinite(c["std"])]
    return max(stds) if stds else 0.0


def verdict(spec: Spec, cells: list[dict]) -> dict:
    """The two rules of the module docstring, with the numbers behind each decision."""
    rules = spec.verdict
    if not rules.get("method"):
        return {}
    method, baselines, broken = rules["method"], rules.get("baselines", []), rules.get("broken")
    families = rules.get("families", list(spec.families))
    depth, deeper, complete = [], [], True
    for name in families:
        fam = spec.families[name]
        order = sorted(fam.shapes, key=lambda s: fam.shapes[s]["layers"])
        deepest = order[-1]
        m = _cell(cells, name, deepest, method)
        base = [c for c in (_cell(cells, name, deepest, b) for b in baselines) if c and c["mean"] is not None]
        p = _cell(cells, name, deepest, broken) if broken else None
        ready = (m and m["complete"] and len(base) == len(baselines) and all(c["complete"] for c in base)
                 and (p is None or p["complete"]))
        if not ready:
            complete = False
            depth.append({"family": name, "shape": deepest, "status": "incomplete"})
        else:
            b = min(base, key=lambda c: c["mean"]) if base else None
            within = b is None or m["mean"] <= b["mean"] + _spread(m, b)
            worse = p is None or p["mean"] > m["mean"] + 2 * _spread(m, p)
            depth.append({"family": name, "shape": deepest, "method": m["mean"], "method_std": m["std"],
                          "best_baseline": b and b["scheme"], "baseline": b and b["mean"],
                          "baseline_std": b and b["std"], "broken": p["mean"] if p else None,
                          "within_or_better": within, "broken_clearly_worse": worse, "holds": within and worse})
        for shallow, deep in zip(order, order[1:]):
            a, z = _cell(cells, name, shallow, method), _cell(cells, name, deep, method)
            if not (a and z and a["complete"] and z["complete"]):
                complete = False
                deeper.append({"family": name, "pair": [shallow, deep], "status": "incomplete"})
                continue
            diffs = [a["seeds"][s] - z["seeds"][s] for s in a["seeds"] if s in z["seeds"]]
            mean, std = statistics.fmean(diffs), _std(diffs)
            holds = len(diffs) > 1 and math.isfinite(mean) and mean > 2 * std
            deeper.append({"family": name, "pair": [shallow, deep], "mean_drop": mean, "std_drop": std,
                           "paired_seeds": len(diffs), "holds": holds})
    return {
        "method": method, "baselines": baselines, "broken": broken, "families": families,
        "enables_depth": None if not complete else all(d.get("holds") for d in depth),
        "deeper_is_better": None if not complete else all(d.get("holds") for d in deeper),
        "depth_rule": depth, "deeper_rule": deeper,
    }


def equal_wall_clock(spec: Spec, records: dict, cells: list[dict]) -> list[dict]:
    """For each family and scheme: the valid loss each shape had reached (best lr, mean over seeds,
    linear in time between evaluations) when the shallowest shape's runs ended."""
    rows = []
    for fam in spec.families.values():
        order = sorted(fam.shapes, key=lambda s: fam.shapes[s]["layers"])
        for scheme in fam.schemes:
            first = _cell(cells, fam.name, order[0], scheme)
            runs0 = _best_runs(records, first)
            if not runs0:
                continue
            budget = statistics.fmean(r["curve_valid"][-1][1] for r in runs0 if r["curve_valid"]) \
                if any(r["curve_valid"] for r in runs0) else None
            if budget is None:
                continue
            row = {"family": fam.name, "scheme": scheme, "seconds": round(budget, 1), "loss": {}}
            for shape in order:
                values = [_loss_at(r["curve_valid"], budget) for r in _best_runs(records, _cell(cells, fam.name, shape, scheme))]
                values = [v for v in values if v is not None]
                row["loss"][shape] = statistics.fmean(values) if values else None
            rows.append(row)
    return rows


def _best_runs(records, cell) -> list[dict]:
    if not cell or cell["best_lr"] is None:
        return []
    return [r for r in records.values() if (r["family"], r["shape"], r["scheme"], r["lr"]) ==
            (cell["family"], cell["shape"], cell["scheme"], cell["best_lr"]) and r["status"] == "done"]


def _loss_at(curve: list, seconds: float) -> float | None:
    points = [(t, loss) for _, t, loss, _ in curve if loss is not None]
    if not points or seconds < points[0][0]:
        return None
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][1]


# ---- writing -----------------------------------------------------------------------------------
def write_results(spec: Spec, out: Path, records: dict, unigram: float | None, meta: dict,
                  plots: bool = True) -> dict:
    cells = summarize_cells(spec, records, unigram)
    result = {"study": spec.name, "spec": str(spec.path), "data": spec.data, "unigram_valid_loss": unigram,
              "stall_margin": STALL_MARGIN, **meta, "cells": cells, "verdict": verdict(spec, cells),
              "equal_wall_clock": equal_wall_clock(spec, records, cells),
              "runs": [records[k] for k in sorted(records)]}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", _finite(result))
    write_text_atomic(out / "results.csv", _csv(records))
    write_text_atomic(out / "results.md", markdown(spec, result))
    if plots and records:
        from dslm.study.plots import plot_study

        plot_study(spec, result, out)
    return result


def _finite(obj):
    """JSON without NaN/inf: non-finite numbers become strings ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _csv(records: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for key in sorted(records):
        writer.writerow(records[key])
    return buf.getvalue()


def _fmt(mean, std=None) -> str:
    if mean is None:
        return "—"
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None and math.isfinite(std) else "")


def _machines_line(runs: list[dict]) -> str:
    """Which machines ran the runs (timings compare only within one)."""
    counts: dict[str, int] = {}
    for run in runs:
        name = run.get("device_name") or run.get("device", "unknown")
        counts[name] = counts.get(name, 0) + 1
    shown = ", ".join(f"{name} ({n} runs)" for name, n in sorted(counts.items()))
    return f"Machines: {shown or 'none yet'}; losses compare across them, wall-clock times only within one."


def markdown(spec: Spec, result: dict) -> str:
    """``results.md``: the unigram reference, the machines, per family the results table, the lr
    sweep and the runs that did not train, then the equal-wall-clock view and the verdict."""
    lines = [f"# Study {spec.name}", ""]
    if result["unigram_valid_loss"] is not None:
        lines += [f"Unigram reference loss of the valid split: {result['unigram_valid_loss']:.3f} nats "
                  f"(a run ending above {result['unigram_valid_loss'] - STALL_MARGIN:.3f} counts as stalled).", ""]
    lines += [_machines_line(result["runs"]), ""]
    for fam in spec.families.values():
        lines += _family_lines(fam, [c for c in result["cells"] if c["family"] == fam.name])
    lines += _wall_clock_lines(result["equal_wall_clock"]) + _verdict_lines(result["verdict"])
    return "\n".join(lines)


def _family_lines(fam, cells: list[dict]) -> list[str]:
    """One family's section: best-lr table, lr sweep, runs that did not train."""
    lines = [f"## Family {fam.name} ({fam.tokens / 1e6:.1f}M tokens per run)", "",
             "Final valid MLM loss at each cell's best lr: mean ± std over seeds (n), best lr.", "",
             "| shape | " + " | ".join(fam.schemes) + " |", "|---|" + "---|" * len(fam.schemes)]
    for shape in fam.shapes:
        row = []
        for scheme in fam.schemes:
            c = _cell(cells, fam.name, shape, scheme)
            lr = f", lr {c['best_lr']:g}" if c["best_lr"] is not None else ""
            row.append(f"{_fmt(c['mean'], c['std'])} ({c['n']}{lr})" if c["n"] else "—")
        lines.append(f"| {shape} | " + " | ".join(row) + " |")
    swept = [c for c in cells if c["lr_sweep"]]
    if not swept:
        return lines + ["", "No runs yet.", ""]
    lrs = sorted({float(lr) for c in swept for lr in c["lr_sweep"]})
    lines += ["", f"Learning-rate sweep (seed {fam.search_seed}):", "",
              "| shape | scheme | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
              "|---|---|" + "---|" * len(lrs)]
    for c in swept:
        values = [_fmt(c["lr_sweep"].get(f"{lr:g}")) for lr in lrs]
        lines.append(f"| {c['shape']} | {c['scheme']} | " + " | ".join(values) + " |")
    bad = [c for c in cells if c["nonfinite"] or c["failed"] or c["stalled"]]
    if bad:
        lines += ["", "Runs that did not train (stalled: ended above the stall line):", "",
                  "| shape | scheme | runs | stalled | non-finite | failed |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['shape']} | {c['scheme']} | {c['runs']} | {c['stalled']} | {c['nonfinite']} | "
                  f"{c['failed']} |" for c in bad]
    return lines + [""]


def _wall_clock_lines(wall: list[dict]) -> list[str]:
    if not wall:
        return []
    lines = ["## Equal wall-clock", "", "Valid loss each shape had reached when the shallowest shape's "
             "runs ended (best lr, mean over seeds).", ""]
    for row in wall:
        shapes = " / ".join(f"{k} {_fmt(v)}" for k, v in row["loss"].items())
        lines.append(f"- {row['family']} {row['scheme']} at {row['seconds']:g} s: {shapes}")
    return lines + [""]


def _verdict_lines(v: dict | None) -> list[str]:
    """The two rules, each with its per-shape (or per-pair) evidence."""
    if not v:
        return []
    lines = ["## Verdict", "", f"Method {v['method']}; baselines {', '.join(v['baselines'])}; "
             f"broken {v['broken']}; families {', '.join(v['families'])}.", ""]
    for name, key in (("DSLM enables depth", "enables_depth"), ("Deeper is better", "deeper_is_better")):
        state = {None: "incomplete", True: "holds", False: "does not hold"}[v[key]]
        lines.append(f"- **{name}**: {state}")
    for d in v["depth_rule"]:
        if d.get("status") == "incomplete":
            lines.append(f"  - {d['family']} {d['shape']}: incomplete")
        else:
            lines.append(f"  - {d['family']} {d['shape']}: {v['method']} {_fmt(d['method'], d['method_std'])}, "
                         f"best baseline {d['best_baseline']} {_fmt(d['baseline'], d['baseline_std'])}, "
                         f"{v['broken']} {_fmt(d['broken'])}: within/better {d['within_or_better']}, "
                         f"broken clearly worse {d['broken_clearly_worse']}")
    for d in v["deeper_rule"]:
        if d.get("status") == "incomplete":
            lines.append(f"  - {d['family']} {' -> '.join(d['pair'])}: incomplete")
        else:
            lines.append(f"  - {d['family']} {' -> '.join(d['pair'])}: drop {_fmt(d['mean_drop'], d['std_drop'])} "
                         f"over {d['paired_seeds']} paired seeds: {'holds' if d['holds'] else 'does not hold'}")
    return lines + [""]
