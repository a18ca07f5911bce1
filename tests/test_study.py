"""`dslm study`: spec checks, the planner (search, edge extension, seeds, lrs around another family),
the decision rules on hand-made cells, and the quick study end to end on the CPU with its resume."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.errors import UsageError
from dslm.study.report import summarize_cells, verdict
from dslm.study.spec import (Run, as_argv, half_steps, load_spec, lr_step, non_embedding_params, plan,
                             pretrain_flags)

ROOT = Path(__file__).resolve().parent.parent


SPEC = """
name = "t"
data = "d"
[train]
seq_len = 16
global_batch = 4
[schemes]
a = {ln = "post", init = "megatron"}
b = {ln = "post", init = "dslm"}
[families.S]
tokens = 6400
shapes = {"2x8" = {layers = 2, hidden = 8, heads = 1}, "8x4" = {layers = 8, hidden = 4, heads = 1}}
lrs = [1e-3, 3e-3]
extend = 1
seeds = [1, 2, 3]
[families.M]
tokens = 12800
schemes = ["b"]
shapes = {"7x16" = {layers = 7, hidden = 16, heads = 2}}
lrs_around = "S"
seeds = [1, 2]
[verdict]
method = "b"
baselines = []
broken = "a"
families = ["S"]
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(SPEC)
    return load_spec(path)


def done(run: Run, loss: float, status="done") -> dict:
    return {"id": run.id, "family": run.family, "shape": run.shape, "scheme": run.scheme, "lr": run.lr,
            "seed": run.seed, "status": status, "valid_mlm_loss": loss, "curve_valid": []}


def finish(records, runs, loss_of):
    for r in runs:
        records[r.id] = done(r, loss_of(r))


def test_lr_ladder():
    assert [lr_step(x, True) for x in (1e-4, 3e-4, 3e-2)] == [3e-4, 1e-3, 1e-1]
    assert [lr_step(x, False) for x in (1e-4, 3e-4)] == [3e-5, 1e-4]
    assert lr_step(5e-4, True) == 2e-3


def test_plan_search_then_edge_extension_then_seeds(spec):
    records = {}
    first = plan(spec, records)
    # S: 2 shapes x 2 schemes x 2 lrs at the search seed; M waits for S
    assert len(first) == 8 and {r.seed for r in first} == {1} and {r.family for r in first} == {"S"}
    finish(records, first, lambda r: 5.0 - 100 * r.lr)         # the largest lr wins: at the upper edge
    second = plan(spec, records)
    assert {r.lr for r in second} == {1e-2} and len(second) == 4   # one step past the edge (extend = 1)
    finish(records, second, lambda r: 9.0)                      # worse: the best stays at 3e-3
    third = plan(spec, records)
    assert {(r.lr, r.seed) for r in third if r.family == "S"} == {(3e-3, 2), (3e-3, 3)}
    # M: three lrs around S's best for scheme b at the nearest depth (7 layers -> 8x4)
    assert sorted(r.lr for r in third if r.family == "M") == [1e-3, 3e-3, 1e-2]
    finish(records, third, lambda r: 4.0 + abs(math.log10(r.lr / 3e-3)))   # M's best is the centre
    assert [(r.family, r.lr, r.seed) for r in plan(spec, records)] == [("M", 3e-3, 2)]


def test_extension_stops_at_extend_and_diverged_runs_never_win(spec):
    records = {}
    finish(records, plan(spec, records), lambda r: 5.0 - 100 * r.lr)
    finish(records, plan(spec, records), lambda r: 1.0)         # 1e-2 wins again, but extend = 1
    assert {(r.lr, r.seed) for r in plan(spec, records) if r.family == "S"} == {(1e-2, 2), (1e-2, 3)}
    records = {}
    for r in plan(spec, records):
        records[r.id] = done(r, None, "nonfinite") if r.lr == 3e-3 else done(r, 6.0)
    assert {r.lr for r in plan(spec, records) if r.seed == 1} == {3e-4}   # 1e-3 is best, at the lower edge


def test_a_cell_whose_whole_sweep_stalled_runs_the_half_steps(tmp_path):
    """refine = true: when the best run of a cell's sweep (edges extended) ends above the stall line,
    the midpoints between its lrs run too and the best of all is seeded; a trained cell, a family
    without refine, or an unknown stall line (no unigram reference) never refines."""
    path = tmp_path / "r.toml"
    path.write_text(SPEC.replace("extend = 1", "extend = 0\nrefine = true"))
    refined = load_spec(path)
    assert half_steps([1e-3, 3e-3]) == [1.7e-3]
    records = {}
    sweep = [r for r in plan(refined, records, stall_line=6.5) if r.shape == "2x8" and r.scheme == "a"]
    assert [r.lr for r in sweep] == [1e-3, 3e-3]
    # 2x8/a stalls at both lrs (the slow one above the line too); 2x8/b and 8x4 train
    finish(records, plan(refined, records, stall_line=6.5),
           lambda r: (7.0 if r.lr == 1e-3 else 6.6) if (r.shape, r.scheme) == ("2x8", "a") else 5.0)
    todo = plan(refined, records, stall_line=6.5)
    assert {(r.shape, r.scheme, r.lr) for r in todo if r.seed == 1 and r.family == "S"} == {("2x8", "a", 1.7e-3)}
    assert not any((r.shape, r.scheme) == ("2x8", "a") for r in todo if r.seed > 1)   # seeds wait
    # without a stall line, or in a family without refine, the stalled cell is seeded at once
    assert {r.seed for r in plan(refined, records) if (r.shape, r.scheme) == ("2x8", "a")} == {2, 3}
    (tmp_path / "p.toml").write_text(SPEC.replace("extend = 1", "extend = 0"))
    plain = load_spec(tmp_path / "p.toml")
    assert {r.seed for r in plan(plain, records, stall_line=6.5) if (r.shape, r.scheme) == ("2x8", "a")} == {2, 3}
    finish(records, [r for r in todo if r.seed == 1 and r.family == "S"], lambda r: 6.2)   # the half step trains
    seeds = [r for r in plan(refined, records, stall_line=6.5) if (r.shape, r.scheme) == ("2x8", "a")]
    assert {(r.lr, r.seed) for r in seeds} == {(1.7e-3, 2), (1.7e-3, 3)}


def test_spec_errors_are_one_line(tmp_path):
    def check(text, match):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_spec(path)
    check(SPEC.replace("seq_len = 16", "seq_len = 16\nlr = 1e-3"), r"\[train\] may not set lr")
    check(SPEC.replace('lrs_around = "S"', 'lrs_around = "Z"'), "must name a family defined before it")
    check(SPEC.replace('lrs = [1e-3, 3e-3]', ''), "exactly one of 'lrs' and 'lrs_around'")
    check(SPEC.replace('method = "b"', 'method = "zz"'), "not a scheme")
    check(SPEC + "\nbogus = 1\n", "unknown keys bogus")
    check(SPEC.replace("extend = 1", "extend = 1\nrefine = 1"), "refine must be true or false")
    check("data = [", "not a valid TOML spec")
    check(SPEC.replace("hidden = 16, heads = 2", "hidden = 16, heads = 3"), r"heads dividing hidden \(got 7, 16, 3\)")
    with pytest.raises(UsageError, match="no such study spec"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    with pytest.raises(UsageError, match="not a text file"):
        load_spec(tmp_path / "binary.toml")


def test_run_flags_and_parameter_count(spec):
    run = Run("S", "8x4", "b", 3e-3, 2)
    flags = pretrain_flags(spec, run, "cpu")
    assert flags["steps"] == 100 and flags["eval_every"] == 12 and flags["save_every"] == 25
    assert flags["layers"] == 8 and flags["init"] == "dslm" and flags["lr"] == 3e-3 and flags["seed"] == 2
    argv = as_argv({"seq_len": 16, "cuda_graphs": True, "progress": False, "lr": 3e-3})
    assert argv == ["--seq-len", "16", "--cuda-graphs", "--no-progress", "--lr", "0.003"]
    assert non_embedding_params({"layers": 2, "hidden": 8, "heads": 1}) == 2 * (4 * 64 + 2 * 8 * 32 + 72 + 32)


def _cells_with(spec, losses: dict) -> list:
    """Records where every S cell's search and seeds are finished with the given per-(shape, scheme)
    per-seed losses (lr 1e-3 best, with the extension below it worse)."""
    records = {}
    for (shape, scheme), seeds in losses.items():
        for lr in (3e-4, 1e-3, 3e-3):
            for k, loss in enumerate(seeds, 1):
                if lr == 1e-3 or k == 1:
                    r = Run("S", shape, scheme, lr, k)
                    records[r.id] = done(r, loss if lr == 1e-3 else loss + 1)
    return summarize_cells(spec, records, unigram=7.0)


def test_verdict_rules(spec):
    cells = _cells_with(spec, {("2x8", "a"): [5.0, 5.1, 5.2], ("8x4", "a"): [6.5, 6.6, 6.4],
                               ("2x8", "b"): [5.0, 5.1, 5.2], ("8x4", "b"): [4.5, 4.62, 4.7]})
    v = verdict(spec, cells)
    assert v["enables_depth"] is True and v["deeper_is_better"] is True
    drop = v["deeper_rule"][0]
    assert drop["mean_drop"] == pytest.approx((0.5 + 0.48 + 0.5) / 3) and drop["paired_seeds"] == 3
    # a noisy drop: mean 0.1, paired std 0.1 -> not more than 2 std
    cells = _cells_with(spec, {("2x8", "a"): [5.0, 5.1, 5.2], ("8x4", "a"): [6.5, 6.6, 6.4],
                               ("2x8", "b"): [5.0, 5.1, 5.2], ("8x4", "b"): [4.8, 5.1, 5.1]})
    assert verdict(spec, cells)["deeper_is_better"] is False
    # the broken scheme close to the method: depth rule fails
    cells = _cells_with(spec, {("2x8", "a"): [5.0, 5.1, 5.2], ("8x4", "a"): [4.6, 4.7, 4.8],
                               ("2x8", "b"): [5.0, 5.1, 5.2], ("8x4", "b"): [4.5, 4.62, 4.7]})
    assert verdict(spec, cells)["enables_depth"] is False
    assert verdict(spec, summarize_cells(spec, {}, 7.0))["enables_depth"] is None


def test_quick_study_runs_resumes_and_reports(tmp_path):
    """studies/quick.toml on the CPU: every run recorded, the tables and plots written; a second call
    runs nothing; a run whose record is deleted runs again (and only that one)."""
    spec = tmp_path / "quick.toml"
    data = tmp_path / "data"
    spec.write_text((ROOT / "studies" / "quick.toml").read_text().replace("outputs/data/embedded", str(data)))
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "dslm", "study", str(spec), "--out", str(out), "--work", str(work), "--jobs", "2",
           "--device", "cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 12 and all(r["status"] == "done" for r in result["runs"])
    assert all(r["device_name"].startswith("cpu (") for r in result["runs"])   # the machine of each run
    assert result["unigram_valid_loss"] > 4.0
    for cell in result["cells"]:
        assert cell["complete"] and cell["n"] == 2 and cell["best_lr"] in (1e-3, 3e-3)
        assert math.isfinite(cell["mean"]) and cell["mean"] == pytest.approx(
            sum(cell["seeds"].values()) / 2)
    run = result["runs"][0]
    manifest = json.loads((data / "dataset.json").read_text())
    assert {r["data_sha256"] for r in result["runs"]} == {manifest["files"]["tokens.bin"]["sha256"]}
    assert run["tokens"] == 30 * 16 * 32 and run["steps"] == 30 and len(run["curve_valid"]) == 2
    assert run["curve_valid"][-1][2] == pytest.approx(run["valid_mlm_loss"], abs=1e-6)
    for name in ("results.md", "results.csv", "loss_vs_depth.png", "loss_vs_lr.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.csv").read_text().count("\n") == 13
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "start" not in again.stdout and "0 to run" in again.stdout
    victim = result["runs"][3]["id"]
    (out / "records" / f"{victim}.json").unlink()
    shutil.rmtree(work / victim / "checkpoints")
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and third.stdout.count("start ") == 1 and f"start  {victim}" in third.stdout
    # a record made on another dataset: --report-only refuses to rewrite the results with this one's
    record = out / "records" / f"{result['runs'][0]['id']}.json"
    record.write_text(record.read_text().replace(manifest["files"]["tokens.bin"]["sha256"], "0" * 64))
    before = (out / "results.md").read_text()
    report = subprocess.run(cmd + ["--report-only", "--no-plots"], capture_output=True, text=True, timeout=600)
    assert report.returncode == 2 and "another dataset" in report.stderr
    assert (out / "results.md").read_text() == before


def test_estimate_scales_from_the_nearest_finished_shape(spec):
    """A shape that ran is estimated by its slowest run; an unseen one from the finished shape nearest
    in depth, scaled by layers x tokens and by a larger width; nothing finished -> 0."""
    from dslm.study.runner import estimate_seconds

    shallow = Run("S", "2x8", "a", 1e-3, 1)
    assert estimate_seconds(spec, {}, shallow) == 0.0
    records = {r.id: {**done(r, 5.0), "wall_s": w} for r, w in
               [(shallow, 10.0), (Run("S", "2x8", "b", 1e-3, 1), 12.0)]}
    assert estimate_seconds(spec, records, Run("S", "2x8", "a", 3e-3, 2)) == 12.0
    assert estimate_seconds(spec, records, Run("S", "8x4", "a", 1e-3, 1)) == pytest.approx(12.0 * 4)
    # M: 7 layers, width 16 (2x), twice the tokens; nearest finished shape is still 2x8
    assert estimate_seconds(spec, records, Run("M", "7x16", "b", 1e-3, 1)) == pytest.approx(12.0 * 3.5 * 2 * 2)
    deep = Run("S", "8x4", "b", 1e-3, 1)
    records[deep.id] = {**done(deep, 5.0), "wall_s": 30.0}
    assert estimate_seconds(spec, records, Run("M", "7x16", "b", 1e-3, 1)) == pytest.approx(30.0 * 7 / 8 * 2 * 4)


def test_records_of_another_dataset_are_refused(tmp_path):
    from dslm.study.runner import check_same_data

    records = {"x": {"data_sha256": "a" * 64}, "y": {"data_sha256": "b" * 64}}
    check_same_data({"x": records["x"]}, "a" * 64, tmp_path)
    with pytest.raises(UsageError, match=r"1 records \(e.g. y\) were made on another dataset"):
        check_same_data(records, "a" * 64, tmp_path)
    with pytest.raises(UsageError, match="another dataset"):
        check_same_data({"z": {}}, "a" * 64, tmp_path)


def test_family_train_flags(tmp_path):
    """A family's train table adds flags for its runs only; the study's own flags are refused there."""
    path = tmp_path / "t.toml"
    path.write_text(SPEC.replace('seeds = [1, 2]\n[verdict]', 'seeds = [1, 2]\ntrain = {grad_profile = true}\n[verdict]'))
    spec = load_spec(path)
    assert pretrain_flags(spec, Run("M", "7x16", "b", 1e-3, 1), "cpu")["grad_profile"] is True
    assert "grad_profile" not in pretrain_flags(spec, Run("S", "2x8", "b", 1e-3, 1), "cpu")
    assert "--grad-profile" in as_argv(pretrain_flags(spec, Run("M", "7x16", "b", 1e-3, 1), "cpu"))
    path.write_text(SPEC.replace('seeds = [1, 2]\n[verdict]', 'seeds = [1, 2]\ntrain = {lr = 1}\n[verdict]'))
    with pytest.raises(UsageError, match="family M: train sets lr"):
        load_spec(path)


def test_grad_profile_plot(tmp_path):
    from dslm.study.plots import plot_grad_profiles

    prof = {"init": {"grad_norm": [1.0, 0.5, 0.25]}, "final": {"grad_norm": [0.2, 0.2, 0.3]}}
    runs = [{"family": "stress", "shape": f"{n}x4", "layers": n, "scheme": s, "grad_profile": prof}
            for n in (3, 6) for s in ("a", "b")]
    plot_grad_profiles(runs, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_name_of_a_gpu_slot_is_that_gpus_model(monkeypatch):
    """A slot on the second visible GPU is named by torch.cuda for index 1 (CUDA_VISIBLE_DEVICES ids
    need not be 0, 1, ...)."""
    import torch

    from dslm.study.runner import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU model #{i}")
    slots = [("cuda", "3"), ("cuda", "3"), ("cuda", "5"), ("cuda", "5")]
    assert device_name(slots[2], slots) == "GPU model #1" and device_name(slots[1], slots) == "GPU model #0"
    assert device_name(("cpu", None), [("cpu", None)]).startswith("cpu (")
