"""Every exact formula of THEORY.md section 1 against a large-sample Monte Carlo at settings off the
paper grid, with tolerances derived from the sample size; the approximate ones within their
documented error. Monte Carlo here is written independently of dslm.sim (plain tensor ops)."""
import math

import numpy as np
import pytest
import torch

from dslm import theory

N = 4_000_000  # samples for pointwise checks


def _pair(n, s, r, mu=0.0, gen=None):
    """n pairs (a, b) of N(mu, s^2) with correlation r."""
    z0 = torch.randn(n, generator=gen, dtype=torch.float64)
    za = torch.randn(n, generator=gen, dtype=torch.float64)
    zb = torch.randn(n, generator=gen, dtype=torch.float64)
    a = mu + s * (math.sqrt(r) * z0 + math.sqrt(1 - r) * za)
    b = mu + s * (math.sqrt(r) * z0 + math.sqrt(1 - r) * zb)
    return a, b


def _tol(values, k=6.0):
    """k standard errors of the mean of ``values``."""
    return k * float(values.std()) / math.sqrt(values.numel())


@pytest.mark.parametrize("s,r", [(0.7, 0.3), (2.2, 0.85), (1.3, 0.0)])
def test_relu_exact_moments(s, r):
    g = torch.Generator().manual_seed(1)
    a, b = _pair(N, s, r, gen=g)
    m = theory.relu(s * s, r, g2=1.7, r_g=0.45)
    ya, yb = a.clamp_min(0), b.clamp_min(0)
    assert abs(ya.mean() - m.mean) < _tol(ya)
    assert abs(ya.var() - m.var) < _tol((ya - ya.mean()) ** 2)
    prod = (ya - m.mean) * (yb - m.mean)
    assert abs(prod.mean() - m.cov) < _tol(prod)
    # backward: gradient g * 1[x > 0] with g of variance g2 and correlation r_g across the pair
    ga, gb = _pair(N, math.sqrt(1.7), 0.45, gen=g)
    da, db = ga * (a > 0), gb * (b > 0)
    assert abs(da.var() - m.grad_var) < _tol(da * da)
    assert abs((da * db).mean() - m.grad_cov) < _tol(da * db)


@pytest.mark.parametrize("s,r", [(0.5, 0.25), (1.9, 0.7)])
def test_gelu_exact_moments(s, r):
    g = torch.Generator().manual_seed(2)
    a, b = _pair(N, s, r, gen=g)
    m = theory.gelu(s * s, r, g2=0.8, r_g=0.6)
    gelu = torch.nn.functional.gelu
    ya, yb = gelu(a), gelu(b)
    assert abs(ya.mean() - m.mean) < _tol(ya)
    assert abs(ya.var() - m.var) < _tol((ya - ya.mean()) ** 2)
    prod = (ya - m.mean) * (yb - m.mean)
    assert abs(prod.mean() - m.cov) < _tol(prod)
    ga, gb = _pair(N, math.sqrt(0.8), 0.6, gen=g)

    def dgelu(x):
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    da, db = ga * dgelu(a), gb * dgelu(b)
    assert abs(da.var() - m.grad_var) < _tol(da * da)
    assert abs((da * db).mean() - m.grad_cov) < _tol(da * db)


def test_linear_exact_moments():
    g = torch.Generator().manual_seed(3)
    d_in, d_out, runs, mu, s, r, sw = 37, 23, 6000, 0.6, 1.4, 0.35, 0.21
    z0 = torch.randn(runs, 1, d_in, generator=g, dtype=torch.float64)
    x = mu + s * (math.sqrt(r) * z0 + math.sqrt(1 - r) * torch.randn(runs, 2, d_in, generator=g, dtype=torch.float64))
    W = sw * torch.randn(runs, d_in, d_out, generator=g, dtype=torch.float64)
    y = x @ W
    m = theory.linear(mu, s * s, r, d_in, d_out, sw * sw, g2=2.0, r_g=0.5)
    assert abs(y.mean()) < _tol(y)
    assert abs(y.square().mean() - m.var) < _tol(y.square())
    prod = y[:, 0] * y[:, 1]
    assert abs(prod.mean() - m.cov) < _tol(prod)
    G = math.sqrt(2.0) * (math.sqrt(0.5) * torch.randn(runs, 1, d_out, generator=g, dtype=torch.float64)
                          + math.sqrt(0.5) * torch.randn(runs, 2, d_out, generator=g, dtype=torch.float64))
    gx = G @ W.transpose(1, 2)
    assert abs(gx.square().mean() - m.grad_var) < _tol(gx.square())
    gp = gx[:, 0] * gx[:, 1]
    assert abs(gp.mean() - m.grad_cov) < _tol(gp)


@pytest.mark.parametrize("p,mu", [(0.25, 0.0), (0.6, 2.5)])
def test_dropout_exact_moments(p, mu):
    g = torch.Generator().manual_seed(4)
    s, r = 0.9, 0.4
    a, b = _pair(N, s, r, mu=mu, gen=g)
    keep_a = (torch.rand(N, generator=g, dtype=torch.float64) >= p) / (1 - p)
    keep_b = (torch.rand(N, generator=g, dtype=torch.float64) >= p) / (1 - p)
    ya, yb = a * keep_a, b * keep_b
    m = theory.dropout(mu, s * s, r, p, g2=1.3, r_g=0.7)
    assert abs(ya.mean() - m.mean) < _tol(ya)
    assert abs(ya.var() - m.var) < _tol((ya - ya.mean()) ** 2)
    prod = (ya - mu) * (yb - mu)
    assert abs(prod.mean() - m.cov) < _tol(prod)
    ga, gb = _pair(N, math.sqrt(1.3), 0.7, gen=g)
    da, db = ga * keep_a, gb * keep_b
    assert abs(da.var() - m.grad_var) < _tol(da * da)
    assert abs((da * db).mean() - m.grad_cov) < _tol(da * db)


def test_layernorm_exact_and_corr():
    g = torch.Generator().manual_seed(5)
    d, runs, r, s, mu = 60, 60000, 0.55, 1.7, -4.0
    z0 = torch.randn(runs, 1, d, generator=g, dtype=torch.float64)
    x = mu + s * (math.sqrt(r) * z0 + math.sqrt(1 - r) * torch.randn(runs, 2, d, generator=g, dtype=torch.float64))
    y = torch.nn.functional.layer_norm(x, (d,), eps=0.0)
    assert abs(y.mean()) < 1e-12
    assert abs(y.square().mean() - 1) < 1e-9                      # exact per token
    fc = (y[:, 0, :, None] * y[:, 0, None, :]).mean(0)
    off = fc[~torch.eye(d, dtype=bool)].mean()
    assert abs(off - theory.layernorm_feature_cov(d)) < 1e-9        # exact: features sum to 0
    corr = (y[:, 0] * y[:, 1]).mean()
    tol = _tol((y[:, 0] * y[:, 1]).mean(1), k=5)
    ours, ref = theory.layernorm_corr(r, d, "delta"), theory.layernorm_corr(r, d, "reference")
    assert abs(corr - ours) < tol
    assert abs(corr - ours) < abs(corr - ref)                       # the delta method is better here
    with pytest.raises(ValueError):
        theory.layernorm_corr(r, d, "bogus")


def test_layernorm_backward_approximation_within_documented_error():
    """grad var = g2/s2 is O(1/d): Monte Carlo ratio close to (d - 2)/(d - 3)-ish, within 2/d."""
    g = torch.Generator().manual_seed(6)
    d, s = 100, 2.0
    x = (s * torch.randn(20000, d, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.nn.functional.layer_norm(x, (d,), eps=0.0)
    G = torch.randn(20000, d, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, G)
    ratio = float(gx.var() / theory.layernorm(s * s, 0.0, d, 1.0).grad_var)
    assert abs(ratio - 1) < 2.0 / d


@pytest.mark.parametrize("s,r,L", [(0.1, 0.2, 300), (0.316, 0.6, 720), (1.0, 0.0, 1000)])
def test_softmax_approximations_within_documented_error(s, r, L):
    g = torch.Generator().manual_seed(7)
    B = 20000
    z0 = torch.randn(B, 1, generator=g, dtype=torch.float64)
    x = s * (math.sqrt(r) * z0 + math.sqrt(1 - r) * torch.randn(B, L, generator=g, dtype=torch.float64))
    y = torch.softmax(x, -1)
    assert abs(y.mean() - 1 / L) < 1e-12                            # exact
    var = float(y.var(unbiased=False))
    approx = theory.softmax_var(s * s, r, L, "approx")
    corrected = theory.softmax_var(s * s, r, L, "full_corrected")
    assert abs(approx / var - 1) < 0.03                              # small-logit approximation
    assert abs(corrected / var - 1) < 0.03
    x.requires_grad_(True)
    G = torch.randn(B, L, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(torch.softmax(x, -1), x, G)
    gvar = float(gx.var())
    assert abs(theory.softmax(s * s, r, L, 1.0, "approx").grad_var / gvar - 1) < 0.05


def test_softmax_full_variants_differ_only_in_exponent():
    full = theory.softmax_var(0.01, 0.0, 300, "full")
    corr = theory.softmax_var(0.01, 0.0, 300, "full_corrected")
    assert full > corr > 0
    with pytest.raises(ValueError):
        theory.softmax_var(0.01, 0.0, 300, "nope")


def test_attention_head_near_uniform():
    """Small logits: the single-head formulas within a few % of a direct simulation."""
    g = torch.Generator().manual_seed(8)
    d, dh, L, R, r = 128, 32, 200, 64, 0.3
    sq, sv = 0.1 / math.sqrt(d), 1.0 / math.sqrt(d)
    z0 = torch.randn(R, 1, d, generator=g, dtype=torch.float64)
    x = (math.sqrt(r) * z0 + math.sqrt(1 - r) * torch.randn(R, L, d, generator=g, dtype=torch.float64)).requires_grad_()
    Wq, Wk, Wv = (std * torch.randn(d, dh, generator=g, dtype=torch.float64) for std in (sq, sq, sv))
    scores = (x @ Wq) @ (x @ Wk).transpose(1, 2) / math.sqrt(dh)
    out = torch.softmax(scores, -1) @ (x @ Wv)
    m = theory.attention_head(1.0, r, d, dh, L, sq, sq, sv, 0.0, 1.0, 0.0)
    assert abs(float(out.detach().var()) / m.var - 1) < 0.1
    G = torch.randn(R, L, dh, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, x, G)
    assert abs(float(gx.var()) / m.grad_var - 1) < 0.1


def test_ffn_block_matches_simulation_and_approximation():
    g = torch.Generator().manual_seed(9)
    d, df, n, r = 64, 256, 4000, 0.5
    s1, s2 = 1.1 / math.sqrt(d), 0.9 / math.sqrt(df)
    z0 = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    x = math.sqrt(r) * z0 + math.sqrt(1 - r) * torch.randn(n, 2, d, generator=g, dtype=torch.float64)
    W1 = s1 * torch.randn(d, df, generator=g, dtype=torch.float64)
    W2 = s2 * torch.randn(df, d, generator=g, dtype=torch.float64)
    y = torch.relu(x @ W1) @ W2
    m = theory.ffn_block(1.0, r, d, df, s1, s2)
    assert abs(float(y.square().mean()) / m.var - 1) < 0.1            # one weight draw: ~ 1/sqrt(d)
    corr = float((y[:, 0] * y[:, 1]).mean() / y.square().mean())
    assert abs(corr - m.corr) < 0.03
    rr = np.linspace(0, 1, 101)
    assert np.max(np.abs(theory.ffn_corr(rr) - theory.ffn_corr_approx(rr))) < 0.01
    assert np.max(np.abs(theory.relu_corr(rr) - theory.relu_corr_approx(rr))) < 0.01
