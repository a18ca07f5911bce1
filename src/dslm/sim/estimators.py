"""Monte-Carlo building blocks shared by every component simulation.

All tensors carry a leading config axis C, so one kernel launch serves many configurations; the
per-config scalars (mean, std, correlation, ...) are host arrays of shape (C,), uploaded once per
call as one small tensor and applied in fp32 or fp64 on the device. Nothing here synchronises with
the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def device_columns(columns, device, dtype=torch.float32) -> torch.Tensor:
    """Per-config host arrays (each of length C) as one (len(columns), C) device tensor, uploaded in
    one copy. On CUDA the copy goes from pinned memory without blocking, so enqueuing a chunk never
    waits for the previous one."""
    t = torch.as_tensor(np.stack([np.asarray(c, dtype=np.float64) for c in columns]), dtype=dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def per_config(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against a (C, ...) tensor of ``ndim`` dimensions."""
    return v.view(-1, *([1] * (ndim - 1)))


def equicorrelated(shape, mean, std, corr, token_dim: int = 2, device=None, dtype=torch.float32):
    """Gaussian samples whose entries are correlated with coefficient ``corr`` along
    ``token_dim`` and independent along every other axis, in O(n):

        x = std sqrt(1 - corr) z  +  (mean + std sqrt(corr) z_shared),

    where z_shared is drawn once per position of the other axes (size 1 along ``token_dim``).
    ``mean``, ``std`` and ``corr`` are host arrays of length C (the leading config axis). The whole
    chunk's z is one ``normal_`` call in ``dtype`` (unit normals, rounded once per element); the
    per-config scales are fp32 device tensors, applied together with the fp32 shared part by one
    fused multiply-add that rounds each element once to ``dtype``. Scales are never rounded to bf16
    on their own: rounding a factor like 0.0316 to bf16 biases every variance by ~0.1 %. In fp32
    this is the same random variable as drawing each config's part already scaled.
    """
    mean, std, corr = (np.asarray(v, dtype=np.float64) for v in (mean, std, corr))
    scales = device_columns([std * np.sqrt(1.0 - corr), std * np.sqrt(corr), mean], device)
    a, b, m = (per_config(v, len(shape)) for v in scales)
    x = torch.empty(shape, device=device, dtype=dtype).normal_()
    if np.any(corr > 0):
        shared_shape = list(shape)
        shared_shape[token_dim] = 1
        shared = torch.empty(shared_shape, device=device, dtype=torch.float32).normal_().mul_(b).add_(m)
    elif np.any(mean != 0):
        shared = m
    else:
        return x.mul_(a)
    return torch.addcmul(shared, x, a, out=x)


def scaled_normal(shape, std, device=None, dtype=torch.float32):
    """N(0, std[c]^2) samples for each config c (``std`` a host array of length C), drawn
    scaled in fp32 and rounded once to ``dtype`` (one pass per config: a vectorised draw would
    need a second pass over the tensor to apply the scales)."""
    z = torch.empty(shape, device=device, dtype=dtype)
    for c in range(shape[0]):
        z[c].normal_(0.0, float(std[c]))
    return z


def n_exact_parts(dtype) -> int:
    """How many ``dtype`` numbers represent any fp32 number exactly as their sum:
    ceil(24 / significand bits), i.e. 1 for fp32 and 3 for bf16."""
    return math.ceil(24 / (1 - round(math.log2(torch.finfo(dtype).eps))))


def exact_parts(w: torch.Tensor, dtype) -> torch.Tensor:
    """Split the fp32 tensor w into :func:`n_exact_parts` tensors of ``dtype`` whose sum is exactly
    w, stacked along a new axis -2. Each part is the ``dtype`` rounding of what the earlier parts
    left; the remainder of a rounding to fewer significand bits is exact in fp32, and each part
    takes the next ``dtype``-width slice of w's 24 bits."""
    parts, rest = [], w
    for _ in range(n_exact_parts(dtype)):
        parts.append(rest.to(dtype))
        rest = rest - parts[-1].to(rest.dtype)
    return torch.stack(parts, dim=-2)


def rotated_equicorrelated(shape, mean, std, corr, device=None, dtype=torch.float32):
    """The equicorrelated tensor x of shape (C, R, L, d) (tokens along axis 2, see
    :func:`equicorrelated`) with its token axis rotated by a fixed orthogonal H, in units of
    a = std sqrt(1 - corr), without a broadcast over the L tokens. Returns (X, a), a a (C,) fp64
    device tensor.

    Per sample x = a (z + 1 h^T) with z (L x d) iid unit normals and h = (mean + std sqrt(corr) xi)/a,
    xi a unit normal d-vector. Let H be any L x L orthogonal matrix whose first row is 1^T/sqrt(L).
    Then H 1 = sqrt(L) e_0, and H z has the law of z (its columns are iid N(0, I_L), a law invariant
    under orthogonal maps) independently of xi, so

        H x / a  =_d  z + sqrt(L) e_0 h^T:

    unit normals with sqrt(L) h added to the first row only. For any per-sample matrix B,
    H (x B) = (H x) B, so :func:`rotated_moments` recovers every moment of x B exactly from
    (H x / a) B without knowing H.

    X is (C, R, L + n, d) in ``dtype``: rows 0..L-1 are the unit normals, rows L..L+n-1 the
    :func:`exact_parts` of the fp32 vector sqrt(L) h, so the first rotated row is
    X_0 + X_L + ... + X_{L+n-1}. The offset is kept out of row 0 because it is far larger than the
    unit noise there (sqrt(L) |mean| / a): added in bf16 and shared by every element when
    corr = 0, its rounding would not be dithered by the noise and would bias the estimates (in the
    unrotated tensor each token carries only |mean| / a against the same unit noise).
    """
    mean, std, corr = (np.asarray(v, dtype=np.float64) for v in (mean, std, corr))
    C, R, L, d = shape
    a = std * np.sqrt(1.0 - corr)
    cols = device_columns([a, np.sqrt(L) * mean / a, np.sqrt(L * corr / (1.0 - corr))], device,
                          torch.float64)
    m, b = (per_config(v, 3) for v in cols[1:].float())
    X = torch.empty((C, R, L + n_exact_parts(dtype), d), device=device, dtype=dtype).normal_()
    xi = torch.empty((C, R, d), device=device, dtype=torch.float32).normal_()
    X[:, :, L:].copy_(exact_parts(xi.mul_(b).add_(m), dtype))
    return X, cols[0]


def rotated_moments(P: torch.Tensor, L: int, scale: torch.Tensor):
    """Mean, variance and cross-token covariance (:func:`token_moments`) of y = x B from
    P = X B, X of :func:`rotated_equicorrelated` and ``scale`` (C,) the factor that turns P into
    y~ = H y: y~_0 = scale (P_0 + P_L + ... + P_{L+n-1}), y~_t = scale P_t for 0 < t < L.

    With the per-row sums s_t = sum_j y~_tj and sums of squares q_t = sum_j y~_tj^2 (one reduction
    of the last axis each, fp32 accumulation), per sample and with H orthogonal, first row 1^T/sqrt(L):

        sum y^2                      = sum_t q_t                    (H preserves norms)
        sum_j (sum_t y_tj)^2         = L q_0                        (1^T y = sqrt(L) e_0^T H y)
        per-token totals T = H^T U,  U_t = sum_samples s_t          (H is the same for every sample)
        sum_t T_t = sqrt(L) U_0,     sum_t T_t^2 = sum_t U_t^2.

    These are exactly the sums :func:`moments_from_sums` needs (n_obs = samples x features); the
    scale enters in fp64 (sums times scale, squares times scale^2).
    """
    acc = acc_dtype(P)        # rows are at most a few thousand long: sequential fp32 sums are accurate
    C, R, _, D = P.shape
    row0 = P[:, :, 0].to(acc) + P[:, :, L:].to(acc).sum(dim=2)                  # (C, R, D)
    rest = P[:, :, 1:L]
    q0 = row0.square().sum(dim=-1).double()                                     # (C, R)
    s0 = row0.sum(dim=-1).double()
    q = torch.linalg.vector_norm(rest, dim=-1, dtype=acc).double().square()     # (C, R, L - 1)
    s = rest.sum(dim=-1, dtype=acc).double()
    U0, U = s0.sum(dim=1), s.sum(dim=1)                                         # (C,), (C, L - 1)
    k = scale.double()
    k2 = k.square()
    return moments_from_sums(k2 * (q0.sum(dim=1) + q.sum(dim=(1, 2))), k2 * L * q0.sum(dim=1),
                             k * math.sqrt(L) * U0, k2 * (U0.square() + U.square().sum(dim=1)),
                             R * D, L)


def acc_dtype(y: torch.Tensor):
    """The accumulation dtype of a reduction over y: fp32, or y's own if wider (fp64 in tests)."""
    return torch.promote_types(y.dtype, torch.float32)


def sum_squares(y: torch.Tensor, dims) -> torch.Tensor:
    """Sum of y^2 over ``dims`` with fp32 (or better) accumulation. On CUDA a fused norm reduction
    (one read, tree-accumulated); on the CPU ``linalg.vector_norm`` accumulates sequentially (0.2 %
    off at 2e7 elements), so there we square and use the cascaded ``sum``."""
    acc = acc_dtype(y)
    if y.is_cuda:
        return torch.linalg.vector_norm(y, dim=dims, dtype=acc).double().square()
    return y.to(acc).square().sum(dim=dims).double()


def mean_var(y: torch.Tensor):
    """Per-config mean and (population) variance over all non-config elements, two-pass so that a
    large mean does not cancel the variance in fp32."""
    dims = tuple(range(1, y.ndim))
    m = y.mean(dim=dims, keepdim=True)
    var = (y - m).square().mean(dim=dims)
    return m.reshape(-1), var


def moments_from_sums(sum_sq, sum_tt, token_total_sum, token_total_sumsq, n_obs: int, L: int):
    """Mean, population variance and mean off-diagonal cross-token covariance, per config, from
    fp64 (C,) sums over the n_obs observations (every non-token, non-config position) of the L
    tokens y_t:

        sum_sq = sum y^2,   sum_tt = sum_obs (sum_t y_t)^2,
        token_total_sum = sum_t T_t,   token_total_sumsq = sum_t T_t^2,   T_t = sum_obs y_t.

    The covariance equals ``torch.cov`` with the tokens as variables (centred per token by
    m_t = T_t / n_obs, normalised by n_obs - 1), averaged over its off-diagonal entries:

        sum_obs sum_{t != t'} (y_t - m_t)(y_t' - m_t')
            = sum_tt - sum_sq - n_obs [(sum_t m_t)^2 - sum_t m_t^2]
            = sum_tt - sum_sq - [(sum_t T_t)^2 - sum_t T_t^2] / n_obs.
    """
    n_all = n_obs * L
    mean = token_total_sum / n_all
    var = sum_sq / n_all - mean.square()
    off = sum_tt - sum_sq - (token_total_sum.square() - token_total_sumsq) / n_obs
    return mean, var, off / (n_obs - 1) / (L * (L - 1))


def row_col_sums(y: torch.Tensor, shift: torch.Tensor | None = None, welford: bool | None = None):
    """The three partial sums every moment of a (C, R, L, D) tensor needs (tokens on axis 2,
    features last), of ``y - shift`` (``shift`` a (C,) tensor, or None), accumulated in fp32 (or
    wider for fp64 input):

        s (C, R, L): sum over features of each row,   q (C, R, L): sum of squares of each row,
        t (C, R, D): sum over tokens of each column.

    On CUDA in fp32 ``s`` and ``q`` come from one Welford pass (``var_mean`` over the features):
    s = D m, q = D (v + m^2) with the row mean m and population variance v, so the shift enters as
    m - shift without a shifted copy, and the squares never cancel a large mean against a small
    spread (the column sums are shifted after summing: L values, an fp32-accurate difference).
    Otherwise (CPU, bf16 input: ``var_mean`` would round its results to bf16) the (shifted) tensor
    is reduced directly: a sum and a norm over the features. ``t`` is one more pass either way.
    ``welford`` forces one path (tests). Meant for rows of several features (D > 1)."""
    acc = acc_dtype(y)
    L = y.shape[2]
    if welford is None:
        welford = y.is_cuda and y.dtype == torch.float32
    if welford:
        v, m = torch.var_mean(y, dim=-1, correction=0)
        if shift is not None:
            m = m - shift.to(m.dtype).view(-1, 1, 1)
        D = y.shape[-1]
        t = y.sum(dim=2, dtype=acc)
        return D * m, D * (v + m.square()), (t if shift is None else t - L * shift.to(t.dtype).view(-1, 1, 1))
    if shift is not None:      # in the accumulation dtype: a bf16-rounded shift would bias the mean
        y = y.to(acc) - shift.to(acc).view(-1, 1, 1, 1)
    s = y.sum(dim=-1, dtype=acc)
    q = torch.linalg.vector_norm(y, dim=-1, dtype=acc).square()
    return s, q, y.sum(dim=2, dtype=acc)


def moments_from_rows(s, q, t, variables: str = "tokens"):
    """(mean, variance, off-diagonal covariance) from :func:`row_col_sums`, with the tokens
    (``variables="tokens"``: observations are (sample, feature) pairs) or the features
    (``"features"``: observations are (sample, token) pairs) as the covariance's variables. The
    partial sums are reduced further with fp64 accumulation."""
    f64 = torch.float64
    R, L, D = s.shape[1], s.shape[2], t.shape[2]
    sum_sq = q.sum(dim=(1, 2), dtype=f64)
    if variables == "tokens":
        totals, sum_tt, n_obs, n_var = s.sum(dim=1, dtype=f64), t.double().square().sum(dim=(1, 2)), R * D, L
    else:
        totals, sum_tt, n_obs, n_var = t.sum(dim=1, dtype=f64), s.double().square().sum(dim=(1, 2)), R * L, D
    return moments_from_sums(sum_sq, sum_tt, totals.sum(dim=1), totals.square().sum(dim=1), n_obs, n_var)


def token_moments(y: torch.Tensor, token_dim: int = 2):
    """Mean, population variance and mean off-diagonal cross-token covariance of y, per config
    (see :func:`moments_from_sums`), from fused reductions of y (no centred copy, no L x L
    matrix): the per-token totals, sum y^2 and the squared token sums.

    The sums accumulate in fp32 (also for bf16 input; fp64 input stays fp64) and are combined in
    fp64. Intended for data whose mean is small against its spread; shift a large-mean tensor
    first (see :func:`row_col_sums`). A (C, R, L, D > 1) tensor with the variables on axis 2 or 3
    goes through :func:`row_col_sums` (two passes on CUDA in fp32).
    """
    if y.ndim == 4 and token_dim in (2, 3) and y.shape[-1] > 1:
        return moments_from_rows(*row_col_sums(y), "tokens" if token_dim == 2 else "features")
    acc = acc_dtype(y)
    dims = tuple(range(1, y.ndim))
    L = y.shape[token_dim]
    n_obs = y[0].numel() // L
    # per-token sums: reduce the contiguous last axis first (fast), then the rest
    if token_dim == y.ndim - 1:
        per_token = y.sum(dim=tuple(range(1, y.ndim - 1)), dtype=acc)
    else:
        inner = y.sum(dim=-1, dtype=acc)
        other = tuple(d for d in range(1, inner.ndim) if d != token_dim)
        per_token = inner.sum(dim=other) if other else inner
    per_token = per_token.double()                                               # (C, L)
    sum_sq = sum_squares(y, dims)
    token_sum = y.sum(dim=token_dim, dtype=acc)
    sum_tt = sum_squares(token_sum, tuple(range(1, token_sum.ndim)))
    return moments_from_sums(sum_sq, sum_tt, per_token.sum(dim=1), per_token.square().sum(dim=1),
                             n_obs, L)


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
