"""r0: the cross-token correlation of a model's summed input embeddings on real data."""
from __future__ import annotations

import math

import torch
from torch import nn

from dslm.probe.stats import TokenMoments


@torch.no_grad()
def measure_r0(model_or_embeddings: nn.Module, batch: dict) -> float:
    """Cross-token correlation of the summed input embeddings (word + position, + token type in
    BERT; without dropout) of a dslm BERT or GPT, or of their ``Embeddings``, on a data batch: the mean off-diagonal correlation over non-pad tokens, pooled
    over features and sequences (:class:`dslm.probe.stats.TokenMoments`). This is the r0 of the
    DSLM s_vo recursion (``--r0 auto``); the result is clipped into (0, 1]."""
    emb = model_or_embeddings
    for stack in ("bert", "transformer", "embeddings"):   # the model -> its stack -> its embeddings
        emb = getattr(emb, stack, emb)
    device = emb.word_embeddings.weight.device
    ids = batch["input_ids"].to(device)
    types = batch.get("token_type_ids")
    mask = batch.get("attention_mask")
    x = emb.embed(ids, None if types is None else types.to(device))
    moments = TokenMoments(device)
    moments.add(x, None if mask is None else mask.to(device))
    r = float(moments.result()[2])
    if not math.isfinite(r):
        raise ValueError("cannot measure r0: the batch needs sequences with at least 2 real tokens")
    return min(max(r, 1e-6), 1.0)
