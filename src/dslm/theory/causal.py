"""Causal attention (decoders): softmax and single-head attention when query t (1-based) sees only
keys 1..t (THEORY.md section 1, "Causal attention (decoders)").

Conventions are those of :mod:`dslm.theory.components`. Averages run over what exists under the mask:
the softmax's moments over the L (L + 1) / 2 unmasked probabilities (each centred on its row mean
1/t, which is also its expectation), the attention output's over the L tokens and the token pairs
i != j. Every function broadcasts over numpy grids; quantities that need a sum over the rows t = 1..L
or a quadrature are evaluated once per distinct (logit variance, L) of the grid.

Attention in a mask enters the attention-block formulas only through a few averages over the rows
(:class:`MaskSums`), so one formula (:func:`attention_head_masked`) serves the causal mask
(:func:`causal_mask_sums`) and the full, bidirectional one (:func:`full_mask_sums`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dslm.theory.components import SOFTMAX_VARIANTS, Moments, softmax

CAUSAL_SOFTMAX_VARIANTS = ("exact",) + SOFTMAX_VARIANTS


def harmonic(L, order: int = 1):
    """Generalised harmonic number H_L^(order) = sum_{t=1}^L 1/t^order, elementwise for integer L >= 0
    (exact up to float rounding)."""
    L = np.asarray(L).astype(np.int64)
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(L.max(initial=0)), 1) + 1) ** order)])
    return table[L]


def _per_unique(fn, *arrays):
    """Evaluate the scalar function ``fn(*values) -> tuple of floats`` once per distinct combination of
    the broadcast ``arrays`` and return each output as an array of the broadcast shape."""
    cols = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    shape = cols[0].shape
    keys, inverse = np.unique(np.stack([c.ravel() for c in cols], axis=1), axis=0, return_inverse=True)
    values = np.array([fn(*k) for k in keys], dtype=np.float64).reshape(len(keys), -1)
    return tuple(values[inverse.ravel(), j].reshape(shape) for j in range(values.shape[1]))


# ------------------------------------------------------------------------------ exact softmax rows


def _falling_sums(q, n: int, k: int):
    """sum_{t=1}^n t^(k) B^(t-k) with B = 1 - q (q in (0, 1], array) and t^(k) = t (t-1)..(t-k+1): the
    k-th derivative of sum_{t=0}^n B^t (exact). For n q <= 1 the binomial series in q,
    sum_j (-q)^j / j! (n+1)^(k+j+1) / (k+j+1), to 40 terms; otherwise the closed form
    k! (1 - B^(n+1)) / q^(k+1) - sum_{j=1}^k C(k, j) (n+1)^(j) B^(n+1-j) (k-j)! / q^(k-j+1)."""
    from math import comb, factorial

    q = np.asarray(q, dtype=np.float64)
    log_b = np.log1p(-np.minimum(q, 1.0 - 1e-16))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):   # the series covers small q
        closed = factorial(k) * -np.expm1((n + 1) * log_b) / q ** (k + 1)
        falling = 1.0
        for j in range(1, k + 1):
            falling *= n + 2 - j                                           # (n+1)^(j)
            closed -= comb(k, j) * falling * np.exp((n + 1 - j) * log_b) * factorial(k - j) / q ** (k - j + 1)
    term = np.ones_like(q) * np.prod([n + 1.0 - i for i in range(k + 1)]) / (k + 1)  # (n+1)^(k+1)/(k+1)
    series = term.copy()
    for j in range(1, 40):
        term = term * -q / j * (n + 1 - (k + j)) * (k + j) / (k + j + 1)
        series += term
    return np.where(n * q <= 1.0, series, closed)


def _laplace(x2: float, L: int):
    """Quadrature for the Laplace-transform representation of softmax moments with logits
    z ~ N(0, x2) iid: nodes lam (a uniform grid in log lam, step h, so weights h lam) and, at each,
    B = E exp(-lam e^z), A1 = E e^z exp(-lam e^z), A2 = E e^(2z) exp(-lam e^z), q = 1 - B (computed
    without cancellation). E is a trapezoid rule in z / sqrt(x2) on [-12, 12] (step 0.05);
    lam runs from 1e-4 / (L E e^z) to 50 e^(10 sqrt(x2)): what lies outside is below 1e-8 relative."""
    sig = np.sqrt(x2)
    v = np.arange(-12.0, 12.0 + 1e-9, 0.05)
    w = np.exp(-0.5 * v * v)
    w /= w.sum()
    e = np.exp(sig * v)
    h = 1.0 / 16
    u = np.arange(np.log(1e-4 / L) - x2 / 2, 10 * sig + np.log(50.0), h)
    lam = np.exp(u)[:, None]
    kern = w * np.exp(-lam * e)
    B, A1, A2 = kern.sum(1), (kern * e).sum(1), (kern * e * e).sum(1)
    q = -(w * np.expm1(-lam * e)).sum(1)
    return h * lam[:, 0], lam[:, 0], B, A1, A2, q


def _prefix_sums(x2: float, L: float):
    """(sum_{t=2}^L t var_t, sum_{t=2}^L t grad_t) for rows of t iid N(0, x2) logits: var_t the
    variance of one probability, grad_t = E gx^2 / g2 of one logit's gradient (exact up to the
    quadrature of :func:`_laplace`, about 1e-6 relative; both 0 for x2 = 0). See
    :func:`softmax_row_exact` for the per-row integrals; summing them over t gives
    sum_t t var_t = int lam D(lam) F_1(L - 1) dlam and
    sum_t t grad_t = int (lam^3 / 6) [2 A2^2 F_2(L) + A2 A1^2 F_3(L)] dlam, F_k = :func:`_falling_sums`."""
    L = int(L)
    if x2 <= 0 or L < 2:
        return 0.0, 0.0
    wt, lam, B, A1, A2, q = _laplace(x2, L)
    D = A2 * B - A1 * A1                         # = E[(e^z - e^z')^2 e^{-lam(e^z + e^z')}] / 2 >= 0
    var = np.sum(wt * lam * D * _falling_sums(q, L - 1, 1))
    grad = np.sum(wt * lam ** 3 / 6 * (2 * A2 * A2 * _falling_sums(q, L, 2) + A2 * A1 * A1 * _falling_sums(q, L, 3)))
    return float(var), float(grad)


def _row_exact(x2: float, t: float):
    """(var_t, grad_t) of one row of t logits, see :func:`softmax_row_exact`."""
    t = int(t)
    if x2 <= 0 or t < 2:
        return 0.0, 0.0
    wt, lam, B, A1, A2, _ = _laplace(x2, t)
    D = A2 * B - A1 * A1
    var = (t - 1) / t * np.sum(wt * lam * D * B ** (t - 2))
    cross = (t - 2) * A2 * A1 * A1 * B ** max(t - 3, 0) if t > 2 else 0.0
    grad = (t - 1) * np.sum(wt * lam ** 3 / 6 * (2 * A2 * A2 * B ** (t - 2) + cross))
    return float(var), float(grad)


def softmax_row_exact(s2, r, t, g2=1.0) -> Moments:
    """Softmax over t Gaussian logits with variance s2 and correlation r, exact (up to quadrature,
    ~1e-6 relative). The shared part of the logits cancels, so only x2 = (1 - r) s2 matters; with
    z iid N(0, x2), Z = sum_u e^(z_u), 1/Z^k = int_0^inf lam^(k-1) e^(-lam Z) dlam / (k-1)! and
    A_k(lam) = E e^(k z) e^(-lam e^z), B = A_0:

    mean = 1/t;  var = E (p - 1/t)^2 = ((t - 1)/t) int lam [A2 B - A1^2] B^(t-2) dlam
        (from (t e_s - Z)^2 = ((t-1) e_s - R)^2, R the other t - 1 terms);
    grad var (upstream G iid, variance g2; gx_s = p_s (G_s - sum_u p_u G_u), so
        E gx_s^2 = g2 E[p_s^2 ((1 - p_s)^2 + sum_{u != s} p_u^2)]):
        g2 (t - 1) int (lam^3/6) [2 A2^2 B^(t-2) + (t - 2) A2 A1^2 B^(t-3)] dlam.
    t = 1 gives var 0, grad 0 (p = 1). Unlike :func:`dslm.theory.components.softmax` this holds for
    any t and any logit variance. Cross-token covariances are not modelled (nan).
    """
    var, grad = _per_unique(_row_exact, (1 - np.asarray(r)) * s2, t)
    return Moments(1.0 / np.asarray(t) + 0.0 * var, var, np.nan * var, g2 * grad, np.nan * var)


def causal_softmax(s2, r, L, g2=1.0, variant: str = "exact") -> Moments:
    """Causally masked softmax over L x L logits (row t: a softmax over its first t logits, rows
    independent, logits with variance s2 and correlation r within a row; upstream G iid, variance g2).
    Moments are averages over the N = L (L + 1) / 2 unmasked entries, each centred on its row mean
    1/t: every probability counts once, as the entries sum_t sum_s P_ts^2 enter the attention output.

    mean = 2 / (L + 1) (exact). var = sum_{t=2}^L t var_t / N, grad var = sum_{t=2}^L t grad_t / N,
    with row 1 exact (var 0, grad 0) and, per row t >= 2:
    ``exact``: the integrals of :func:`softmax_row_exact` (exact up to quadrature; the sums over t
    are done inside the integral in closed form);
    ``approx``, ``full``, ``full_corrected``: :func:`dslm.theory.components.softmax` with L -> t, its
    small-logit, large-L formulas as written (approximate; off by O(1) at small t when the logit
    variance is not small, see THEORY.md).
    Cross-token covariances are not modelled (nan).
    """
    L = np.asarray(L)
    n = L * (L + 1) / 2.0
    if variant == "exact":
        var_sum, grad_sum = _per_unique(_prefix_sums, (1 - np.asarray(r)) * s2, L)
    elif variant in SOFTMAX_VARIANTS:
        var_sum, grad_sum = _per_unique(lambda a, b, l: _transcribed_sums(a, b, l, variant), s2, r, L)
    else:
        raise ValueError(f"unknown causal softmax variant {variant!r}; expected one of {CAUSAL_SOFTMAX_VARIANTS}")
    return Moments(2.0 / (L + 1) + 0.0 * var_sum, var_sum / n, np.nan * var_sum, g2 * grad_sum / n,
                   np.nan * var_sum)


def _transcribed_sums(s2: float, r: float, L: float, variant: str):
    """sum_{t=2}^L t var(t), sum_{t=2}^L t grad(t) for :func:`dslm.theory.components.softmax` with L -> t."""
    t = np.arange(2, int(L) + 1, dtype=np.float64)
    m = softmax(s2, r, t, 1.0, variant)
    return float(np.sum(t * m.var)), float(np.sum(t * m.grad_var))


# ------------------------------------------------------------------------------ attention


class MaskSums(NamedTuple):
    """The averages over an attention mask's rows that the single-head formulas need. Query t sees
    the key set K_t of n_t keys, and Q_s is the set of queries that see key s; attention is near
    uniform (P_ts ~ 1/n_t), so E P_ts P_t's' = 1/(n_t n_t') for t != t', and S_t = E sum_s P_ts^2
    carries the row's fluctuations. Means over t are over the L rows, means over pairs over the
    L (L - 1) ordered pairs t != t'.
    """

    L: object
    sq: object              # mean_t S_t
    seen: object            # mean_t (n_t - 1) / n_t
    seen2: object           # mean_t (n_t - 1) / n_t^2
    overlap: object         # mean over pairs of |K_t & K_t'| / (n_t n_t')
    overlap_total: object   # (L - 1) overlap (kept apart so that L = 1 gives 0, not nan)
    inv_pair: object        # mean over pairs of 1 / (n_t n_t')
    seen_pair: object       # mean over pairs of (n_t - 1)(n_t' - 1) / (n_t n_t')
    shared_total: object    # (1/L) sum over pairs of (|K_t & K_t'| - 1) / (n_t n_t') (nested or equal rows)


def causal_mask_sums(L, logit_var, r) -> MaskSums:
    """:class:`MaskSums` of the causal mask, n_t = t, K_t = {1..t} (exact given S_t): with H = H_L,
    H2 = H_L^(2): seen = (L - H)/L, seen2 = (H - H2)/L, overlap = 2 (L - H)/(L (L - 1)) (pair i < j:
    |K_i & K_j| / (i j) = 1/j), inv_pair = (H^2 - H2)/(L (L - 1)),
    seen_pair = ((L - H)^2 - (L - 2H + H2))/(L (L - 1)), shared_total = (2 (L - H) - (H^2 - H2))/L,
    sq = (H + sum_{t>=2} t var_t)/L with var_t the exact row variance of :func:`softmax_row_exact`
    (logits of variance ``logit_var``, correlation r)."""
    L = np.asarray(L, dtype=np.float64)
    H, H2 = harmonic(L), harmonic(L, 2)
    var_sum, _ = _per_unique(_prefix_sums, (1 - np.asarray(r)) * logit_var, L)
    sq = (H + var_sum) / L
    with np.errstate(divide="ignore", invalid="ignore"):
        pairs = L * (L - 1)
        return MaskSums(L, sq, (L - H) / L, (H - H2) / L, 2 * (L - H) / pairs, 2 * (L - H) / L,
                        (H * H - H2) / pairs, ((L - H) ** 2 - (L - 2 * H + H2)) / pairs,
                        (2 * (L - H) - (H * H - H2)) / L)


def full_mask_sums(L, logit_var, r) -> MaskSums:
    """:class:`MaskSums` of the full (bidirectional) mask, n_t = L for every row: seen = (L - 1)/L,
    seen2 = (L - 1)/L^2, overlap = 1/L, inv_pair = 1/L^2, seen_pair = shared_total = ((L - 1)/L)^2,
    sq = 1/L + L var_L (exact row variance of :func:`softmax_row_exact`)."""
    L = np.asarray(L, dtype=np.float64)
    var = softmax_row_exact(logit_var, r, L).var
    sq = 1 / L + L * var
    return MaskSums(L, sq, (L - 1) / L, (L - 1) / L ** 2, 1 / L, (L - 1) / L, 1 / L ** 2, ((L - 1) / L) ** 2,
                    ((L - 1) / L) ** 2)


def attention_qk_gradient(s2, r, d, d_h, sums: MaskSums, s_q, s_k, s_v, p=0.0, g2=1.0, r_g=0.0):
    """The input gradient's variance and cross-token covariance through Q and K (approximate: near
    uniform attention, first order in the logits; Q, K, V paths are uncorrelated by the symmetry of
    the weights). With w = d s2 s_q^2 s_k^2, logit variance sl2 = d w s2 and c = 1 - r + r p:

    Q path: dq_t = G_t C_t / (n_t sqrt(d_h)), C_t = sum_{s in K_t} m_ts v_s^T (k_s - kbar_t), whose mean
    (n_t - 1)(1 - r) s2 Wv^T Wk does not shrink with n_t; E||C_t||^2 from the Wishart moments of the
    centred scatter matrix gives, per token, g2 d_h s_v^2 [(1 - r)^2 w s2 (n_t - 1)/n_t
    + sl2 (1 - r) c / (1 - p) (n_t - 1)/n_t^2]; its cross-token covariance r_g g2 d_h s_v^2 (1 - r)^2 w s2
    [(n_t - 1)(n_t' - 1) + (d + 1)(|K_t & K_t'| - 1)] / (n_t n_t').
    K path: dk_s = sum_{t in Q_s} (G_t . u_ts) q_t / (n_t sqrt(d_h)), u_ts = m_ts v_s - mean_t(m v): per key
    g2 d_h s_v^2 sl2 {c sum_{t in Q_s} (n_t - 1)/n_t^3
                      + r (1 - r) r_g sum_{t != t' in Q_s} (|K_t & K_t'| - 1)/(n_t n_t')}
    (the second sum: upstream gradients correlated across queries, E u_ts . u_t's ~ d_h sigma_v^2 (1 - r)
    (1 - 1/min(n)) for nested rows, E q_t . q_t' = d_h r sigma_q^2); covariance not modelled.
    Returns (var, cov) averaged with :class:`MaskSums`.
    """
    w = d * s2 * s_q ** 2 * s_k ** 2
    sl2 = d * w * s2
    one_r, c = 1 - r, (1 - r + r * p) / (1 - p)
    unit = g2 * d_h * s_v ** 2
    var = unit * (one_r ** 2 * w * s2 * sums.seen + sl2 * c * (one_r + 1) * sums.seen2
                  + sl2 * r * one_r * r_g * sums.shared_total)
    cov = unit * r_g * one_r ** 2 * w * s2 * (sums.seen_pair + (d + 1) * (sums.overlap - sums.inv_pair))
    return var, cov


def attention_head_masked(s2, r, d, d_h, sums: MaskSums, s_q, s_k, s_v, p=0.0, g2=1.0, r_g=0.0,
                          qk_paths: bool = True) -> Moments:
    """Single-head attention (as :func:`dslm.theory.components.attention_head`) under a mask
    summarised by ``sums`` (approximate: near-uniform attention, first order in the logits, with the
    rows' exact S_t). With w = d s2 s_q^2 s_k^2, logit variance sl2 = d w s2, v_s = c + e_s (shared
    part variance r sigma_v^2, sigma_v^2 = d s_v^2 s2) and rho = r (1 - r) sl2, the covariance of two
    rows' centred logits for a common key (correlated queries; times 1 - 1/min(n_t, n_t') for nested
    rows):

    var = d s_v^2 { r s2 + (1 - r)^2 w s2^2 seen + ((1 - r) + p r) s2 sq / (1 - p) }
        (uniform part exact: Var out_t = sigma_v^2 [r E(sum_s Pd_ts)^2 + (1 - r) E sum_s Pd_ts^2] with
        dropped-out Pd, E(sum Pd)^2 = 1 + p S_t/(1 - p), E sum Pd^2 = S_t/(1 - p). First order in the
        logits the fluctuating output is x_t M S_t w_v / (n_t sqrt(d_h)), M = Wq Wk^T, S_t the centred
        scatter matrix of the row's inputs; its Wishart moments give (1 - r)^2 w s2^2 (n_t - 1)/n_t,
        the same term as the reference's, and the first-order part of S_t. The reference's
        4 (1 - r)^2 w s2^2 exp(.)/((1 - p) L) has no counterpart there and is left out)
    cov = d s_v^2 { r s2 + (1 - r) s2 overlap + r (1 - r)^2 w s2^2 [seen_pair + (d + 1)(overlap - inv_pair)] }
        (uniform part exact: Cov(out_i, out_j) = sigma_v^2 [r + (1 - r) |K_i & K_j| / (n_i n_j)],
        dropout masks independent across rows; the last term is the first-order
        E[(x_i . x_j) tr(S_i S_j)]; the reference's 2 (1 - r)^2 w s2^2 / L is left out likewise)
    grad var = g2 d_h s_v^2 [sq / (1 - p) + r_g (overlap_total + rho shared_total)] + Q/K paths
    grad cov = g2 d_h s_v^2 [(1 - sq) / (L - 1) + r_g (1 - overlap - rho shared_total/(L - 1))] + Q/K paths
        (value path dv_s = sum_{t in Q_s} Pd_ts G_t, exact given S_t and rho for uniform attention;
        Q/K paths: :func:`attention_qk_gradient`, left out with ``qk_paths=False``).
    """
    w = d * s2 * s_q ** 2 * s_k ** 2
    dv = d * s_v ** 2
    one_r = 1 - r
    var = dv * (r * s2 + one_r ** 2 * w * s2 ** 2 * sums.seen + (one_r + p * r) * s2 * sums.sq / (1 - p))
    rho = r * one_r * d * w * s2
    unit = g2 * d_h * s_v ** 2
    gvar = unit * (sums.sq / (1 - p) + r_g * (sums.overlap_total + rho * sums.shared_total))
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = rho * sums.shared_total / (sums.L - 1)
        coherent = sums.seen_pair + (d + 1) * (sums.overlap - sums.inv_pair)
        cov = dv * (r * s2 + one_r * s2 * sums.overlap + r * one_r ** 2 * w * s2 ** 2 * coherent)
        gcov = unit * ((1 - sums.sq) / (sums.L - 1) + r_g * (1 - sums.overlap - cross))
    if qk_paths:
        qk_var, qk_cov = attention_qk_gradient(s2, r, d, d_h, sums, s_q, s_k, s_v, p, g2, r_g)
        gvar, gcov = gvar + qk_var, gcov + qk_cov
    return Moments(0.0 * var, var, cov, gvar, gcov)


def causal_attention_head(s2, r, d, d_h, L, s_q, s_k, s_v, p=0.0, g2=1.0, r_g=0.0,
                          qk_paths: bool = True) -> Moments:
    """Causal single-head attention (query t sees keys 1..t), zero-mean input (approximate: near
    uniform attention; see :func:`attention_head_masked` for the equations and
    :func:`causal_mask_sums` for the causal averages). In the uniform limit (s_q s_k -> 0):

    var  = sigma_v^2 [r + ((1 - r) + p r) H_L / ((1 - p) L)]
    cov  = sigma_v^2 [r + 2 (1 - r)(L - H_L) / (L (L - 1))]      (pair i < j: sigma_v^2 (1 + (j-1) r)/j)
    grad var = g2 d_h s_v^2 [H_L / ((1 - p) L) + 2 r_g (L - H_L) / L]
    grad cov = g2 d_h s_v^2 [(L - H_L) + r_g (L^2 - 3L + 2 H_L)] / (L (L - 1)),
    exact there for any L (L = 1: var = sigma_v^2 / (1 - p), grad var = g2 d_h s_v^2 / (1 - p)).
    """
    sums = causal_mask_sums(L, d * d * s2 * s2 * s_q ** 2 * s_k ** 2, r)
    return attention_head_masked(s2, r, d, d_h, sums, s_q, s_k, s_v, p, g2, r_g, qk_paths)
