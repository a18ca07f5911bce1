"""BERT samples: layout, segments, truncation, masking rates, n-grams, swap rate, determinism, loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dslm.data import PretrainingDataset, make_loader
from dslm.data.samples import _truncation, build_chunks, choose_spans, draw_ngram_sizes
from dslm.data.split import split_documents
from dslm.data.store import TokenStore
from dslm.errors import UsageError
from test_data_common import make_documents, prepare_small

L = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("samples"), make_documents(400, seed=7))


@pytest.fixture(scope="module")
def dataset(data_dir):
    return PretrainingDataset(data_dir, seq_len=L, seed=11)


@pytest.fixture(scope="module")
def batch(dataset):
    return {k: v.numpy() for k, v in dataset.get_batch(range(3000)).items()}


def _within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n)


def test_keys_shapes_and_dtypes(dataset):
    sample = dataset[5]
    assert set(sample) == {"input_ids", "token_type_ids", "attention_mask", "mlm_labels", "binary_labels"}
    for key in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels"):
        assert sample[key].shape == (L,) and sample[key].dtype == torch.int64
    assert sample["binary_labels"].shape == () and sample["binary_labels"].dtype == torch.int64


def test_layout_cls_a_sep_b_sep_pad(dataset, batch):
    sp = dataset.special
    ids, types, att, labels = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_labels"]
    assert (ids[:, 0] == sp.cls).all()
    for row in range(len(ids)):
        seps = np.nonzero(ids[row] == sp.sep)[0]
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] >= seps[0] + 2  # both segments non-empty
        end = seps[1] + 1
        assert (att[row, :end] == 1).all() and (att[row, end:] == 0).all()
        assert (ids[row, end:] == sp.pad).all()
        assert (types[row, :seps[0] + 1] == 0).all() and (types[row, seps[0] + 1:end] == 1).all()
        assert (types[row, end:] == 0).all()
        specials = np.r_[0, seps, np.arange(end, L)]
        assert (labels[row, specials] == -100).all()
    assert not (ids[:, 1:] == sp.cls).any()


def _segments(batch, row, sep):
    original = np.where(batch["mlm_labels"][row] != -100, batch["mlm_labels"][row], batch["input_ids"][row])
    first, second = np.nonzero(original == sep)[0]
    return original[1:first], original[first + 1:second]


def test_segments_are_the_chunk_split_at_a_sentence_boundary(data_dir, dataset, batch):
    store = TokenStore(data_dir)
    builder = dataset._builder
    chunks = builder.chunks_of(np.arange(len(batch["input_ids"])))
    checked = 0
    for row, c in enumerate(chunks):
        first, end = builder.chunk_first[c], builder.chunk_end[c]
        text = np.asarray(store.tokens[store.sent_offsets[first]:store.sent_offsets[end]], dtype=np.int64)
        one, two = _segments(batch, row, dataset.special.sep)
        assert len(one) + len(two) == min(len(text), L - 3)  # truncated to fit exactly
        if len(text) > L - 3:
            continue
        a, b = (two, one) if batch["binary_labels"][row] else (one, two)
        assert np.array_equal(np.concatenate([a, b]), text)
        assert store.sent_offsets[first] + len(a) in store.sent_offsets[first + 1:end]
        checked += 1
    assert checked > 500


def test_truncation_matches_one_token_at_a_time():
    rng = np.random.default_rng(0)
    len1, len2 = rng.integers(1, 120, 2000), rng.integers(1, 120, 2000)
    cut1, cut2 = _truncation(len1, len2, 61)
    for a, b, c1, c2 in zip(len1, len2, cut1, cut2):
        x, y = a, b
        while x + y > 61:
            if x > y:
                x -= 1
            else:
                y -= 1
        assert (a - x, b - y) == (c1, c2)


def test_masking_budget_and_80_10_10(dataset, batch):
    labels, ids = batch["mlm_labels"], batch["input_ids"]
    predicted = labels != -100
    n_text = (batch["attention_mask"].sum(1) - 3)
    budget = np.minimum(round(0.15 * L), np.maximum(1, np.floor(0.15 * n_text + 0.5)))
    count = predicted.sum(1)
    assert (count <= budget).all() and (count >= 1).all()
    # short of the budget only when no remaining word fits (words here are up to ~6 pieces)
    assert (count == budget).mean() > 0.97
    assert abs(count.sum() / n_text.sum() - 0.15) < 0.005
    total = int(predicted.sum())
    as_mask = (ids == dataset.special.mask) & predicted
    kept = (ids == labels) & predicted
    replaced = predicted & ~as_mask & ~kept
    n_repl = len(dataset._builder.replacements)
    assert _within(as_mask.sum() / total, 0.8, total)
    assert _within(kept.sum() / total, 0.1 + 0.1 / n_repl, total)  # a random pick can hit the same token
    assert _within(replaced.sum() / total, 0.1 * (1 - 1 / n_repl), total)
    assert not np.isin(ids[replaced], [0, 1, 2, 3, 4]).any()  # random replacements are never special


def test_masking_is_whole_word(dataset, batch):
    cont = dataset._builder.continuation
    labels, ids = batch["mlm_labels"], batch["input_ids"]
    original = np.where(labels != -100, labels, ids)
    predicted = labels != -100
    sep_or_cls = np.isin(original, [dataset.special.cls, dataset.special.sep])
    inner = cont[original[:, 1:]] & ~sep_or_cls[:, :-1]  # continuation piece, not at a segment start
    assert inner.sum() > 1000
    # a predicted continuation has its previous piece predicted, and the other way round
    assert (predicted[:, :-1] == predicted[:, 1:])[inner].all()


def test_ngram_sizes_follow_one_over_n():
    rng = np.random.default_rng(1)
    n = 200_000
    sizes = draw_ngram_sizes(rng.random(n), np.full(n, 10), 3)
    p = np.array([1, 1 / 2, 1 / 3]) / (11 / 6)
    for k in range(3):
        assert _within((sizes == k + 1).mean(), p[k], n)
    near_end = draw_ngram_sizes(rng.random(n), np.full(n, 2), 3)  # renormalised over n <= 2
    assert near_end.max() == 2 and _within((near_end == 1).mean(), 2 / 3, n)


def _sequential_spans(priority, n, word_len, budget):
    """Reference: visit spans by decreasing priority, dropping those that overlap one kept before;
    cut each kept span to the words that still fit the budget (none: skipped)."""
    size, covered, room = np.zeros(len(n), int), np.zeros(len(n), bool), budget
    for i in np.argsort(-priority, kind="stable"):
        if covered[i:i + n[i]].any():
            continue
        covered[i:i + n[i]] = True
        m = n[i]
        while m > 0 and word_len[i:i + m].sum() > room:
            m -= 1
        size[i], room = m, room - word_len[i:i + m].sum()
    return size


def test_vectorised_span_choice_equals_the_sequential_greedy():
    rng = np.random.default_rng(2)
    rows, words = 300, 40
    n_words = rng.integers(1, words + 1, rows)
    valid = np.arange(words)[None, :] < n_words[:, None]
    left = np.where(valid, n_words[:, None] - np.arange(words)[None, :], 1)
    n = np.where(valid, draw_ngram_sizes(rng.random((rows, words)), left, 3), 1)
    priority = rng.random((rows, words))
    word_len = np.where(valid, rng.integers(1, 4, (rows, words)), 0)
    budget = rng.integers(1, 20, rows)
    got = choose_spans(valid, priority, n, word_len, budget)
    for r in range(rows):
        k = n_words[r]
        assert np.array_equal(got[r, :k], _sequential_spans(priority[r, :k], n[r, :k], word_len[r, :k], budget[r]))
    assert (got[~valid] == 0).all()
    sizes = got[got > 0]
    assert {1, 2, 3} <= set(sizes.tolist())


def test_swap_rate(batch):
    assert _within(batch["binary_labels"].mean(), 0.5, len(batch["binary_labels"]))


def test_chunk_targets_and_short_sequences():
    # 300 documents of 60 sentences of 5 tokens: a full chunk is exactly 20 sentences (100 tokens)
    doc_index = np.arange(0, 300 * 60 + 1, 60)
    offsets = np.arange(0, 300 * 60 * 5 + 1, 5)
    docs = np.arange(300)
    first, end = build_chunks(doc_index, offsets, docs, 100, 0.0, np.random.default_rng(0))
    assert ((end - first) == 20).all() and len(first) == 300 * 3
    first, end = build_chunks(doc_index, offsets, docs, 100, 0.1, np.random.default_rng(0))
    inner = end % 60 != 0  # chunks not cut by the end of their document
    short = ((end - first) < 20)[inner]
    # each chunk's target is short with probability 0.1, and then below 100 tokens unless it is > 95
    assert _within(short.mean(), 0.1 * 94 / 98, len(short))
    assert (end - first >= 2).all()


def test_chunks_pack_consecutive_sentences_of_one_document(data_dir):
    store = TokenStore(data_dir)
    docs = split_documents(store.n_docs, (980, 10, 10))["train"]
    offsets, doc_index = store.sent_offsets.view(np.ndarray), store.doc_index.view(np.ndarray)
    doc_of = np.searchsorted(doc_index, np.arange(store.n_sentences), side="right") - 1
    first, end = build_chunks(doc_index, offsets, docs, 30, 0.1, np.random.default_rng(3))
    assert (end - first >= 2).all() and (first[1:] >= end[:-1]).all()
    assert (doc_of[first] == doc_of[end - 1]).all() and np.isin(doc_of[first], docs).all()
    # greedy: a chunk that did not end its document needed its last sentence (or has just two)
    inner = end < doc_index[doc_of[first] + 1]
    full = inner & (offsets[end] - offsets[first] >= 30)
    assert full.sum() > 100 and ((end - first == 2) | (offsets[end - 1] - offsets[first] < 30))[full].all()
    # every sentence of a document with two or more is used, except at most one at its end
    used = np.zeros(store.n_sentences, bool)
    for a, b in zip(first, end):
        used[a:b] = True
    per_doc = doc_index[docs + 1] - doc_index[docs]
    unused = np.array([(~used[doc_index[d]:doc_index[d + 1]]).sum() for d in docs])
    assert (unused[per_doc >= 2] <= 1).all() and (unused[per_doc < 2] == per_doc[per_doc < 2]).all()


def test_samples_are_deterministic_per_seed_and_index(data_dir, dataset, batch):
    again = PretrainingDataset(data_dir, seq_len=L, seed=11)
    one = again[1234]
    for key in batch:
        assert np.array_equal(one[key].numpy(), batch[key][1234])
    mixed = again.get_batch([7, 2999, 7])
    assert np.array_equal(mixed["input_ids"][0].numpy(), batch["input_ids"][7])
    assert np.array_equal(mixed["input_ids"][1].numpy(), batch["input_ids"][2999])
    other = PretrainingDataset(data_dir, seq_len=L, seed=12).get_batch(range(50))
    assert not np.array_equal(other["input_ids"].numpy(), batch["input_ids"][:50])


def test_epochs_reorder_and_remask(dataset):
    n = len(dataset)
    builder = dataset._builder
    first, second = builder.chunks_of(np.arange(n)), builder.chunks_of(np.arange(n, 2 * n))
    assert sorted(first) == sorted(second) == list(range(n)) and not np.array_equal(first, second)
    where = np.argsort(second)[first[:20]] + n  # the same chunks in the second epoch
    a, b = dataset.get_batch(range(20)), dataset.get_batch(where)
    assert not torch.equal(a["mlm_labels"], b["mlm_labels"])


def test_loader_same_batches_for_any_workers_ranks_and_resume(dataset):
    def collect(**kw):
        return [b["input_ids"] for b in make_loader(dataset, num_steps=4, **kw)]

    plain = collect(batch_size=8, num_workers=0)
    assert torch.equal(torch.stack(plain), torch.stack(collect(batch_size=8, num_workers=2)))
    ranks = [collect(batch_size=4, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for step in range(4):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), plain[step])
    assert torch.equal(torch.stack(collect(batch_size=8, start_step=2, num_workers=0)), torch.stack(plain[2:]))
    assert torch.equal(plain[1], dataset.get_batch(range(8, 16))["input_ids"])
    assert len(make_loader(dataset, batch_size=8, world_size=2, num_workers=0)) == len(dataset) // 16


def test_plain_dataloader_gets_the_same_samples(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=False)
    first = next(iter(loader))
    expected = dataset.get_batch(range(6))
    assert all(torch.equal(first[k], expected[k]) for k in expected)


def test_splits_use_their_own_documents(data_dir):
    valid = PretrainingDataset(data_dir, split="valid", seq_len=L, seed=11, shuffle=False)
    store = TokenStore(data_dir)
    docs = split_documents(store.n_docs, (980, 10, 10))
    doc_of = np.searchsorted(store.doc_index, valid._builder.chunk_first, side="right") - 1
    assert np.isin(doc_of, docs["valid"]).all() and not np.isin(doc_of, docs["train"]).any()
    with pytest.raises(UsageError, match="split 'dev'"):
        PretrainingDataset(data_dir, split="dev")


def test_dataset_pickles_without_copying_the_tokens(dataset):
    import pickle

    blob = pickle.dumps(dataset)
    assert len(blob) < 200_000
    clone = pickle.loads(blob)
    assert torch.equal(clone.get_batch([3, 4])["input_ids"], dataset.get_batch([3, 4])["input_ids"])
