"""The seven component simulations of THEORY.md section 4: what each samples and measures, how
:mod:`dslm.theory` predicts it, its paper and quick grids, and the rows of its report.

A simulation function receives a chunk of configurations that share their integer/shape axes
(``S``: name -> value) and differ in their scalar axes (``P``: name -> host array of shape (C,)), and
the dtype in which to sample (bfloat16 for the matmul components under ``--precision bf16``, where
every tensor is drawn in bf16 so no cast pass is needed; float32 otherwise); it returns measured
moments as (C,) tensors, accumulated in fp32 or better. The backward pass is the vector-Jacobian product with a
sampled upstream gradient G, i.e. the gradient of ``sum(out * G)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dslm import theory
from dslm.sim.estimators import (equicorrelated, mean_var, offdiag_cov, scaled_normal,
                                 token_moments)

THIRDS = [0.0, 1 / 3, 2 / 3]
FIFTHS = [0.0, 0.2, 0.4, 0.6, 0.8]
STD3 = [10 ** -0.5, 1.0, 10 ** 0.5]              # logspace(-0.5, 0.5, 3)
SIZES3 = [100, 316, 1000]                           # logspace(2, 3, 3) as int


@dataclass(frozen=True)
class Row:
    """One line of the report: the error of ``measured`` against ``predicted``; ``scale`` (a
    predicted key) is the natural scale v of THEORY.md section 4, or None for a plain relative
    error."""

    label: str
    measured: str
    predicted: str
    scale: str | None = None


@dataclass(frozen=True)
class Component:
    """A component simulation: grids, simulator, predictor and report rows."""

    name: str
    shape_axes: tuple[str, ...]        # axes that fix tensor shapes (configs are grouped by them)
    paper: dict                        # THEORY.md section 4 grid, axis -> values, in product order
    quick: dict                        # reduced grid for the CPU (<= 60 s for all seven)
    simulate: Callable                 # (P, S, device, dtype) -> {measured: (C,) tensor}
    predict: Callable                  # {axis: np.ndarray} -> {predicted: np.ndarray}
    rows: tuple[Row, ...]
    floats_per_config: Callable        # S -> peak number of float32 values one config needs
    uses_matmul: bool = False          # precision flag applies: tf32 matmuls, or bf16 tensors

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.paper)


# ------------------------------------------------------------------------------ shared pieces


def _upstream_gradient(shape, P, device, dtype):
    """G: mean 0, std g, cross-token correlation r_g (along the token axis 2)."""
    return equicorrelated(shape, np.zeros_like(P["g"]), P["g"], P["r_g"], device=device, dtype=dtype)


def _measure(y, gx, shift: bool = False) -> dict:
    """Forward mean, variance and cross-token covariance; the same for the input gradient.

    ``shift``: subtract a data-driven constant (the first token's mean) before the fused
    reductions, for outputs whose mean dwarfs their spread (dropout of a mean-10 input); the
    moments are shift-invariant, so this only protects fp32 accuracy."""
    c = None
    if shift:
        c = y[:, :, :1].mean(dim=tuple(range(1, y.ndim)), keepdim=True, dtype=torch.float32)
        y = y - c
    mean, var, cov = token_moments(y)
    if c is not None:
        mean = mean + c.reshape(-1).double()
    _, gvar, gcov = token_moments(gx)
    return {"mean": mean, "var": var, "cov": cov, "grad_var": gvar, "grad_cov": gcov}


def _vjp(fn, x, G_shape, P, device):
    """Run ``fn`` on x (requires grad) and return (out, d sum(out * G) / dx)."""
    x.requires_grad_(True)
    y = fn(x)
    G = _upstream_gradient(G_shape, P, device, y.dtype)
    (gx,) = torch.autograd.grad(y, x, G)
    return y, gx


def _moments_dict(m: theory.Moments, prefix: str = "") -> dict:
    return {f"{prefix}mean": m.mean, f"{prefix}var": m.var, f"{prefix}cov": m.cov,
            f"{prefix}grad_var": m.grad_var, f"{prefix}grad_cov": m.grad_cov}


STANDARD_ROWS = (
    Row("x mean", "mean", "mean", "var"),
    Row("x var", "var", "var"),
    Row("g var", "grad_var", "grad_var"),
    Row("x cov", "cov", "cov", "var"),
    Row("g cov", "grad_cov", "grad_cov", "grad_var"),
)

# ------------------------------------------------------------------------------ linear


def _sim_linear(P, S, device, dtype):
    C, R, L, din, dout = len(P["mu"]), S["samples"], S["L"], S["d_in"], S["d_out"]
    x = equicorrelated((C, R, L, din), P["mu"], P["s"], P["r"], device=device, dtype=dtype)
    W = scaled_normal((C, R, din, dout), P["s_w"] / math.sqrt(din), device=device, dtype=dtype)
    y, gx = _vjp(lambda t: torch.matmul(t, W), x, (C, R, L, dout), P, device)
    return _measure(y, gx)


def _pred_linear(A):
    sw2 = A["s_w"] ** 2 / A["d_in"]
    return _moments_dict(theory.linear(A["mu"], A["s"] ** 2, A["r"], A["d_in"], A["d_out"], sw2,
                                       A["g"] ** 2, A["r_g"]))


LINEAR = Component(
    name="linear",
    shape_axes=("d_in", "d_out", "L", "samples"),
    paper={"mu": [0.1, 1.0, 10.0], "s": STD3, "r": THIRDS, "s_w": [0.1, 1.0, 10.0], "g": STD3,
           "r_g": THIRDS, "d_in": SIZES3, "d_out": SIZES3, "L": [100, 1000], "samples": [100]},
    quick={"mu": [0.1, 10.0], "s": [10 ** -0.5, 10 ** 0.5], "r": [0.0, 2 / 3], "s_w": [0.1, 10.0],
           "g": [1.0], "r_g": [0.0, 2 / 3], "d_in": [100], "d_out": [100], "L": [100], "samples": [100]},
    simulate=_sim_linear,
    predict=_pred_linear,
    rows=STANDARD_ROWS,
    floats_per_config=lambda S: S["samples"] * (S["L"] * (5 * S["d_in"] + 5 * S["d_out"]) + S["d_in"] * S["d_out"]),
    uses_matmul=True,
)

# ------------------------------------------------------------------------------ relu / gelu


def _pointwise_sim(fn):
    def sim(P, S, device, dtype):
        C, R, L, d = len(P["s"]), S["samples"], S["L"], S["d"]
        x = equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device)
        y, gx = _vjp(fn, x, (C, R, L, d), P, device)
        return _measure(y, gx)
    return sim


def _pred_relu(A):
    return _moments_dict(theory.relu(A["s"] ** 2, A["r"], A["g"] ** 2, A["r_g"]))


def _pred_gelu(A):
    return _moments_dict(theory.gelu(A["s"] ** 2, A["r"], A["g"] ** 2, A["r_g"]))


def _activation_grid(samples: int) -> dict:
    return {"mu": [0.0], "s": STD3, "r": FIFTHS, "g": STD3, "r_g": FIFTHS, "d": [1],
            "L": [100, 1000], "samples": [samples]}


def _activation_quick(samples: int) -> dict:
    return {"mu": [0.0], "s": STD3, "r": [0.0, 0.4, 0.8], "g": [1.0], "r_g": [0.0, 0.4, 0.8],
            "d": [1], "L": [100], "samples": [samples]}


def _pointwise_floats(S):
    return 8 * S["samples"] * S["L"] * S["d"]


RELU = Component("relu", ("d", "L", "samples"), _activation_grid(10_000), _activation_quick(10_000),
                 _pointwise_sim(F.relu), _pred_relu, STANDARD_ROWS, _pointwise_floats)
GELU = Component("gelu", ("d", "L", "samples"), _activation_grid(100_000), _activation_quick(50_000),
                 _pointwise_sim(lambda t: F.gelu(t, approximate="none")), _pred_gelu, STANDARD_ROWS,
                 _pointwise_floats)

# ------------------------------------------------------------------------------ layernorm


def _sim_layernorm(P, S, device, dtype):
    C, R, L, d = len(P["s"]), S["samples"], S["L"], S["d"]
    x = equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device)
    y, gx = _vjp(lambda t: F.layer_norm(t, (d,)), x, (C, R, L, d), P, device)
    out = _measure(y, gx)
    out["feature_cov"] = offdiag_cov(y, 3)
    return out


def _pred_layernorm(A):
    s2, g2 = A["s"] ** 2, A["g"] ** 2
    out = _moments_dict(theory.layernorm(s2, A["r"], A["d"], g2, A["r_g"], corr_mode="delta"))
    out["cov_reference"] = theory.layernorm_corr(A["r"], A["d"], "reference")
    out["feature_cov"] = theory.layernorm_feature_cov(A["d"])
    return out


LAYERNORM = Component(
    name="layernorm",
    shape_axes=("d", "L", "samples"),
    paper={"mu": [-10.0, -10 / 3, 10 / 3], "s": STD3, "r": FIFTHS, "g": STD3, "r_g": FIFTHS,
           "d": SIZES3, "L": [100, 1000], "samples": [100]},
    quick={"mu": [-10 / 3, 10 / 3], "s": STD3, "r": [0.0, 0.4, 0.8], "g": [1.0], "r_g": [0.0, 0.4, 0.8],
           "d": [100], "L": [100], "samples": [100]},
    simulate=_sim_layernorm,
    predict=_pred_layernorm,
    rows=STANDARD_ROWS[:3] + (
        Row("x cov (reference r(1-1/d))", "cov", "cov_reference", "var"),
        Row("x cov (ours, delta method)", "cov", "cov", "var"),
        Row("feature cov", "feature_cov", "feature_cov", "var"),
        Row("g cov", "grad_cov", "grad_cov", "grad_var"),
    ),
    floats_per_config=lambda S: 10 * S["samples"] * S["L"] * S["d"],
)

# ------------------------------------------------------------------------------ dropout


def _sim_dropout(P, S, device, dtype):
    C, R, L, d, p = len(P["s"]), S["samples"], S["L"], S["d"], S["p"]
    x = equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device)
    y, gx = _vjp(lambda t: F.dropout(t, p=p, training=True), x, (C, R, L, d), P, device)
    return _measure(y, gx, shift=True)


def _pred_dropout(A):
    return _moments_dict(theory.dropout(A["mu"], A["s"] ** 2, A["r"], A["p"], A["g"] ** 2, A["r_g"]))


DROPOUT = Component(
    name="dropout",
    shape_axes=("p", "d", "L", "samples"),
    paper={"mu": [-10.0, 0.0, 10.0], "s": STD3, "r": THIRDS, "g": STD3, "r_g": THIRDS, "p": THIRDS,
           "d": SIZES3, "L": [100, 1000], "samples": [100]},
    quick={"mu": [-10.0, 0.0, 10.0], "s": [10 ** -0.5, 10 ** 0.5], "r": [0.0, 2 / 3], "g": [1.0],
           "r_g": [0.0, 2 / 3], "p": THIRDS, "d": [100], "L": [100], "samples": [100]},
    simulate=_sim_dropout,
    predict=_pred_dropout,
    rows=STANDARD_ROWS,
    floats_per_config=lambda S: 10 * S["samples"] * S["L"] * S["d"],
)

# ------------------------------------------------------------------------------ softmax


def _sim_softmax(P, S, device, dtype):
    C, B, L = len(P["s"]), S["samples"], S["L"]
    x = equicorrelated((C, B, L), np.zeros_like(P["s"]), P["s"], P["r"], token_dim=2, device=device)
    x.requires_grad_(True)
    y = torch.softmax(x, dim=-1)
    G = scaled_normal((C, B, L), P["g"], device=device)  # r_g = 0
    (gx,) = torch.autograd.grad(y, x, G)
    mean, var = mean_var(y)
    _, gvar = mean_var(gx)
    return {"mean": mean, "var": var, "grad_var": gvar}


def _pred_softmax(A):
    s2, g2, L = A["s"] ** 2, A["g"] ** 2, A["L"]
    out = {}
    for variant in theory.components.SOFTMAX_VARIANTS:
        m = theory.softmax(s2, A["r"], L, g2, variant)
        out["mean"] = m.mean
        out[f"var_{variant}"] = m.var
        out[f"grad_var_{variant}"] = m.grad_var
    return out


SOFTMAX = Component(
    name="softmax",
    shape_axes=("L", "samples"),
    paper={"s": [0.01, 10 ** -1.5, 0.1, 10 ** -0.5, 1.0], "r": FIFTHS,
           "g": list(np.logspace(-0.5, 0.5, 5)), "r_g": [0.0], "L": [300, 720, 1732, 4161, 10000],
           "samples": [10_000]},
    quick={"s": [0.01, 0.1, 1.0], "r": [0.0, 0.4, 0.8], "g": [1.0], "r_g": [0.0], "L": [300, 1732],
           "samples": [10_000]},
    simulate=_sim_softmax,
    predict=_pred_softmax,
    rows=(
        Row("x mean", "mean", "mean"),
        Row("x var full", "var", "var_full"),
        Row("x var approx", "var", "var_approx"),
        Row("x var full (corrected exponent)", "var", "var_full_corrected"),
        Row("g var full", "grad_var", "grad_var_full"),
        Row("g var approx", "grad_var", "grad_var_approx"),
        Row("g var full (corrected exponent)", "grad_var", "grad_var_full_corrected"),
    ),
    floats_per_config=lambda S: 8 * S["samples"] * S["L"],
)

# ------------------------------------------------------------------------------ single-head attention


def _sim_sha(P, S, device, dtype):
    C, R, L, d, dh, p = len(P["s"]), S["samples"], S["L"], S["d"], S["d_h"], S["p"]
    x = equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device, dtype=dtype)
    W = torch.empty(C, d, 3, dh, device=device, dtype=dtype)
    for c in range(C):                                   # Q, K (s_k = s_q) and V, scaled in fp32
        for j, std in enumerate((P["s_q"][c], P["s_q"][c], P["s_v"][c])):
            W[c, :, j].normal_(0.0, float(std) / math.sqrt(d))
    W = W.reshape(C, d, 3 * dh)

    def attention(t):
        qkv = torch.bmm(t.reshape(C, R * L, d), W).reshape(C, R, L, 3, dh)
        q, k, v = qkv.unbind(dim=3)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    y, gx = _vjp(attention, x, (C, R, L, dh), P, device)
    return _measure(y, gx)


def _pred_sha(A):
    d = A["d"]
    s_q = A["s_q"] / np.sqrt(d)
    return _moments_dict(theory.attention_head(A["s"] ** 2, A["r"], d, A["d_h"], A["L"], s_q, s_q,
                                               A["s_v"] / np.sqrt(d), A["p"], A["g"] ** 2, A["r_g"]))


SHA = Component(
    name="sha",
    shape_axes=("p", "d", "d_h", "L", "samples"),
    paper={"mu": [0.0], "s": [1.0], "r": THIRDS, "s_v": STD3, "s_q": [0.1, float(np.sqrt(0.06)), 0.6],
           "p": THIRDS, "g": STD3, "r_g": THIRDS, "d": SIZES3, "d_h": [32, 64, 128, 256],
           "L": [300, 547, 1000], "samples": [64]},
    quick={"mu": [0.0], "s": [1.0], "r": [0.0, 2 / 3], "s_v": [1.0], "s_q": [0.1, 0.6],
           "p": [0.0, 1 / 3], "g": [1.0], "r_g": [0.0, 2 / 3], "d": [100], "d_h": [32],
           "L": [300], "samples": [64]},
    simulate=_sim_sha,
    predict=_pred_sha,
    rows=STANDARD_ROWS[:4] + (Row("g cov", "grad_cov", "grad_cov"),),   # the reference: no scale here
    floats_per_config=lambda S: S["samples"] * S["L"] * (6 * S["d"] + 12 * S["d_h"] + 3 * S["L"]) + 3 * S["d"] * S["d_h"],
    uses_matmul=True,
)

COMPONENTS: dict[str, Component] = {c.name: c for c in (LINEAR, RELU, GELU, LAYERNORM, DROPOUT, SOFTMAX, SHA)}
