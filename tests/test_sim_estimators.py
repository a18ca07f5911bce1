"""The fast estimators of linear and sha: their algebraic identities hold exactly (fp64, explicit
rotation), and their samplers have the law of the direct simulation (statistical tests whose
tolerances come from the Monte-Carlo standard errors)."""
import math

import numpy as np
import pytest
import torch

from dslm.sim.components import (_column_factor, _effective_wt, _gram_grad_moments, _sha_projected,
                                 _sim_linear, _sim_sha)
from dslm.sim.estimators import (exact_parts, n_exact_parts, rotated_equicorrelated,
                                 rotated_moments, token_moments)

CPU = torch.device("cpu")
F64 = torch.float64
Z_MAX = 5.0            # z-score bound of the statistical tests (two-sided p ~ 6e-7 each)


def _rotation(L: int) -> torch.Tensor:
    """An L x L orthogonal H whose first row is 1^T / sqrt(L): QR of a matrix whose first column is
    ones, sign-fixed."""
    A = torch.randn(L, L, dtype=F64)
    A[:, 0] = 1.0
    Q, _ = torch.linalg.qr(A)
    H = Q.T.clone()
    H[0] *= torch.sign(H[0, 0])
    assert torch.allclose(H @ H.T, torch.eye(L, dtype=F64), atol=1e-13)
    assert torch.allclose(H[0], torch.full((L,), L ** -0.5, dtype=F64), atol=1e-13)
    return H


def _assert_moments_equal(got, expected, rtol=1e-10):
    scale = float(expected[1].abs().max())                       # the variance sets the scale
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * scale)


def _col(v):
    return torch.tensor(v, dtype=F64)


@pytest.mark.parametrize("side", ["forward", "backward"])
def test_rotated_moments_equal_direct_moments_exactly(side):
    """x = a (z + 1 h^T) per sample; with an explicit H, H x / a = H z + sqrt(L) e_0 h^T, and the
    moments rotated_moments reads off (H x / a) B equal token_moments(x B) (fp64)."""
    torch.manual_seed(0)
    C, R, L, d, e = 3, 4, 7, 5, 6
    mean, std, corr = _col([0.3, -2.0, 0.0]), _col([1.0, 0.5, 2.0]), _col([0.0, 0.4, 0.7])
    if side == "backward":
        mean = torch.zeros(C, dtype=F64)
    sigma = _col([0.5, 1.0, 3.0])
    a = std * (1 - corr).sqrt()
    z, xi = torch.randn(C, R, L, d, dtype=F64), torch.randn(C, R, d, dtype=F64)
    h = (mean.view(C, 1, 1) + (std * corr.sqrt()).view(C, 1, 1) * xi) / a.view(C, 1, 1)
    x = a.view(C, 1, 1, 1) * (z + h[:, :, None])
    # forward: y = x W (W = sigma V, d x e); backward: gx = G W^T (W = sigma V, e x d)
    V = torch.randn(C, R, d, e, dtype=F64) if side == "forward" else torch.randn(C, R, e, d, dtype=F64)
    B = V if side == "forward" else V.transpose(-1, -2)
    expected = token_moments(x @ (sigma.view(C, 1, 1, 1) * B))

    H = _rotation(L)
    # the layout of rotated_equicorrelated: H z, then sqrt(L) h as the sum of several offset rows
    offset = math.sqrt(L) * h
    p1, p2 = torch.randn_like(offset), torch.randn_like(offset)
    X = torch.cat([H @ z, torch.stack([p1, p2, offset - p1 - p2], dim=2)], dim=2)
    rotated = H @ x / a.view(C, 1, 1, 1)
    torch.testing.assert_close(X[:, :, 0] + X[:, :, L:].sum(dim=2), rotated[:, :, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(X[:, :, 1:L], rotated[:, :, 1:], rtol=1e-12, atol=1e-12)
    _assert_moments_equal(rotated_moments(X @ B, L, a * sigma), expected)


def test_exact_parts_sum_to_fp32_exactly():
    torch.manual_seed(1)
    w = torch.randn(20_000) * torch.pow(10.0, torch.empty(20_000).uniform_(-4, 4))
    assert n_exact_parts(torch.float32) == 1 and n_exact_parts(torch.bfloat16) == 3
    for dtype in (torch.float32, torch.bfloat16):
        parts = exact_parts(w, dtype)                                 # stacked along axis -2
        assert parts.dtype == dtype and parts.shape == (n_exact_parts(dtype), 20_000)
        assert torch.equal(parts.double().sum(dim=0), w.double()), dtype
    # two bf16 parts do not suffice, so the third is needed
    assert not torch.equal(exact_parts(w, torch.bfloat16)[:2].double().sum(dim=0), w.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_equicorrelated_layout_and_law(dtype):
    """Rows 0..L-1 are unit normals; the offset rows sum to sqrt(L) h, h = (mean + std sqrt(corr) xi)/a,
    i.e. mean sqrt(L) mean/a and variance L corr/(1 - corr) (exactly the constant when corr = 0)."""
    torch.manual_seed(2)
    C, R, L, d = 3, 300, 5, 40
    mean, std, corr = np.array([1.5, -0.7, 0.0]), np.array([0.3, 2.0, 1.0]), np.array([0.0, 0.5, 0.8])
    X, a = rotated_equicorrelated((C, R, L, d), mean, std, corr, CPU, dtype)
    n = n_exact_parts(dtype)
    assert X.shape == (C, R, L + n, d) and X.dtype == dtype
    assert torch.equal(a, torch.tensor(std * np.sqrt(1 - corr)))
    z = X[:, :, :L].double().reshape(C, -1)
    N = z.shape[1]
    assert (z.mean(dim=1).abs() < Z_MAX / math.sqrt(N)).all()
    assert ((z.var(dim=1) - 1).abs() < Z_MAX * math.sqrt(2 / N)).all()
    off = X[:, :, L:].double().sum(dim=2).reshape(C, -1)           # (C, R d)
    m = np.sqrt(L) * mean / (std * np.sqrt(1 - corr))
    v = L * corr / (1 - corr)
    # corr = 0: the fp32 constant, represented exactly
    assert torch.equal(off[0], torch.full_like(off[0], float(np.float32(m[0]))))
    M = off.shape[1]
    for c in (1, 2):
        assert abs(float(off[c].mean()) - m[c]) < Z_MAX * math.sqrt(v[c] / M), c
        assert abs(float(off[c].var()) / v[c] - 1) < Z_MAX * math.sqrt(2 / M), c


def _replicated(config: dict, n: int) -> dict:
    return {k: np.full(n, float(v)) for k, v in config.items()}


def _assert_same_law(a: dict, b: dict, keys, power_keys=()):
    """The replicate means of each estimate agree within Z_MAX standard errors of their difference;
    for ``power_keys`` the bound is also below 6 % of the value, so a 6 % bias would be caught."""
    for key in keys:
        x, y = np.asarray(a[key], dtype=np.float64), np.asarray(b[key], dtype=np.float64)
        se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        assert abs(x.mean() - y.mean()) < Z_MAX * se, (key, x.mean(), y.mean(), se)
        if key in power_keys:
            assert Z_MAX * se < 0.06 * abs(y.mean()), (key, se, y.mean())


def _direct_linear(P, S, n):
    """The definition: x equicorrelated, W ~ N(0, s_w^2/d_in), y = x W; G equicorrelated (mean 0),
    gx = G W^T; token_moments of both (fp64, no rotation)."""
    R, L, din, dout = S["samples"], S["L"], S["d_in"], S["d_out"]
    col = {k: torch.tensor(v).view(n, 1, 1, 1) for k, v in P.items()}

    def equi(m, s, r, e):
        return m + s * (1 - r).sqrt() * torch.randn(n, R, L, e, dtype=F64) \
            + s * r.sqrt() * torch.randn(n, R, 1, e, dtype=F64)

    x = equi(col["mu"], col["s"], col["r"], din)
    W = col["s_w"] / math.sqrt(din) * torch.randn(n, R, din, dout, dtype=F64)
    G = equi(0.0, col["g"], col["r_g"], dout)
    mean, var, cov = token_moments(x @ W)
    _, gvar, gcov = token_moments(G @ W.transpose(-1, -2))
    return {"mean": mean, "var": var, "cov": cov, "grad_var": gvar, "grad_cov": gcov}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [
    {"mu": 1.5, "s": 0.7, "r": 0.5, "s_w": 1.2, "g": 0.8, "r_g": 0.6},
    {"mu": -0.4, "s": 2.0, "r": 0.0, "s_w": 0.3, "g": 1.5, "r_g": 0.0},
])
def test_linear_has_the_law_of_the_direct_simulation(config, dtype):
    """_sim_linear (rotated, in fp32 or bf16) against the definition, over 400 replicates of one
    config."""
    torch.manual_seed(3)
    n, S = 400, {"samples": 40, "L": 6, "d_in": 7, "d_out": 5}
    P = _replicated(config, n)
    fast = {k: v.numpy() for k, v in _sim_linear(P, S, CPU, dtype).items()}
    direct = {k: v.numpy() for k, v in _direct_linear(P, S, n).items()}
    _assert_same_law(fast, direct, ["mean", "var", "cov", "grad_var", "grad_cov"],
                     power_keys=["var", "grad_var"])


def _sha_weights(C, d, k):
    return torch.randn(C, d, k, dtype=F64) * torch.linspace(0.3, 2.0, k, dtype=F64)


@pytest.mark.parametrize("factor", ["direct", "projected"])
def test_gram_gradient_moments_equal_direct_moments_exactly(factor):
    """The Gram identities: the moments of gx = [dq | dk | dv] W^T from the Gram blocks of dq, dk, dv
    with K = W^T W (direct path) or K = F F^T (projected path, W~ = W in fp64) and w = W^T 1 equal
    the moments of gx formed explicitly; W~^T V through the triangular solve equals W^T V."""
    torch.manual_seed(4)
    C, R, L, d, dh = 2, 3, 5, 11, 2
    k = 3 * dh
    W = _sha_weights(C, d, k)
    ones = torch.ones(C, d, 1, dtype=F64)
    if factor == "projected":
        a = _col([0.7, 1.3])
        Lc, Lq, Fe = _column_factor(W, a.view(C, 1, 1), F64)
        torch.testing.assert_close(Lc @ Lc.transpose(1, 2), W.transpose(1, 2) @ W)
        V = torch.randn(C, d, 4, dtype=F64)
        torch.testing.assert_close(_effective_wt(W, Lc, Fe, V), W.transpose(1, 2) @ V, rtol=1e-12, atol=1e-12)
        K, w = Fe @ Fe.transpose(1, 2), _effective_wt(W, Lc, Fe, ones)
    else:
        K, w = W.transpose(1, 2) @ W, W.transpose(1, 2) @ ones
    D = torch.randn(C, R, L, k, dtype=F64) + torch.randn(C, R, 1, k, dtype=F64)  # cross-token correlated
    expected = token_moments(D @ W.transpose(1, 2)[:, None])
    grads = tuple(t.contiguous() for t in D.view(C, R, L, 3, dh).unbind(dim=3))
    _assert_moments_equal(_gram_grad_moments(grads, K, w, d), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_gradient_moments_from_low_precision_gradients(dtype):
    """The route the simulation takes: dq, dk, dv in fp32 or bf16 (non-contiguous, as autograd may
    return them), Gram blocks accumulated in fp32, against the moments of the explicit product of
    the same (rounded) gradients with W in fp64."""
    torch.manual_seed(8)
    C, R, L, d, dh = 2, 5, 7, 9, 3
    W = _sha_weights(C, d, 3 * dh)
    D = (torch.randn(C, R, L, 3 * dh, dtype=F64) + torch.randn(C, R, 1, 3 * dh, dtype=F64)).to(dtype)
    grads = D.view(C, R, L, 3, dh).unbind(dim=3)          # strided views of one tensor
    expected = token_moments(D.double() @ W.transpose(1, 2)[:, None])
    got = _gram_grad_moments(grads, W.transpose(1, 2) @ W, W.transpose(1, 2) @ torch.ones(C, d, 1, dtype=F64), d)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=2e-6 * float(e.abs().max()))


def _wishart_z(S, M, n):
    """z-scores of a sample second-moment matrix S (n iid rows, known mean) against its expectation M:
    Var(S_ij) = (M_ii M_jj + M_ij^2) / n."""
    dg = torch.diagonal(M)
    return (S - M) / ((dg[:, None] * dg[None, :] + M.square()) / n).sqrt()


def test_projected_sampler_has_the_law_of_x_w():
    """Given W, QKV rows of the projected sampler are N(mu W^T 1, s^2 W^T W), with cross-token
    covariance s^2 r W^T W within a sample, as for x W with x equicorrelated."""
    torch.manual_seed(5)
    d, k = 30, 12
    W = _sha_weights(1, d, k).float()
    M = (W.double().transpose(1, 2) @ W.double())[0]

    # independent part: r = 0, mu = 0; rows iid N(0, s^2 M)
    s = 1.3
    qkv, _, _ = _sha_projected({"s": np.array([s]), "r": np.array([0.0]), "mu": np.array([0.0])},
                            W, 40, 500, CPU, torch.float32)
    rows = qkv.reshape(-1, k).double()
    n = rows.shape[0]
    assert _wishart_z(rows.T @ rows / n, s * s * M, n).abs().max() < Z_MAX
    # the transposed factor (rows U Lc instead of U Lc^T) would be caught
    Lc = torch.linalg.cholesky(M)
    assert _wishart_z(rows.T @ rows / n, s * s * Lc.T @ Lc, n).abs().max() > 3 * Z_MAX

    # shared part: r > 0, mu != 0, two tokens per sample
    s, r, mu, R = 0.9, 0.6, 0.8, 8000
    qkv, _, _ = _sha_projected({"s": np.array([s]), "r": np.array([r]), "mu": np.array([mu])},
                            W, R, 2, CPU, torch.float32)
    x = qkv[0].double()                                                     # (R, 2, k)
    mean = mu * W[0].double().sum(dim=0)
    dg = torch.diagonal(M)
    se_mean = (s * s * dg * ((1 - r) / (2 * R) + r / R)).sqrt()
    assert ((x.mean(dim=(0, 1)) - mean).abs() < Z_MAX * se_mean).all()
    c = x - mean
    cross = c[:, 0].T @ c[:, 1] / R
    se_cross = (s ** 4 * (dg[:, None] * dg[None, :] + r * r * M.square()) / R).sqrt()
    assert ((cross - s * s * r * M).abs() < Z_MAX * se_cross).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sha_projected_and_direct_paths_agree(dtype):
    """On a config where both are legal (3 d_h < d), the projected path (in fp32 or bf16) and the
    direct path (fp32) give estimates of the same law, over 1000 replicates each."""
    config = {"mu": 0.5, "s": 1.0, "r": 0.4, "s_v": 1.5, "s_q": 0.8, "g": 1.0, "r_g": 0.3}
    S = {"p": 0.25, "d": 60, "d_h": 16, "L": 8, "samples": 4}
    n = 1000
    torch.manual_seed(6)
    P = _replicated(config, n)
    projected = {k: v.numpy() for k, v in _sim_sha(P, S, CPU, dtype, projected=True).items()}
    direct = {k: v.numpy() for k, v in _sim_sha(P, S, CPU, torch.float32, projected=False).items()}
    _assert_same_law(projected, direct, ["mean", "var", "cov", "grad_var", "grad_cov"],
                     power_keys=["var", "grad_var"])


@pytest.mark.parametrize("welford", [False, True])
def test_row_col_sums_give_token_and_feature_covariances_of_the_shifted_tensor(welford):
    # the one-pass (Welford) path used on CUDA and the plain path agree with torch.cov, for the
    # tokens and for the features as variables, on data whose mean (10) dwarfs its spread
    from dslm.sim.estimators import moments_from_rows, row_col_sums

    g = torch.Generator().manual_seed(3)
    C, R, L, D = 2, 5, 7, 6
    y = 10.0 + 0.3 * torch.randn(C, R, L, D, generator=g) + 0.2 * torch.randn(C, R, 1, D, generator=g)
    shift = y[:, :, :1].mean(dim=(1, 2, 3))
    rows = row_col_sums(y, shift, welford=welford)
    for variables, axis in (("tokens", 2), ("features", 3)):
        mean, var, cov = moments_from_rows(*rows, variables)
        for c in range(C):
            obs = y[c].double().movedim(axis - 1, 0).reshape(y.shape[axis], -1)
            full = torch.cov(obs)
            off = (full.sum() - full.diagonal().sum()) / (full.numel() - full.shape[0])
            assert float(cov[c]) == pytest.approx(float(off), rel=1e-4, abs=1e-7)
            assert float(mean[c]) + float(shift[c]) == pytest.approx(float(y[c].double().mean()), rel=1e-6)
            assert float(var[c]) == pytest.approx(float(y[c].double().var(unbiased=False)), rel=1e-4)


def test_shifted_bf16_rows_keep_the_exact_mean():
    # the shift is subtracted in the accumulation dtype: a bf16-rounded shift (10.03 -> 10.0)
    # would move the measured mean by the rounding error
    from dslm.sim.estimators import moments_from_rows, row_col_sums

    g = torch.Generator().manual_seed(5)
    y = (10.03 + 0.05 * torch.randn(2, 4, 8, 16, generator=g)).to(torch.bfloat16)
    shift = y[:, :, :1].float().mean(dim=(1, 2, 3))
    mean, var, _ = moments_from_rows(*row_col_sums(y, shift))
    truth = y.double().mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean + shift.double(), truth, rtol=1e-6, atol=0)
    torch.testing.assert_close(var, y.double().var(dim=(1, 2, 3), unbiased=False), rtol=1e-4, atol=0)
