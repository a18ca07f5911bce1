"""Finetuning metrics (accuracy, F1, RACE levels) and the sweep table, against hand-computed values."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from dslm.cli import main
from dslm.finetune import metrics as M
from dslm.finetune import sweep as S


def test_accuracy_f1_by_hand():
    pred = [1, 1, 0, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0, 1, 1]
    # tp = 3 (0, 3, 6), fp = 1 (1), fn = 2 (4, 7), tn = 2 -> acc 5/8, F1 = 6 / (6 + 1 + 2) = 2/3
    assert M.accuracy(pred, gold) == pytest.approx(5 / 8)
    assert M.f1_score(pred, gold) == pytest.approx(2 / 3)
    logits = torch.tensor([[0.0, 1.0] if p else [1.0, 0.0] for p in pred])
    sums = {k: float(v) for k, v in M.batch_sums(logits, torch.tensor(gold), "binary").items()}
    assert (sums["tp"], sums["fp"], sums["fn"], sums["correct"], sums["count"]) == (3, 1, 2, 5, 8)
    out = M.summarize(sums)
    assert out["acc"] == pytest.approx(5 / 8) and out["f1"] == pytest.approx(2 / 3)
    assert out["precision"] == pytest.approx(3 / 4) and out["recall"] == pytest.approx(3 / 5)
    # loss = mean cross-entropy: log(1 + e^-1) on hits, log(1 + e) on misses
    expect = (5 * torch.log1p(torch.exp(torch.tensor(-1.0))) + 3 * torch.log1p(torch.exp(torch.tensor(1.0)))) / 8
    assert out["loss"] == pytest.approx(float(expect), rel=1e-6)
    # sums over two halves give the same summary (what the engine does over batches and ranks)
    a = M.batch_sums(logits[:3], torch.tensor(gold[:3]), "binary")
    b = M.batch_sums(logits[3:], torch.tensor(gold[3:]), "binary")
    assert M.summarize({k: float(a[k] + b[k]) for k in a}) == pytest.approx(out)


def test_race_levels():
    logits = torch.eye(4)[[0, 1, 2, 3, 0]]             # predictions 0 1 2 3 0
    labels = torch.tensor([0, 1, 0, 3, 1])
    level = torch.tensor([0, 0, 1, 1, 1])              # middle: 2/2 right; high: 1/3
    out = M.summarize({k: float(v) for k, v in M.batch_sums(logits, labels, "race", level).items()})
    assert out["acc"] == pytest.approx(3 / 5)
    assert out["acc_middle"] == pytest.approx(1.0) and out["acc_high"] == pytest.approx(1 / 3)


def test_sweep_aggregation_by_hand():
    values = {(1e-5, 1): 0.80, (1e-5, 2): 0.82, (1e-5, 3): 0.90,
              (2e-5, 1): 0.84, (2e-5, 2): 0.83, (2e-5, 3): 0.85}
    runs = [{"lr": lr, "seed": s, "metrics": {"dev/acc": v, "dev/loss": 1 - v}} for (lr, s), v in values.items()]
    agg = S.aggregate(runs)
    r1, r2 = agg["dev/acc"]["rows"][1e-5], agg["dev/acc"]["rows"][2e-5]
    # lr 1e-5: mean 2.52/3 = 0.84, median 0.82, sample std sqrt((0.04^2 + 0.02^2 + 0.06^2) / 2) = sqrt(0.0028)
    assert r1["mean"] == pytest.approx(0.84) and r1["median"] == pytest.approx(0.82)
    assert r1["std"] == pytest.approx(0.0028 ** 0.5) and (r1["min"], r1["max"], r1["n"]) == (0.80, 0.90, 3)
    # lr 2e-5: mean 0.84, median 0.84, std sqrt((0 + 0.01^2 + 0.01^2) / 2) = 0.01
    assert r2["mean"] == pytest.approx(0.84) and r2["median"] == pytest.approx(0.84) and r2["std"] == pytest.approx(0.01)
    # accuracy: the highest mean wins; a loss: the lowest
    runs[0]["metrics"].update({"dev/acc": 0.79, "dev/loss": 0.21})
    agg = S.aggregate(runs)
    assert agg["dev/acc"]["best_lr"] == 2e-5 and agg["dev/loss"]["best_lr"] == 2e-5
    single = S.aggregate([{"lr": 3e-5, "seed": 1, "metrics": {"dev/acc": 0.5}}])
    assert single["dev/acc"]["rows"][3e-5]["std"] == 0.0
    md = S.to_markdown(agg, "t")
    assert "| dev/acc | 2e-05 | 3 | 84.00 | 84.00 | 1.00 | 83.00 | 85.00 | best |" in md
    assert "dev/loss" not in md.split("Best")[0]   # losses stay in the CSV, not the table
    rows = list(csv.DictReader(io.StringIO(S.to_csv(agg))))
    assert {r["metric"] for r in rows} == {"dev/acc", "dev/loss"} and len(rows) == 4
    best = [r for r in rows if r["metric"] == "dev/acc" and r["best"] == "1"]
    assert [r["lr"] for r in best] == ["2e-05"] and float(best[0]["std"]) == pytest.approx(0.01)


def test_sweep_collect_and_aggregate_only(tmp_path, capsys):
    for lr, seed, acc in ((1e-5, 1, 0.5), (1e-5, 2, 0.7), (2e-5, 1, 0.9)):
        d = tmp_path / S.run_name(lr, seed)
        d.mkdir()
        (d / "final_metrics.json").write_text(json.dumps(
            {"lr": lr, "seed": seed, "eval": {"dev_matched": {"acc": acc, "loss": 0.3}}}))
    (tmp_path / "lr3e-05_seed1").mkdir()                   # unfinished
    assert main(["finetune-sweep", "--task", "mnli", "--out", str(tmp_path), "--aggregate-only",
                 "--lrs", "1e-5,2e-5,3e-5", "--seeds", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "| dev_matched/acc | 1e-05 | 2 | 60.00 | 60.00 | 14.14 |" in out
    assert "missing runs (3): lr2e-05_seed2, lr3e-05_seed1, lr3e-05_seed2" in out
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    assert table["dev_matched/acc"]["best_lr"] == 2e-5
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()


def test_sweep_errors(tmp_path, capsys):
    def one_line(argv):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dslm finetune-sweep: error: ")
        return lines[0]

    assert "no finished runs" in one_line(["finetune-sweep", "--task", "qqp", "--out", str(tmp_path), "--aggregate-only"])
    assert "set by the sweep" in one_line(["finetune-sweep", "--task", "qqp", "--out", str(tmp_path), "--",
                                           "--lr", "1e-3"])
    assert "--lrs" in one_line(["finetune-sweep", "--task", "qqp", "--lrs", "a,b"])
    # dry run prints the command of each run
    assert main(["finetune-sweep", "--task", "demo", "--out", str(tmp_path), "--lrs", "1e-5", "--seeds", "4",
                 "--nproc", "1", "--dry-run", "--", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "finetune --task demo --lr 1e-05 --seed 4 --out-dir" in out and out.rstrip().endswith("--epochs 1")
