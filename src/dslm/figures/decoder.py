"""The decoder's side of `dslm figures --arch gpt`: its config from the shared model flags and its
batch, next-token windows of a prepared dataset.

A window is seq_len + 1 consecutive tokens of the train split: its documents in a shuffled order
(the seed's), each followed by [SEP] (the vocabulary's end-of-text), packed back to back and cut
into the batch's windows, as a decoder is pretrained. input_ids are a window's first seq_len tokens
and targets its last seq_len (the next token at every position): no padding, no segments, no
masking, every position a target.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from dslm.errors import UsageError
from dslm.model import GPTConfig, TransformerConfig

WINDOW_STREAM = 0x77696E   # domain tag: the document order never shares a random stream with BERT's draws


def decoder_config(encoder_config, tie_word_embeddings: bool = True) -> GPTConfig:
    """The :class:`GPTConfig` with every field the encoder's config shares with it (sizes, LN,
    activation, dropout, init and its DSLM options, positions); causal attention, word + position
    embeddings. An impossible decoder is a one-line :class:`UsageError`."""
    shared = {f.name: getattr(encoder_config, f.name) for f in fields(TransformerConfig)}
    try:
        return GPTConfig(**shared, tie_word_embeddings=tie_word_embeddings)
    except ValueError as e:
        raise UsageError(f"model: {e}") from None


def _train_documents(data_dir: Path, seq_len: int, seed: int):
    """(token store, train document ids, [SEP] id, vocabulary size) of a prepared dataset, checked
    as :class:`dslm.data.PretrainingDataset` checks it."""
    from dslm.data import PretrainingDataset
    from dslm.data.split import split_documents
    from dslm.data.store import TokenStore

    ds = PretrainingDataset(data_dir, split="train", seq_len=seq_len, seed=seed)
    store = TokenStore(data_dir)
    docs = split_documents(store.n_docs, tuple(ds.manifest["split"]["weights"]))["train"]
    return store, docs, ds.special.sep, len(ds.vocab)


def next_token_windows(data_dir, seq_len: int, batch: int, seed: int) -> tuple[dict, int]:
    """``batch`` next-token windows of ``data_dir``'s train split (module docstring):
    ``{"input_ids", "targets"}``, int64 (batch, seq_len); and the vocabulary size."""
    store, docs, sep, vocab_size = _train_documents(Path(data_dir), seq_len, seed)
    need = batch * (seq_len + 1)
    parts, have = [], 0
    for d in np.random.default_rng([seed, WINDOW_STREAM]).permutation(docs):
        start, end = store.sent_offsets[store.doc_index[d]], store.sent_offsets[store.doc_index[d + 1]]
        parts += [np.asarray(store.tokens[start:end]), np.array([sep])]
        have += int(end - start) + 1
        if have >= need:
            break
    else:
        raise UsageError(f"--data {data_dir}: the train split has {have} tokens, --batch {batch} "
                         f"windows of --seq-len {seq_len} + 1 need {need}")
    windows = torch.from_numpy(np.concatenate(parts)[:need].astype(np.int64)).view(batch, seq_len + 1)
    return {"input_ids": windows[:, :-1].contiguous(), "targets": windows[:, 1:].contiguous()}, vocab_size
