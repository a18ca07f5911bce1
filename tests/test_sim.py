"""The simulation engine: estimators against torch.cov, the error metric, the quick grid end to end
against the reference table, determinism, grid files and CLI errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dslm.cli import main
from dslm.sim.components import COMPONENTS
from dslm.sim.estimators import equicorrelated, mean_var, percentiles, relative_error, token_moments
from dslm.sim.runner import resolve_grid, run_component

# THEORY.md section 4: the reference's p99 (%) per report row.
REFERENCE_P99 = {
    "linear": {"x mean": 1.3, "x var": 2.8, "g var": 2.2, "x cov": 2.8, "g cov": 2.2},
    "relu": {"x mean": 2.3, "x var": 3.4, "g var": 2.6, "x cov": 3.1, "g cov": 2.3},
    "gelu": {"x mean": 2.4, "x var": 1.3, "g var": 1.1, "x cov": 1.2, "g cov": 0.9},
    "layernorm": {"x mean": 0.0, "x var": 0.0, "g var": 3.2, "x cov (reference r(1-1/d))": 1.0,
                  "x cov (ours, delta method)": 1.0, "feature cov": 0.0, "g cov": 2.2},
    "dropout": {"x mean": 0.5, "x var": 1.5, "g var": 1.5, "x cov": 1.3, "g cov": 1.2},
    "softmax": {"x mean": 0.0, "x var full": 4.0, "x var approx": 2.6, "x var full (corrected exponent)": 4.0,
                "g var full": 4.5, "g var approx": 3.7, "g var full (corrected exponent)": 4.5},
    "sha": {"x mean": 2.5, "x var": 7.8, "g var": 44.5, "x cov": 7.4, "g cov": 8.2},
}


def test_token_moments_match_torch_cov():
    torch.manual_seed(0)
    y = torch.randn(3, 5, 7, 11) * 2 + 0.5 + torch.randn(3, 5, 1, 11)
    mean, var, cov = token_moments(y)
    for i in range(3):
        Y = y[i].transpose(0, 1).reshape(7, -1).double()
        C = torch.cov(Y)
        C.fill_diagonal_(0)
        assert float(cov[i]) == pytest.approx(float(C.mean() * 7 / 6), rel=1e-5)
        assert float(mean[i]) == pytest.approx(float(y[i].double().mean()), rel=1e-6)
        assert float(var[i]) == pytest.approx(float(y[i].double().var(unbiased=False)), rel=1e-5)
    m2, v2 = mean_var(y)
    assert torch.allclose(m2.double(), mean, rtol=1e-5) and torch.allclose(v2.double(), var, rtol=1e-5)


def test_equicorrelated_sampler_moments():
    torch.manual_seed(1)
    C = 3
    mean, std, corr = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.5, 3.0]), torch.tensor([0.0, 0.4, 0.8])
    x = equicorrelated((C, 4000, 6, 50), mean, std, corr)
    m, v, c = token_moments(x)
    assert torch.allclose(m.float(), mean, atol=0.02 * 3)
    assert torch.allclose(v.float(), std ** 2, rtol=0.02)
    assert torch.allclose(c.float(), corr * std ** 2, atol=0.02 * std.max() ** 2)


def test_relative_error_metric():
    assert relative_error(2.0, 1.5)[()] == pytest.approx(0.25)
    # with a scale: the smaller of the two normalisations
    assert relative_error(0.01, 0.02, 1.0)[()] == pytest.approx(0.01)
    # prediction 0: min(|a|, |a| / v)
    assert relative_error(0.003, 0.0, 0.5)[()] == pytest.approx(0.003)
    assert relative_error(0.003, 0.0, 0.001)[()] == pytest.approx(0.003)
    assert relative_error(-0.3, 0.0, 10.0)[()] == pytest.approx(0.03)


def test_percentiles_follow_reference_indexing():
    errs = np.arange(1, 201) / 100.0       # 0.01 .. 2.00
    assert percentiles(errs) == [pytest.approx(101.0), pytest.approx(181.0), pytest.approx(199.0)]


def test_paper_grids_have_the_reference_config_counts():
    counts = {name: int(np.prod([len(v) for v in resolve_grid(c, "paper").values()]))
              for name, c in COMPONENTS.items()}
    assert counts == {"linear": 13122, "relu": 450, "gelu": 450, "layernorm": 4050, "dropout": 4374,
                      "softmax": 625, "sha": 26244}
    assert resolve_grid(COMPONENTS["gelu"], "paper")["samples"] == [100_000]
    assert resolve_grid(COMPONENTS["sha"], "paper")["L"] == [300, 547, 1000]


def test_quick_grid_end_to_end_against_reference(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert main(["simulate", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Error x var:" in printed and "Error x var approx:" in printed
    record = json.loads(out.read_text())
    assert set(record["components"]) == set(COMPONENTS)
    for name, res in record["components"].items():
        assert set(res["percentiles"]) == set(REFERENCE_P99[name]), name
        n = res["configs"]
        assert n == int(np.prod([len(v) for v in res["grid"].values()]))
        for column in ("params", "measured", "predicted", "errors"):
            for key, values in res["columns"][column].items():
                assert len(values) == n, (name, column, key)
        for row, pcts in res["percentiles"].items():
            bound = 2 * REFERENCE_P99[name][row] + 1.0
            assert max(pcts) <= bound, (name, row, pcts, bound)
        # the report's percentiles are those of the stored per-config errors
        for row, errs in res["columns"]["errors"].items():
            assert percentiles(errs) == pytest.approx(res["percentiles"][row])
    # the delta-method LayerNorm correlation beats the reference's r(1 - 1/d)
    ln = record["components"]["layernorm"]["percentiles"]
    assert ln["x cov (ours, delta method)"][1] < ln["x cov (reference r(1-1/d))"][1]


def test_same_seed_same_measurements_other_seed_differs():
    comp = COMPONENTS["sha"]
    grid = resolve_grid(comp, {"d": [40], "d_h": [8], "L": [30], "r": [0.0, 0.5], "s_v": [1.0],
                               "s_q": [0.3], "p": [0.2], "g": [1.0], "r_g": [0.5], "samples": [4]})
    cpu = torch.device("cpu")
    a = run_component(comp, grid, cpu, seed=3, progress=False)
    b = run_component(comp, grid, cpu, seed=3, progress=False)
    c = run_component(comp, grid, cpu, seed=4, progress=False)
    assert a["columns"]["measured"] == b["columns"]["measured"]
    assert a["columns"]["measured"] != c["columns"]["measured"]


def test_chunking_does_not_change_the_measurement_definition():
    """Splitting a group into one-config chunks gives the same kind of estimate (same size
    statistics); with a fixed seed and chunk size the result is reproducible."""
    comp = COMPONENTS["dropout"]
    grid = resolve_grid(comp, {"mu": [10.0], "s": [0.316], "r": [0.5], "g": [1.0], "r_g": [0.0],
                               "p": [0.0], "d": [50], "L": [20], "samples": [40]})
    res = run_component(comp, grid, torch.device("cpu"), seed=0, progress=False, budget_bytes=1)
    # p = 0: dropout is the identity, so the estimates are those of the equicorrelated input
    assert res["columns"]["measured"]["mean"][0] == pytest.approx(10.0, abs=0.05)
    assert res["columns"]["measured"]["var"][0] == pytest.approx(0.1, rel=0.05)
    assert res["columns"]["measured"]["cov"][0] == pytest.approx(0.05, rel=0.15)


def test_grid_file_runs_only_its_components(tmp_path, capsys):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"relu": {"s": [1.0], "r": [0.5], "g": [1.0], "r_g": [0.5], "L": [10],
                                         "samples": [200]}}))
    out = tmp_path / "o.json"
    assert main(["simulate", "--grid", str(grid), "--quiet", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert list(record["components"]) == ["relu"]
    assert record["components"]["relu"]["configs"] == 1
    assert record["components"]["relu"]["grid"]["d"] == [1]          # untouched axes: paper values


@pytest.mark.parametrize("grid_content,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"relu": {"s": [-1.0]}}), "must be > 0"),
    (json.dumps({"relu": {"r": [1.0]}}), "correlation in [0, 1)"),
    (json.dumps({"dropout": {"p": [1.0]}}), "probability in [0, 1)"),
    (json.dumps({"linear": {"d_in": [0]}}), "integer >= 1"),
    (json.dumps({"softmax": {"L": [1]}}), "integer >= 2"),
    (json.dumps({"relu": {"nope": [1]}}), "unknown axis"),
    (json.dumps({"bogus": {}}), "unknown component"),
    (json.dumps({"relu": {"s": []}}), "non-empty list"),
])
def test_bad_grid_files_give_one_line_errors(tmp_path, capsys, grid_content, needle):
    grid = tmp_path / "g.json"
    grid.write_text(grid_content)
    assert main(["simulate", "--grid", str(grid), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("dslm simulate: error:")


def test_cli_errors_exit_2_without_traceback(tmp_path):
    cases = [["simulate", "--component", "conv"], ["simulate", "--grid", str(tmp_path / "missing.json")],
             ["simulate", "--device", "tpu"], ["nosuchcommand"]]
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "dslm", *args], capture_output=True, text=True)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_approximations_command(tmp_path, capsys):
    assert main(["approximations", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "relu_correlation.png").stat().st_size > 10_000
    assert (tmp_path / "ffn_correlation.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "approximations.json").read_text())
    # on r >= 0 both approximations are within 0.01 of the exact maps (THEORY.md section 1)
    assert 0.001 < summary["relu_correlation"]["max_abs_error_r_ge_0"] < 0.01
    assert 0.001 < summary["ffn_correlation"]["max_abs_error_r_ge_0"] < 0.01
    assert "max |approx - exact|" in capsys.readouterr().out
