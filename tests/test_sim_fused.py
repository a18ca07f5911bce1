"""The fused Triton kernel of the LayerNorm and dropout simulations (dslm.sim.fused): its random
numbers, its partial sums against PyTorch's layers applied to the same numbers, and the runner's
fused path. On a CUDA machine the kernels run for real; on the CPU they run in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 there)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dslm.cli import main
from dslm.sim.components import COMPONENTS
from dslm.sim.runner import resolve_grid, run_component

triton = pytest.importorskip("triton", reason="the fused kernels need the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
tl = triton.language
_draws = None                               # dslm.sim.fused._draws, set by the fixture


@pytest.fixture(scope="module")
def kernels():
    """dslm.sim.fused and a test kernel that writes the draws of its counters, both compiled for
    DEVICE (interpreted on the CPU)."""
    import dslm.sim.fused as fused
    global _draws
    _draws = fused._draws                   # a global: Triton resolves a kernel's callees from them

    @triton.jit
    def write_draws(seed, out, shared, L, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """out (pairs, 3, L, D): z, z', u at counters (feature, token, pair, 0); shared (pairs, 2, D):
        xi, xi' at (feature, 0, pair, 1), exactly as _rows_kernel draws them."""
        pair = tl.program_id(0)
        f = tl.arange(0, BLOCK_D)
        t = tl.arange(0, BLOCK_T)
        fm = f < D
        zeros = tl.zeros([BLOCK_D], dtype=tl.int32)
        xi, xi_g, _ = _draws(seed, f, zeros, zeros + pair, zeros + 1)
        tl.store(shared + pair * 2 * D + f, xi, mask=fm)
        tl.store(shared + pair * 2 * D + D + f, xi_g, mask=fm)
        f2 = tl.broadcast_to(f[None, :], (BLOCK_T, BLOCK_D))
        t2 = tl.broadcast_to(t[:, None], (BLOCK_T, BLOCK_D))
        z, z_g, u = _draws(seed, f2, t2, f2 * 0 + pair, f2 * 0)
        m = (t < L)[:, None] & fm[None, :]
        at = out + pair * 3 * L * D + t2 * D + f2
        tl.store(at, z, mask=m)
        tl.store(at + L * D, z_g, mask=m)
        tl.store(at + 2 * L * D, u, mask=m)

    def draws(seed, pairs, L, D):
        out = torch.empty((pairs, 3, L, D), device=DEVICE)
        shared = torch.empty((pairs, 2, D), device=DEVICE)
        write_draws[(pairs,)](seed, out, shared, L, D, BLOCK_T=triton.next_power_of_2(L),
                              BLOCK_D=triton.next_power_of_2(D))
        return out.double().cpu(), shared.double().cpu()

    return fused, draws


def test_draws_are_independent_unit_normals_and_uniforms(kernels):
    _, draws = kernels
    out, shared = draws(12345, 6, 32, 64)                       # 12,288 draws of each kind
    z, zg, u = out[:, 0].flatten(), out[:, 1].flatten(), out[:, 2].flatten()
    n = z.numel()
    for w in (z, zg, shared[:, 0].flatten(), shared[:, 1].flatten()):
        k = w.numel()
        assert abs(float(w.mean())) < 5 / k ** 0.5
        assert abs(float(w.var()) - 1) < 5 * (2 / k) ** 0.5
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5       # Var((U - 1/2)^2) = 1/180
    assert float(u.min()) >= 0 and float(u.max()) < 1
    for a, b in ((z, zg), (z, u - 0.5), (z[1:], z[:-1])):      # the two normals, normal vs uniform, neighbours
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 5 / n ** 0.5
    assert abs(float(z.pow(4).mean()) - 3) < 5 * (96 / n) ** 0.5          # Gaussian kurtosis, not uniform's
    other, _ = draws(12346, 6, 32, 64)
    assert not torch.equal(other, out)                           # the key changes every number


def _reference_rows(op, P, S, z, zg, u, xi, xi_g):
    """The (s, q, t) sums of y (minus mu for dropout) and gx from PyTorch's own layer and autograd
    in fp64, on the kernel's random numbers, each with the largest |element| summed per config
    ((C, 1, 1))."""
    C, R, L, D = len(P["s"]), S["samples"], S["L"], S["d"]
    col = {k: torch.as_tensor(np.asarray(P[k], dtype=np.float64)).view(C, 1, 1, 1) for k in P}
    shape = (C, R, L, D)
    z, zg, u = (t.view(shape) for t in (z, zg, u))
    xi, xi_g = (t.view(C, R, 1, D) for t in (xi, xi_g))
    a, b = col["s"] * (1 - col["r"]).sqrt(), col["s"] * col["r"].sqrt()
    x = (col["mu"] + a * z + b * xi).requires_grad_(True)
    G = col["g"] * (1 - col["r_g"]).sqrt() * zg + col["g"] * col["r_g"].sqrt() * xi_g
    if op == "layernorm":
        y = F.layer_norm(x, (D,), eps=1e-5)
    else:
        y = x * (u >= S["p"]) / (1 - S["p"])
    (gx,) = torch.autograd.grad(y, x, G)
    y = y.detach() - (col["mu"] if op == "dropout" else 0)
    return [((t.sum(-1), t.square().sum(-1), t.sum(2)), t.abs().amax(dim=(1, 2, 3)).view(C, 1, 1))
            for t in (y, gx)]


# (L, d): one token block with padding on both axes; several token blocks (d 100: 8 rows of 128 per
# iteration, d 300: 2 rows of 512), the last one partial, so the loop offset and the column-sum
# accumulation across iterations are exercised.
SHAPES = [(7, 20), (37, 100), (9, 300)]


@pytest.mark.parametrize("L,d", SHAPES)
@pytest.mark.parametrize("op", ["layernorm", "dropout"])
def test_partial_sums_match_pytorch_on_the_same_draws(kernels, op, L, d):
    fused, draws = kernels
    assert fused.block_shape(d)[0] < L or (L, d) == SHAPES[0]
    P = {"mu": np.array([3.0, -10.0]), "s": np.array([1.0, 0.316]), "r": np.array([0.4, 0.0]),
         "g": np.array([1.0, 3.16]), "r_g": np.array([0.0, 0.8])}
    S = {"samples": 3, "L": L, "d": d, "p": 1 / 3}
    gen = torch.Generator().manual_seed(7)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(7)))
    got = fused.row_sums(getattr(fused, op.upper()), P, S, DEVICE, generator=gen)
    out, shared = draws(seed, 2 * 3, L, d)
    want = _reference_rows(op, P, S, out[:, 0], out[:, 1], out[:, 2], shared[:, 0], shared[:, 1])
    if op == "dropout":                                  # the draws drop some but not all elements
        kept = float((out[:, 2] >= 1 / 3).double().mean())
        assert 0.4 < kept < 0.9
    # fp32 vs fp64: sums of d or L terms, and x = mu + ... rounded to fp32 before it is centred, which
    # costs a relative 6e-8 |mu| / s in every centred value (1 + |mu| / s per config below)
    cond = torch.as_tensor(1 + np.abs(P["mu"]) / P["s"]).view(2, 1, 1)
    for got_part, (want_part, largest) in zip(got, want):
        for g, w, scale in zip(got_part, want_part, (d * largest, d * largest ** 2, L * largest)):
            assert g.shape == w.shape
            assert bool(((g.double().cpu() - w).abs() <= 1e-5 * w.abs() + 1e-6 * scale * cond).all())


def test_runner_fused_path_measures_the_component(kernels):
    """Dropout of a mean-10 input through run_component's fused path: the mean comes back from the
    shifted sums, and every moment matches the (exact) theory within Monte-Carlo error."""
    comp = COMPONENTS["dropout"]
    grid = resolve_grid(comp, {"mu": [10.0], "s": [1.0], "r": [0.5], "g": [1.0], "r_g": [0.0], "p": [0.25],
                               "d": [64], "L": [8], "samples": [64]})
    res = run_component(comp, grid, torch.device(DEVICE), seed=3, progress=False, fused=True)
    assert res["fused"] is True
    m, pred = res["columns"]["measured"], res["columns"]["predicted"]
    n = 64 * 8 * 64
    assert m["mean"][0] == pytest.approx(10.0, abs=5 * (pred["var"][0] / n) ** 0.5 * 3)
    assert m["var"][0] == pytest.approx(pred["var"][0], rel=0.1)
    assert m["grad_var"][0] == pytest.approx(pred["grad_var"][0], rel=0.1)
    assert m["cov"][0] == pytest.approx(pred["cov"][0], rel=0.15)


def test_runner_fused_layernorm_matches_the_pytorch_path(kernels):
    """LayerNorm through run_component's fused path (with its feature covariance) against the
    PyTorch path on the same grid: different random numbers, the same moments within Monte-Carlo
    error, and the correlation structure the theory predicts."""
    comp = COMPONENTS["layernorm"]
    grid = resolve_grid(comp, {"mu": [3.0], "s": [2.0], "r": [0.6], "g": [1.0], "r_g": [0.3], "d": [48],
                               "L": [6], "samples": [48]})
    on, off = (run_component(comp, grid, torch.device(DEVICE), seed=5, progress=False, fused=f)
               for f in (True, False))
    assert on["fused"] is True and off["fused"] is False
    m_on, m_off, pred = on["columns"]["measured"], off["columns"]["measured"], on["columns"]["predicted"]
    assert m_on["var"][0] == pytest.approx(1.0, abs=1e-4)            # LayerNorm output: exactly unit variance
    assert m_on["feature_cov"][0] == pytest.approx(pred["feature_cov"][0], abs=0.01)    # -1/(d-1)
    for key, tol in (("cov", 0.05), ("grad_var", 0.1), ("grad_cov", 0.05)):
        assert m_on[key][0] == pytest.approx(m_off[key][0], abs=tol)
        assert m_on[key][0] == pytest.approx(pred[key][0], abs=tol)


def test_fused_on_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["simulate", "--component", "layernorm", "--fused", "on", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--fused on needs --device cuda" in err and "Traceback" not in err


def test_wide_rows_take_the_pytorch_path(kernels):
    """Rows wider than the register block (d > 4096) run through PyTorch even with fused on: the
    same numbers as with fused off."""
    fused, _ = kernels
    assert fused.fits(4096) and not fused.fits(4097)
    n = fused.ELEMENTS_PER_BLOCK
    assert fused.block_shape(100) == (n // 128, 128) and fused.block_shape(1000) == (max(1, n // 1024), 1024)
    comp = COMPONENTS["layernorm"]
    grid = resolve_grid(comp, {"mu": [1.0], "s": [1.0], "r": [0.2], "g": [1.0], "r_g": [0.0], "d": [4097],
                               "L": [3], "samples": [2]})
    on, off = (run_component(comp, grid, torch.device(DEVICE), seed=1, progress=False, fused=f)
               for f in (True, False))
    assert on["columns"]["measured"] == off["columns"]["measured"]
