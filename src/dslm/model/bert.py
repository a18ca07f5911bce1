"""BERT with Pre-LN / Post-LN placement and DeepScaleLM residual scaling (THEORY.md section 3).

Modules in the order data flows through them (the first four in :mod:`dslm.model.blocks`, shared
with the decoder):

    Embeddings        word + position + token-type, summed, dropout (no LayerNorm here)
    SelfAttention     fused QKV projection, SDPA with an additive padding bias and attention dropout,
                      output projection
    FeedForward       Linear(d -> d_f), ReLU/GeLU, Linear(d_f -> d)
    TransformerLayer  LN placement and the residual adds x_next = lam x + beta Dropout(block)
    BertModel         embeddings, layers, final LayerNorm, tanh pooler of token 0
    LMHead            dense, activation, LayerNorm, (DSLM logit scale), tied decoder + bias
    BertForPreTraining  BertModel + LM head (only at masked positions) + binary (NSP/SOP) head

Post-LN follows the Megatron convention: a = LN1(x); h = a + Attn(a); b = LN2(h); out = b + FFN(b),
so layer 1's LN1 is the original BERT's embedding LayerNorm and the final LN closes the last layer.
``hidden_states`` are the residual stream (the embedding output, then each layer's output, before
any following LayerNorm); :func:`dslm.model.hf.hf_hidden_states` maps them to HF's convention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dslm.model.blocks import Embeddings, ModelOutput, TransformerLayer, dense_activation
from dslm.model.config import BertConfig
from dslm.model.init import init_weights
from dslm.model.ops import attention_bias, compute_dtype
from dslm.model.saved import Pretrained

IGNORE_INDEX = -100


class Pooler(nn.Module):
    """tanh(dense(h[:, 0]))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


@dataclass
class BertOutput(ModelOutput):
    last_hidden_state: torch.Tensor            # after the final LayerNorm
    pooled_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output, then each layer's


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None           # mlm_loss + binary_loss (those given)
    mlm_loss: torch.Tensor | None = None       # mean over masked tokens
    binary_loss: torch.Tensor | None = None    # mean over labelled sequences
    mlm_loss_sum: torch.Tensor | None = None   # summed over masked tokens (mlm_loss = sum / count)
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    binary_loss_sum: torch.Tensor | None = None
    binary_correct: torch.Tensor | None = None
    binary_count: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None     # (predicted slots, vocab) with labels, else (B, L, vocab)
    binary_logits: torch.Tensor | None = None  # (B, 2)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BertModel(nn.Module, Pretrained):
    """The encoder: embeddings, N layers, final LayerNorm, pooler."""

    config_class = BertConfig

    def __init__(self, config: BertConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = Pooler(config)
        if init:
            init_weights(self, config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                output_hidden_states: bool = False) -> BertOutput:
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:  # (B, 1, 1, L) additive: every query sees the real keys only
            mask = attention_bias(attention_mask, compute_dtype(x))
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.final_ln(x)
        return BertOutput(x, self.pooler(x), tuple(hidden) if hidden is not None else None)


class LMHead(nn.Module):
    """dense d->d, activation, LayerNorm, times ``logit_scale`` (DSLM), tied decoder + bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.dense = nn.Linear(d, d)
        self.activation = config.activation
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.logit_scale = config.logit_scale()

    def forward(self, h, decoder_weight):
        h = self.ln(dense_activation(self.dense, self.activation, h))
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
        return F.linear(h, decoder_weight, self.bias)


def _predicted_positions(mlm_labels: torch.Tensor, max_predictions: int | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat indices (into B x L) of the positions the MLM head predicts: ``max_predictions`` slots per
    sequence (its predicted positions first, then others, whose labels are -100), or every
    predicted position (a data-dependent size: one host sync)."""
    predicted = mlm_labels != IGNORE_INDEX
    if max_predictions is None:
        return predicted.reshape(-1).nonzero().squeeze(1)
    b, length = mlm_labels.shape
    n = min(max_predictions, length)
    slots = predicted.to(dtype).topk(n, dim=1, sorted=False).indices
    return (slots + torch.arange(b, device=slots.device).unsqueeze(1) * length).reshape(-1)


class BertForPreTraining(nn.Module, Pretrained):
    """BERT with the masked-LM head (decoder tied to the word embeddings) and a binary head on the
    pooled token 0 (next-sentence / sentence-order prediction)."""

    config_class = BertConfig
    stack_prefix = "bert"

    def __init__(self, config: BertConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, init=False)
        self.lm_head = LMHead(config)
        self.binary_head = nn.Linear(config.hidden_size, 2)
        if init:
            init_weights(self, config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                binary_labels=None, output_hidden_states: bool = False,
                max_predictions: int | None = None) -> PreTrainingOutput:
        """Encoder, heads and (with labels) losses; ``max_predictions``: see :meth:`head_loss`."""
        enc = self.bert(input_ids, token_type_ids, attention_mask, output_hidden_states)
        out = self.head_loss(enc.last_hidden_state, enc.pooled_output, mlm_labels, binary_labels, max_predictions)
        out.hidden_states = enc.hidden_states
        return out

    def head_loss(self, seq, pooled, mlm_labels=None, binary_labels=None,
                  max_predictions: int | None = None) -> PreTrainingOutput:
        """The two heads on the encoder output and their losses (means, with the sums and counts).

        Only the predicted positions go through the LM head (d x vocab per token is BERT's largest
        matmul). With ``max_predictions`` (the sampler predicts at most that many tokens per
        sequence) each sequence's predicted positions are gathered into that many slots, spare slots
        carrying label -100: static shapes and no host sync (training, torch.compile, CUDA graphs).
        Without it the positions are found with a boolean gather, whose size is data dependent (the
        one host sync). Both give the same loss, summed in the same order."""
        out = PreTrainingOutput()
        decoder = self.bert.embeddings.word_embeddings.weight
        if mlm_labels is None:
            out.mlm_logits = self.lm_head(seq, decoder)
        else:
            index = _predicted_positions(mlm_labels, max_predictions,
                                         seq.dtype if seq.is_floating_point() else torch.float32)
            labels = mlm_labels.reshape(-1).index_select(0, index)
            logits = self.lm_head(seq.reshape(-1, seq.shape[-1]).index_select(0, index), decoder)
            valid = labels != IGNORE_INDEX
            out.mlm_loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            out.mlm_count = valid.sum()
            out.mlm_loss = out.mlm_loss_sum / out.mlm_count.clamp(min=1)
            out.mlm_logits = logits
            out.mlm_correct = ((logits.argmax(-1) == labels) & valid).sum()
        out.binary_logits = self.binary_head(pooled)
        if binary_labels is not None:
            valid = binary_labels != IGNORE_INDEX
            out.binary_loss_sum = F.cross_entropy(out.binary_logits.float(), binary_labels,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
            out.binary_count = valid.sum()
            out.binary_loss = out.binary_loss_sum / out.binary_count.clamp(min=1)
            out.binary_correct = ((out.binary_logits.argmax(-1) == binary_labels) & valid).sum()
        losses = [x for x in (out.mlm_loss, out.binary_loss) if x is not None]
        if losses:
            out.loss = losses[0] if len(losses) == 1 else losses[0] + losses[1]
        return out
