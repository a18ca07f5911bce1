"""Benchmark of `dslm simulate`: speed and accuracy on the paper grids (docs/simulate.md).

1. ``--paper``: the paper grids of all seven components at the chosen precision; per-component
   seconds (after the untimed CUDA start-up, which is reported on its own) and percentiles.
2. ``--precision-check``: a subset of the matmul components (linear, sha) at fp32, tf32 and bf16,
   percentiles side by side, to show that reduced-precision matmuls leave them unchanged.
3. ``--reference-style N``: the reference's sampling (a full L x L multivariate normal per
   configuration, x sampled and gx formed for linear and sha, torch.cov for LayerNorm's feature
   covariance, one configuration at a time with a host sync after each) timed on N random
   configurations per component and extrapolated to the paper grid. The token covariances use this
   package's fused sums, so the extrapolation underestimates the reference's own code.
4. ``--determinism``: the same seed twice gives bit-identical measurements (sha, and the fused
   LayerNorm kernel when fused kernels are on).
5. ``--fused-check``: the LayerNorm and dropout paper grids through the fused Triton kernel and
   through the PyTorch path, seconds and percentiles side by side; ``--fused-tune``: the fused
   kernel's seconds on those grids per block size and warp count.
6. ``--profile``: top kernels of the sha and linear paper grids; ``--shapes sha``: seconds per
   (d, d_h, L) group; ``--sha-sdpa``: SDPA backends for
   sha in priority order; ``--components``: a subset for ``--paper``.

Everything lands in one JSON (``--out``); a table is printed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time

import numpy as np
import torch

import dslm.sim.components as comps
from dslm.runtime import resolve_device
from dslm.sim.runner import AXIS_KINDS, FUSED_MODES, resolve_fused, resolve_grid, run_component, warm_up

PRECISION_SUBSET = {
    "linear": {"d_in": [316], "d_out": [316, 1000], "L": [100]},
    "sha": {"d": [316], "d_h": [64], "L": [300, 1000], "g": [1.0]},
}


def paper(device, precision, seed, names=None, fused=False):
    """The paper grids as ``dslm simulate --grid paper`` runs them: CUDA start-up first (untimed
    in the component seconds, reported on its own), then every component once."""
    names = [n for n in comps.COMPONENTS if not names or n in names]
    startup = warm_up(names, device, precision, fused)
    print(f"CUDA start-up {startup:.2f} s (fused kernels {'on' if fused else 'off'})", flush=True)
    out = {}
    for name in names:
        comp = comps.COMPONENTS[name]
        res = run_component(comp, resolve_grid(comp, "paper"), device, precision, seed, progress=False,
                            fused=fused)
        out[name] = {"seconds": res["seconds"], "configs": res["configs"], "percentiles": res["percentiles"]}
        print(f"paper {name:9s} {res['configs']:6d} configs {res['seconds']:7.2f} s", flush=True)
    total = sum(v["seconds"] for v in out.values())
    print(f"paper total {total:.2f} s ({precision})", flush=True)
    return {"precision": precision, "fused": fused, "total_seconds": total, "startup_seconds": startup,
            "components": out}


def fused_check(device, seed):
    """LayerNorm and dropout paper grids through the fused kernel and the PyTorch path (each after
    a warm-up), to show that the fused kernel gives the same percentiles."""
    out = {}
    for name in ("layernorm", "dropout"):
        comp = comps.COMPONENTS[name]
        out[name] = {}
        for fused in (True, False):
            warm_up([name], device, "fp32", fused)
            res = run_component(comp, resolve_grid(comp, "paper"), device, "fp32", seed, progress=False,
                                fused=fused)
            label = "fused" if fused else "pytorch"
            out[name][label] = {"seconds": res["seconds"], "percentiles": res["percentiles"]}
            rows = "  ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in res["percentiles"].items())
            print(f"fused-check {name} {label}: {res['seconds']:.2f} s  {rows}", flush=True)
    return out


def precision_check(device, seed):
    out = {}
    for name, sub in PRECISION_SUBSET.items():
        comp = comps.COMPONENTS[name]
        grid = resolve_grid(comp, sub)
        out[name] = {}
        for precision in ("fp32", "tf32", "bf16"):
            res = run_component(comp, grid, device, precision, seed, progress=False)
            out[name][precision] = {"seconds": res["seconds"], "configs": res["configs"],
                                    "percentiles": res["percentiles"]}
            rows = "  ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in res["percentiles"].items())
            print(f"precision {name} {precision}: {res['seconds']:.2f} s  {rows}", flush=True)
    return out


# --- the reference's method, for timing --------------------------------------------------------

def _mvn_equicorrelated(shape, mean, std, corr, token_dim=2, device=None, dtype=torch.float32):
    """Reference-style sampler: a full L x L covariance and a MultivariateNormal per call."""
    assert shape[0] == 1
    L = shape[token_dim]
    m, s, r = float(mean[0]), float(std[0]), float(corr[0])
    cov = torch.full((L, L), r * s * s, device=device)
    cov.fill_diagonal_(s * s)
    dist = torch.distributions.MultivariateNormal(torch.full((L,), m, device=device), cov)
    other = [n for i, n in enumerate(shape) if i != token_dim]
    x = dist.sample(tuple(other))                       # (*other, L)
    return x.movedim(-1, token_dim).contiguous().to(dtype)


def _torch_cov_offdiag(y, var_dim):
    """Reference-style estimator: torch.cov over the L x L matrix, then .item()."""
    V = y.shape[var_dim]
    cov = torch.cov(y[0].movedim(var_dim - 1, 0).reshape(V, -1))
    cov.fill_diagonal_(0)
    return torch.tensor([cov.mean().item() * V / (V - 1)], device=y.device)


def _reference_linear(P, S, device, dtype):
    """The reference's linear simulation: x sampled token by token (MVN), y = x W, gx by autograd."""
    C, R, L, din, dout = len(P["mu"]), S["samples"], S["L"], S["d_in"], S["d_out"]
    x = comps.equicorrelated((C, R, L, din), P["mu"], P["s"], P["r"], device=device, dtype=dtype)
    W = comps.scaled_normal((C, R, din, dout), P["s_w"] / np.sqrt(din), device=device, dtype=dtype)
    y, gx = comps._vjp(lambda t: torch.matmul(t, W), x, (C, R, L, dout), P, device)
    return comps._measure(y, gx)


def _reference_layernorm(P, S, device, dtype):
    """The reference's LayerNorm simulation: MVN inputs, the feature covariance by torch.cov."""
    import torch.nn.functional as F

    C, R, L, d = len(P["s"]), S["samples"], S["L"], S["d"]
    x = comps.equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device)
    y, gx = comps._vjp(lambda t: F.layer_norm(t, (d,)), x, (C, R, L, d), P, device)
    out = comps._measure(y, gx)
    out["feature_cov"] = _torch_cov_offdiag(y, 3)
    return out


def reference_components():
    """The components with the reference's sampling: linear as above, sha on its direct path (x
    sampled and gx formed), the others unchanged (their samplers are patched below)."""
    import dataclasses
    import functools

    out = dict(comps.COMPONENTS)
    out["linear"] = dataclasses.replace(out["linear"], simulate=_reference_linear)
    out["sha"] = dataclasses.replace(out["sha"], simulate=functools.partial(comps._sim_sha, projected=False))
    out["layernorm"] = dataclasses.replace(out["layernorm"], simulate=_reference_layernorm)
    return out


def reference_style(device, n_per_component, seed):
    rng = random.Random(seed)
    fast = comps.equicorrelated
    comps.equicorrelated = _mvn_equicorrelated
    out = {}
    try:
        for name, comp in reference_components().items():
            grid = resolve_grid(comp, "paper")
            import itertools
            configs = list(itertools.product(*grid.values()))
            sample = rng.sample(configs, min(n_per_component, len(configs)))
            start = time.perf_counter()
            for c in sample:
                one = {a: [v] for a, v in zip(grid, c)}
                res = run_component(comp, one, device, "fp32", seed, progress=False, budget_bytes=1)
                _ = res["percentiles"]
            per = (time.perf_counter() - start) / len(sample)
            out[name] = {"seconds_per_config": per, "configs": len(configs),
                         "extrapolated_seconds": per * len(configs), "sampled": len(sample)}
            print(f"reference-style {name:9s} {per * 1e3:8.1f} ms/config -> {per * len(configs):8.1f} s "
                  f"for {len(configs)} configs", flush=True)
    finally:
        comps.equicorrelated = fast
    total = sum(v["extrapolated_seconds"] for v in out.values())
    print(f"reference-style total (extrapolated) {total:.1f} s", flush=True)
    return {"total_extrapolated_seconds": total, "components": out}


def fused_tune(device, seed, variants=((512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4))):
    """Seconds of the fused LayerNorm and dropout paper grids per (elements per block, warps)."""
    from dslm.sim import fused as kernels

    defaults = kernels.ELEMENTS_PER_BLOCK, kernels.NUM_WARPS
    out = {}
    try:
        for elements, warps in variants:
            kernels.ELEMENTS_PER_BLOCK, kernels.NUM_WARPS = elements, warps
            warm_up(["layernorm", "dropout"], device, "fp32", True)
            key = f"{elements} elements, {warps} warps"
            out[key] = {name: run_component(comps.COMPONENTS[name], resolve_grid(comps.COMPONENTS[name], "paper"),
                                            device, "fp32", seed, progress=False, fused=True)["seconds"]
                        for name in ("layernorm", "dropout")}
            print(f"fused-tune {key}: " + "  ".join(f"{k} {v:.3f} s" for k, v in out[key].items()), flush=True)
    finally:
        kernels.ELEMENTS_PER_BLOCK, kernels.NUM_WARPS = defaults
    return out


def determinism(device, seed, fused=False):
    subsets = {"sha": {"d": [100], "d_h": [32], "L": [300], "r_g": [0.0]}}
    if fused:
        subsets["layernorm"] = {"d": [316], "L": [1000]}
    out = {}
    for name, sub in subsets.items():
        comp = comps.COMPONENTS[name]
        grid = resolve_grid(comp, sub)
        a, b = (run_component(comp, grid, device, "bf16", seed, progress=False, fused=fused) for _ in range(2))
        out[name] = all(np.array_equal(np.array(a["columns"]["measured"][k], dtype=float),
                                       np.array(b["columns"]["measured"][k], dtype=float))
                        for k in a["columns"]["measured"])
        print(f"determinism ({name} subset, twice, seed {seed}): identical = {out[name]}", flush=True)
    return {"identical": all(out.values()), "components": out}


def profile(device, seed, components=("sha", "linear")):
    """Top kernels of each component's whole paper grid (where the paper-grid time goes), after a
    warm-up on one small subset so that CUDA start-up is not in the table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in components:
        comp = comps.COMPONENTS[name]
        first = {axis: values[:1] for axis, values in comp.paper.items()}
        run_component(comp, resolve_grid(comp, first), device, "bf16", seed, progress=False)   # warm-up
        with torch_profile(activities=acts) as prof:
            res = run_component(comp, resolve_grid(comp, "paper"), device, "bf16", seed, progress=False)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile {name}: {res['configs']} configs {res['seconds']:.2f} s (under the profiler)", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90), flush=True)


def shapes(device, seed, name="sha"):
    """Seconds of one component's paper grid per combination of its size axes (sha: d, d_h, L;
    every other axis at all its paper values): where the time goes (for sha it grows with
    d_h L^2, the attention kernels' work)."""
    comp = comps.COMPONENTS[name]
    warm_up([name], device, "bf16")
    sizes = [a for a in comp.shape_axes if AXIS_KINDS[a] in ("size", "tokens") and a != "samples"]
    out = {}
    for key in itertools.product(*(comp.paper[a] for a in sizes)):
        sub = dict(zip(sizes, ([v] for v in key)))
        res = run_component(comp, resolve_grid(comp, sub), device, "bf16", seed, progress=False)
        out[" ".join(f"{a} {v[0]}" for a, v in sub.items())] = res["seconds"]
        print(f"shapes {name} {list(out)[-1]}: {res['seconds']:.3f} s", flush=True)
    print(f"shapes {name} total {sum(out.values()):.2f} s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", help="precision of the --paper run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper", action="store_true")
    p.add_argument("--components", nargs="+", default=None, help="--paper: only these components")
    p.add_argument("--precision-check", action="store_true")
    p.add_argument("--reference-style", type=int, default=0, metavar="N")
    p.add_argument("--determinism", action="store_true")
    p.add_argument("--fused", choices=FUSED_MODES, default="auto",
                   help="fused Triton kernels for layernorm and dropout (as dslm simulate --fused)")
    p.add_argument("--fused-check", action="store_true")
    p.add_argument("--fused-tune", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shapes", default=None, metavar="COMPONENT", help="seconds per shape group of one component")
    p.add_argument("--sha-sdpa", default=None, metavar="B1,B2",
                   help="SDPA backends for sha in priority order (cudnn_attention, flash_attention, "
                        "efficient_attention, math); default: the package's choice")
    p.add_argument("--out", default="bench_simulate.json")
    args = p.parse_args()
    if args.sha_sdpa:
        comps.SHA_SDPA = tuple(args.sha_sdpa.split(","))
    device = resolve_device(args.device)
    fused = resolve_fused(args.fused, device)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "sha_sdpa": comps.SHA_SDPA, "fused": fused}
    if fused:
        import triton
        record["triton"] = triton.__version__
    print(record, flush=True)
    if args.fused_tune:
        record["fused_tune"] = fused_tune(device, args.seed)
    if args.profile:
        profile(device, args.seed)
    if args.shapes:
        record["shapes"] = shapes(device, args.seed, args.shapes)
    if args.paper:
        record["paper"] = paper(device, args.precision, args.seed, args.components, fused)
    if args.fused_check:
        record["fused_check"] = fused_check(device, args.seed)
    if args.precision_check:
        record["precision_check"] = precision_check(device, args.seed)
    if args.determinism:
        record["determinism"] = determinism(device, args.seed, fused)
    if args.reference_style:
        record["reference_style"] = reference_style(device, args.reference_style, args.seed)
        if "paper" in record:
            record["speedup"] = record["reference_style"]["total_extrapolated_seconds"] / record["paper"]["total_seconds"]
            print(f"speed-up over the reference method: {record['speedup']:.0f}x", flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
