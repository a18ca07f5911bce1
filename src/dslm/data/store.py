"""The memory-mapped token store: ``tokens.bin`` (all token ids, back to back) and ``tokens.idx``.

``tokens.idx`` is a 40-byte little-endian header followed by two int64 offset arrays::

    magic     8 bytes  b"DSLMTOK\\0"
    version   uint32   STORE_VERSION
    dtype     uint32   1 = uint16 tokens, 2 = uint32 tokens
    n_docs    uint64
    n_sents   uint64
    n_tokens  uint64
    doc_index    int64[n_docs + 1]   first sentence of each document (last entry = n_sents)
    sent_offsets int64[n_sents + 1]  first token of each sentence (last entry = n_tokens)

Both files are memory-mapped when read, so a dataset of any size opens instantly and worker
processes share the pages. The writer streams: tokens and offsets go to temporary files as they
arrive (memory does not grow with the corpus) and the final names appear only in ``finish``.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from dslm.errors import UsageError

BIN_FILE, IDX_FILE = "tokens.bin", "tokens.idx"
MAGIC = b"DSLMTOK\0"
STORE_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds every id of a vocabulary of ``vocab_size`` tokens."""
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


class TokenStore:
    """Read side of the store in ``directory``: ``tokens`` (all ids), ``doc_index`` and
    ``sent_offsets`` as read-only memory maps, after checking the header and the file sizes."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        idx_path, bin_path = self.directory / IDX_FILE, self.directory / BIN_FILE
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise UsageError(f"{path}: missing (re-run 'dslm prepare-data')")
        with open(idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise UsageError(f"{idx_path}: not a dslm token index (bad magic number)")
        _, version, code, n_docs, n_sents, n_tokens = _HEADER.unpack(raw)
        if version != STORE_VERSION:
            raise UsageError(f"{idx_path}: token index version {version}, this dslm reads version "
                             f"{STORE_VERSION}; re-run 'dslm prepare-data --force'")
        if code not in _DTYPES:
            raise UsageError(f"{idx_path}: unknown token dtype code {code}")
        self.dtype = _DTYPES[code]
        expected_idx = _HEADER.size + 8 * (n_docs + 1 + n_sents + 1)
        if idx_path.stat().st_size != expected_idx:
            raise UsageError(f"{idx_path}: truncated or corrupt ({idx_path.stat().st_size} bytes, "
                             f"the header says {expected_idx})")
        if bin_path.stat().st_size != n_tokens * self.dtype.itemsize or n_tokens == 0:
            raise UsageError(f"{bin_path}: truncated or corrupt ({bin_path.stat().st_size} bytes, "
                             f"{IDX_FILE} says {n_tokens} tokens of {self.dtype.itemsize} bytes)")
        self.n_docs, self.n_sentences, self.n_tokens = n_docs, n_sents, n_tokens
        self.doc_index = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(n_docs + 1,))
        self.sent_offsets = np.memmap(idx_path, dtype="<i8", mode="r",
                                      offset=_HEADER.size + 8 * (n_docs + 1), shape=(n_sents + 1,))
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n_tokens,))
        ends = (self.doc_index[0], self.doc_index[-1], self.sent_offsets[0], self.sent_offsets[-1])
        if ends != (0, n_sents, 0, n_tokens):
            raise UsageError(f"{idx_path}: corrupt offsets (they do not span the {n_sents} sentences "
                             f"and {n_tokens} tokens of the header)")

    def document(self, d: int) -> list[np.ndarray]:
        """The token ids of document ``d``, one array per sentence."""
        first, last = int(self.doc_index[d]), int(self.doc_index[d + 1])
        offsets = self.sent_offsets[first:last + 1]
        return [np.asarray(self.tokens[offsets[i]:offsets[i + 1]]) for i in range(last - first)]


class TokenStoreWriter:
    """Write side: ``add`` batches of documents, then ``finish`` (or ``abort`` on failure).

    Tokens, sentence starts and document starts are streamed to ``*.tmp`` files; ``finish`` joins
    the offsets behind the header into ``tokens.idx`` and renames both files into place. The SHA-256
    of each file is computed on the way (``checksums``), so nothing is read back."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.directory = directory
        self.dtype = np.dtype(dtype)
        self.n_docs = self.n_sentences = self.n_tokens = 0
        self.checksums: dict[str, str] = {}
        self._tmp = {name: directory / f"{name}.tmp" for name in (BIN_FILE, "doc_index", "sent_offsets")}
        self._files = {name: open(path, "wb") for name, path in self._tmp.items()}
        self._bin_hash = hashlib.sha256()

    def add(self, tokens: np.ndarray, sentence_lengths: np.ndarray, doc_sentence_counts: np.ndarray) -> None:
        """Append documents: their tokens back to back, the token count of each sentence, and the
        sentence count of each document."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._files[BIN_FILE].write(data)
        self._bin_hash.update(data)
        sent_starts = self.n_tokens + np.concatenate(([0], np.cumsum(sentence_lengths[:-1], dtype=np.int64)))
        doc_starts = self.n_sentences + np.concatenate(([0], np.cumsum(doc_sentence_counts[:-1], dtype=np.int64)))
        self._files["sent_offsets"].write(sent_starts.astype("<i8").tobytes())
        self._files["doc_index"].write(doc_starts.astype("<i8").tobytes())
        self.n_tokens += int(np.sum(sentence_lengths, dtype=np.int64))
        self.n_sentences += len(sentence_lengths)
        self.n_docs += len(doc_sentence_counts)

    def finish(self) -> None:
        for f in self._files.values():
            f.close()
        idx_tmp = self.directory / f"{IDX_FILE}.tmp"
        code = next(c for c, d in _DTYPES.items() if d == self.dtype)
        idx_hash = hashlib.sha256()
        with open(idx_tmp, "wb") as out:
            def put(data: bytes) -> None:
                out.write(data)
                idx_hash.update(data)

            put(_HEADER.pack(MAGIC, STORE_VERSION, code, self.n_docs, self.n_sentences, self.n_tokens))
            for name, total in (("doc_index", self.n_sentences), ("sent_offsets", self.n_tokens)):
                with open(self._tmp[name], "rb") as f:
                    while chunk := f.read(1 << 24):
                        put(chunk)
                put(struct.pack("<q", total))
                os.unlink(self._tmp[name])
        os.replace(self._tmp[BIN_FILE], self.directory / BIN_FILE)
        os.replace(idx_tmp, self.directory / IDX_FILE)
        self.checksums = {BIN_FILE: self._bin_hash.hexdigest(), IDX_FILE: idx_hash.hexdigest()}

    def abort(self) -> None:
        """Close and delete the temporary files."""
        for f in self._files.values():
            f.close()
        for path in [*self._tmp.values(), self.directory / f"{IDX_FILE}.tmp"]:
            path.unlink(missing_ok=True)

