"""Finetuning features: [CLS] a [SEP] b [SEP] layout, truncation budgets (RACE qa 128), batches, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dslm.data.vocab import SPECIAL_TOKENS, Tokenizer
from dslm.finetune import features as F
from dslm.finetune.readers import RaceQuestion

WORDS = ["tom", "has", "a", "red", "ball", "blue", "what", "does", "have", "is", "the", "it", "w", "x"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(list(SPECIAL_TOKENS) + WORDS)   # ids: [PAD]0 [UNK]1 [CLS]2 [SEP]3 [MASK]4, words from 5


def test_pair_layout_and_tail_truncation():
    CLS, SEP = 2, 3
    a, b = list(range(10, 16)), list(range(20, 30))          # 6 + 10 tokens
    flat, off, seg0 = F.build_pair_arrays([a, a, [11]], [b, [21], b], CLS, SEP, max_len=12)
    seqs = [flat[off[i]:off[i + 1]].tolist() for i in range(3)]
    # 6 + 10 + 3 > 12: b is cut from its end first (to 12 - 3 - 6 = 3 tokens)
    assert seqs[0] == [CLS, *a, SEP, 20, 21, 22, SEP] and seg0[0] == 8
    assert seqs[1] == [CLS, *a, SEP, 21, SEP] and seg0[1] == 8          # fits: untouched
    assert seqs[2] == [CLS, 11, SEP, *b[:8], SEP] and len(seqs[2]) == 12
    # a alone longer than the budget: a is cut too, b is empty, both [SEP]s stay
    flat, off, seg0 = F.build_pair_arrays([list(range(40, 60))], [b], CLS, SEP, max_len=8)
    assert flat.tolist() == [CLS, 40, 41, 42, 43, 44, SEP, SEP] and seg0[0] == 7


def test_encode_pairs_and_batches(tok):
    enc = F.encode_pairs(tok, ["Tom has a red ball.", "What?"], ["It is blue", "x"], [0, 2], ["a", "b"], max_len=64)
    assert enc.choices == 1 and enc.labels.tolist() == [0, 2] and enc.guids.tolist() == ["a", "b"]
    first = enc.ids[enc.offsets[0]:enc.offsets[1]].tolist()
    assert tok.decode(first, skip_special_tokens=False).split() == \
        "[CLS] tom has a red ball [UNK] [SEP] it is blue [SEP]".split()
    ds = F.EncodedDataset(enc, tok.special.pad, max_len=64)
    batch = ds.get_batch([1, 0])
    assert batch["input_ids"].shape == (2, 16)         # longest 12 -> a multiple of 8, not 64
    assert batch["index"].tolist() == [1, 0] and batch["labels"].tolist() == [2, 0]
    row = batch["input_ids"][1]
    n = int(batch["attention_mask"][1].sum())
    assert n == 12 and row[n:].eq(tok.special.pad).all()
    assert batch["token_type_ids"][1].tolist() == [0] * 8 + [1] * 4 + [0] * 4
    assert F.EncodedDataset(enc, 0, 64, pad_to_max=True).get_batch([0])["input_ids"].shape == (1, 64)
    item = ds[0]
    assert item["input_ids"].shape == (64,) and item["labels"].dim() == 0


def test_race_formatting_and_budgets(tok):
    long_q = " ".join(["what"] * 200) + " _"
    q = [RaceQuestion("tom has a red ball . " * 100, "what does tom have ?", ["a ball", "red", "blue", "x"], 1, "m1-0",
                      "middle"),
         RaceQuestion("tom has a red ball .", long_q, ["w", "x", "a", "it"], 3, "h2-0", "high")]
    enc = F.encode_race(tok, q, max_len=160, qa_max_len=128)
    assert enc.choices == 4 and len(enc) == 2 and enc.levels.tolist() == [0, 1] and enc.labels.tolist() == [1, 3]
    seqs = [enc.ids[enc.offsets[s]:enc.offsets[s + 1]].tolist() for s in range(8)]
    # question 1, option 1: [CLS] question option [SEP] article..., cut to L = 160
    s = seqs[0]
    assert len(s) == 160 and s[0] == 2 and s[-1] == 3
    qa = tok.encode("what does tom have ? a ball")
    assert s[1:1 + len(qa)] == qa and s[1 + len(qa)] == 3 and enc.seg0[0] == len(qa) + 2
    # question 2: the blank is filled and qa is trimmed to its first 128 tokens, the article follows
    s = seqs[4]
    assert enc.seg0[4] == 128 + 2 and s[1:129] == tok.encode(long_q.replace("_", "w"))[:128]
    article = tok.encode("tom has a red ball .")
    assert s[130:130 + len(article)] == article and len(s) == 128 + len(article) + 3
    batch = F.EncodedDataset(enc, 0, 160).get_batch([0, 1])
    assert batch["input_ids"].shape == (2, 4, 160) and batch["level"].tolist() == [0, 1]


def test_cache_reuses_and_keys(tmp_path, tok):
    calls = []

    def build():
        calls.append(1)
        return F.encode_pairs(tok, ["a red ball"], ["it is"], [1], ["g"], 32), {"report": {"x": 1}}

    key = F.cache_key("abc", tok, 32)
    enc1, meta1 = F.cached_encode(tmp_path, "t-train", key, build)
    enc2, meta2 = F.cached_encode(tmp_path, "t-train", key, build)
    assert len(calls) == 1 and meta1["fresh"] and "fresh" not in meta2 and meta2["report"] == {"x": 1}
    for name in ("ids", "offsets", "seg0", "labels", "guids", "levels"):
        np.testing.assert_array_equal(getattr(enc1, name), getattr(enc2, name))
    assert F.cache_key("abc", tok, 64) != key and F.cache_key("abd", tok, 32) != key
    assert F.cache_key("abc", Tokenizer(list(SPECIAL_TOKENS) + WORDS[:-1]), 32) != key
    # a damaged cache file is rebuilt, not fatal
    (tmp_path / f"t-train-{key}.npz").write_bytes(b"garbage")
    msgs = []
    F.cached_encode(tmp_path, "t-train", key, build, log=msgs.append)
    assert len(calls) == 2 and "unreadable cache" in msgs[0]
    # a truncated or bit-flipped .npz (a zip archive) is rebuilt too
    path = tmp_path / f"t-train-{key}.npz"
    good = path.read_bytes()
    for damaged in (good[:len(good) // 2], good[:40] + bytes(b ^ 0xFF for b in good[40:296]) + good[296:]):
        path.write_bytes(damaged)
        F.cached_encode(tmp_path, "t-train", key, build, log=msgs.append)
    assert len(calls) == 4 and all("unreadable cache" in m for m in msgs)
    assert torch.is_tensor(F.EncodedDataset(enc2, 0, 32).get_batch([0])["input_ids"])
