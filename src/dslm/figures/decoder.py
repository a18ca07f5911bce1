"""The decoder's batch for `dslm figures --arch gpt`: next-token windows of a prepared dataset.

The windows are :class:`dslm.data.NextTokenDataset`'s (the train split's documents joined by [SEP],
cut into windows of seq_len + 1 tokens, as ``dslm pretrain --arch gpt`` trains on them); the batch
takes ``batch`` of them at random (the seed's). input_ids are a window's first seq_len tokens and
targets its last seq_len (the next token at every position): no padding, no segments, no masking,
every position a target.
"""
from __future__ import annotations

import numpy as np

from dslm.errors import UsageError

WINDOW_STREAM = 0x77696E   # domain tag: the window draw never shares a random stream with BERT's draws


def next_token_windows(data_dir, seq_len: int, batch: int, seed: int) -> tuple[dict, int]:
    """``batch`` distinct next-token windows of ``data_dir``'s train split, drawn with ``seed``:
    ``{"input_ids", "targets"}``, int64 (batch, seq_len); and the vocabulary size."""
    from dslm.data import NextTokenDataset
    from dslm.data.manifest import read_manifest

    ds = NextTokenDataset(data_dir, split="train", seq_len=seq_len)
    if len(ds) < batch:
        raise UsageError(f"--data {data_dir}: the train split has {len(ds)} windows of --seq-len "
                         f"{seq_len} + 1 tokens, --batch asks for {batch}")
    picks = np.random.default_rng([seed, WINDOW_STREAM]).choice(len(ds), size=batch, replace=False)
    return ds.get_batch(np.sort(picks)), int(read_manifest(ds.data_dir)["vocab_size"])
