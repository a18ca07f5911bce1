"""DeepScaleLM's initialisation and residual scaling as pure math (THEORY.md section 3).

DSLM sizes every block so that its output has variance 1 - p before dropout (1 after) and mixes the
residual stream as x_next = lam x + beta block(x) with lam^2 + beta^2 = 1, so the stream variance is
1 at every layer. The value/output std of each layer's attention depends on the cross-token
correlation r entering it, which this module tracks with a recursion built from the component
formulas in :mod:`dslm.theory.components`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dslm.theory.components import ffn_corr

REFERENCE_R0 = 0.221
"""Correlation of the summed input embeddings measured by the reference on Wikipedia text."""


def residual_scales(n_layers: int, k: float = 1.0, lam2: float | None = None,
                    beta2: float | None = None) -> tuple[float, float]:
    """(lam^2, beta^2) with lam^2 + beta^2 = 1. Given explicitly (one of them suffices) or derived
    as beta^2 = k / N (the reference used 0.005 for N = 192, close to 1/N)."""
    if lam2 is None and beta2 is None:
        if n_layers <= 0 or k <= 0 or k >= n_layers:
            raise ValueError(f"need 0 < k < n_layers for beta^2 = k/N (got k={k}, N={n_layers})")
        beta2 = k / n_layers
    if beta2 is None:
        beta2 = 1.0 - lam2
    if lam2 is None:
        lam2 = 1.0 - beta2
    if not (0.0 < beta2 <= 1.0 and 0.0 <= lam2 < 1.0) or abs(lam2 + beta2 - 1.0) > 1e-9:
        raise ValueError(f"residual scales must satisfy lam^2 + beta^2 = 1 with 0 < beta^2 <= 1 "
                         f"(got lam^2={lam2}, beta^2={beta2})")
    return float(lam2), float(beta2)


def _mix(r, s, r_blk, lam2, beta2):
    """Correlation and variance factor after x_next = lam x + beta block, block variance 1."""
    r_new = (lam2 * r * s + beta2 * r_blk) / (lam2 * s + beta2)
    return r_new, lam2 * s + beta2


@dataclass(frozen=True)
class DSLMStds:
    """Per-weight initialisation stds of a DSLM BERT."""

    embedding: float            # word, position and token-type tables (each): sqrt((1 - p) / 3)
    qk: float                   # Q and K: sqrt(1 / d)
    ffn: float                  # FFN in and out: sqrt(sqrt((1 - p) / 2) / d)
    vo: np.ndarray              # V and attention output of layer i: sqrt(sqrt((1 - p) / r_i) / d)
    attn_input_corr: np.ndarray  # r_i, the correlation entering layer i's attention
    head: float                 # LM-head dense, pooler, binary head: 1 / sqrt(d)
    logit_scale: float          # LM logits multiplied by 1 / sqrt(d s_emb^2)


def dslm_stds(d: int, n_layers: int, p: float, lam2: float, beta2: float,
              r0: float = REFERENCE_R0) -> DSLMStds:
    """The DSLM init table with the per-layer s_vo recursion:

        r = r0 (1 - p); s = 1
        for each layer: s_vo = sqrt(sqrt((1 - p) / r) / d)
                        attention output (after dropout) has correlation 1 - p: mix it in
                        FFN output (after dropout) has correlation (1 - p) ffn_corr(r): mix it in
    where mixing is r <- (lam2 r s + beta2 r_blk) / (lam2 s + beta2), s <- lam2 s + beta2.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if not 0.0 < r0 <= 1.0:
        raise ValueError(f"r0 must be in (0, 1], got {r0}")
    r, s = r0 * (1 - p), 1.0
    vo, corr = np.empty(n_layers), np.empty(n_layers)
    for i in range(n_layers):
        corr[i] = r
        vo[i] = math.sqrt(math.sqrt((1 - p) / r) / d)
        r, s = _mix(r, s, 1 - p, lam2, beta2)
        r, s = _mix(r, s, (1 - p) * float(ffn_corr(r)), lam2, beta2)
    emb = math.sqrt((1 - p) / 3)
    return DSLMStds(
        embedding=emb,
        qk=math.sqrt(1.0 / d),
        ffn=math.sqrt(math.sqrt((1 - p) / 2) / d),
        vo=vo,
        attn_input_corr=corr,
        head=1.0 / math.sqrt(d),
        logit_scale=1.0 / math.sqrt(d * emb * emb),
    )
