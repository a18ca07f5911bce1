"""One fused Triton kernel for the row-wise elementwise simulations (LayerNorm and dropout).

The PyTorch path of these components is memory-bound: it writes the sampled input, the output,
the upstream gradient and the input gradient (C x R x L x d fp32 each) and reads them back for the
moments, ~14 passes over 1e11 elements on the paper grids. This kernel draws every random number
where it is used (counter-based Philox, so nothing is stored), applies the layer and its backward
in registers and writes only the partial sums the moments need: per (config, sample) and token
the row sum and row sum of squares of y and of gx, and per feature the column sums over tokens,
exactly the ``(s, q, t)`` triples of :func:`dslm.sim.estimators.row_col_sums`.

It samples the same random variables as the PyTorch path (:func:`dslm.sim.components._measure`):

    x_t = mu + a z_t + b xi,      a = s sqrt(1 - r),  b = s sqrt(r)     (tokens t, shared xi)
    G_t = g_a z'_t + g_b xi',     g_a = g sqrt(1 - r_g),  g_b = g sqrt(r_g)

with z, z', xi, xi' unit normals: xi and xi' are drawn once per (config, sample) and feature.
Random numbers come from Philox-4x32-10 with the counter (feature, token, config-sample index,
stream) under one 64-bit key per launch, drawn from the seeded CPU generator: the results are
deterministic for a seed, but not the same numbers as the PyTorch path. Everything runs in fp32
as the PyTorch path does; the column sums add BLOCK_T rows at a time (fixed order).

Triton is imported here; :mod:`dslm.sim.components` imports this module only when the fused path
runs (on CUDA by default; on the CPU only under ``TRITON_INTERPRET=1``, which the tests use).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from dslm.sim.estimators import device_columns

LAYERNORM: int = 0
DROPOUT: int = 1
LAYERNORM_EPS = 1e-5       # torch.nn.functional.layer_norm's default, as in the PyTorch path
MAX_FEATURES = 4096        # wider rows do not fit a register block: the PyTorch path runs them
ELEMENTS_PER_BLOCK = 1024  # BLOCK_T x BLOCK_D elements per loop iteration (H100 sweep: fastest)
NUM_WARPS = 4


@triton.jit
def _draws(seed, feature, token, pair, stream):
    """Two unit normals (Box-Muller) and one U[0, 1) from one Philox-4x32-10 call at the counter
    (feature, token, pair, stream); all four are int32 blocks of one shape."""
    r0, r1, r2, _ = tl.philox(seed, feature, token, pair, stream)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    return n0, n1, tl.uint_to_uniform_float(r2)


@triton.jit(do_not_specialize=["seed", "R", "L", "D"])    # one compile per (OP, block shape)
def _rows_kernel(seed, scales, row_stats, col_stats, R, L, D, eps,
                 OP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (config, sample) pair, looping over its L tokens BLOCK_T at a time.

    ``scales`` is (C, 6) fp32: a, b, mu, g_a, g_b, p (not named ``params``: Triton 3.6's
    argument binder has a local of that name). Writes ``row_stats`` (C R, 4, L): row sums
    of y and y^2, then of gx and gx^2, and ``col_stats`` (C R, 2, D): column sums of y and gx.
    LayerNorm (OP 0, no affine): y = (x - m) rstd, gx = rstd (G - mean(G) - y mean(G y)).
    Dropout (OP 1): y = x keep / (1 - p), gx = G keep / (1 - p), keep = [u >= p]; y is stored
    shifted by mu (the sums of y - mu keep fp32 accurate when |mu| >> s; the moments add it back).
    """
    pair = tl.program_id(0)
    cfg = pair // R
    a = tl.load(scales + cfg * 6)
    b = tl.load(scales + cfg * 6 + 1)
    mu = tl.load(scales + cfg * 6 + 2)
    g_a = tl.load(scales + cfg * 6 + 3)
    g_b = tl.load(scales + cfg * 6 + 4)
    p = tl.load(scales + cfg * 6 + 5)

    feats = tl.arange(0, BLOCK_D)
    fmask = feats < D
    zeros = tl.zeros([BLOCK_D], dtype=tl.int32)
    xi, xi_g, _ = _draws(seed, feats, zeros, zeros + pair, zeros + 1)
    shared = mu + b * xi
    shared_g = g_b * xi_g

    feats2 = tl.broadcast_to(feats[None, :], (BLOCK_T, BLOCK_D))
    pair2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32) + pair
    stream2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    col_y = tl.zeros([BLOCK_D], dtype=tl.float32)
    col_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    rows_out = row_stats + pair.to(tl.int64) * 4 * L
    for t0 in range(0, L, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < L
        m = tmask[:, None] & fmask[None, :]
        z, z_g, u = _draws(seed, feats2, tl.broadcast_to(tok[:, None], (BLOCK_T, BLOCK_D)), pair2, stream2)
        x = a * z + shared[None, :]
        G = tl.where(m, g_a * z_g + shared_g[None, :], 0.0)
        if OP == 0:
            x = tl.where(m, x, 0.0)
            xc = tl.where(m, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
            y = xc * rstd[:, None]
            g_mean = tl.sum(G, axis=1) / D
            gy_mean = tl.sum(G * y, axis=1) / D
            gx = tl.where(m, rstd[:, None] * (G - g_mean[:, None] - y * gy_mean[:, None]), 0.0)
        else:
            keep = m & (u >= p)
            scale = 1.0 / (1.0 - p)
            y = tl.where(m, tl.where(keep, x * scale, 0.0) - mu, 0.0)
            gx = tl.where(keep, G * scale, 0.0)
        tl.store(rows_out + tok, tl.sum(y, axis=1), mask=tmask)
        tl.store(rows_out + L + tok, tl.sum(y * y, axis=1), mask=tmask)
        tl.store(rows_out + 2 * L + tok, tl.sum(gx, axis=1), mask=tmask)
        tl.store(rows_out + 3 * L + tok, tl.sum(gx * gx, axis=1), mask=tmask)
        col_y += tl.sum(y, axis=0)
        col_g += tl.sum(gx, axis=0)
    cols_out = col_stats + pair.to(tl.int64) * 2 * D
    tl.store(cols_out + feats, col_y, mask=fmask)
    tl.store(cols_out + D + feats, col_g, mask=fmask)


def fits(D: int) -> bool:
    """Whether rows of D features fit the kernel's register block."""
    return D <= MAX_FEATURES


def block_shape(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): the row padded to a power of two, as many rows as make
    :data:`ELEMENTS_PER_BLOCK` elements."""
    block_d = triton.next_power_of_2(D)
    return max(1, ELEMENTS_PER_BLOCK // block_d), block_d


def row_sums(op: int, P: dict, S: dict, device, generator: torch.Generator | None = None):
    """Simulate LayerNorm (``op`` = :data:`LAYERNORM`) or dropout (:data:`DROPOUT`) for the chunk
    of configs ``P`` (host arrays mu, s, r, g, r_g and, for dropout, p in ``S``) and return
    ``(rows_y, rows_gx)``, each the ``(s, q, t)`` triple of
    :func:`dslm.sim.estimators.row_col_sums` ((C, R, L), (C, R, L), (C, R, D) fp32). For dropout
    rows_y is of y - mu. The kernel's key is drawn from ``generator`` (default: the seeded global
    CPU generator), so a seed fixes the result without a device sync."""
    C, R, L, D = len(P["s"]), S["samples"], S["L"], S["d"]
    if not fits(D):
        raise ValueError(f"fused rows hold at most {MAX_FEATURES} features, got {D}")
    s, r, g, r_g = (np.asarray(P[k], dtype=np.float64) for k in ("s", "r", "g", "r_g"))
    p = np.full(C, float(S.get("p", 0.0)))
    scales = device_columns([s * np.sqrt(1 - r), s * np.sqrt(r), P["mu"], g * np.sqrt(1 - r_g),
                             g * np.sqrt(r_g), p], device).T.contiguous()
    row_stats = torch.empty((C * R, 4, L), device=device)
    col_stats = torch.empty((C * R, 2, D), device=device)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    block_t, block_d = block_shape(D)
    with torch.cuda.device(row_stats.device) if row_stats.is_cuda else contextlib.nullcontext():
        _rows_kernel[(C * R,)](seed, scales, row_stats, col_stats, R, L, D, LAYERNORM_EPS,
                               OP=op, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS)
    rows = row_stats.view(C, R, 4, L)
    cols = col_stats.view(C, R, 2, D)
    return (rows[:, :, 0], rows[:, :, 1], cols[:, :, 0]), (rows[:, :, 2], rows[:, :, 3], cols[:, :, 1])


def floats_per_config(S: dict) -> int:
    """Device memory per config in fp32 values: the partial sums (4 L + 2 d per sample) and the
    fp64 temporaries that :func:`dslm.sim.estimators.moments_from_rows` makes of them (squared
    column sums, and squared row sums for LayerNorm's feature covariance)."""
    return S["samples"] * (8 * S["L"] + 6 * S["d"])
