"""Tokenisation into model inputs, cached on disk, and the map-style datasets the engine reads.

A sequence is ``[CLS] a [SEP] b [SEP]`` with token type 0 up to and including the first [SEP] and 1
after it. When it is longer than ``max_len`` the tail is cut: the second segment loses tokens from
its end first, then the first segment, so both [SEP]s always stay. RACE (THEORY.md section 4): per
option, ``a`` is the question with the option filled in (:func:`~dslm.finetune.readers.race_qa`)
trimmed to its first ``qa_max_len`` (128) tokens, ``b`` the article, so the input is
``[CLS] qa [SEP] article [SEP]`` truncated to ``max_len``.

Encoded arrays live in one ``.npz`` per split, named by a key hashed from the source's checksum
(file SHA-256 or the HF fingerprint), the vocabulary's checksum, ``max_len``, ``qa_max_len`` and the
format version, so a second run with the same inputs loads instantly and any change re-tokenises.
Batches are padded to the longest sequence in the batch (rounded up to a multiple of 8) unless
``pad_to_max`` asks for ``max_len``; the attention mask hides the padding, so the results are the
same either way.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dslm.errors import ConfigError, UsageError
from dslm.files import atomic_output

CACHE_VERSION = 1
LEVEL_IDS = {"middle": 0, "high": 1}


@dataclass
class Encoded:
    """``n`` examples of ``choices`` sequences each (1 for pairs, 4 for RACE), sequences back to
    back in ``ids``: sequence ``s`` is ``ids[offsets[s]:offsets[s + 1]]``, its first ``seg0[s]``
    tokens have token type 0."""

    ids: np.ndarray        # int32, all sequences concatenated
    offsets: np.ndarray    # int64, n * choices + 1
    seg0: np.ndarray       # int32, n * choices
    labels: np.ndarray     # int64, n (-1 = unlabelled)
    guids: np.ndarray      # str, n
    levels: np.ndarray     # int8, n (RACE: 0 middle, 1 high; else 0)
    choices: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, path: Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, "wb") as f:
            np.savez(f, ids=self.ids, offsets=self.offsets, seg0=self.seg0, labels=self.labels,
                     guids=self.guids, levels=self.levels, choices=np.array(self.choices),
                     meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Path) -> tuple["Encoded", dict]:
        with np.load(path, allow_pickle=False) as z:
            enc = cls(z["ids"], z["offsets"], z["seg0"], z["labels"], z["guids"], z["levels"], int(z["choices"]))
            meta = json.loads(str(z["meta"]))
        return enc, meta


def build_pair_arrays(ids_a: list, ids_b: list, cls_id: int, sep_id: int, max_len: int):
    """``[CLS] a [SEP] b [SEP]`` for each pair with the tail-first truncation; returns
    (flat ids int32, offsets int64, seg0 int32)."""
    if max_len < 4:
        raise ConfigError(f"{{max_len}} {max_len}: must be >= 4")
    budget = max_len - 3
    flat: list[int] = []
    lengths = np.empty(len(ids_a), dtype=np.int64)
    seg0 = np.empty(len(ids_a), dtype=np.int32)
    extend, append = flat.extend, flat.append
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        na, nb = len(a), len(b)
        if na + nb > budget:
            nb = max(0, budget - na)
            na = min(na, budget)
            a, b = a[:na], b[:nb]
        append(cls_id)
        extend(a)
        append(sep_id)
        extend(b)
        append(sep_id)
        lengths[i] = na + nb + 3
        seg0[i] = na + 2
    offsets = np.zeros(len(ids_a) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.array(flat, dtype=np.int32), offsets, seg0


def encode_pairs(tokenizer, text_a: list, text_b: list, labels: list, guids: list, max_len: int,
                 batch: int = 8192) -> Encoded:
    """Tokenise sentence pairs with the fast tokenizer's batch encoder (both segments of a chunk in
    one call, so the Rust threads stay busy)."""
    ids_a: list = []
    ids_b: list = []
    for start in range(0, len(text_a), batch):
        a, b = text_a[start:start + batch], text_b[start:start + batch]
        out = tokenizer.encode_batch(list(a) + list(b))
        ids_a.extend(out[:len(a)])
        ids_b.extend(out[len(a):])
    flat, offsets, seg0 = build_pair_arrays(ids_a, ids_b, tokenizer.special.cls, tokenizer.special.sep, max_len)
    n = len(labels)
    return Encoded(flat, offsets, seg0, np.asarray(labels, dtype=np.int64), np.asarray(guids, dtype=str),
                   np.zeros(n, dtype=np.int8), 1)


def encode_race(tokenizer, questions: list, max_len: int, qa_max_len: int = 128) -> Encoded:
    """Tokenise RACE questions: 4 sequences ``[CLS] qa[:qa_max_len] [SEP] article [SEP]`` each; every
    distinct article is tokenised once."""
    from dslm.finetune.readers import race_qa

    articles: dict[str, int] = {}
    for q in questions:
        articles.setdefault(q.article, len(articles))
    article_ids = tokenizer.encode_batch(list(articles)) if articles else []
    qa_texts = [race_qa(q.question, o) for q in questions for o in q.options]
    qa_ids = tokenizer.encode_batch(qa_texts) if qa_texts else []
    qa_ids = [ids[:qa_max_len] for ids in qa_ids]
    ctx = [article_ids[articles[q.article]] for q in questions for _ in q.options]
    flat, offsets, seg0 = build_pair_arrays(qa_ids, ctx, tokenizer.special.cls, tokenizer.special.sep, max_len)
    labels = np.asarray([q.label for q in questions], dtype=np.int64)
    return Encoded(flat, offsets, seg0, labels, np.asarray([q.id for q in questions], dtype=str),
                   np.asarray([LEVEL_IDS[q.level] for q in questions], dtype=np.int8), 4)


def vocab_checksum(tokenizer) -> str:
    """The vocabulary and its casing (a cased tokenizer encodes the same text differently)."""
    cased = "" if getattr(tokenizer, "lowercase", True) else "\n#cased"
    return hashlib.sha256(("\n".join(tokenizer.tokens) + cased).encode()).hexdigest()


def cache_key(fingerprint: str, tokenizer, max_len: int, qa_max_len: int | None = None) -> str:
    text = json.dumps({"v": CACHE_VERSION, "source": fingerprint, "vocab": vocab_checksum(tokenizer),
                       "max_len": max_len, "qa_max_len": qa_max_len}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_encode(cache_dir: Path | None, name: str, key: str, build, wait: bool = False,
                  log=print) -> tuple[Encoded, dict]:
    """The cached arrays ``<cache_dir>/<name>-<key>.npz``, or ``build()`` -> (Encoded, meta) saved
    there. ``wait``: another process (torchrun rank 0) is building it; poll for the file instead."""
    path = cache_dir / f"{name}-{key}.npz" if cache_dir is not None else None
    if path is not None and wait:
        deadline = time.time() + 3600
        while not path.is_file():
            if time.time() > deadline:
                raise UsageError(f"{path}: timed out waiting for rank 0 to tokenise the data")
            time.sleep(1.0)
    if path is not None and path.is_file():
        try:
            enc, meta = Encoded.load(path)
            return enc, meta
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log(f"{path}: unreadable cache ({e.__class__.__name__}), tokenising again")
    t0 = time.perf_counter()
    enc, meta = build()
    meta = {**meta, "tokenise_seconds": round(time.perf_counter() - t0, 2)}
    if path is not None:
        try:
            enc.save(path, meta)
        except OSError as e:
            log(f"{path}: cannot write the token cache ({e.strerror or e}); continuing without it")
    return enc, {**meta, "fresh": True}


# ---- datasets ------------------------------------------------------------------------------------
class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Encoded`; ``get_batch(indices)`` builds a padded batch in one
    call: ``input_ids``, ``token_type_ids``, ``attention_mask`` of shape (B, T) -- (B, 4, T) for
    RACE --, ``labels`` (B), ``index`` (B, the example's position, for predictions) and ``level``
    (B, RACE: 0 middle, 1 high)."""

    def __init__(self, enc: Encoded, pad_id: int, max_len: int, pad_to_max: bool = False, multiple: int = 8):
        self.enc, self.pad_id, self.max_len = enc, pad_id, max_len
        self.pad_to_max, self.multiple = pad_to_max, multiple
        self._lengths = enc.lengths()

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> dict:
        batch = self.get_batch([i], width=self.max_len)
        return {k: v[0] for k, v in batch.items()}

    def mean_tokens(self) -> float:
        """Mean number of real (non-pad) tokens per example (all its choices)."""
        return float(self._lengths.sum()) / max(1, len(self.enc))

    def get_batch(self, indices, width: int | None = None) -> dict:
        enc, c = self.enc, self.enc.choices
        idx = np.asarray(list(indices), dtype=np.int64)
        seqs = (idx[:, None] * c + np.arange(c)[None, :]).reshape(-1)
        lengths = self._lengths[seqs]
        if width is None:
            longest = int(lengths.max()) if len(lengths) else 1
            width = self.max_len if self.pad_to_max else min(self.max_len, -(-longest // self.multiple) * self.multiple)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            start = enc.offsets[s]
            ids[row, :n] = enc.ids[start:start + n]
            types[row, enc.seg0[s]:n] = 1
            mask[row, :n] = 1
        shape = (len(idx), c, width) if c > 1 else (len(idx), width)
        return {"input_ids": torch.from_numpy(ids).view(shape),
                "token_type_ids": torch.from_numpy(types).view(shape),
                "attention_mask": torch.from_numpy(mask).view(shape),
                "labels": torch.from_numpy(enc.labels[idx]),
                "index": torch.from_numpy(idx),
                "level": torch.from_numpy(enc.levels[idx].astype(np.int64))}
