"""Fixed evaluation sets: every model, at every evaluation, scores the same masked positions.

A held-out split (valid or test) is cut into samples once, with the fixed seed :data:`EVAL_SEED`
(independent of a run's ``--seed``), in chunk order and without shuffling, and the result is stored
in the dataset directory as ``eval/<split>_L<seq_len>.npz``: token ids, token types, the attention
mask, the MLM labels (-100 where nothing is predicted) and the segment-order labels. Later runs load
the stored arrays instead of drawing masks again, so two runs (or two schemes, or two evaluations of
one run) differ only in the model. The file records the SHA-256 of the token store it was cut from;
a dataset prepared again (``--force``) invalidates it and it is rebuilt.

:func:`unigram_cross_entropy` gives the reference line of an MLM study: the loss of a model that
ignores the context and predicts the train split's token frequencies at every masked position.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dslm.data.manifest import read_manifest
from dslm.data.split import split_documents
from dslm.data.store import BIN_FILE, TokenStore
from dslm.errors import UsageError
from dslm.files import atomic_output

EVAL_SEED = 20240309
EVAL_DIR = "eval"
_FIELDS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "binary_labels")
_BUILD_BATCH = 512


def eval_set_path(data_dir: str | Path, split: str, seq_len: int) -> Path:
    return Path(data_dir) / EVAL_DIR / f"{split}_L{seq_len}.npz"


class FrozenEvalSet(torch.utils.data.Dataset):
    """The stored evaluation samples of ``split`` at ``seq_len`` (built on first use). Items and
    ``get_batch`` return the same tensors as :class:`~dslm.data.PretrainingDataset`."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.path = eval_set_path(data_dir, split, seq_len)
        store_sha = read_manifest(self.data_dir)["files"][BIN_FILE]["sha256"]
        arrays = _load(self.path, store_sha)
        if arrays is None:
            arrays = _build(self.data_dir, split, seq_len)
            _save(self.path, arrays, store_sha)
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["binary_labels"])

    @property
    def predicted_tokens(self) -> int:
        """Masked positions scored by one full pass."""
        return int((self.arrays["mlm_labels"] != -100).sum())

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(list(indices), dtype=np.int64)
        return {k: torch.from_numpy(self.arrays[k][idx].astype(np.int64)) for k in _FIELDS}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}


def _build(data_dir: Path, split: str, seq_len: int) -> dict[str, np.ndarray]:
    from dslm.data.dataset import PretrainingDataset

    ds = PretrainingDataset(data_dir, split, seq_len, seed=EVAL_SEED, shuffle=False)
    parts = [ds.get_batch(range(i, min(i + _BUILD_BATCH, len(ds)))) for i in range(0, len(ds), _BUILD_BATCH)]
    ids_dtype = np.uint16 if ds.manifest["vocab_size"] <= 1 << 16 else np.int32
    dtypes = {"input_ids": ids_dtype, "token_type_ids": np.uint8, "attention_mask": np.uint8,
              "mlm_labels": np.int32, "binary_labels": np.int8}
    return {k: np.concatenate([p[k].numpy() for p in parts]).astype(dtypes[k]) for k in _FIELDS}


def _load(path: Path, store_sha: str) -> dict[str, np.ndarray] | None:
    """The stored arrays, or None when absent, unreadable or cut from another token store."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["store_sha256"]) != store_sha:
                return None
            return {k: f[k] for k in _FIELDS}
    except (OSError, ValueError, KeyError):
        return None


def _save(path: Path, arrays: dict[str, np.ndarray], store_sha: str) -> None:
    """Write through a per-process temporary file and a rename: concurrent runs that build the same
    set write identical files, and a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(path, "wb") as f:
            np.savez(f, store_sha256=np.array(store_sha), **arrays)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the evaluation set ({e})") from None


def unigram_cross_entropy(data_dir: str | Path, eval_set: FrozenEvalSet) -> float:
    """Mean -log p(label) over the masked positions of ``eval_set``, with p the train split's token
    frequencies (add-one smoothed over the vocabulary): the MLM loss of a context-free model, the
    plateau a model reaches by learning token frequencies only. In nats."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    store = TokenStore(data_dir)
    docs = split_documents(store.n_docs, tuple(manifest["split"]["weights"]))["train"]
    doc_index = store.doc_index.view(np.ndarray)
    offsets = store.sent_offsets.view(np.ndarray)
    tokens = store.tokens.view(np.ndarray)
    counts = np.ones(manifest["vocab_size"], dtype=np.float64)
    for start, stop in _runs(docs):   # consecutive train documents are one slice of the store
        lo, hi = offsets[doc_index[start]], offsets[doc_index[stop]]
        counts += np.bincount(tokens[lo:hi], minlength=len(counts))[:len(counts)]
    log_p = np.log(counts / counts.sum())
    labels = eval_set.arrays["mlm_labels"]
    return float(-log_p[labels[labels != -100]].mean())


def _runs(ids: np.ndarray):
    """(first, stop) of each run of consecutive integers in sorted ``ids``."""
    if len(ids) == 0:
        return
    breaks = np.nonzero(np.diff(ids) != 1)[0]
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(ids) - 1]])
    for a, b in zip(starts, stops):
        yield int(ids[a]), int(ids[b]) + 1
