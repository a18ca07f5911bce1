"""A decoder-only transformer (GPT-2's layout) on the blocks BERT uses, with every LN placement and
init scheme, DeepScaleLM included.

Modules in the order data flows through them:

    Embeddings        word + learned position embeddings, summed, dropout (:mod:`dslm.model.blocks`)
    TransformerLayer  causal self-attention (SDPA's causal path) and FFN, Pre-LN or Post-LN, residual
                      adds x_next = lam x + beta Dropout(block)
    GPTModel          embeddings, layers, final LayerNorm
    GPTLMHeadModel    GPTModel + the LM head: logits = (logit_scale h) E^T with the word-embedding
                      table E (tied, GPT-2's choice) or its own matrix (untied), next-token loss

Positions are learned, as in GPT-2: the HF ``GPT2LMHeadModel`` converts both ways exactly
(:mod:`dslm.model.hf_gpt2`), and the signal-propagation theory treats a position table like the word
table (an independent embedding summed into the stream). With Pre-LN, ``final_ln`` is GPT-2's
``ln_f``; with Post-LN (Megatron convention) it closes the last layer as in BERT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dslm.model.blocks import Embeddings, ModelOutput, TransformerLayer
from dslm.model.config import GPTConfig
from dslm.model.init import init_weights
from dslm.model.ops import causal_attention_bias, compute_dtype
from dslm.model.saved import Pretrained

IGNORE_INDEX = -100


@dataclass
class GPTOutput(ModelOutput):
    last_hidden_state: torch.Tensor            # after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output, then each layer's


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None           # mean next-token cross-entropy over the targets
    loss_sum: torch.Tensor | None = None       # summed over the targets (loss = sum / count)
    correct: torch.Tensor | None = None        # targets whose arg-max prediction is right
    count: torch.Tensor | None = None          # targets (positions whose target is not -100)
    logits: torch.Tensor | None = None         # (B, L, vocab)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class GPTModel(nn.Module, Pretrained):
    """The decoder stack: embeddings, N causal layers, final LayerNorm."""

    config_class = GPTConfig

    def __init__(self, config: GPTConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if init:
            init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> GPTOutput:
        """``attention_mask`` (batch, seq) of 1 / 0 marks padding keys; without it (packed text, the
        training case) the layers take SDPA's causal path and no mask is built."""
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            mask = causal_attention_bias(attention_mask, compute_dtype(x))
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        return GPTOutput(self.final_ln(x), tuple(hidden) if hidden is not None else None)


class GPTLMHeadModel(nn.Module, Pretrained):
    """:class:`GPTModel` and a next-token LM head (see the module docstring)."""

    config_class = GPTConfig
    stack_prefix = "transformer"

    def __init__(self, config: GPTConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config, init=False)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_scale = config.logit_scale()
        if init:
            init_weights(self, config)

    def output_embedding(self) -> torch.Tensor:
        """The (vocab, d) matrix the logits are taken against."""
        if self.lm_head is None:
            return self.transformer.embeddings.word_embeddings.weight
        return self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
        return F.linear(h, self.output_embedding())

    def forward(self, input_ids, targets=None, attention_mask=None,
                output_hidden_states: bool = False) -> CausalLMOutput:
        """Logits at every position and, with ``targets``, the loss. ``targets[b, t]`` is the token
        that position t predicts (the next token: the data layer shifts, not the model; HF's
        ``labels`` are the inputs, shifted inside); -100 marks positions without a target."""
        enc = self.transformer(input_ids, attention_mask, output_hidden_states)
        out = CausalLMOutput(logits=self.logits(enc.last_hidden_state), hidden_states=enc.hidden_states)
        if targets is not None:
            flat = out.logits.reshape(-1, out.logits.shape[-1])
            labels = targets.reshape(-1)
            valid = labels != IGNORE_INDEX
            out.loss_sum = F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            out.count = valid.sum()
            out.loss = out.loss_sum / out.count.clamp(min=1)
            out.correct = ((flat.argmax(-1) == labels) & valid).sum()
        return out
