"""Closed-form moments of every transformer component (THEORY.md section 1).

Conventions. The input x of a component is Gaussian with mean ``mu``, variance ``s2`` and
cross-token correlation ``r`` (every pair of tokens has correlation r for each feature; features are
independent). The gradient arriving from above, G, has variance ``g2`` and cross-token correlation
``r_g``; "backward" moments are those of the input gradient of ``loss = sum(out * G)``. "cov" is the
mean off-diagonal cross-token covariance. Every function is pure math on Python floats or numpy
arrays (broadcasting), so the same code predicts one configuration or a whole simulation grid.

Each function returns a :class:`Moments` (forward mean/var/cov, backward grad_var/grad_cov) and its
docstring states the equation and whether it is exact.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

PI = np.pi


class Moments(NamedTuple):
    """Forward output mean, variance and cross-token covariance; backward input-gradient variance
    and cross-token covariance."""

    mean: object
    var: object
    cov: object
    grad_var: object
    grad_cov: object

    @property
    def corr(self):
        """Cross-token correlation of the output, cov / var (covariance of the centred output)."""
        return self.cov / self.var


def linear(mu, s2, r, d_in, d_out, sw2, g2=1.0, r_g=0.0) -> Moments:
    """Linear map y = x W with W_ij ~ N(0, sw2), d_in -> d_out (exact).

    mean 0; var = d_in sw2 (s2 + mu^2); cov = d_in sw2 (mu^2 + r s2);
    grad var = d_out sw2 g2; grad cov = r_g * grad var.
    """
    var = d_in * sw2 * (s2 + mu * mu)
    cov = d_in * sw2 * (mu * mu + r * s2)
    gvar = d_out * sw2 * g2
    return Moments(0.0 * var, var, cov, gvar, r_g * gvar)


def relu_corr(r):
    """Correlation of ReLU outputs (centred) for zero-mean inputs with correlation r (exact):
    [pi r + sqrt(1 - r^2) - r acos(r) - 1] / (pi - 1)."""
    r = np.clip(r, -1.0, 1.0)
    return (PI * r + np.sqrt(1 - r * r) - r * np.arccos(r) - 1) / (PI - 1)


def relu_corr_approx(r):
    """The paper's approximation of :func:`relu_corr`: 0.7 r + 0.3 r^2."""
    return 0.7 * r + 0.3 * r * r


def relu(s2, r, g2=1.0, r_g=0.0) -> Moments:
    """ReLU of a zero-mean input (exact).

    mean = s / sqrt(2 pi); var = s2 (pi - 1) / (2 pi);
    cov = s2 [pi r + sqrt(1 - r^2) - r acos(r) - 1] / (2 pi);
    grad var = g2 / 2; grad cov = (1/4 + asin(r) / (2 pi)) r_g g2.
    """
    r = np.clip(r, -1.0, 1.0)
    mean = np.sqrt(s2) / np.sqrt(2 * PI)
    var = s2 * (PI - 1) / (2 * PI)
    cov = s2 * (PI * r + np.sqrt(1 - r * r) - r * np.arccos(r) - 1) / (2 * PI)
    gvar = 0.5 * g2 + 0.0 * r
    gcov = (0.25 + np.arcsin(r) / (2 * PI)) * r_g * g2
    return Moments(mean, var, cov, gvar, gcov)


def gelu(s2, r, g2=1.0, r_g=0.0) -> Moments:
    """GeLU (erf form, x Phi(x)) of a zero-mean input, with a = s2 / (1 + s2) (exact).

    mean = (s / sqrt(2 pi)) sqrt(a)
    var = (s2 / (2 pi)) [pi - a - acos(a) + 2 a sqrt((1 - a) / (1 + a))]
    cov = (s2 / 4) [r + r (2/pi) asin(r a)
          + s2 (2/pi) (s2 (1 - r^2) + 1 + r^2) / ((s2 + 1) sqrt((s2 + 1)^2 - (r s2)^2))] - mean^2
    grad var = g2 [1/2 + (1/(2 pi)) (-acos(a) + a (5 s2 + 3) / (1 + 2 s2)^(3/2))]
    grad cov = r_g g2 [1/2 + (1/(2 pi)) (-acos(r a)
               + r a ((s2 + 1)(2 s2 + 3) - 2 (r s2)^2) / ((s2 + 1)^2 - (r s2)^2)^(3/2))]
    """
    a = s2 / (1 + s2)
    mean = np.sqrt(s2) / np.sqrt(2 * PI) * np.sqrt(a)
    var = s2 / (2 * PI) * (PI - a - np.arccos(a) + 2 * a * np.sqrt((1 - a) / (1 + a)))
    rs = r * s2
    cov = s2 / 4 * (r + r * (2 / PI) * np.arcsin(r * a)
                    + s2 * (2 / PI) * (s2 * (1 - r * r) + 1 + r * r)
                    / ((s2 + 1) * np.sqrt((s2 + 1) ** 2 - rs * rs))) - mean * mean
    gvar = g2 * (0.5 + (-np.arccos(a) + a * (5 * s2 + 3) / (1 + 2 * s2) ** 1.5) / (2 * PI))
    gcov = r_g * g2 * (0.5 + (-np.arccos(r * a) + r * a * ((s2 + 1) * (2 * s2 + 3) - 2 * rs * rs)
                              / ((s2 + 1) ** 2 - rs * rs) ** 1.5) / (2 * PI))
    return Moments(mean, var, cov, gvar, gcov)


LAYERNORM_CORR_MODES = ("delta", "reference")


def layernorm_corr(r, d, mode: str = "delta"):
    """Cross-token correlation after LayerNorm over d features (no affine).

    ``reference``: r (1 - 1/d), what the paper's code predicts (centring removes 1/d).
    ``delta`` (default): r (1 - (1 - r^2) / (2 (d - 1))), a delta-method expansion that also
    accounts for dividing by each token's own random std; error O(1/d^2). Both tend to r.
    """
    if mode == "reference":
        return r * (1 - 1 / d)
    if mode == "delta":
        return r * (1 - (1 - r * r) / (2 * (d - 1)))
    raise ValueError(f"unknown LayerNorm correlation mode {mode!r}; expected one of {LAYERNORM_CORR_MODES}")


def layernorm(s2, r, d, g2=1.0, r_g=0.0, corr_mode: str = "delta") -> Moments:
    """LayerNorm over d features, gain 1, bias 0, any input mean.

    mean 0, var 1 (exact); cov = :func:`layernorm_corr` (delta method by default);
    grad var = g2 / s2, grad cov = r_g g2 / s2 (approximate: O(1/d) error, the projection that
    LayerNorm's backward applies removes about 2 of d directions).
    The feature-feature covariance inside a token is :func:`layernorm_feature_cov`.
    """
    cov = layernorm_corr(r, d, corr_mode)
    return Moments(0.0 * cov, 1.0 + 0.0 * cov, cov, g2 / s2, r_g * g2 / s2)


def layernorm_feature_cov(d):
    """Covariance between two different features of one LayerNorm-ed token: -1/(d - 1) (exact,
    the d features sum to zero and have variance 1)."""
    return -1.0 / (d - 1)


def dropout(mu, s2, r, p, g2=1.0, r_g=0.0) -> Moments:
    """Inverted dropout with rate p (exact).

    mean = mu; var = (s2 + p mu^2) / (1 - p); cov = r s2 (masks are independent across tokens,
    so the centred cross-token covariance keeps only the input's); grad var = g2 / (1 - p);
    grad cov = r_g g2. For a zero-mean input the correlation becomes (1 - p) r.
    """
    var = (s2 + p * mu * mu) / (1 - p)
    return Moments(mu + 0.0 * var, var, r * s2 + 0.0 * var, g2 / (1 - p) + 0.0 * var, r_g * g2 + 0.0 * var)


SOFTMAX_VARIANTS = ("approx", "full", "full_corrected")


def softmax_var(s2, r, L, variant: str = "approx"):
    """Variance of one softmax probability over L logits with variance s2, correlation r
    (approximate, small logits).

    ``approx``: (exp((1 - r) s2) - 1) / L^2.
    ``full`` (the reference's): with E = exp((1 - r) s2 L / (L - 1)),
    (E - 1) E^2 / ((L - 1) exp((1 - r) s2) + 1)^2.
    ``full_corrected``: the same with the exponent factor (L - 1) / L instead of L / (L - 1),
    which our Monte Carlo shows to be the more accurate one (see README).
    """
    if variant == "approx":
        return (np.exp((1 - r) * s2) - 1) / (L * L)
    if variant in ("full", "full_corrected"):
        factor = L / (L - 1) if variant == "full" else (L - 1) / L
        e = np.exp((1 - r) * s2 * factor)
        return (e - 1) * e * e / ((L - 1) * np.exp((1 - r) * s2) + 1) ** 2
    raise ValueError(f"unknown softmax variant {variant!r}; expected one of {SOFTMAX_VARIANTS}")


def softmax(s2, r, L, g2=1.0, variant: str = "approx") -> Moments:
    """Softmax over L logits (approximate, small logits); the upstream gradient is uncorrelated.

    mean = 1/L (exact); var = :func:`softmax_var`;
    grad var: ``approx`` exp((1 - r) s2) g2 / L^2, ``full``/``full_corrected`` g2 (var + 1/L^2).
    Cross-token covariances are not modelled (nan).
    """
    var = softmax_var(s2, r, L, variant)
    if variant == "approx":
        gvar = np.exp((1 - r) * s2) * g2 / (L * L)
    else:
        gvar = g2 * (var + 1.0 / (L * L))
    nan = np.nan * var
    return Moments(1.0 / L + 0.0 * var, var, nan, gvar, nan)


def attention_head(s2, r, d, d_h, L, s_q, s_k, s_v, p=0.0, g2=1.0, r_g=0.0) -> Moments:
    """Single-head attention: Q = x Wq, K = x Wk, V = x Wv (d -> d_h, stds s_q, s_k, s_v),
    P = Dropout_p(softmax(Q K^T / sqrt(d_h))), out = P V; zero-mean input (approximate).

    With w = d s2 s_q^2 s_k^2:
    var = d s_v^2 { r s2 + [ (1 - r)^2 (L - 1) w s2^2
                             + exp((1 - r) d w s2) / (1 - p) (4 (1 - r)^2 w s2^2 + (1 - r) s2) ] / L }
    cov = d s_v^2 { r s2 + [ 2 (1 - r)^2 d s_q^2 s_k^2 s2^3 + (1 - r) s2 ] / L }
    grad var = g2 d_h s_v^2 (1 + (L - 1) r_g (1 - p)) / (L (1 - p))
    grad cov = g2 d_h s_v^2 (1 + (L - 1) r_g) / L
    The backward ignores the path through Q and K (valid for near-uniform attention).
    """
    w = d * s2 * s_q ** 2 * s_k ** 2
    dv = d * s_v ** 2
    one_r = 1 - r
    var = dv * (r * s2 + (one_r ** 2 * (L - 1) * w * s2 ** 2
                          + np.exp(one_r * d * w * s2) / (1 - p) * (4 * one_r ** 2 * w * s2 ** 2 + one_r * s2)) / L)
    cov = dv * (r * s2 + (2 * one_r ** 2 * d * s_q ** 2 * s_k ** 2 * s2 ** 3 + one_r * s2) / L)
    gvar = g2 * d_h * s_v ** 2 * (1 + (L - 1) * r_g * (1 - p)) / (L * (1 - p))
    gcov = g2 * d_h * s_v ** 2 * (1 + (L - 1) * r_g) / L
    return Moments(0.0 * var, var, cov, gvar, gcov)


# ----------------------------------------------------------------------------------------------
# Blocks


def ffn_corr(r):
    """Correlation after the ReLU FFN (Linear -> ReLU -> Linear, zero-mean weights), exact for
    Gaussian input: r + (sqrt(1 - r^2) - r acos(r)) / pi. The second linear map sees the
    uncentred ReLU output, so this is E[relu(a) relu(b)] / E[relu(a)^2]."""
    r = np.clip(r, -1.0, 1.0)
    return r + (np.sqrt(1 - r * r) - r * np.arccos(r)) / PI


def ffn_corr_approx(r):
    """The paper's quadratic approximation of :func:`ffn_corr`: 1/pi + r/2 + (1/2 - 1/pi) r^2."""
    return 1 / PI + r / 2 + (0.5 - 1 / PI) * r * r


def ffn_block(s2, r, d, d_f, s_1, s_2, g2=1.0, r_g=0.0, activation: str = "relu") -> Moments:
    """FFN block Linear(d -> d_f, std s_1) -> activation -> Linear(d_f -> d, std s_2), zero-mean
    input, no dropout.

    ReLU: var_out = d_f s_2^2 d s_1^2 s2 / 2 (exact); r_out = :func:`ffn_corr`; the backward gain
    equals the forward gain, grad var = g2 d_f s_2^2 d s_1^2 / 2 (approximate: it treats the
    ReLU gate as independent of the upstream gradient). GeLU uses E[gelu(h)^2] = var + mean^2 of
    :func:`gelu` with h ~ N(0, d s_1^2 s2) and its gradient gain.
    """
    h2 = d * s_1 ** 2 * s2
    if activation == "relu":
        second_moment = h2 / 2
        gain_back = 0.5
        r_out = ffn_corr(r)
    elif activation == "gelu":
        m = gelu(h2, r)
        second_moment = m.var + m.mean ** 2
        gain_back = gelu(h2, r, 1.0, 0.0).grad_var
        r_out = (m.cov + m.mean ** 2) / second_moment
    else:
        raise ValueError(f"unknown activation {activation!r}")
    var = d_f * s_2 ** 2 * second_moment
    gvar = g2 * d * s_1 ** 2 * d_f * s_2 ** 2 * gain_back
    return Moments(0.0 * var, var, r_out * var, gvar, r_g * gvar)


def attention_block(s2, r, d, s_v, s_o, g2=1.0, r_g=1.0) -> Moments:
    """Multi-head attention block (value d -> d with s_v, output d -> d with s_o) in the limit of
    small logits and large L, where every token attends uniformly (approximate):
    var_out = d^2 s_v^2 s_o^2 r s2 and the output tokens are fully correlated (r_out -> 1 before
    dropout). Backward: the uniform average passes the token-mean of the gradient,
    grad var = d^2 s_v^2 s_o^2 r_g g2 (its own correlation 1)."""
    var = d * d * s_v ** 2 * s_o ** 2 * r * s2
    gvar = d * d * s_v ** 2 * s_o ** 2 * r_g * g2
    return Moments(0.0 * var, var, var, gvar, gvar)
