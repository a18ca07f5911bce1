"""Fixed evaluation sets: masks drawn once with their own seed, stored, reused, rebuilt when the
token store changes; the unigram reference loss against an independent count."""
import math

import numpy as np
import pytest

from dslm.data.dataset import PretrainingDataset
from dslm.data.evalset import EVAL_SEED, FrozenEvalSet, eval_set_path, unigram_cross_entropy
from dslm.data.manifest import read_manifest
from dslm.data.split import split_documents
from dslm.data.store import TokenStore


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")


def test_eval_set_is_the_fixed_seed_split_stored_and_reused(data):
    frozen = FrozenEvalSet(data, "valid", 64)
    path = eval_set_path(data, "valid", 64)
    assert path.is_file()
    reference = PretrainingDataset(data, "valid", 64, seed=EVAL_SEED, shuffle=False)
    assert len(frozen) == len(reference)
    for key, value in reference.get_batch(range(len(reference))).items():
        assert np.array_equal(frozen.get_batch(range(len(frozen)))[key].numpy(), value.numpy()), key
    other_seed = PretrainingDataset(data, "valid", 64, seed=1234, shuffle=False).get_batch(range(len(reference)))
    assert not np.array_equal(other_seed["mlm_labels"].numpy(), frozen.arrays["mlm_labels"])
    # a second instance loads the stored file (same arrays, file untouched)
    mtime = path.stat().st_mtime_ns
    again = FrozenEvalSet(data, "valid", 64)
    assert path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.arrays["mlm_labels"], frozen.arrays["mlm_labels"])
    assert frozen.predicted_tokens == int((frozen.arrays["mlm_labels"] != -100).sum()) > 0


def test_eval_set_is_rebuilt_for_another_token_store(data):
    path = eval_set_path(data, "test", 64)
    FrozenEvalSet(data, "test", 64)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["store_sha256"] = np.array("0" * 64)
    arrays["mlm_labels"] = np.full_like(arrays["mlm_labels"], -100)
    np.savez(path, **arrays)
    rebuilt = FrozenEvalSet(data, "test", 64)
    assert (rebuilt.arrays["mlm_labels"] != -100).any()
    with np.load(path) as f:
        assert str(f["store_sha256"]) == read_manifest(data)["files"]["tokens.bin"]["sha256"]


def test_unigram_cross_entropy_matches_a_direct_count(data):
    frozen = FrozenEvalSet(data, "valid", 64)
    manifest = read_manifest(data)
    store = TokenStore(data)
    counts = np.ones(manifest["vocab_size"])
    for d in split_documents(store.n_docs, tuple(manifest["split"]["weights"]))["train"]:
        for t in store.tokens[store.sent_offsets[store.doc_index[d]]:store.sent_offsets[store.doc_index[d + 1]]]:
            counts[t] += 1
    labels = frozen.arrays["mlm_labels"]
    labels = labels[labels != -100]
    expected = -np.mean([math.log(counts[t] / counts.sum()) for t in labels])
    got = unigram_cross_entropy(data, frozen)
    assert got == pytest.approx(expected, rel=1e-9)
    assert 4.0 < got < math.log(manifest["vocab_size"])
