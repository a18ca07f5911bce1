"""Causal attention theory (dslm.theory.causal) against independent computations: direct Monte Carlo
of masked softmax and causal SDPA (fixed seeds, tolerances from the sample's standard error), exact
limits (one token, uniform attention, fully correlated input), the full-mask identity with the
bidirectional formulas, and `dslm simulate --causal` end to end."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dslm import theory
from dslm.cli import main
from dslm.sim.components import CAUSAL, causal_softmax_moments
from dslm.sim.runner import resolve_grid, run_component
from dslm.theory import causal

# ------------------------------------------------------------------------------ sums and softmax


def test_harmonic_numbers_are_exact_sums():
    for L in (1, 2, 7, 40):
        assert causal.harmonic(L) == pytest.approx(float(sum(Fraction(1, t) for t in range(1, L + 1))), rel=1e-14)
        assert causal.harmonic(L, 2) == pytest.approx(float(sum(Fraction(1, t * t) for t in range(1, L + 1))),
                                                      rel=1e-14)
    assert causal.harmonic(np.array([[1, 3]])).shape == (1, 2)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_falling_factorial_sums_match_direct_sums(k):
    q = np.array([1e-9, 1e-4, 0.01, 0.3, 1.0])
    for n in (1, 3, 50, 2000):
        t = np.arange(1, n + 1)[:, None].astype(float)
        ff = np.prod([t - i for i in range(k)], axis=0)
        direct = (ff * (1 - q) ** np.maximum(t - k, 0)).sum(axis=0)
        assert causal._falling_sums(q, n, k) == pytest.approx(direct, rel=1e-9)


def _softmax_rows_mc(x2, t, n, seed):
    """Per-row statistics of a softmax over t iid N(0, x2) logits: (mean (p - 1/t)^2, its standard
    error, mean gx^2 for unit upstream gradients, its standard error)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, t)) * math.sqrt(x2)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    G = rng.standard_normal((n, t))
    gx = p * (G - (p * G).sum(axis=1, keepdims=True))
    dev, g = ((p - 1 / t) ** 2).mean(axis=1), (gx ** 2).mean(axis=1)
    return dev.mean(), dev.std() / math.sqrt(n), g.mean(), g.std() / math.sqrt(n)


@pytest.mark.parametrize("x2,t", [(1.0, 2), (1.0, 5), (0.36, 3), (0.01, 12)])
def test_softmax_row_exact_against_monte_carlo(x2, t):
    var, var_se, grad, grad_se = _softmax_rows_mc(x2, t, 200_000, seed=t)
    m = causal.softmax_row_exact(x2 / 0.5, 0.5, t, g2=1.0)        # (1 - r) s2 = x2
    assert m.mean == pytest.approx(1 / t)
    assert abs(m.var - var) < 4 * var_se
    assert abs(m.grad_var - grad) < 4 * grad_se


def test_large_logits_break_the_transcribed_row_formula_but_not_the_exact_one():
    """At t = 2, x2 = 1 the large-L formula is 86 % off; the Monte Carlo above pins the exact one."""
    exact = causal.softmax_row_exact(1.0, 0.0, 2).var
    assert theory.softmax_var(1.0, 0.0, 2, "full_corrected") / exact - 1 > 0.5


def test_small_logit_limit_of_the_causal_softmax():
    """Linearised: p_ts ~ (1 + z_s - zbar_t)/t, so sum_t t var_t = x2 (H_L - H2_L) and
    sum_t t grad_t = H_L - H2_L (relative error O(x2))."""
    L, x2 = 50, 1e-5
    n = L * (L + 1) / 2
    H, H2 = causal.harmonic(L), causal.harmonic(L, 2)
    m = causal.causal_softmax(x2, 0.0, L, g2=1.0)
    assert m.mean == pytest.approx(2 / (L + 1))
    assert m.var == pytest.approx(x2 * (H - H2) / n, rel=1e-4)
    assert m.grad_var == pytest.approx((H - H2) / n, rel=1e-4)


def test_one_token_is_exact_and_the_prefix_integral_equals_the_sum_of_rows():
    one = causal.causal_softmax(0.7, 0.2, 1, g2=3.0)
    assert (one.mean, one.var, one.grad_var) == (1.0, 0.0, 0.0)
    s2, r, L, g2 = np.array([0.5, 1.0]), np.array([0.2, 0.0]), 9, 2.0
    rows = [causal.softmax_row_exact(s2, r, t, g2) for t in range(1, L + 1)]
    n = L * (L + 1) / 2
    m = causal.causal_softmax(s2, r, L, g2)
    assert m.var == pytest.approx(sum(t * row.var for t, row in enumerate(rows, 1)) / n, rel=1e-7)
    assert m.grad_var == pytest.approx(sum(t * row.grad_var for t, row in enumerate(rows, 1)) / n, rel=1e-7)


def test_transcribed_variants_are_the_per_row_formulas_averaged_over_entries():
    s2, r, L = 0.09, 0.4, 30
    n = L * (L + 1) / 2
    for variant in ("approx", "full", "full_corrected"):
        m = causal.causal_softmax(s2, r, L, 1.0, variant)
        rows = [theory.softmax(s2, r, t, 1.0, variant) for t in range(2, L + 1)]
        assert m.var == pytest.approx(sum(t * row.var for t, row in enumerate(rows, 2)) / n, rel=1e-12)
        assert m.grad_var == pytest.approx(sum(t * row.grad_var for t, row in enumerate(rows, 2)) / n, rel=1e-12)
    with pytest.raises(ValueError, match="unknown causal softmax variant"):
        causal.causal_softmax(s2, r, L, 1.0, "nope")


def test_causal_softmax_against_a_masked_softmax_monte_carlo():
    """An independent simulation: L x L matrices with iid rows, torch's softmax over a -inf mask and
    autograd for the gradient; averages over the unmasked entries, each centred on its row mean."""
    torch.manual_seed(0)
    n, L, s, r = 20_000, 6, 1.0, 0.3
    x = s * (math.sqrt(1 - r) * torch.randn(n, L, L, dtype=torch.float64)
             + math.sqrt(r) * torch.randn(n, L, 1, dtype=torch.float64))
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    x.requires_grad_(True)
    p = torch.softmax(x.masked_fill(~mask, -math.inf), dim=-1)
    G = torch.randn(n, L, L, dtype=torch.float64)
    (gx,) = torch.autograd.grad(p, x, G)
    rows = torch.arange(1, L + 1, dtype=torch.float64).view(L, 1)
    dev = ((p - 1 / rows) ** 2 * mask).sum(dim=(1, 2)) / mask.sum()
    g = (gx ** 2 * mask).sum(dim=(1, 2)) / mask.sum()
    m = causal.causal_softmax(s * s, r, L)
    assert abs(m.var - dev.mean().item()) < 4 * dev.std().item() / math.sqrt(n)
    assert abs(m.grad_var - g.mean().item()) < 4 * g.std().item() / math.sqrt(n)


def test_prefix_sum_simulation_equals_the_masked_softmax_on_the_same_draws():
    torch.manual_seed(1)
    C, B, L = 2, 3, 7
    x = torch.randn(C, B, L) * torch.tensor([0.3, 1.0]).view(C, 1, 1)
    G = torch.randn(C, B, L)
    got = causal_softmax_moments(x, G)
    xm = x.double().unsqueeze(2).expand(C, B, L, L).clone().requires_grad_(True)   # every row = x
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    p = torch.softmax(xm.masked_fill(~mask, -math.inf), dim=-1)
    (gx,) = torch.autograd.grad(p, xm, G.double().unsqueeze(2).expand(C, B, L, L))
    n = B * L * (L + 1) / 2
    rows = torch.arange(1, L + 1, dtype=torch.float64).view(L, 1)
    assert torch.allclose(got["mean"], (p * mask).sum(dim=(1, 2, 3)) / n, rtol=1e-6)
    assert torch.allclose(got["var"], ((p - 1 / rows) ** 2 * mask).sum(dim=(1, 2, 3)) / n, rtol=1e-4)
    assert torch.allclose(got["grad_var"], (gx ** 2 * mask).sum(dim=(1, 2, 3)) / n, rtol=1e-4)


# ------------------------------------------------------------------------------ attention


def _attention_mc(N, L, d, dh, s_q, r, p, r_g, seed):
    """N independent draws of (W, x, dropout, G) of single-head attention, causal SDPA, in fp64.
    Per draw: mean square and mean off-diagonal token product of the output and of the input gradient
    (the means are zero, so these are the variance and covariance). Returns {key: (mean, se)}."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    scale = torch.tensor([s_q, s_q, 1.0], dtype=f64).view(1, 1, 3, 1) / math.sqrt(d)
    W = torch.randn(N, d, 3, dh, generator=gen, dtype=f64) * scale
    x = (math.sqrt(1 - r) * torch.randn(N, L, d, generator=gen, dtype=f64)
         + math.sqrt(r) * torch.randn(N, 1, d, generator=gen, dtype=f64)).requires_grad_(True)
    q, k, v = (x @ W[:, :, i] for i in range(3))
    torch.manual_seed(seed)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    G = (math.sqrt(1 - r_g) * torch.randn(N, L, dh, generator=gen, dtype=f64)
         + math.sqrt(r_g) * torch.randn(N, 1, dh, generator=gen, dtype=f64))
    (gx,) = torch.autograd.grad(y, x, G)
    out = {}
    for name, a in (("var", y.detach()), ("grad_var", gx)):
        sq = a.square().mean(dim=(1, 2))
        out[name] = sq
        if L > 1:
            out[name.replace("var", "cov")] = ((a.sum(1).square().sum(-1) - a.square().sum(dim=(1, 2)))
                                               / (a.shape[2] * L * (L - 1)))
    return {key: (v.mean().item(), v.std().item() / math.sqrt(N)) for key, v in out.items()}


def _prediction(L, d, dh, s_q, r, p, r_g, qk_paths=True):
    return causal.causal_attention_head(1.0, r, d, dh, L, s_q / math.sqrt(d), s_q / math.sqrt(d),
                                        1 / math.sqrt(d), p, 1.0, r_g, qk_paths)


@pytest.mark.parametrize("L,r,p,r_g", [(6, 0.3, 0.25, 0.5), (1, 0.3, 0.25, 0.5), (4, 0.0, 0.0, 0.0)])
def test_uniform_attention_is_exact(L, r, p, r_g):
    """s_q = s_k = 0: every logit is 0, attention is exactly uniform over the prefix, and the
    formulas (value path, exact dropout terms) hold for any L; L = 1 is out = dropout(v_1)."""
    mc = _attention_mc(20_000, L, 16, 8, 0.0, r, p, r_g, seed=L)
    m = _prediction(L, 16, 8, 0.0, r, p, r_g)
    for key in ("var", "cov", "grad_var", "grad_cov"):
        if key in mc:
            mean, se = mc[key]
            assert abs(getattr(m, key) - mean) < 4 * se, key
    H = causal.harmonic(L)
    assert m.var == pytest.approx(r + ((1 - r) + p * r) * H / ((1 - p) * L))          # sigma_v^2 = 1
    assert m.grad_var == pytest.approx(8 / 16 * (H / ((1 - p) * L) + 2 * r_g * (L - H) / L))
    if L == 1:
        assert m.var == pytest.approx(1 / (1 - p)) and math.isnan(m.cov)


def test_pairwise_covariance_of_uniform_causal_attention():
    """cov(out_i, out_j) = sigma_v^2 (1 + (j - 1) r)/j for i < j, averaged over the L (L - 1)/2 pairs."""
    L, r = 9, 0.4
    pairs = [(1 + (j - 1) * r) / j for j in range(1, L + 1) for _ in range(1, j)]
    assert _prediction(L, 16, 8, 0.0, r, 0.3, 0.0).cov == pytest.approx(np.mean(pairs), rel=1e-12)


def test_fully_correlated_input_is_exact_for_any_logits():
    """r = 1: every token is the same vector, each row's logits are equal, attention is exactly
    uniform whatever s_q; with p = 0 the Q/K gradient paths vanish too."""
    L = 5
    mc = _attention_mc(20_000, L, 16, 8, 2.0, 1.0 - 1e-12, 0.0, 0.5, seed=11)
    m = _prediction(L, 16, 8, 2.0, 1.0, 0.0, 0.5)
    for key in ("var", "cov", "grad_var", "grad_cov"):
        mean, se = mc[key]
        assert abs(getattr(m, key) - mean) < 4 * se + 1e-9, key


def test_query_and_key_gradient_paths_are_needed_and_close():
    """Moderate logits (logit variance 0.13): the value path alone misses the input-gradient variance
    by 15 %; with the Q/K paths the formula is within its first-order accuracy (a few %)."""
    mc = _attention_mc(3000, 32, 64, 16, 0.6, 0.0, 0.0, 0.0, seed=5)
    mean, se = mc["grad_var"]
    full = _prediction(32, 64, 16, 0.6, 0.0, 0.0, 0.0).grad_var
    value = _prediction(32, 64, 16, 0.6, 0.0, 0.0, 0.0, qk_paths=False).grad_var
    assert abs(full / mean - 1) < 0.03 + 4 * se / mean
    assert abs(value / mean - 1) > 0.10
    for key in ("var", "cov", "grad_cov"):
        mean, se = mc[key]
        assert abs(getattr(_prediction(32, 64, 16, 0.6, 0.0, 0.0, 0.0), key) / mean - 1) < 0.02 + 4 * se / mean


def test_covariance_between_rows_through_shared_keys():
    """r > 0, r_g > 0: two rows' probabilities of a common key are correlated through their correlated
    queries (rho = r (1 - r) logit_var); leaving that out misses the gradient variance by 13 % here."""
    L, d, dh, s_q, r, r_g = 32, 64, 16, 0.8, 0.5, 0.9
    mean, se = _attention_mc(3000, L, d, dh, s_q, r, 0.0, r_g, seed=7)["grad_var"]
    sums = causal.causal_mask_sums(L, s_q ** 4, r)                   # logit variance d^2 (s_q^2/d)^2
    args = (1.0, r, d, dh)
    rest = (s_q / math.sqrt(d), s_q / math.sqrt(d), 1 / math.sqrt(d), 0.0, 1.0, r_g)
    with_rows = causal.attention_head_masked(*args, sums, *rest).grad_var
    without = causal.attention_head_masked(*args, sums._replace(shared_total=0.0), *rest).grad_var
    assert with_rows == pytest.approx(_prediction(L, d, dh, s_q, r, 0.0, r_g).grad_var)
    assert abs(with_rows / mean - 1) < 0.02 + 4 * se / mean
    assert abs(without / mean - 1) > 0.08


def test_full_mask_reproduces_the_bidirectional_formulas():
    """Every row seeing all L keys, with the reference's row second moment S = exp((1 - r) logit_var)/L
    ('approx' softmax) and without the covariance between rows (shared_total = 0), the masked formula
    is the reference's attention_head term by term, except for what the derivation changes: plus the
    dropout term r p S/(1 - p) (O(1/L)) and the first-order coherent covariance
    r (1 - r)^2 w s2^2 [seen_pair + (d + 1)(overlap - inv_pair)]; minus the reference's
    4 (1 - r)^2 w s2^2 S/(1 - p) and 2 (1 - r)^2 w s2^2 / L, which the derivation does not produce.
    The value-path gradient with uniform rows (S = 1/L) is the reference's exactly."""
    s2, r, d, dh, L, p, g2, r_g = 1.3, np.array([0.0, 0.4]), 100, 32, 300, 0.2, 2.0, np.array([0.3, 0.0])
    s_q, s_k, s_v = 0.05, 0.07, 0.09
    ref = theory.attention_head(s2, r, d, dh, L, s_q, s_k, s_v, p, g2, r_g)
    lv = d * d * s2 * s2 * s_q ** 2 * s_k ** 2
    w, dv = d * s2 * s_q ** 2 * s_k ** 2, d * s_v ** 2
    S = np.exp((1 - r) * lv) / L
    sums = causal.full_mask_sums(L, lv, r)._replace(sq=S, shared_total=0.0)
    m = causal.attention_head_masked(s2, r, d, dh, sums, s_q, s_k, s_v, p, g2, r_g, qk_paths=False)
    four = dv * 4 * (1 - r) ** 2 * w * s2 ** 2 * S / (1 - p)
    assert m.var == pytest.approx(ref.var + dv * s2 * r * p * S / (1 - p) - four, rel=1e-12)
    coherent = dv * r * (1 - r) ** 2 * w * s2 ** 2 * (((L - 1) / L) ** 2 + (d + 1) * (L - 1) / L ** 2)
    assert m.cov == pytest.approx(ref.cov - dv * 2 * (1 - r) ** 2 * w * s2 ** 2 / L + coherent, rel=1e-12)
    uniform = causal.attention_head_masked(s2, r, d, dh, sums._replace(sq=1 / L), s_q, s_k, s_v, p, g2, r_g,
                                           qk_paths=False)
    assert uniform.grad_var == pytest.approx(ref.grad_var, rel=1e-12)
    assert uniform.grad_cov == pytest.approx(ref.grad_cov, rel=1e-12)
    # and the exact row variance is the reference's at small logits (large L)
    assert causal.full_mask_sums(L, lv, r).sq == pytest.approx(S, rel=2e-3)


def test_forward_moments_at_small_width():
    """d = 32, logit variance 0.13, r = 0, where the O(w) terms are largest: the output variance and
    covariance within 4 standard errors of 120 weight draws. (A 600-draw run for THEORY.md measured
    the variance 1.3 % below a prediction that keeps the reference's 4 (1 - r)^2 w s2^2 S/(1 - p),
    0.1 % below this one.)"""
    mc = _attention_mc(120, 128, 32, 16, 0.6, 0.0, 0.0, 0.0, seed=3)
    m = _prediction(128, 32, 16, 0.6, 0.0, 0.0, 0.0)
    for key in ("var", "cov"):
        mean, se = mc[key]
        assert abs(getattr(m, key) - mean) < 4 * se, key


def test_causal_sums_match_direct_sums_over_the_mask():
    L = 7
    n = np.arange(1, L + 1)
    pairs = [(i, j) for i in range(1, L + 1) for j in range(1, L + 1) if i != j]
    s = causal.causal_mask_sums(L, 0.0, 0.0)
    assert s.sq == pytest.approx(np.mean(1 / n))                                   # logit variance 0: S_t = 1/t
    assert s.seen == pytest.approx(np.mean((n - 1) / n))
    assert s.seen2 == pytest.approx(np.mean((n - 1) / n ** 2))
    assert s.overlap == pytest.approx(np.mean([min(i, j) / (i * j) for i, j in pairs]))
    assert s.overlap_total == pytest.approx((L - 1) * s.overlap)
    assert s.inv_pair == pytest.approx(np.mean([1 / (i * j) for i, j in pairs]))
    assert s.seen_pair == pytest.approx(np.mean([(i - 1) * (j - 1) / (i * j) for i, j in pairs]))
    assert s.shared_total == pytest.approx(sum((min(i, j) - 1) / (i * j) for i, j in pairs) / L)


# ------------------------------------------------------------------------------ dslm simulate --causal


def test_simulate_causal_flag_end_to_end(tmp_path, capsys):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"softmax": {"s": [0.5, 1.0], "r": [0.2], "g": [1.0], "L": [24],
                                            "samples": [3000]}}))
    out = tmp_path / "o.json"
    assert main(["simulate", "--component", "softmax", "--causal", "--grid", str(grid), "--quiet",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "softmax (causal)" in printed and "Error x var exact:" in printed
    record = json.loads(out.read_text())
    res = record["components"]["softmax"]
    assert record["causal"] is True and res["causal"] is True and res["configs"] == 2
    assert max(res["percentiles"]["x var exact"]) < 2.0 and max(res["percentiles"]["g var exact"]) < 2.0
    # the large-L formula transcribed row by row is far off at these logit variances
    assert res["percentiles"]["x var full corrected (L->t)"][2] > 5.0


def test_causal_sha_simulation_uses_the_mask():
    """At r = 0 the causal output variance is about H_L/L of sigma_v^2, the bidirectional one 1/L:
    3.4x apart at L = 16; the simulation must land on the causal prediction."""
    comp = CAUSAL["sha"]
    grid = resolve_grid(comp, {"d": [40], "d_h": [8], "L": [16], "r": [0.0], "s_v": [1.0], "s_q": [0.1],
                               "p": [0.0], "g": [1.0], "r_g": [0.0], "samples": [64]})
    res = run_component(comp, grid, torch.device("cpu"), seed=0, progress=False)
    assert res["causal"] is True
    measured, predicted = res["columns"]["measured"], res["columns"]["predicted"]
    for key in ("var", "grad_var"):
        assert measured[key][0] == pytest.approx(predicted[key][0], rel=0.15), key
    assert predicted["var"][0] > 3 * theory.attention_head(1.0, 0.0, 40, 8, 16, 0.1 / 40 ** 0.5, 0.1 / 40 ** 0.5,
                                                           1 / 40 ** 0.5).var


def test_simulate_causal_rejects_components_without_a_causal_form(capsys):
    assert main(["simulate", "--component", "linear", "--causal", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no causal form" in err and "\n" not in err
