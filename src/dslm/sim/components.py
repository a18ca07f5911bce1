"""The seven component simulations of THEORY.md section 4: what each samples and measures, how
:mod:`dslm.theory` predicts it, its paper and quick grids, and the rows of its report; and the causal
(decoder) forms of softmax and single-head attention (:data:`CAUSAL`, ``dslm simulate --causal``).

A simulation function receives a chunk of configurations that share their integer/shape axes
(``S``: name -> value) and differ in their scalar axes (``P``: name -> host array of shape (C,)), and
the dtype in which to sample (bfloat16 for the matmul components under ``--precision bf16``, where
every tensor is drawn in bf16 so no cast pass is needed; float32 otherwise); it returns measured
moments as (C,) tensors, accumulated in fp32 or better. The backward pass is the vector-Jacobian product with a
sampled upstream gradient G, i.e. the gradient of ``sum(out * G)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dslm import theory
from dslm.sim.estimators import (acc_dtype, device_columns, equicorrelated, mean_var, moments_from_rows,
                                 moments_from_sums, per_config, rotated_equicorrelated, rotated_moments,
                                 row_col_sums, scaled_normal, token_moments)
from dslm.theory import causal as causal_theory

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
    fused: Callable | None = None      # the same simulation as one Triton kernel (dslm.sim.fused)
    causal: bool = False               # the causally masked form (query t sees keys 1..t)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.paper)


# ------------------------------------------------------------------------------ shared pieces


def _upstream_gradient(shape, P, device, dtype):
    """G: mean 0, std g, cross-token correlation r_g (along the token axis 2)."""
    return equicorrelated(shape, np.zeros_like(P["g"]), P["g"], P["r_g"], device=device, dtype=dtype)


def _measure(y, gx, shift: bool = False, feature_cov: bool = False) -> dict:
    """Forward mean, variance and cross-token covariance; the same for the input gradient.

    ``shift``: measure y - c with c a data-driven constant (the first token's mean), for outputs
    whose mean dwarfs their spread (dropout of a mean-10 input); the moments are shift-invariant
    (the mean gets c back), so this only protects fp32 accuracy. ``feature_cov``: also the mean
    off-diagonal covariance between features (LayerNorm), from the same partial sums."""
    c = y[:, :, :1].mean(dim=(1, 2, 3), dtype=torch.float32) if shift else None
    if y.shape[-1] > 1 or feature_cov:
        return _row_moments(row_col_sums(y, c), row_col_sums(gx), c, feature_cov)
    mean, var, cov = token_moments(y if c is None else y - c.view(-1, 1, 1, 1))   # rows of one feature
    _, gvar, gcov = token_moments(gx)
    return {"mean": mean + (0 if c is None else c.double()), "var": var, "cov": cov,
            "grad_var": gvar, "grad_cov": gcov}


def _row_moments(rows_y, rows_gx, shift=None, feature_cov: bool = False) -> dict:
    """The moments of :func:`_measure` from the (s, q, t) partial sums of y - shift and of gx
    (:func:`row_col_sums` or the fused kernel's); ``shift`` a (C,) tensor or None."""
    mean, var, cov = moments_from_rows(*rows_y)
    _, gvar, gcov = moments_from_rows(*rows_gx)
    out = {"mean": mean + (0 if shift is None else shift.double()), "var": var, "cov": cov,
           "grad_var": gvar, "grad_cov": gcov}
    if feature_cov:
        out["feature_cov"] = moments_from_rows(*rows_y, "features")[2]
    return out


def _fused_rows(op_name: str, feature_cov: bool = False, shift_by_mean: bool = False):
    """The fused-kernel simulation of a row-wise component (:func:`dslm.sim.fused.row_sums`):
    the same moments as its PyTorch path, from partial sums written by one Triton kernel."""
    def sim(P, S, device, dtype):
        from dslm.sim import fused

        rows_y, rows_gx = fused.row_sums(getattr(fused, op_name), P, S, device)
        shift = device_columns([P["mu"]], device, torch.float64)[0] if shift_by_mean else None
        return _row_moments(rows_y, rows_gx, shift, feature_cov)
    return sim


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
    """y = x W, gx = G W^T per sample, measured on the token-rotated tensors (exact, see
    :func:`rotated_equicorrelated` and :func:`rotated_moments`): with H orthogonal, first row
    1^T/sqrt(L), H y = (H x) W and H gx = (H G) W^T, and H x, H G are sampled directly as unit
    normals plus a first-row offset. W = sigma_w V with V unit normals; the scales a sigma_w and
    a_g sigma_w are applied to the fp64 sums, never to a bf16 tensor. Per element of the L-sized
    tensors: one write, one matmul read, and two row reductions of the product."""
    C, R, L, din, dout = len(P["mu"]), S["samples"], S["L"], S["d_in"], S["d_out"]
    sigma_w = device_columns([P["s_w"] / math.sqrt(din)], device, torch.float64)[0]
    X, a = rotated_equicorrelated((C, R, L, din), P["mu"], P["s"], P["r"], device, dtype)
    V = torch.empty((C, R, din, dout), device=device, dtype=dtype).normal_()
    mean, var, cov = rotated_moments(torch.matmul(X, V), L, a * sigma_w)
    del X
    G, a_g = rotated_equicorrelated((C, R, L, dout), np.zeros_like(P["g"]), P["g"], P["r_g"], device, dtype)
    _, gvar, gcov = rotated_moments(torch.matmul(G, V.transpose(-1, -2)), L, a_g * sigma_w)
    return {"mean": mean, "var": var, "cov": cov, "grad_var": gvar, "grad_cov": gcov}


def _linear_floats(S):
    """X, V and X V (then G, V and G V^T) with their offset rows, and the fp32 offsets and row
    sums (measured on the CPU: within 1 % of the peak)."""
    R, L, din, dout = S["samples"], S["L"], S["d_in"], S["d_out"]
    return R * (din * dout + (L + 16) * (din + dout))


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
    floats_per_config=_linear_floats,
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
    return _measure(y, gx, feature_cov=True)


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
    fused=_fused_rows("LAYERNORM", feature_cov=True),
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
    fused=_fused_rows("DROPOUT", shift_by_mean=True),
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


# SDPA backends for the attention simulation, in priority order (None: PyTorch's own choice).
SHA_SDPA: tuple[str, ...] | None = None


def _attention_backends():
    """The context that applies :data:`SHA_SDPA` (names of ``torch.nn.attention.SDPBackend``)."""
    import contextlib

    if SHA_SDPA is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name.upper()) for name in SHA_SDPA], set_priority=True)


def _sim_sha(P, S, device, dtype, projected: bool | None = None, causal: bool = False):
    """QKV = x W with one W = [W_q | W_k | W_v] (d x 3 d_h) per config, y = SDPA(q, k, v) with
    dropout, G on y; measures y and the input gradient gx = dQKV W^T. q, k and v are the autograd
    leaves (views of one QKV tensor), so autograd stops at dq, dk, dv and never stacks them.
    ``projected`` (default: 3 d_h < d) picks :func:`_sha_projected`, which never forms the L x d
    input, over :func:`_sha_direct`; both give the same random variable. Neither forms gx: its
    moments come from the Gram matrix of (dq, dk, dv) (:func:`_gram_grad_moments`). ``causal``: SDPA's
    causal mask (query t attends to keys 1..t); the moments are still over all tokens and token pairs."""
    C, R, L, d, dh, p = len(P["s"]), S["samples"], S["L"], S["d"], S["d_h"], S["p"]
    if projected is None:
        projected = 3 * dh < d
    # W: columns N(0, s_q^2/d) for Q and K (s_k = s_q), N(0, s_v^2/d) for V, in fp32
    col_std = device_columns([P["s_q"] / math.sqrt(d), P["s_q"] / math.sqrt(d), P["s_v"] / math.sqrt(d)],
                             device).T.reshape(C, 1, 3, 1)
    W = torch.empty((C, d, 3, dh), device=device).normal_().mul_(col_std).reshape(C, d, 3 * dh)
    qkv, K, w = (_sha_projected if projected else _sha_direct)(P, W, R, L, device, dtype)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv.view(C, R, L, 3, dh).unbind(dim=3))
    with _attention_backends():
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
    G = _upstream_gradient((C, R, L, dh), P, device, y.dtype)
    grads = torch.autograd.grad(y, (q, k, v), G)
    mean, var, cov = token_moments(y.detach())
    _, gvar, gcov = _gram_grad_moments(grads, K, w, d)
    return {"mean": mean, "var": var, "cov": cov, "grad_var": gvar, "grad_cov": gcov}


def _sha_direct(P, W, R, L, device, dtype):
    """QKV = x W with x equicorrelated (L x d per sample) and W rounded once to ``dtype``. On this
    path (3 d_h >= d) x is no wider than QKV, so the shared cross-token part is added to x. Returns
    (QKV, K, w) for :func:`_gram_grad_moments`: K = Wq^T Wq and w = Wq^T 1_d in fp64, Wq the rounded W
    the forward pass used."""
    C, d, k = W.shape
    Wq = W.to(dtype)
    x = equicorrelated((C, R, L, d), P["mu"], P["s"], P["r"], device=device, dtype=dtype)
    qkv = torch.bmm(x.view(C, R * L, d), Wq).view(C, R, L, k)
    Wd = Wq.double()
    return qkv, Wd.transpose(1, 2) @ Wd, Wd.sum(dim=1).unsqueeze(2)


def _sha_projected(P, W, R, L, device, dtype):
    """QKV through the 3 d_h-dimensional column space of W (d x 3 d_h, full column rank since
    d > 3 d_h); exact, with 3 d_h instead of d random numbers per token and no L x d tensor.
    Returns (QKV, K, w) for :func:`_gram_grad_moments`.

    Per sample x = a z + 1 u^T (a = s sqrt(1 - r), u = mu + s sqrt(r) xi, z unit normals), so
    QKV = a z W + 1 (W^T u)^T. With W = Q Lc^T (:func:`_column_factor`), z Q has iid unit-normal
    rows given W (z is independent of W and Q^T Q = I), so a z W =_d U (a Lc)^T with U unit
    normals (R L x 3 d_h). The matmul uses Lq = a Lc rounded once per entry to ``dtype``, and every
    other use of W goes through the same factor: the simulation runs exactly with
    W~ = Q F^T, F = Lq / a (W~ = W up to that rounding, as the reference's W is rounded to bf16):

        QKV = U Lq^T + 1 (W~^T u)^T     (W~^T u from :func:`_effective_wt`),

    and the input gradient gx = dQKV W~^T has the Gram matrix K = W~^T W~ = F F^T (Q^T Q = I) and
    w = W~^T 1_d.
    """
    C, d, k = W.shape
    cols = device_columns([P["s"] * np.sqrt(1 - P["r"]), P["s"] * np.sqrt(P["r"]), P["mu"]], device,
                          torch.float64)
    a, b, m = (per_config(v, 3) for v in cols)
    Wd = W.double()
    Lc, Lq, Fe = _column_factor(Wd, a, dtype)
    xi = torch.empty((C, R, d), device=device).normal_().double()
    ones = torch.ones((C, d, 1), device=device, dtype=torch.float64)
    Wtu = _effective_wt(Wd, Lc, Fe, torch.cat([(xi * b + m).transpose(1, 2), ones], dim=2))
    U = torch.empty((C, R * L, k), device=device, dtype=dtype).normal_()
    qkv = torch.bmm(U, Lq.transpose(1, 2)).view(C, R, L, k)
    del U
    qkv.add_(Wtu[:, :, :R].transpose(1, 2).unsqueeze(2).float())     # + 1 (W~^T u_r)^T, rounded once
    return qkv, Fe @ Fe.transpose(1, 2), Wtu[:, :, R:]


def _column_factor(Wd, a, dtype):
    """(Lc, Lq, F) for W (C, d, k) in fp64 of full column rank: Lc the Cholesky factor of
    M = W^T W (so W = Q Lc^T with Q = W Lc^-T, Q^T Q = Lc^-1 M Lc^-T = I), Lq = a Lc rounded once
    to ``dtype`` (``a`` (C, 1, 1)), F = Lq / a in fp64. The fp64 factorisation fails only for a
    numerically rank-deficient W (probability ~0 for a Gaussian d x k with d > k), so no host sync
    checks it."""
    Lc, _ = torch.linalg.cholesky_ex(Wd.transpose(1, 2) @ Wd)
    Lq = (a * Lc).to(dtype)
    return Lc, Lq, Lq.double() / a


def _effective_wt(Wd, Lc, Fe, V):
    """W~^T V for W~ = Q F^T: F Q^T V = F Lc^-1 (W^T V), one triangular solve (fp64)."""
    return Fe @ torch.linalg.solve_triangular(Lc, Wd.transpose(1, 2) @ V, upper=False)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b per config for (C, n, p) and (C, n, q) tensors, accumulated and returned in fp32
    (bf16 inputs on CUDA: one GEMM with an fp32 output, no rounding of the sums to bf16). fp32
    inputs are multiplied in full fp32 even under ``--precision tf32``: the Gram matrix is part of
    the measurement, not of the simulated layer."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return torch.bmm(a.transpose(1, 2), b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    if a.is_cuda:
        try:
            return torch.bmm(a.transpose(1, 2), b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):     # a torch without bmm's out_dtype
            pass
    return torch.bmm(a.transpose(1, 2).float(), b.float())


def _gram_grad_moments(grads, K, w, d):
    """Mean, variance and cross-token covariance of gx = D W^T without forming gx, where per sample
    D_r = [dq_r | dk_r | dv_r] (L x k, ``grads`` = (dq, dk, dv), each (C, R, L, d_h)), K = W^T W
    (C, k, k) and w = W^T 1_d (C, k, 1), both fp64. With M = sum_r D_r^T D_r (the Gram matrix of
    D over all samples and tokens, assembled from the d_h x d_h blocks of dq, dk, dv) and
    c_r = 1^T D_r (the token sums):

        sum gx^2                          = sum_r tr(D_r K D_r^T) = sum(M * K),
        sum_i (sum_t gx_rti)^2            = sum_r c_r K c_r^T,
        per-token totals sum_{r,i} gx_rti = ((sum_r D_r) w)_t,

    the sums :func:`moments_from_sums` needs (n_obs = R d). Each of dq, dk, dv is read three
    times (its Gram blocks) plus twice for the sums; no L x d or L x 3 d_h tensor is written (a
    gradient that autograd returns non-contiguous is copied once, L x d_h)."""
    C, R, L, dh = grads[0].shape
    acc = acc_dtype(grads[0])
    flat = [g.reshape(C, R * L, dh) for g in grads]
    M = torch.empty((C, 3, dh, 3, dh), device=K.device, dtype=torch.float64)
    for i in range(3):
        for j in range(i, 3):
            block = _gram(flat[i], flat[j]).double()
            M[:, i, :, j] = block
            if j != i:
                M[:, j, :, i] = block.transpose(1, 2)
    M = M.view(C, 3 * dh, 3 * dh)
    sum_sq = (M * K).sum(dim=(1, 2))
    c = torch.cat([g.sum(dim=2, dtype=acc) for g in grads], dim=2).double()         # (C, R, k)
    sum_tt = ((c @ K) * c).sum(dim=(1, 2))
    per_token = torch.cat([g.sum(dim=1, dtype=acc) for g in grads], dim=2).double()  # (C, L, k)
    T = (per_token @ w).view(C, L)
    return moments_from_sums(sum_sq, sum_tt, T.sum(dim=1), T.square().sum(dim=1), R * d, L)


def _sha_floats(S):
    """Peak per config: the projected path holds 3 d_h-wide tensors only (U or QKV, dq/dk/dv), the
    direct one also x (d wide, until QKV is formed); both hold y, G and the CPU attention matrices.
    The estimate predates the Gram moments (which dropped a stacked dQKV and the d-wide gx) and is
    kept as it is: a smaller one would change the chunking, hence the random stream and every
    recorded result, for no measured gain."""
    R, L, d, dh = S["samples"], S["L"], S["d"], S["d_h"]
    wide = 0 if 3 * dh < d else 3 * d
    return R * L * (wide + 15 * dh + 3 * L) + 6 * d * dh + 2 * R * d


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
    floats_per_config=_sha_floats,
    uses_matmul=True,
)

COMPONENTS: dict[str, Component] = {c.name: c for c in (LINEAR, RELU, GELU, LAYERNORM, DROPOUT, SOFTMAX, SHA)}

# ------------------------------------------------------------------------------ causal forms


def _sim_softmax_causal(P, S, device, dtype):
    """Causally masked softmax: per sample an L x L logit matrix whose rows are all one equicorrelated
    vector x (length L) and one upstream gradient vector G (std g, r_g = 0), row t masked to its first
    t entries. Every row has the law of the component's row (t logits with variance s^2, correlation
    r; its own G), and the moments are averages over rows, so sharing x and G across rows changes the
    noise, not the expectation; it lets prefix sums give every row in O(L). A row's softmax is
    invariant to a shift of its logits, so with e_s = exp(x_s - x_1) = 1 + u_s (u from expm1, small
    for small logits: no cancellation in fp32):

        Z_t = sum_{s<=t} e_s,   sum_{s<=t} (p_ts - 1/t)^2 = [sum_{s<=t} u_s^2 - (sum_{s<=t} u_s)^2 / t] / Z_t^2,
        Gbar_t = sum_{s<=t} e_s G_s / Z_t,
        sum_{s<=t} gx_ts^2 = [sum e^2 G^2 - 2 Gbar_t sum e^2 G + Gbar_t^2 sum e^2] / Z_t^2,

    gx_ts = p_ts (G_s - Gbar_t) the masked softmax's backward (prefix sums in fp32, totals in fp64).
    Measured over the L (L + 1) / 2 unmasked entries: the mean, the variance of each entry about its
    row mean 1/t (the rows sum to 1), and the mean square of gx (each row of gx sums to 0)."""
    C, B, L = len(P["s"]), S["samples"], S["L"]
    x = equicorrelated((C, B, L), np.zeros_like(P["s"]), P["s"], P["r"], token_dim=2, device=device)
    G = scaled_normal((C, B, L), P["g"], device=device)
    return causal_softmax_moments(x, G)


def causal_softmax_moments(x: torch.Tensor, G: torch.Tensor) -> dict:
    """Per config (axis 0), the mean, variance and gradient mean square over the unmasked entries
    of the causally masked softmax of the L x L matrices whose rows all equal x[c, b] (shape
    (C, B, L)), with upstream gradient rows G[c, b], by the prefix sums of :func:`_sim_softmax_causal`."""
    B, L = x.shape[1:]
    f64 = torch.float64
    u = torch.expm1(x - x[:, :, :1])
    t = torch.arange(1, L + 1, device=x.device, dtype=x.dtype)
    e = u + 1
    Z = e.cumsum(dim=-1)
    Z2 = Z.square()
    n = B * L * (L + 1) / 2
    mean = (Z / Z).sum(dim=(1, 2), dtype=f64) / n                        # every row's probabilities sum to 1
    dev = (u.square().cumsum(dim=-1) - u.cumsum(dim=-1).square_().div_(t)).div_(Z2)
    var = dev.sum(dim=(1, 2), dtype=f64) / n
    del u, dev
    eG = e * G
    e2G = e * eG
    gbar = eG.cumsum(dim=-1).div_(Z)
    gsq = (e2G * G).cumsum(dim=-1) - 2 * gbar * e2G.cumsum(dim=-1) + gbar.square() * e.square().cumsum(dim=-1)
    return {"mean": mean, "var": var, "grad_var": gsq.div_(Z2).sum(dim=(1, 2), dtype=f64) / n}


def _pred_softmax_causal(A):
    s2, g2, L = A["s"] ** 2, A["g"] ** 2, A["L"]
    out = {}
    for variant in causal_theory.CAUSAL_SOFTMAX_VARIANTS:
        m = causal_theory.causal_softmax(s2, A["r"], L, g2, variant)
        out["mean"] = m.mean
        out[f"var_{variant}"] = m.var
        out[f"grad_var_{variant}"] = m.grad_var
    return out


SOFTMAX_CAUSAL = dataclasses.replace(
    SOFTMAX,
    simulate=_sim_softmax_causal,
    predict=_pred_softmax_causal,
    rows=(
        Row("x mean", "mean", "mean"),
        Row("x var exact", "var", "var_exact"),
        Row("x var full (L->t)", "var", "var_full"),
        Row("x var approx (L->t)", "var", "var_approx"),
        Row("x var full corrected (L->t)", "var", "var_full_corrected"),
        Row("g var exact", "grad_var", "grad_var_exact"),
        Row("g var full (L->t)", "grad_var", "grad_var_full"),
        Row("g var approx (L->t)", "grad_var", "grad_var_approx"),
        Row("g var full corrected (L->t)", "grad_var", "grad_var_full_corrected"),
    ),
    floats_per_config=lambda S: 12 * S["samples"] * S["L"],
    causal=True,
)


def _pred_sha_causal(A):
    d = A["d"]
    s_q = A["s_q"] / np.sqrt(d)
    args = (A["s"] ** 2, A["r"], d, A["d_h"], A["L"], s_q, s_q, A["s_v"] / np.sqrt(d), A["p"], A["g"] ** 2,
            A["r_g"])
    out = _moments_dict(causal_theory.causal_attention_head(*args))
    value = causal_theory.causal_attention_head(*args, qk_paths=False)
    out["grad_var_value"], out["grad_cov_value"] = value.grad_var, value.grad_cov
    return out


SHA_CAUSAL = dataclasses.replace(
    SHA,
    simulate=functools.partial(_sim_sha, causal=True),
    predict=_pred_sha_causal,
    rows=SHA.rows + (Row("g var (value path only)", "grad_var", "grad_var_value"),
                     Row("g cov (value path only)", "grad_cov", "grad_cov_value")),
    causal=True,
)

CAUSAL: dict[str, Component] = {c.name: c for c in (SOFTMAX_CAUSAL, SHA_CAUSAL)}
