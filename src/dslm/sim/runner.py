"""Run component simulations over a grid: group configurations by shape, batch each group into
memory-bounded chunks (one kernel launch per chunk), keep every measurement on the device until the
component finishes, then compare with the theory and report percentiles.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dslm.errors import ConfigError, UsageError
from dslm.sim.components import CAUSAL, COMPONENTS, Component
from dslm.sim.estimators import percentiles, relative_error

# cuBLAS needs a fixed workspace for deterministic results (must be set before its first use).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# What each axis means and which values it may take.
AXIS_KINDS = {
    "mu": "real", "s": "positive", "g": "positive", "s_w": "positive", "s_v": "positive",
    "s_q": "positive", "r": "corr", "r_g": "corr", "p": "prob",
    "d_in": "size", "d_out": "size", "d": "size", "d_h": "size", "L": "tokens", "samples": "tokens",
}
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
GRIDS = ("quick", "paper")
FUSED_MODES = ("auto", "on", "off")


def _check_value(component: str, axis: str, v):
    kind = AXIS_KINDS[axis]
    where = f"grid for {component}: axis {axis!r} value {v!r}"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UsageError(f"{where} is not a finite number")
    if kind == "positive" and v <= 0:
        raise UsageError(f"{where} must be > 0")
    if kind == "corr" and not 0 <= v < 1:
        raise UsageError(f"{where} must be a correlation in [0, 1)")
    if kind == "prob" and not 0 <= v < 1:
        raise UsageError(f"{where} must be a probability in [0, 1)")
    if kind in ("size", "tokens"):
        if float(v) != int(v) or v < (2 if kind == "tokens" else 1):
            raise UsageError(f"{where} must be an integer >= {2 if kind == 'tokens' else 1}")
        if component == "layernorm" and axis == "d" and v < 2:
            raise UsageError(f"{where} must be >= 2 (LayerNorm over one feature is constant)")


def resolve_grid(component: Component, spec) -> dict:
    """The grid to run: ``"paper"``, ``"quick"`` or a dict of axis -> values overriding the paper
    grid. Values are validated; size axes become ints."""
    if spec == "paper":
        grid = dict(component.paper)
    elif spec == "quick":
        grid = dict(component.quick)
    else:
        if not isinstance(spec, dict):
            raise UsageError(f"grid for {component.name} must be an object of axis -> list of values")
        unknown = sorted(set(spec) - set(component.axes))
        if unknown:
            raise UsageError(f"grid for {component.name}: unknown axis {unknown[0]!r}; "
                             f"axes are {', '.join(component.axes)}")
        grid = dict(component.paper)
        for axis, values in spec.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"grid for {component.name}: axis {axis!r} must be a non-empty list")
            grid[axis] = values
    out = {}
    for axis, values in grid.items():
        for v in values:
            _check_value(component.name, axis, v)
        kind = AXIS_KINDS[axis]
        out[axis] = [int(v) for v in values] if kind in ("size", "tokens") else [float(v) for v in values]
    return out


def load_grid_file(path: str | Path) -> dict:
    """Read a JSON grid file: {component: {axis: [values]}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"grid file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"grid file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"grid file {path} must be a JSON object of component -> {{axis: [values]}}")
    unknown = sorted(set(data) - set(COMPONENTS))
    if unknown:
        raise UsageError(f"grid file {path}: unknown component {unknown[0]!r}; "
                         f"components are {', '.join(COMPONENTS)}")
    return data


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (shown to leave the percentiles unchanged, see README), fp32 on the
    CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_fused(mode: str, device: torch.device) -> bool:
    """Whether LayerNorm and dropout run as fused Triton kernels (:mod:`dslm.sim.fused`).
    ``auto``: on CUDA when Triton is installed (it ships with PyTorch's CUDA wheels); ``on``
    insists (CUDA and Triton required); ``off``: the PyTorch path everywhere."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False                # decided without importing Triton (a second of CPU start-up)
    if device.type != "cuda":
        raise ConfigError("{fused} on needs {device} cuda (the fused kernels are Triton GPU kernels)")
    try:
        import triton  # noqa: F401
    except Exception:               # not installed, or an install that does not import
        if mode == "auto":
            return False
        raise ConfigError("{fused} on needs the triton package (pip install triton)") from None
    return True


@contextlib.contextmanager
def _kernel_settings(component: Component, precision: str):
    """TF32 matmuls where asked (matmul components only), and deterministic kernels (attention
    backward without atomics) so a seed fixes the result. Deterministic mode would also fill every
    new tensor with NaN, a wasted pass over memory: we always write before reading, so it is off."""
    import torch.utils.deterministic as det

    prev = (torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
            det.fill_uninitialized_memory)
    torch.backends.cuda.matmul.allow_tf32 = component.uses_matmul and precision == "tf32"
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev[0]
        torch.use_deterministic_algorithms(prev[1])
        det.fill_uninitialized_memory = prev[2]


def default_budget_bytes(device: torch.device) -> int:
    """Memory one chunk may use. Fixed per device type (not read from free memory) so that the
    chunking, and hence the random stream, is the same on every machine of that type."""
    return (16 if device.type == "cuda" else 3) * 2 ** 30


def warm_up(names, device: torch.device, precision: str, fused: bool = False, causal: bool = False) -> float:
    """Start the GPU libraries before any component is timed: one configuration of each named
    component (the first value of every paper axis) runs untimed, which creates the CUDA context
    and the cuBLAS / cuSOLVER / cuRAND handles and loads the kernels that configuration uses
    (~6-7 s on an H100, once per process); kernels for other shapes (another head size, sha's
    direct path) still load lazily inside the timed runs, milliseconds each. With ``fused``, the
    Triton kernels are compiled here too, one per row width of the paper grids (a compiled kernel
    is cached on disk, so later processes load it). Returns its seconds (0 on a CPU, where
    nothing is done).
    :func:`run_component` reseeds, so the results do not depend on it. ``causal``: the components'
    causal forms (:data:`CAUSAL`)."""
    if device.type != "cuda":
        return 0.0
    start = time.perf_counter()
    for name in names:
        comp = (CAUSAL if causal else COMPONENTS)[name]
        first = {axis: values[:1] for axis, values in comp.paper.items()}
        if fused and comp.fused is not None:      # one config per row width: one Triton compile each
            first["d"] = comp.paper["d"]
        run_component(comp, resolve_grid(comp, first), device, precision, progress=False, fused=fused)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_component(component: Component, grid: dict, device: torch.device, precision: str = "fp32",
                  seed: int = 0, budget_bytes: int | None = None, progress: bool = True,
                  fused: bool = False) -> dict:
    """Simulate every configuration of ``grid`` and compare with the theory. Returns the result
    record (grid, configs, seconds, percentile table and per-config columns). ``fused``: run a
    component that has a fused Triton kernel through it (:func:`resolve_fused`); rows wider than
    the kernel's register block take the PyTorch path."""
    axes = list(grid)
    configs = list(itertools.product(*grid.values()))
    columns = {a: np.array([c[i] for c in configs]) for i, a in enumerate(axes)}
    torch.manual_seed(seed * 1009 + list(COMPONENTS).index(component.name))
    start = time.perf_counter()
    measured, ran_fused = _simulate_grid(component, configs, axes, columns, device, precision,
                                         budget_bytes or default_budget_bytes(device), progress, fused)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    predicted = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (len(configs),))
                 for k, v in component.predict({a: columns[a].astype(np.float64) for a in axes}).items()}
    errors = {row.label: relative_error(measured[row.measured], predicted[row.predicted],
                                        predicted[row.scale] if row.scale else None)
              for row in component.rows}
    return {
        "component": component.name,
        "grid": grid,
        "configs": len(configs),
        "seconds": seconds,
        "fused": ran_fused,
        "causal": component.causal,
        "percentiles": {label: percentiles(e) for label, e in errors.items()},
        "columns": {
            "params": {a: columns[a].tolist() for a in axes},
            "measured": {k: _finite_list(v) for k, v in measured.items()},
            "predicted": {k: _finite_list(v) for k, v in predicted.items()},
            "errors": {k: _finite_list(v) for k, v in errors.items()},
        },
    }


def _simulate_grid(component: Component, configs: list, axes: list, columns: dict, device,
                   precision: str, budget: int, progress: bool, fused: bool) -> tuple[dict, bool]:
    """The measured columns of every configuration (in ``configs``' order), and whether the fused
    kernel ran. Configurations that share the component's shape axes run together, in chunks that
    fit ``budget`` bytes."""
    scalar_axes = [a for a in axes if a not in component.shape_axes]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(tuple(c[axes.index(a)] for a in component.shape_axes), []).append(i)
    dtype = torch.bfloat16 if component.uses_matmul and precision == "bf16" else torch.float32
    order, chunks, ran_fused = [], [], False
    bar = tqdm(total=len(configs), desc=f"{component.name:9s}", unit="cfg", disable=not progress, leave=False)
    for key, idx in groups.items():
        S = dict(zip(component.shape_axes, key))
        simulate, floats = component.simulate, component.floats_per_config
        if fused and component.fused is not None:
            from dslm.sim import fused as kernels      # needs triton: imported only when asked for

            if kernels.fits(S["d"]):
                simulate, floats, ran_fused = component.fused, kernels.floats_per_config, True
        per_chunk = max(1, int(budget // (4 * floats(S))))
        for s in range(0, len(idx), per_chunk):
            sel = idx[s:s + per_chunk]
            with _kernel_settings(component, precision):
                out = simulate({a: columns[a][sel] for a in scalar_axes}, S, device, dtype)
            order.extend(sel)
            chunks.append({k: v.detach().double() for k, v in out.items()})
            bar.update(len(sel))
    bar.close()
    inverse = np.argsort(np.asarray(order))
    return {k: torch.cat([c[k] for c in chunks]).cpu().numpy()[inverse] for k in chunks[0]}, ran_fused


def _finite_list(a) -> list:
    """JSON-safe list: NaN/inf become null."""
    return [float(x) if math.isfinite(x) else None for x in np.asarray(a, dtype=np.float64)]


def format_report(result: dict) -> str:
    """The reference's layout: one line per row, ``Error x var:  [p50, p90, p99]`` in %."""
    name = result["component"] + (" (causal)" if result.get("causal") else "")
    lines = [f"== {name}: {result['configs']} configs, {result['seconds']:.1f} s =="]
    width = max(len(k) for k in result["percentiles"])
    for label, (p50, p90, p99) in result["percentiles"].items():
        lines.append(f"Error {label + ':':{width + 1}s} [{p50:.1f}, {p90:.1f}, {p99:.1f}]")
    return "\n".join(lines)
