"""Finetuning through the engine: a few CPU steps learn the demo task; `dslm finetune` end to end for
demo, QQP (from our checkpoint) and RACE; user errors are one line with exit status 2."""
from __future__ import annotations

import json

import pytest
import torch

from dslm.cli import main
from dslm.data.vocab import Tokenizer
from dslm.finetune.command import _embedded_vocab
from dslm.finetune.features import EncodedDataset
from dslm.finetune.tasks import DEMO_DATA, SPECS, FinetuneTask, load_split, predict
from dslm.model import BertConfig, BertForPreTraining, BertModel
from dslm.train.engine import TrainConfig, train



@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(_embedded_vocab())


def test_engine_steps_raise_accuracy(tmp_path, tok):
    spec = SPECS["demo"]
    sets = {s: EncodedDataset(load_split(spec, str(DEMO_DATA), s, tok, 64, cache_dir=tmp_path / "c", log=print)[0],
                              tok.special.pad, 64)
            for s in ("train", "dev_matched")}
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=2, hidden_dropout=0.0,
                        attention_dropout=0.0, init="dslm")
    task = FinetuneTask(spec, config, lambda: BertModel(config), sets["train"], {"dev_matched": sets["dev_matched"]}, 64)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=60, global_batch=16, lr=1e-3, warmup=0.1,
                      precision="fp32", eval_every=0, eval_iters=None, save_every=0, num_workers=0, device="cpu",
                      progress=False, log_every=20, seed=3)
    torch.manual_seed(cfg.seed)
    before = task.build_model()
    acc0 = (predict(before, sets["dev_matched"]).argmax(-1) == sets["dev_matched"].enc.labels).mean()
    result = train(task, cfg)
    acc1 = result["eval"]["dev_matched"]["acc"]
    assert acc0 < 0.45 and acc1 > 0.55 and acc1 > acc0 + 0.15, (acc0, acc1)
    assert result["steps"] == 60 and result["train"]["loss"] < 1.0


def _run(argv):
    return main(["finetune", "--device", "cpu", "--no-progress", "--precision", "fp32", *argv])


def test_cli_demo_end_to_end_and_cache(tmp_path, capsys):
    argv = ["--task", "demo", "--steps", "12", "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
            "--eval-batch", "50"]
    assert _run(argv) == 0
    first = capsys.readouterr().out
    assert "train: " in first and "600 examples [tokenised in" in first
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["task"] == "demo" and final["steps"] == 12 and set(final["eval"]) == {"dev_matched", "dev_mismatched"}
    lines = (tmp_path / "out" / "predictions_dev_matched.tsv").read_text().splitlines()
    assert lines[0] == "id\tprediction\tlabel\tcorrect" and len(lines) == 151
    # the predictions file agrees with the engine's evaluation
    assert final["predictions"]["dev_matched"]["acc"] == pytest.approx(final["eval"]["dev_matched"]["acc"])
    assert _run(argv + ["--out-dir", str(tmp_path / "out2")]) == 0
    assert "600 examples [loaded in" in capsys.readouterr().out


def _qqp(folder):
    folder.mkdir(parents=True)
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = [f"{i}\t{2 * i}\t{2 * i + 1}\twhat is the file {i} ?\twhat is the file {i if i % 2 else i + 1} ?\t{i % 2}"
            for i in range(40)]
    (folder / "train.tsv").write_text(head + "\n".join(rows) + "\nbroken row\n")
    (folder / "dev.tsv").write_text(head + "\n".join(rows[:10]) + "\n")


def test_cli_qqp_from_our_checkpoint(tmp_path, capsys):
    _qqp(tmp_path / "QQP")
    config = BertConfig(vocab_size=8192, hidden_size=32, num_layers=2, num_heads=2, init="megatron")
    BertForPreTraining(config).save_pretrained(tmp_path / "ckpt")
    argv = ["--task", "qqp", "--data", str(tmp_path / "QQP"), "--init-from", str(tmp_path / "ckpt"),
            "--vocab", str(_embedded_vocab()), "--steps", "4", "--global-batch", "8", "--lr", "1e-4",
            "--out-dir", str(tmp_path / "out"), "--max-len", "32"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "40 examples, 1 malformed rows skipped: 1 rows with fewer than 6 columns (first at train.tsv:42)" in out
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert {"acc", "f1", "precision", "recall", "loss"} <= set(final["eval"]["dev"])
    assert final["data_reports"]["train"]["malformed"] == {"rows with fewer than 6 columns": 1}
    assert "dslm checkpoint" in final["init_from"]
    assert (tmp_path / "QQP" / ".dslm_cache").is_dir()     # the cache sits next to writable data


def test_cli_race_fresh_model(tmp_path):
    for split in ("train", "dev", "test"):
        for level in ("middle", "high"):
            d = tmp_path / "RACE" / split / level
            d.mkdir(parents=True)
            for k in range(2):
                (d / f"{k}.txt").write_text(json.dumps({
                    "id": f"{level}{k}.txt", "article": "the file is open . the queue is empty .",
                    "questions": ["the file is _ .", "what is empty ?"],
                    "options": [["open", "closed", "valid", "ready"], ["the queue", "the file", "a list", "a key"]],
                    "answers": ["A", "A"]}))
    out = tmp_path / "out"
    assert _run(["--task", "race", "--data", str(tmp_path / "RACE"), "--steps", "3", "--global-batch", "4",
                 "--out-dir", str(out), "--max-len", "48", "--lr", "1e-3"]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(final["eval"]) == {"dev", "test"}
    assert {"acc", "acc_middle", "acc_high"} <= set(final["eval"]["test"])
    rows = (out / "predictions_test.tsv").read_text().splitlines()
    assert rows[0].endswith("\tlevel") and len(rows) == 9 and rows[1].split("\t")[1] in "ABCD"


@pytest.mark.parametrize("argv, needle", [
    (["--task", "mnli"], "--data is required"),
    (["--task", "mnli", "--data", "{tmp}/nope"], "no such directory"),
    (["--task", "mnli", "--data", "{tmp}"], "train.tsv: file not found"),
    (["--task", "race", "--data", "{tmp}"], "no 'train' folder"),
    (["--task", "demo", "--init-from", "{tmp}/nope"], "--init-from"),
    (["--task", "demo", "--vocab", "{tmp}/v.txt"], "--vocab"),
    (["--task", "demo", "--max-len", "4"], "--max-len 4"),
    (["--task", "demo", "--lr", "-1"], "--lr"),
    (["--task", "demo", "--data", "hf"], "demo task reads its shipped files"),
    (["--task", "qqp", "--data", "{tmp}/bad"], "lacks the column"),
])
def test_cli_errors_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("a\tb\n1\t2\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _run(argv + ["--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dslm finetune: error: ") and needle in lines[0], lines


def test_cli_hf_hub_and_hf_model(tmp_path, monkeypatch, capsys):
    """--data hf (the download faked: datasets.load_dataset returns local rows) from a local HF BERT
    folder whose vocab.txt is found next to its weights."""
    import shutil
    import sys
    import types

    transformers = pytest.importorskip("transformers")
    rows = [{"question1": f"what is the file {i} ?", "question2": f"what is the key {i} ?", "label": i % 2, "idx": i}
            for i in range(24)]

    class Table(list):
        column_names = ["question1", "question2", "label", "idx"]

        def __getitem__(self, key):
            return [r[key] for r in self] if isinstance(key, str) else list.__getitem__(self, key)

    def load_dataset(path, name=None, split=None):
        assert (path, name) == ("nyu-mll/glue", "qqp") and split in ("train", "validation")
        return Table(rows if split == "train" else rows[:8])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hf_cfg = transformers.BertConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(hf_cfg).save_pretrained(tmp_path / "hf")
    shutil.copy(_embedded_vocab(), tmp_path / "hf" / "vocab.txt")
    monkeypatch.chdir(tmp_path)
    assert _run(["--task", "qqp", "--data", "hf", "--init-from", str(tmp_path / "hf"), "--steps", "2",
                 "--global-batch", "8", "--max-len", "32", "--out-dir", "out"]) == 0
    out = capsys.readouterr().out
    assert "nyu-mll/glue/qqp:train: 24 examples" in out and "HF BERT" in out
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["data"] == "hf" and "f1" in final["eval"]["dev"]
    assert list((tmp_path / "outputs" / "finetune_cache").glob("qqp-train-*.npz"))


def test_demo_under_two_process_fsdp(tmp_path):
    """torchrun, 2 CPU processes, FSDP2: training, evaluation and the predictions (from the gathered
    final checkpoint) all run; the prediction file's accuracy is the reported one."""
    import os
    import subprocess
    import sys

    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dslm", "finetune", "--task", "demo", "--device", "cpu", "--no-progress", "--fsdp",
                           "--steps", "10", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((out / "final_metrics.json").read_text())
    rows = (out / "predictions_dev_matched.tsv").read_text().splitlines()[1:]
    assert len(rows) == 150
    accuracy = sum(int(r.split("\t")[-1]) for r in rows) / len(rows)
    assert accuracy == pytest.approx(final["eval"]["dev_matched"]["acc"], abs=1e-6)
