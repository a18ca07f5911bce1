"""``PretrainingDataset``: BERT pretraining samples of one split of a prepared dataset directory.

It checks the directory (manifest version, file sizes, token-store header, vocabulary, and the
SHA-256 of every file on first use: :class:`PreparedData`, which the next-token windows of
:mod:`dslm.data.nexttoken` open the same way), cuts the
split's documents into chunks (:func:`dslm.data.samples.build_chunks`) and builds samples on
demand. ``len(ds)`` is the number of chunks, i.e. samples per epoch; an index past it continues into
later epochs (another order, other segment cuts and masks), so a run of any length indexes the
dataset directly and sample ``i`` is the same on every rank, worker count and resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dslm.data.manifest import check_files, read_manifest, verify_files
from dslm.data.samples import SampleBuilder, SampleConfig, build_chunks
from dslm.data.split import SPLITS, split_documents
from dslm.data.store import BIN_FILE, TokenStore
from dslm.data.vocab import VOCAB_FILE, SpecialIds, read_vocab
from dslm.errors import UsageError

_SPLIT_STREAM = {name: k for k, name in enumerate(SPLITS)}
CHUNKING_STREAM = 0x63686B   # domain tag: the chunking draws never share a stream with the epoch orders


def check_token_ids(store: TokenStore, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every token id of ``store`` is below ``vocab_size`` (read in chunks of the memory map)."""
    tokens = store.tokens
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start:start + chunk].max())
        if top >= vocab_size:
            raise UsageError(f"{store.directory / BIN_FILE}: token id {top} outside the {vocab_size}-token "
                             "vocabulary (corrupt); re-run 'dslm prepare-data --force'")


def check_split(split: str) -> None:
    """A one-line error unless ``split`` is one of train, valid, test."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


@dataclass
class PreparedData:
    """A prepared dataset directory, opened and checked: its manifest, vocabulary and token store."""

    directory: Path
    manifest: dict
    vocab: list[str]
    store: TokenStore

    @classmethod
    def open(cls, data_dir: str | Path) -> "PreparedData":
        """Open ``data_dir`` after checking the manifest version and file sizes, the vocabulary and the
        store's counts against the manifest, and (on first use) the SHA-256 of every file and every
        token id against the vocabulary; anything wrong is a one-line :class:`UsageError`."""
        directory = Path(data_dir)
        manifest = read_manifest(directory)
        check_files(directory, manifest)
        vocab = read_vocab(directory / VOCAB_FILE)
        if len(vocab) != manifest["vocab_size"]:
            raise UsageError(f"{directory / VOCAB_FILE}: {len(vocab)} tokens, the manifest says "
                             f"{manifest['vocab_size']}")
        store = TokenStore(directory)
        counts = manifest["counts"]
        if (store.n_docs, store.n_sentences, store.n_tokens) != (counts["documents"], counts["sentences"], counts["tokens"]):
            raise UsageError(f"{directory}: token store and manifest disagree on the counts (corrupt)")
        if BIN_FILE in verify_files(directory, manifest):
            check_token_ids(store, len(vocab))
        return cls(directory, manifest, vocab, store)

    def documents(self, split: str) -> np.ndarray:
        """The sorted document ids of ``split`` (:func:`dslm.data.split.split_documents`)."""
        return split_documents(self.store.n_docs, tuple(self.manifest["split"]["weights"]))[split]


class PretrainingDataset(torch.utils.data.Dataset):
    """Samples ``{input_ids, token_type_ids, attention_mask, mlm_labels, binary_labels}`` (int64
    tensors; the first four of length ``seq_len``, ``binary_labels`` a scalar: 1 when segments A and
    B were swapped) from ``split`` of the dataset in ``data_dir``. See :mod:`dslm.data.samples` for
    how a sample is made; ``shuffle`` visits the chunks in a new random order each epoch."""

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 512, seed: int = 1234,
                 short_seq_prob: float = 0.1, mask_prob: float = 0.15, max_ngram: int = 3, shuffle: bool = True):
        check_split(split)
        if seq_len < 8:
            raise UsageError(f"seq_len {seq_len}: too short for [CLS] A [SEP] B [SEP]")
        if not (0 <= short_seq_prob <= 1 and 0 < mask_prob < 1 and max_ngram >= 1):
            raise UsageError("short_seq_prob must be in [0, 1], mask_prob in (0, 1), max_ngram >= 1")
        self.data_dir, self.split = Path(data_dir), split
        prepared = PreparedData.open(self.data_dir)
        self.manifest, self.vocab, store = prepared.manifest, prepared.vocab, prepared.store
        self.special = SpecialIds.of(self.vocab)
        self.config = SampleConfig(seq_len, short_seq_prob, mask_prob, max_ngram)
        docs = prepared.documents(split)
        offsets = store.sent_offsets.view(np.ndarray)
        first, end = build_chunks(store.doc_index.view(np.ndarray), offsets, docs, self.config.max_tokens,
                                  short_seq_prob, np.random.default_rng([seed, CHUNKING_STREAM, _SPLIT_STREAM[split]]))
        if len(first) == 0:
            raise UsageError(f"{self.data_dir}: the {split} split has no document with two sentences")
        self._builder = SampleBuilder(store.tokens, offsets, first, end, self.vocab, self.config, seed, shuffle)

    def __len__(self) -> int:
        return len(self._builder)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """What a plain ``DataLoader(ds, batch_size=...)`` fetches: the batch built in one vectorised
        call, returned as the list of samples its collate function expects."""
        batch = self.get_batch(indices)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        """Samples ``indices`` stacked: [B, L] tensors and ``binary_labels`` [B]; vectorised, so much
        faster per sample than ``__getitem__`` one at a time."""
        return {k: torch.from_numpy(v) for k, v in self._builder.build(indices).items()}

    # Memory maps would be pickled as copies of the data: workers started by spawn reopen the files.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_builder"] = None
        state["_builder_state"] = {k: v for k, v in self._builder.__dict__.items()
                                   if k not in ("tokens", "sent_offsets", "_perm")}
        return state

    def __setstate__(self, state):
        builder_state = state.pop("_builder_state")
        self.__dict__.update(state)
        store = TokenStore(self.data_dir)
        self._builder = SampleBuilder.__new__(SampleBuilder)
        self._builder.__dict__.update(builder_state, tokens=store.tokens, sent_offsets=store.sent_offsets.view(np.ndarray),
                                      _perm=None)
