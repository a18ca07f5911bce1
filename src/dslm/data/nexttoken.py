"""``NextTokenDataset``: next-token (decoder) training windows of one split of a prepared dataset.

The split's documents (the same train / valid / test documents the BERT samples use) are read in
store order as one stream, with the vocabulary's [SEP] id between consecutive documents (the
document boundary the model sees, as GPT-2's <|endoftext|>; none after the last document). The
stream is cut from its start into non-overlapping windows of ``seq_len + 1`` tokens; the tail
shorter than a window is dropped. Window ``k`` is stream positions ``[k (L + 1), (k + 1) (L + 1))``
and its item is ``{"input_ids": w[:-1], "targets": w[1:]}`` (int64, length L each: position t
predicts token t + 1 of the window).

Nothing of the store is copied: per split document the dataset keeps its first token in the store
and its length, and a window's tokens are gathered from the memory map by index arithmetic (each
stream position found by a binary search over the documents' stream starts). Windows are a pure
function of the dataset directory and ``seq_len``, so every rank, worker and resumed run reads the
same item for the same index; the training order comes from the engine's loader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dslm.data.dataset import PreparedData, check_split
from dslm.data.store import TokenStore
from dslm.data.vocab import SpecialIds
from dslm.errors import UsageError


class NextTokenDataset(torch.utils.data.Dataset):
    """The next-token windows of ``split`` of the dataset in ``data_dir`` (see the module docstring)."""

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 1024):
        check_split(split)
        if seq_len < 1:
            raise UsageError(f"seq_len {seq_len}: must be >= 1")
        prepared = PreparedData.open(data_dir)
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.sep_id = SpecialIds.of(prepared.vocab).sep
        self.tokens = prepared.store.tokens
        self._starts, self._lengths = _document_spans(prepared.store, prepared.documents(split))
        # the stream position of each document's first token; the last entry is the stream's length + 1
        # (no [SEP] follows the last document)
        self._stream_starts = np.concatenate(([0], np.cumsum(self._lengths + 1)))
        self.stream_tokens = int(self._stream_starts[-1]) - 1 if len(self._lengths) else 0
        self.windows = self.stream_tokens // (seq_len + 1)
        if self.windows == 0:
            raise UsageError(f"{self.data_dir}: the {split} split holds {self.stream_tokens} tokens, fewer than one "
                             f"window of --seq-len + 1 = {seq_len + 1}; choose a shorter --seq-len or more data")

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        """Windows ``indices`` stacked: ``input_ids`` and ``targets``, [B, seq_len] int64 each."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.windows):
            raise IndexError(f"window index out of range [0, {self.windows})")
        windows = torch.from_numpy(self._stream(idx[:, None] * (self.seq_len + 1) + np.arange(self.seq_len + 1)))
        return {"input_ids": windows[:, :-1].contiguous(), "targets": windows[:, 1:].contiguous()}

    def _stream(self, positions: np.ndarray) -> np.ndarray:
        """The stream's tokens at ``positions`` (any shape), int64: a document's token, or [SEP] at
        the position just past a document."""
        doc = np.searchsorted(self._stream_starts, positions, side="right") - 1
        offset = positions - self._stream_starts[doc]
        boundary = offset >= self._lengths[doc]
        source = np.where(boundary, 0, self._starts[doc] + offset)
        return np.where(boundary, self.sep_id, self.tokens[source]).astype(np.int64)

    # A memory map would be pickled as a copy of the data: a worker started by spawn reopens the file.
    def __getstate__(self):
        return {**self.__dict__, "tokens": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokens = TokenStore(self.data_dir).tokens


def _document_spans(store: TokenStore, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first token in the store, token count) of each of ``docs``, int64."""
    offsets = store.sent_offsets.view(np.ndarray)
    doc_index = store.doc_index.view(np.ndarray)
    starts = offsets[doc_index[docs]].astype(np.int64)
    return starts, offsets[doc_index[docs + 1]].astype(np.int64) - starts
