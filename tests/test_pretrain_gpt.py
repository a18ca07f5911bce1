"""Decoder pretraining (`dslm pretrain --arch gpt`): the next-token windows of a prepared dataset, a
tiny CPU run that learns, exact resume, the loss against an independent cross-entropy, the tied and
untied LM head, and the flags that mean nothing for one architecture."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dslm.cli import main
from dslm.data import NextTokenDataset
from dslm.data.manifest import FORMAT, MANIFEST_FILE, MANIFEST_VERSION
from dslm.data.store import TokenStoreWriter, token_dtype
from dslm.data.vocab import SPECIAL_TOKENS, VOCAB_FILE, write_vocab
from dslm.errors import UsageError
from dslm.files import sha256_file
from dslm.train import checkpoint as ckpt_io
from dslm.train.logging import read_metrics

SEP = SPECIAL_TOKENS.index("[SEP]")
# three documents of sentences of token ids (5.. are words): 3 + 4 + 3 tokens
DOCS = [[[5, 6], [7]], [[8, 9, 10, 11]], [[12], [13, 14]]]
STREAM = [5, 6, 7, SEP, 8, 9, 10, 11, SEP, 12, 13, 14]


def hand_built(directory: Path, docs=DOCS, split=(1, 0, 0)) -> Path:
    """A prepared dataset directory written by hand: vocab, token store and manifest (every document
    in train with the default split)."""
    directory.mkdir(parents=True)
    vocab = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(12)]
    write_vocab(vocab, directory / VOCAB_FILE)
    writer = TokenStoreWriter(directory, token_dtype(len(vocab)))
    sentences = [s for doc in docs for s in doc]
    writer.add(np.concatenate(sentences), np.array([len(s) for s in sentences]), np.array([len(d) for d in docs]))
    writer.finish()
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
             for name in ("tokens.bin", "tokens.idx", VOCAB_FILE)}
    manifest = {"format": FORMAT, "version": MANIFEST_VERSION, "request": {}, "vocab_size": len(vocab),
                "token_dtype": str(writer.dtype), "split": {"weights": list(split)}, "files": files,
                "counts": {"documents": writer.n_docs, "sentences": writer.n_sentences, "tokens": writer.n_tokens}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.mark.parametrize("seq_len", [2, 3, 5])
def test_windows_are_the_documents_joined_by_sep(tmp_path, seq_len):
    ds = NextTokenDataset(hand_built(tmp_path / "d"), "train", seq_len)
    w = seq_len + 1
    expected = [STREAM[k * w:(k + 1) * w] for k in range(len(STREAM) // w)]
    assert len(ds) == len(expected) and ds.stream_tokens == len(STREAM)
    batch = ds.get_batch(range(len(ds)))
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [x[:-1] for x in expected]
    assert batch["targets"].tolist() == [x[1:] for x in expected]
    assert ds[len(ds) - 1]["targets"].tolist() == expected[-1][1:]
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])


def test_a_split_shorter_than_one_window_is_a_one_line_error(tmp_path):
    data = hand_built(tmp_path / "d")
    with pytest.raises(UsageError, match=r"the train split holds 12 tokens, fewer than one window of "
                                         r"--seq-len \+ 1 = 13") as e:
        NextTokenDataset(data, "train", 12)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="the valid split holds 0 tokens"):
        NextTokenDataset(data, "valid", 2)


# ---- the command on the embedded corpus ---------------------------------------------------------
TINY = ["--arch", "gpt", "--preset", "tiny", "--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2",
        "--seq-len", "32", "--global-batch", "8", "--lr", "3e-3", "--warmup", "2", "--eval-every", "0",
        "--eval-iters", "1", "--log-every", "1", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "embedded"
    assert main(["prepare-data", "--source", "embedded", "--out", str(out), "--no-progress"]) == 0
    return out


def pretrain(data, out, *flags):
    return main(["pretrain", *TINY, "--data", str(data), "--out-dir", str(out), *flags])


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(ckpt_io.step_dirs(Path(out) / "checkpoints")[-1] / "model.safetensors"))


def test_tiny_gpt_learns_and_resumes_exactly(data, tmp_path):
    """30 steps: the training loss falls from ln(8192) = 9.01 (measured 9.015 at step 1, 7.670 at step
    30); a run stopped at step 15 and resumed with --load ends with the same loss and weights."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain(data, full, "--steps", "30") == 0
    rows = read_metrics(full, "train")
    assert rows[0]["loss"] > 8.5 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert {"acc", "ppl", "tokens", "tokens_per_s"} <= set(rows[-1]) and rows[-1]["tokens"] == 30 * 8 * 32
    final = json.loads((full / "final_metrics.json").read_text())
    assert set(final["eval"]) == {"valid", "test"} and final["eval"]["valid"]["tokens"] == 8 * 32
    from dslm.model import from_pretrained

    model = from_pretrained(final["checkpoint"])
    assert type(model).__name__ == "GPTLMHeadModel" and model.config.max_position_embeddings == 32
    assert model.config.tie_word_embeddings and (full / "vocab.txt").is_file()

    assert pretrain(data, part, "--steps", "30", "--stop-at", "15") == 0
    assert pretrain(data, part, "--steps", "30", "--load", str(part)) == 0
    resumed = read_metrics(part, "train")
    assert [r["step"] for r in resumed] == list(range(1, 31)) and resumed[-1]["loss"] == rows[-1]["loss"]
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_is_next_token_cross_entropy(data):
    """The task's loss and metric sums on its training loader's first batch equal F.cross_entropy and
    the arg-max hits of the model's own logits."""
    from dslm.model import GPTConfig
    from dslm.pretrain.gpt import GPTPretrainTask

    config = GPTConfig(vocab_size=8192, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=32,
                       hidden_dropout=0.0, attention_dropout=0.0)
    task = GPTPretrainTask(data, config, seq_len=32, num_workers=0)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.make_loader(task.train_dataset(), 4, 0, 1, 0, 1, True)))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    loss, sums = task.loss_and_metrics(model, batch)
    logits = model(batch["input_ids"]).logits
    expected = F.cross_entropy(logits.reshape(-1, config.vocab_size), batch["targets"].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert sums["count"].item() == 4 * 32
    assert sums["correct"].item() == (logits.argmax(-1) == batch["targets"]).sum().item()
    summary = task.summarize({k: v.item() for k, v in sums.items()})
    assert summary["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert summary["ppl"] == pytest.approx(np.exp(expected.item()), rel=1e-5)


def test_untied_embeddings_train_and_bert_refuses_them(data, tmp_path, capsys):
    out = tmp_path / "untied"
    assert pretrain(data, out, "--steps", "2", "--untie-embeddings") == 0
    w = weights(out)
    assert "lm_head.weight" in w and not torch.equal(w["lm_head.weight"], w["transformer.embeddings.word_embeddings.weight"])
    capsys.readouterr()
    for flags, message in ((["--arch", "bert", "--untie-embeddings"], "--untie-embeddings: only with --arch gpt"),
                           (["--grad-profile"], "--grad-profile: the probe reads BERT models only")):
        code = main(["pretrain", *TINY, "--data", str(data), "--out-dir", str(tmp_path / "no"), "--steps", "1", *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "no").exists()
