"""Training FLOPs per token of the models, for MFU = tokens/s x FLOPs per token / peak FLOP/s.

Conventions shared by every count here: a multiply-add is 2 FLOPs; training = forward + backward =
3 x forward; the matrix products are counted (QKV and output projections, FFN, attention scores and
values, LM head); embeddings, LayerNorms, softmax, dropout and the optimizer are left out.
"""
from __future__ import annotations

from dslm.model.config import TransformerConfig


def bert_flops_per_token(config: TransformerConfig, seq_len: int, lm_fraction: float = 0.15) -> float:
    """Training FLOPs per token of BERT pretraining:

        3 x [ N (8 d^2 + 4 d d_f + 4 L d) + f (2 d^2 + 2 d V) ]

    per layer: QKV + output projections 8 d^2, FFN 4 d d_f, attention scores and values 4 L d (every
    query sees all L keys); the LM head (dense d x d and the tied d x V decoder) runs on the fraction
    ``f`` of positions that are predicted (0.15 here; 1.0 for a head on every position, as in HF).
    Pooler and binary head are left out. For d_f = 4 d this is 6 x (12 N d^2) + 12 N L d per token
    (+ the head), the usual "6 x parameters + attention" estimate."""
    d, n, df, v = config.hidden_size, config.num_layers, config.ffn_size, config.vocab_size
    return 3.0 * (n * (8 * d * d + 4 * d * df + 4 * seq_len * d) + lm_fraction * (2 * d * d + 2 * d * v))


def gpt_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token of next-token (decoder) pretraining:

        3 x [ N (8 d^2 + 4 d d_f + 2 L d) + 2 d V ]

    per layer: QKV + output projections 8 d^2, FFN 4 d d_f; attention scores and values 2 L d, half
    of the encoder's 4 L d, because under the causal mask query t sees t keys (L / 2 on average) and
    a causal kernel (FlashAttention, cuDNN) skips the masked half; the LM head (the d x V output
    matrix) runs on every position. This is the work a causal kernel executes, so MFU counts only
    useful FLOPs; counts that bill the full 4 L d (nanoGPT's 6 N_params + 12 N L d) come out higher
    by 6 N L d per token (7 % for GPT-2 small at L 1024)."""
    d, n, df, v = config.hidden_size, config.num_layers, config.ffn_size, config.vocab_size
    return 3.0 * (n * (8 * d * d + 4 * d * df + 2 * seq_len * d) + 2 * d * v)
