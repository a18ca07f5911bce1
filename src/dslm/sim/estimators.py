"""Monte-Carlo building blocks shared by every component simulation.

All tensors carry a leading config axis C, so one kernel launch serves many configurations; the
per-config scalars (mean, std, correlation, ...) are host arrays of shape (C,), applied inside the
sampling kernels. Nothing here synchronises with the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def equicorrelated(shape, mean, std, corr, token_dim: int = 2, device=None, dtype=torch.float32):
    """Gaussian samples whose entries are correlated with coefficient ``corr`` along
    ``token_dim`` and independent along every other axis, in O(n):

        x = std sqrt(1 - corr) z  +  (mean + std sqrt(corr) z_shared),

    where z_shared is drawn once per position of the other axes (size 1 along ``token_dim``).
    ``mean``, ``std`` and ``corr`` are host arrays of length C (the leading config axis). Each
    config's part is drawn already scaled (the normal kernel applies the std in fp32 and rounds
    once to ``dtype``), then the fp32 shared part is added in one pass. Scales are never rounded
    to bf16 on their own: rounding a factor like 0.0316 to bf16 biases every variance by ~0.1 %.
    """
    shared_shape = list(shape)
    shared_shape[token_dim] = 1
    x = torch.empty(shape, device=device, dtype=dtype)
    shared = torch.empty(shared_shape, device=device, dtype=torch.float32)
    needs_shared = False
    for c in range(shape[0]):
        m, sd, r = float(mean[c]), float(std[c]), float(corr[c])
        x[c].normal_(0.0, sd * math.sqrt(1.0 - r))
        if r > 0:
            shared[c].normal_(m, sd * math.sqrt(r))
        else:
            shared[c].fill_(m)
        needs_shared = needs_shared or r > 0 or m != 0
    return x.add_(shared) if needs_shared else x


def scaled_normal(shape, std, device=None, dtype=torch.float32):
    """N(0, std[c]^2) samples for each config c (``std`` a host array of length C), drawn
    scaled in fp32 and rounded once to ``dtype``."""
    z = torch.empty(shape, device=device, dtype=dtype)
    for c in range(shape[0]):
        z[c].normal_(0.0, float(std[c]))
    return z


def sum_squares(y: torch.Tensor, dims) -> torch.Tensor:
    """Sum of y^2 over ``dims`` with fp32 (or better) accumulation. On CUDA a fused norm reduction
    (one read, tree-accumulated); on the CPU ``linalg.vector_norm`` accumulates sequentially (0.2 %
    off at 2e7 elements), so there we square and use the cascaded ``sum``."""
    if y.is_cuda:
        return torch.linalg.vector_norm(y, dim=dims, dtype=torch.float32).double().square()
    return y.float().square().sum(dim=dims).double()


def mean_var(y: torch.Tensor):
    """Per-config mean and (population) variance over all non-config elements, two-pass so that a
    large mean does not cancel the variance in fp32."""
    dims = tuple(range(1, y.ndim))
    m = y.mean(dim=dims, keepdim=True)
    var = (y - m).square().mean(dim=dims)
    return m.reshape(-1), var


def token_moments(y: torch.Tensor, token_dim: int = 2):
    """Mean, population variance and mean off-diagonal cross-token covariance of y, per config,
    from three fused reductions (no centred copy, no L x L matrix).

    The covariance equals ``torch.cov`` with the L tokens as variables and every other
    non-config element as an observation (centred per token, normalised by n - 1), averaged over
    its off-diagonal entries:

        sum_obs sum_{t != t'} (y_t - m_t)(y_t' - m_t')
            = sum_obs (sum_t y_t)^2 - sum y^2 - n [(sum_t m_t)^2 - sum_t m_t^2].

    The sums accumulate in fp32 (also for bf16 input) and are combined in fp64. Intended for data
    whose mean is small against its spread; shift a large-mean tensor first (see ``_measure``).
    """
    dims = tuple(range(1, y.ndim))
    L = y.shape[token_dim]
    n_all = y[0].numel()
    n_obs = n_all // L
    # per-token sums: reduce the contiguous last axis first (fast), then the rest
    if token_dim == y.ndim - 1:
        per_token = y.sum(dim=tuple(range(1, y.ndim - 1)), dtype=torch.float32)
    else:
        inner = y.sum(dim=-1, dtype=torch.float32)
        other = tuple(d for d in range(1, inner.ndim) if d != token_dim)
        per_token = inner.sum(dim=other) if other else inner
    per_token = per_token.double()                                               # (C, L)
    sum_sq = sum_squares(y, dims)
    token_sum = y.sum(dim=token_dim, dtype=torch.float32)
    sum_tt = sum_squares(token_sum, tuple(range(1, token_sum.ndim)))
    mean = per_token.sum(dim=1) / n_all
    var = sum_sq / n_all - mean.square()
    m_t = per_token / n_obs
    off = sum_tt - sum_sq - n_obs * (m_t.sum(dim=1).square() - m_t.square().sum(dim=1))
    return mean, var, off / (n_obs - 1) / (L * (L - 1))


def offdiag_cov(y: torch.Tensor, var_dim: int):
    """Mean off-diagonal covariance between the variables along ``var_dim`` (every other
    non-config axis being observations); see :func:`token_moments`."""
    return token_moments(y, var_dim)[2]


def relative_error(actual, predicted, scale=None):
    """The reference's error of one estimate (THEORY.md section 4), vectorised:

    |a - p| / |a|; with a natural scale v: min(|a - p| / |a|, |a - p| / v), and when p = 0:
    min(|a|, |a| / v).
    """
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(a - p) / np.abs(a)
        if scale is None:
            return rel
        v = np.abs(np.asarray(scale, dtype=np.float64))
        scaled = np.minimum(rel, np.abs(a - p) / v)
        zero = np.minimum(np.abs(a), np.abs(a) / v)
        return np.where(p == 0, zero, scaled)


PERCENTILES = (50, 90, 99)


def percentiles(errors, qs=PERCENTILES):
    """The reference's percentiles in %: sort the errors and take element int(n q / 100)."""
    e = np.sort(np.asarray(errors, dtype=np.float64)) * 100.0
    n = len(e)
    return [float(e[min(n - 1, int(n * q / 100))]) for q in qs]
