"""DeepScaleLM's initialisation and residual scaling as pure math (THEORY.md section 3).

DSLM sizes every block so that its output has variance 1 - p before dropout (1 after) and mixes the
residual stream as x_next = lam x + beta block(x) with lam^2 + beta^2 = 1, so the stream variance is
1 at every layer. The value/output std of each layer's attention depends on the cross-token
correlation r entering it, which this module tracks with a recursion built from the component
formulas in :mod:`dslm.theory.components`.

Decoders (``causal_len`` = the context length L): query t averages only the t tokens it sees, so
the head output keeps (1 - r) S_t of the fluctuating part, S_t = E sum_s P_ts^2 ~ 1/t, and two
tokens share only their common prefix. The recursion then takes the attention block's variance
factor and output correlation from :func:`dslm.theory.causal.causal_attention_head` (THEORY.md,
"DSLM init for decoders") instead of the bidirectional large-L limits r and 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dslm.theory.causal import causal_attention_head
from dslm.theory.components import ffn_corr

REFERENCE_R0 = 0.221
"""Correlation of the summed input embeddings measured by the reference on Wikipedia text."""

DECODER_R0 = 0.008
"""Correlation of a decoder's summed input embeddings (word + learned position tables of equal std,
one segment) on English text: half the chance that two tokens of a window are the same token, as
no other part is shared. Measured on the English corpus of docs/data.md (400 training windows):
0.0084 at L 128, 0.0078 at L 256, 0.0073 at L 512, 0.0068 at L 1024; BERT's 0.221 comes mostly
from its shared token-type rows."""


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


@lru_cache(maxsize=4096)
def _causal_attention(r: float, d: int, L: int, pa: float) -> tuple[float, float]:
    """(variance factor f, output correlation) of DSLM's causal attention on a unit-variance input of
    correlation r: f is the head output variance per unit d s_v^2 (bidirectional, large L: r), with
    Q/K std sqrt(1/d), so that the block output variance is d^2 s_vo^4 f. The causal softmax's
    quadrature costs ~10 ms, and repeated calls with the same config repeat every r exactly."""
    head = causal_attention_head(1.0, r, d, d, L, math.sqrt(1.0 / d), math.sqrt(1.0 / d),
                                 math.sqrt(1.0 / d), pa, qk_paths=False)
    return float(head.var), float(head.cov / head.var)


def _attention_factors(r: float, d: int, causal_len: int | None, pa: float) -> tuple[float, float]:
    """(variance factor, output correlation before dropout) of the attention block entering the
    s_vo recursion: the bidirectional large-L limits (r, 1), or the causal moments."""
    if causal_len is None:
        return r, 1.0
    return _causal_attention(float(r), int(d), int(causal_len), float(pa))


@dataclass(frozen=True)
class DSLMStds:
    """Per-weight initialisation stds of a DSLM BERT or decoder."""

    embedding: float            # each summed embedding table: sqrt((1 - p) / tables)
    qk: float                   # Q and K: sqrt(1 / d)
    ffn: float                  # FFN in and out: sqrt(sqrt((1 - p) / 2) / d)
    vo: np.ndarray              # V and attention output of layer i: sqrt(sqrt((1 - p) / f_i) / d)
    attn_input_corr: np.ndarray  # r_i, the correlation entering layer i's attention
    head: float                 # LM-head dense, pooler, binary head: 1 / sqrt(d)
    logit_scale: float          # LM logits multiplied by 1 / sqrt(d s_emb^2)


def dslm_stds(d: int, n_layers: int, p: float, lam2: float, beta2: float,
              r0: float = REFERENCE_R0, causal_len: int | None = None, embedding_tables: int = 3,
              attention_dropout: float | None = None) -> DSLMStds:
    """The DSLM init table with the per-layer s_vo recursion:

        r = r0 (1 - p); s = 1
        for each layer: (f, c) = attention variance factor and output correlation at r
                        s_vo = sqrt(sqrt((1 - p) / f) / d)    (block output variance 1 - p)
                        attention output (after dropout) has correlation (1 - p) c: mix it in
                        FFN output (after dropout) has correlation (1 - p) ffn_corr(r): mix it in
    where mixing is r <- (lam2 r s + beta2 r_blk) / (lam2 s + beta2), s <- lam2 s + beta2.

    ``causal_len=None`` (bidirectional): f = r and c = 1, the large-L limits (the reference's
    recursion). ``causal_len=L`` (decoder, query t sees keys 1..t): f and c from
    :func:`dslm.theory.causal.causal_attention_head` at s2 = 1 (the LayerNorm-ed input) with Q/K std
    sqrt(1/d), attention dropout ``attention_dropout`` (None: p) and L = causal_len, pooled over the
    L positions:
        f = r + (1 - r)^2 seen / d + ((1 - r) + pa r) sq / (1 - pa),
        c = [r + (1 - r) overlap + r (1 - r)^2 (seen_pair + (d + 1)(overlap - inv_pair)) / d] / f
    (:class:`dslm.theory.causal.MaskSums`; without Q/K, f = r + (1 - r) H_L / L). The logits have
    variance ~1 - r, so the softmax is not uniform: sq uses the exact rows' E sum_s P_ts^2 (exact up
    to quadrature); the first-order logit terms (seen, the (d + 1) term) are approximate. The
    recursion, like the bidirectional one, treats the stream as equicorrelated with the pooled r,
    whereas in a decoder early positions carry more variance (token t's head output:
    r + (1 - r) S_t, S_1 = 1): s_vo sets the block's variance averaged over positions to 1 - p.

    ``embedding_tables``: how many tables are summed into the input (BERT word + position +
    token type: 3; GPT word + position: 2); each gets std sqrt((1 - p) / tables), so the sum has
    variance 1 - p, and the LM-logit scale is 1 / sqrt(d s_emb^2) with that std.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if not 0.0 < r0 <= 1.0:
        raise ValueError(f"r0 must be in (0, 1], got {r0}")
    if isinstance(embedding_tables, bool) or not isinstance(embedding_tables, int) or embedding_tables < 1:
        raise ValueError(f"embedding_tables must be a positive integer, got {embedding_tables!r}")
    if causal_len is not None and (isinstance(causal_len, bool) or int(causal_len) != causal_len
                                   or causal_len < 2):
        # one token has no cross-token correlation to carry into the next layer
        raise ValueError(f"causal_len must be an integer >= 2 or None, got {causal_len!r}")
    pa = p if attention_dropout is None else float(attention_dropout)
    if not 0.0 <= pa < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {pa}")
    r, s = r0 * (1 - p), 1.0
    vo, corr = np.empty(n_layers), np.empty(n_layers)
    for i in range(n_layers):
        corr[i] = r
        f, c = _attention_factors(r, d, causal_len, pa)
        vo[i] = math.sqrt(math.sqrt((1 - p) / f) / d)
        r, s = _mix(r, s, (1 - p) * c, lam2, beta2)
        r, s = _mix(r, s, (1 - p) * float(ffn_corr(r)), lam2, beta2)
    emb = math.sqrt((1 - p) / embedding_tables)
    return DSLMStds(
        embedding=emb,
        qk=math.sqrt(1.0 / d),
        ffn=math.sqrt(math.sqrt((1 - p) / 2) / d),
        vo=vo,
        attn_input_corr=corr,
        head=1.0 / math.sqrt(d),
        logit_scale=1.0 / math.sqrt(d * emb * emb),
    )
