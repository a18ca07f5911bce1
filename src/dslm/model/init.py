"""Initialisation schemes, applied to a built model (BERT or GPT): the reference BERT's (THEORY.md
section 3), DeepNorm (DeepNet, Wang et al. 2022) as a baseline, and GPT-2's.

| weight                  | megatron | xavier            | dslm                      | deepnorm               | gpt2          |
|-------------------------|----------|-------------------|---------------------------|------------------------|---------------|
| embeddings (each table) | 0.02     | sqrt(1/d)         | sqrt((1 - p)/T)           | sqrt(1/d)              | 0.02          |
| Q and K                 | 0.02     | sqrt(2/(d + d_h)) | sqrt(1/d)                 | sqrt(1/(2d))           | 0.02          |
| V                       | 0.02     | sqrt(2/(d + d_h)) | s_vo(layer)               | sqrt(1/(2d)) b_DN      | 0.02          |
| attention output        | 0.02     | sqrt(1/d)         | s_vo(layer)               | sqrt(1/d) b_DN         | 0.02/sqrt(2N) |
| FFN in                  | 0.02     | sqrt(2/(d + d_f)) | (2 (1 - p)/(d d_f))^(1/4) | sqrt(2/(d + d_f)) b_DN | 0.02          |
| FFN out                 | 0.02     | sqrt(2/(d + d_f)) | (2 (1 - p)/(d d_f))^(1/4) | sqrt(2/(d + d_f)) b_DN | 0.02/sqrt(2N) |
| LM-head dense, pooler   | 0.02     | 1/sqrt(d)         | 1/sqrt(d)                 | 1/sqrt(d)              | 0.02          |
| untied decoder d -> V   | 0.02     | 1/sqrt(d)         | 1/sqrt(d)                 | 1/sqrt(d)              | 0.02          |
| binary head d -> 2      | 0.02     | sqrt(2/(d + 2))   | 1/sqrt(d)                 | sqrt(2/(d + 2))        | 0.02          |

T is the number of embedding tables summed (3 for BERT, 2 for GPT); a decoder's DSLM s_vo recursion
runs with causal attention (THEORY.md, "DSLM init for decoders").

All biases 0, LayerNorm gain 1 / bias 0, every weight drawn from a normal distribution. With
d_f = 4d the FFN entries are the table's sqrt(2/(5d)) and sqrt(sqrt((1 - p)/2)/d); for other widths
they keep the same meaning (Xavier's fan average; DSLM's FFN output variance 1 - p). The DSLM
numbers come from :func:`dslm.theory.dslm_init.dslm_stds` (via :meth:`BertConfig.dslm_stds`),
including the per-layer s_vo recursion; the LM-logit scale lives in the config.

DeepNorm's column follows torchscale's encoder init (:mod:`dslm.theory.deepnorm` names the files and
functions it was checked against, and where it differs): Q/K/V Xavier over (d, d) with gain
1/sqrt(2), attention output Xavier with gain 1, FFN Xavier (as the DeepNet paper describes; torchscale
keeps nn.Linear's default there), and V, attention output and FFN scaled by b_DN = (8N)^(-1/4)
(DeepNet's beta, an init scale; the residual adds' beta is 1). DeepNorm is Post-LN only. torchscale
draws uniforms, the model draws normals of the same variance. Embeddings and heads are the xavier
column's. Its residual adds are x_next = LN(alpha x + block), alpha = (2N)^(1/4).

The embeddings row is each of the word, position and (BERT) token-type tables. The residual scales of every
scheme come from :meth:`BertConfig.residual_variances`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dslm.model.config import TransformerConfig
from dslm.theory.schemes import MEGATRON_STD, scheme_stds  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class InitEntry:
    """One weight (or a row block of the fused QKV weight) and the std it is drawn with."""

    name: str            # parameter name in ``model.named_parameters()``
    role: str            # embedding | q | k | v | attn_out | ffn_in | ffn_out | lm_dense | pooler | binary | decoder
    std: float
    layer: int | None = None
    rows: tuple[int, int] | None = None  # [start, stop) rows of the parameter, None = all


def _layer_entries(prefix: str, i: int, roles: dict, d: int) -> list[InitEntry]:
    """The six weight roles of layer ``i`` (the same names in BERT and GPT, :mod:`dslm.model.blocks`)."""
    p = f"{prefix}layers.{i}."
    qkv = p + "attention.qkv.weight"
    return [
        InitEntry(qkv, "q", roles["qk"], i, (0, d)),
        InitEntry(qkv, "k", roles["qk"], i, (d, 2 * d)),
        InitEntry(qkv, "v", roles["v"][i], i, (2 * d, 3 * d)),
        InitEntry(p + "attention.out.weight", "attn_out", roles["attn_out"][i], i),
        InitEntry(p + "ffn.fc_in.weight", "ffn_in", roles["ffn"], i),
        InitEntry(p + "ffn.fc_out.weight", "ffn_out", roles["ffn_out"], i),
    ]


def _bert_heads(model, roles: dict, prefix: str) -> list[InitEntry]:
    plan = [InitEntry(f"{prefix}pooler.dense.weight", "pooler", roles["head"])]
    if hasattr(model, "lm_head"):
        plan.append(InitEntry("lm_head.dense.weight", "lm_dense", roles["head"]))
        plan.append(InitEntry("binary_head.weight", "binary", roles["binary"]))
    return plan


def _gpt_heads(model, roles: dict) -> list[InitEntry]:
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or model.config.tie_word_embeddings:
        return []
    return [InitEntry("lm_head.weight", "decoder", roles["head"])]


def init_plan(model: nn.Module, config: TransformerConfig | None = None) -> list[InitEntry]:
    """Every weight matrix / embedding table of ``model`` (a ``BertModel``, ``BertForPreTraining``,
    ``GPTModel`` or ``GPTLMHeadModel``) with the std its scheme draws it from."""
    config = config or model.config
    roles = scheme_stds(config)
    stack = next((getattr(model, n) for n in ("bert", "transformer") if hasattr(model, n)), model)
    prefix = next((n + "." for n in ("bert", "transformer") if hasattr(model, n)), "")
    tables = ("word", "position", "token_type") if stack.embeddings.token_type_embeddings is not None \
        else ("word", "position")
    plan = [InitEntry(f"{prefix}embeddings.{t}_embeddings.weight", "embedding", roles["embedding"])
            for t in tables]
    for i in range(len(stack.layers)):
        plan += _layer_entries(prefix, i, roles, config.hidden_size)
    plan += _gpt_heads(model, roles) if config.causal else _bert_heads(model, roles, prefix)
    return plan


@torch.no_grad()
def init_weights(model: nn.Module, config: TransformerConfig | None = None,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Initialise ``model`` in place by ``config.init`` (megatron / xavier / dslm / deepnorm / gpt2): weights from
    N(0, std^2) per :func:`init_plan`, every bias 0, every LayerNorm gain 1 and bias 0."""
    config = config or model.config
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
    params = dict(model.named_parameters())
    for entry in init_plan(model, config):
        target = params[entry.name]
        if entry.rows is not None:
            target = target[entry.rows[0]:entry.rows[1]]
        target.normal_(0.0, entry.std, generator=generator)
    return model
