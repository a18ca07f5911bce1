"""The init std of every weight role under each scheme: the table of :mod:`dslm.model.init` as
numbers, a function of the model's sizes only (theory needs it to predict; the model to draw).

Roles: embedding, qk, v and attn_out (per-layer lists), ffn (the FFN input matrix) and ffn_out (its
output matrix), head (LM-head dense and pooler; an untied decoder output matrix) and binary. ``config`` is any model config with ``hidden_size``, ``head_dim``, ``ffn_size``,
``num_layers``, ``weight_scheme`` and, for DSLM, ``dslm_stds()`` (:class:`dslm.model.BertConfig`).
"""
from __future__ import annotations

import math

from dslm.theory.deepnorm import deepnorm_stds

MEGATRON_STD = 0.02


def scheme_stds(config) -> dict:
    """The table column of ``config.weight_scheme``: role -> std, with keys embedding, qk, v and
    attn_out (per-layer lists), ffn, ffn_out, head and binary."""
    stds = _scheme_stds(config)
    stds.setdefault("ffn_out", stds["ffn"])
    return stds


def _scheme_stds(config) -> dict:
    d, d_h, d_f, n = config.hidden_size, config.head_dim, config.ffn_size, config.num_layers
    scheme = config.weight_scheme
    if scheme == "megatron":
        s = MEGATRON_STD
        return dict(embedding=s, qk=s, v=[s] * n, attn_out=[s] * n, ffn=s, head=s, binary=s)
    if scheme == "gpt2":   # GPT-2: 0.02, the projections into the residual stream / sqrt(2N)
        s, s_res = MEGATRON_STD, MEGATRON_STD / math.sqrt(2 * n)
        return dict(embedding=s, qk=s, v=[s] * n, attn_out=[s_res] * n, ffn=s, ffn_out=s_res,
                    head=s, binary=s)
    if scheme == "xavier":
        return dict(embedding=math.sqrt(1 / d), qk=math.sqrt(2 / (d + d_h)),
                    v=[math.sqrt(2 / (d + d_h))] * n, attn_out=[math.sqrt(1 / d)] * n,
                    ffn=math.sqrt(2 / (d + d_f)), head=1 / math.sqrt(d),
                    binary=math.sqrt(2 / (d + 2)))
    if scheme == "deepnorm":
        dn = deepnorm_stds(d, d_f, n)
        return dict(embedding=math.sqrt(1 / d), qk=dn["qk"], v=[dn["v"]] * n,
                    attn_out=[dn["attn_out"]] * n, ffn=dn["ffn"], head=1 / math.sqrt(d),
                    binary=math.sqrt(2 / (d + 2)))
    stds = config.dslm_stds()
    vo = [float(v) for v in stds.vo]
    # the table's FFN std is for d_f = 4d; (4d/d_f)^(1/4) keeps the block's output variance 1 - p
    ffn = stds.ffn * (4 * d / d_f) ** 0.25
    return dict(embedding=stds.embedding, qk=stds.qk, v=vo, attn_out=vo, ffn=ffn,
                head=stds.head, binary=stds.head)
