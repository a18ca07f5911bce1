"""How the probe reads one family of models: a :class:`ProbeAdapter` names where the residual stream
is, which weight matrix plays each role (the roles of :data:`dslm.theory.profile.GRAD_MATRICES`) and
what the pretraining loss terms are, so :func:`dslm.probe.probe_model` works on any model.

Four adapters ship: :data:`DSLM_BERT` (dslm's :class:`dslm.model.BertForPreTraining`),
:data:`HF_BERT` (Hugging Face ``transformers.BertForPreTraining``), :data:`DSLM_GPT` (dslm's
decoder, :class:`dslm.model.GPTLMHeadModel`) and :data:`HF_GPT2` (``transformers.GPT2LMHeadModel``).
All read the stream where THEORY.md does: the embedding sum, then the sum after each layer's second
residual add, before any following LayerNorm; on HF's Post-LN BERT that is the input of the
LayerNorms that close the embeddings and each layer, so a model and its :func:`dslm.model.hf.to_hf`
conversion measure alike (in training mode HF drops out after that LayerNorm, so its embedding
moments are before dropout). GPT-2 is Pre-LN: the stream after a block is the block's output, and a
decoder's loss term is ``"lm"``, the next-token loss over the batch's ``targets``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dslm.model.bert import IGNORE_INDEX, BertForPreTraining
from dslm.model.gpt import GPTLMHeadModel


class Tap(NamedTuple):
    """A point of the residual stream: the output of ``module`` (its first element where it returns
    a tuple, as older transformers' GPT-2 blocks do), or its first input."""

    module: nn.Module
    input: bool = False


@dataclass(frozen=True)
class ProbeAdapter:
    """The probe's view of a model, as functions of the model (or of one of its blocks).

    ``embedding(model)``: the stream entering the first block. ``blocks(model)``: the blocks, input
    side first. ``grads(block)``: role -> gradient of that role's weight matrix, for all six roles
    (a fused QKV matrix split here). ``losses(model, batch)``: one micro-batch's loss terms (the
    batch has the data layer's keys), ``{"mlm" | "binary" | "lm": (mean loss, labels averaged
    over)}``, so the probe can weight each micro-batch by its share of the labels. ``stream(block)``: the
    stream after the block (default: the block's output).
    """

    embedding: Callable[[nn.Module], Tap]
    blocks: Callable[[nn.Module], list]
    grads: Callable[[nn.Module], dict]
    losses: Callable[[nn.Module, dict], dict]
    stream: Callable[[nn.Module], Tap] = Tap


def _dslm_grads(layer) -> dict:
    q, k, v = layer.attention.qkv.weight.grad.chunk(3)
    return {"q": q, "k": k, "v": v, "attn_out": layer.attention.out.weight.grad,
            "ffn_in": layer.ffn.fc_in.weight.grad, "ffn_out": layer.ffn.fc_out.weight.grad}


def _dslm_losses(model, batch: dict) -> dict:
    out = model(**batch)
    terms = {}
    if out.mlm_loss is not None:
        terms["mlm"] = (out.mlm_loss, out.mlm_count)
    if out.binary_loss is not None:
        terms["binary"] = (out.binary_loss, out.binary_count)
    return terms


DSLM_BERT = ProbeAdapter(
    embedding=lambda model: Tap(model.bert.embeddings),
    blocks=lambda model: list(model.bert.layers),
    grads=_dslm_grads, losses=_dslm_losses)


def _mean_and_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Cross-entropy averaged over the labelled entries (label -100 left out), and their count."""
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1), count


def _hf_grads(layer) -> dict:
    attn = layer.attention
    return {"q": attn.self.query.weight.grad, "k": attn.self.key.weight.grad,
            "v": attn.self.value.weight.grad, "attn_out": attn.output.dense.weight.grad,
            "ffn_in": layer.intermediate.dense.weight.grad,
            "ffn_out": layer.output.dense.weight.grad}


def _hf_losses(model, batch: dict) -> dict:
    """HF's forward takes other label names; the terms come from its logits, as dslm's do."""
    out = model(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                attention_mask=batch.get("attention_mask"))
    terms = {}
    if "mlm_labels" in batch:
        terms["mlm"] = _mean_and_count(out.prediction_logits, batch["mlm_labels"])
    if "binary_labels" in batch:
        terms["binary"] = _mean_and_count(out.seq_relationship_logits, batch["binary_labels"])
    return terms


HF_BERT = ProbeAdapter(
    embedding=lambda model: Tap(model.bert.embeddings.LayerNorm, input=True),
    blocks=lambda model: list(model.bert.encoder.layer),
    grads=_hf_grads, losses=_hf_losses,
    stream=lambda layer: Tap(layer.output.LayerNorm, input=True))


def _dslm_lm_losses(model, batch: dict) -> dict:
    """The decoder's next-token loss over the batch's ``targets`` and their count."""
    out = model(batch["input_ids"], targets=batch["targets"], attention_mask=batch.get("attention_mask"))
    return {"lm": (out.loss, out.count)}


DSLM_GPT = ProbeAdapter(
    embedding=lambda model: Tap(model.transformer.embeddings),
    blocks=lambda model: list(model.transformer.layers),
    grads=_dslm_grads, losses=_dslm_lm_losses)


def _hf_gpt2_grads(block) -> dict:
    """GPT-2's Conv1D weights are (in, out): transposed to (out, in); c_attn's output columns are
    [Q | K | V]."""
    q, k, v = block.attn.c_attn.weight.grad.t().chunk(3)
    return {"q": q, "k": k, "v": v, "attn_out": block.attn.c_proj.weight.grad.t(),
            "ffn_in": block.mlp.c_fc.weight.grad.t(), "ffn_out": block.mlp.c_proj.weight.grad.t()}


def _hf_gpt2_losses(model, batch: dict) -> dict:
    """The next-token loss from HF's logits against the batch's ``targets`` (the next tokens)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return {"lm": _mean_and_count(out.logits, batch["targets"])}


HF_GPT2 = ProbeAdapter(
    embedding=lambda model: Tap(model.transformer.drop),
    blocks=lambda model: list(model.transformer.h),
    grads=_hf_gpt2_grads, losses=_hf_gpt2_losses)


def adapter_for(model: nn.Module) -> ProbeAdapter:
    """The shipped adapter for ``model``'s class (TypeError naming the supported ones otherwise)."""
    if isinstance(model, BertForPreTraining):
        return DSLM_BERT
    if isinstance(model, GPTLMHeadModel):
        return DSLM_GPT
    transformers = sys.modules.get("transformers")   # an HF model means transformers is loaded
    if transformers is not None and isinstance(model, transformers.BertForPreTraining):
        return HF_BERT
    if transformers is not None and isinstance(model, transformers.GPT2LMHeadModel):
        return HF_GPT2
    raise TypeError(
        f"the probe has no adapter for {type(model).__name__}: it supports "
        "dslm.model.BertForPreTraining and transformers.BertForPreTraining, dslm.model.GPTLMHeadModel "
        "and transformers.GPT2LMHeadModel; pass adapter=ProbeAdapter(...) (dslm.probe.adapters) for "
        "other models")
