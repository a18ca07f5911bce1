"""The transformer parts the encoder (:mod:`dslm.model.bert`) and the decoder (:mod:`dslm.model.gpt`)
share, in the order data flows through them:

    Embeddings        word + position (+ token-type for BERT), summed, dropout (no LayerNorm here)
    SelfAttention     fused QKV projection, SDPA (an additive padding bias, or the causal mask),
                      attention dropout, output projection
    FeedForward       Linear(d -> d_f), ReLU / GeLU / tanh-GeLU, Linear(d_f -> d)
    TransformerLayer  LN placement and the residual adds x_next = lam x + beta Dropout(block)

Parameter names are the same in both models (``attention.qkv``, ``ffn.fc_in``, ``ln1``, ...), so the
init plan, the probe and the HF converters address a layer the same way in either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dslm.model.config import TransformerConfig
from dslm.model.ops import linear_relu


def dense_activation(linear: nn.Linear, activation: str, x: torch.Tensor) -> torch.Tensor:
    """activation(linear(x)); ReLU as one GEMM with a fused bias + ReLU epilogue (the same values,
    :mod:`dslm.model.ops`), GeLU in its exact (erf) form as HF's "gelu", "gelu_tanh" as GPT-2's
    "gelu_new" (the tanh approximation)."""
    if activation == "relu":
        return linear_relu(x, linear.weight, linear.bias)
    if activation == "gelu_tanh":
        return F.gelu(linear(x), approximate="tanh")
    return F.gelu(linear(x))


class Embeddings(nn.Module):
    """word + position (+ token-type where the config has token types) embeddings, summed, then
    dropout."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        types = getattr(config, "type_vocab_size", 0)
        self.token_type_embeddings = nn.Embedding(types, d) if types else None
        self.dropout = nn.Dropout(config.hidden_dropout)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """The summed embeddings before dropout, shape (batch, seq, d); without ``token_type_ids``
        every token has type 0."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq_len]
        if self.token_type_embeddings is None:
            return x
        if token_type_ids is None:
            return x + self.token_type_embeddings.weight[0]
        return x + self.token_type_embeddings(token_type_ids)

    def forward(self, input_ids, token_type_ids=None):
        return self.dropout(self.embed(input_ids, token_type_ids))


class SelfAttention(nn.Module):
    """Multi-head self-attention. ``qkv.weight`` rows are [Q; K; V] (d rows each), heads are
    contiguous slices of d_h features inside each. A causal config masks the future through SDPA's
    causal path (no mask tensor) unless an explicit additive ``mask`` is given, which then must hold
    the causal part too."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout_p = config.attention_dropout
        self.causal = config.causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.ffn_size)
        self.fc_out = nn.Linear(config.ffn_size, config.hidden_size)
        self.activation = config.activation

    def forward(self, x):
        return self.fc_out(dense_activation(self.fc_in, self.activation, x))


class TransformerLayer(nn.Module):
    """One layer; both residual adds are x_next = lam x + beta Dropout(block(...)) (the block's
    bias included), with (lam^2, beta^2) = ``config.residual_variances()``: (1, 1) for plain adds,
    lam^2 + beta^2 = 1 with DSLM residual scaling, (alpha^2, 1) with DeepNorm.

    Pre-LN: h = x + Attn(LN1(x)); out = h + FFN(LN2(h)) (GPT-2's layer). Post-LN (Megatron):
    a = LN1(x); h = a + Attn(a); b = LN2(h); out = b + FFN(b)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.pre_ln = config.ln == "pre"
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attention = SelfAttention(config)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        lam2, beta2 = config.residual_variances()
        self.lam, self.beta = math.sqrt(lam2), math.sqrt(beta2)

    def _residual(self, x, block):
        block = self.dropout(block)
        if self.lam == 1.0:
            return torch.add(x, block, alpha=self.beta) if self.beta != 1.0 else x + block
        return torch.add(x * self.lam, block, alpha=self.beta)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            h = self._residual(x, self.attention(self.ln1(x), mask))
            return self._residual(h, self.ffn(self.ln2(h)))
        a = self.ln1(x)
        h = self._residual(a, self.attention(a, mask))
        b = self.ln2(h)
        return self._residual(b, self.ffn(b))


@dataclass
class ModelOutput:
    """Dataclass output that can also be read like a dict (``out["loss"]``)."""

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self)]
