"""Conversion between HF transformers' BERT and our Post-LN BERT, both directions, exact.

The original BERT (HF ``BertModel``) applies a LayerNorm after each residual add and one on the
embeddings; our Post-LN (Megatron convention) applies it at the start of each sub-layer and after the
last layer. The LayerNorms map one position shifted (THEORY.md section 3):

    HF embeddings.LayerNorm                   -> layers[0].ln1
    HF layer l attention.output.LayerNorm      -> layers[l].ln2
    HF layer l output.LayerNorm                -> layers[l + 1].ln1, or final_ln for the last layer

so in eval mode hidden states (after :func:`hf_hidden_states`) and logits agree to float rounding.
In training mode only the embedding dropout differs (HF drops after the embedding LayerNorm, we drop
before it). Q, K and V are concatenated into our fused ``qkv`` in that order.
"""
from __future__ import annotations

import torch

from dslm.model.bert import BertForPreTraining, BertModel
from dslm.model.config import BertConfig


def config_from_hf(hf_config) -> BertConfig:
    """Our Post-LN config for an HF ``BertConfig`` (raises ValueError for what we cannot hold)."""
    act = hf_config.hidden_act
    if act not in ("gelu", "relu"):
        raise ValueError(f"HF hidden_act {act!r} is not supported (gelu or relu)")
    pos = getattr(hf_config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"HF position_embedding_type {pos!r} is not supported (absolute)")
    if getattr(hf_config, "is_decoder", False):
        raise ValueError("HF decoder BERT (is_decoder=True) is not supported")
    pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    return BertConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        ffn_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        hidden_dropout=float(hf_config.hidden_dropout_prob),
        attention_dropout=float(hf_config.attention_probs_dropout_prob),
        ln="post", activation=act, layer_norm_eps=float(hf_config.layer_norm_eps),
        init="megatron", pad_token_id=pad)


def config_to_hf(config: BertConfig):
    """An HF ``BertConfig`` for our config (Post-LN, plain residual adds, no logit scale)."""
    import transformers

    if config.ln != "post":
        raise ValueError("only Post-LN models convert to HF BERT (ln='post')")
    if config.residual_variances() != (1.0, 1.0) or config.logit_scale() != 1.0:
        raise ValueError("residual scales (DSLM scaling, DeepNorm's alpha) and the DSLM logit "
                         "scale have no HF BERT equivalent")
    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.ffn_size, hidden_act=config.activation,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id, tie_word_embeddings=True)


def _mapping(n_layers: int, ours: str, hf: str, pretraining: bool) -> dict[str, list[str]]:
    """our parameter name -> HF parameter name(s) (several are concatenated along dim 0)."""
    m: dict[str, list[str]] = {}

    def pair(a, b, suffixes=("weight", "bias")):
        for s in suffixes:
            m[f"{ours}{a}.{s}"] = [f"{hf}{b}.{s}"]

    for t in ("word", "position", "token_type"):
        pair(f"embeddings.{t}_embeddings", f"embeddings.{t}_embeddings", ("weight",))
    pair("layers.0.ln1", "embeddings.LayerNorm")
    for i in range(n_layers):
        h = f"encoder.layer.{i}."
        for s in ("weight", "bias"):
            m[f"{ours}layers.{i}.attention.qkv.{s}"] = [
                f"{hf}{h}attention.self.{x}.{s}" for x in ("query", "key", "value")]
        pair(f"layers.{i}.attention.out", h + "attention.output.dense")
        pair(f"layers.{i}.ln2", h + "attention.output.LayerNorm")
        pair(f"layers.{i}.ffn.fc_in", h + "intermediate.dense")
        pair(f"layers.{i}.ffn.fc_out", h + "output.dense")
        pair(f"layers.{i + 1}.ln1" if i + 1 < n_layers else "final_ln", h + "output.LayerNorm")
    pair("pooler.dense", "pooler.dense")
    if pretraining:
        m["lm_head.dense.weight"] = ["cls.predictions.transform.dense.weight"]
        m["lm_head.dense.bias"] = ["cls.predictions.transform.dense.bias"]
        m["lm_head.ln.weight"] = ["cls.predictions.transform.LayerNorm.weight"]
        m["lm_head.ln.bias"] = ["cls.predictions.transform.LayerNorm.bias"]
        m["lm_head.bias"] = ["cls.predictions.bias"]
        m["binary_head.weight"] = ["cls.seq_relationship.weight"]
        m["binary_head.bias"] = ["cls.seq_relationship.bias"]
    return m


def _is_pretraining_hf(hf_model) -> bool:
    """Both pretraining heads present (HF ``BertForPreTraining``)."""
    cls = getattr(hf_model, "cls", None)
    return hasattr(hf_model, "bert") and hasattr(cls, "predictions") and hasattr(cls, "seq_relationship")


@torch.no_grad()
def from_hf(hf_model):
    """Our ``BertForPreTraining`` from an HF ``BertForPreTraining``; our ``BertModel`` from an HF
    ``BertModel`` or from the encoder (``.bert``) of any other HF BERT head class (``BertForMaskedLM``,
    ``BertForSequenceClassification``, ...): their task heads have no counterpart here and are not
    converted. An HF encoder without a pooler (``BertForMaskedLM``) leaves ours at its init."""
    if not _is_pretraining_hf(hf_model) and isinstance(getattr(hf_model, "bert", None), torch.nn.Module):
        return from_hf(hf_model.bert)
    pretraining = _is_pretraining_hf(hf_model)
    config = config_from_hf(hf_model.config)
    model = BertForPreTraining(config) if pretraining else BertModel(config)
    hf_state = hf_model.state_dict()
    if pretraining:
        decoder = hf_state.get("cls.predictions.decoder.weight")
        word = hf_state["bert.embeddings.word_embeddings.weight"]
        if decoder is not None and not torch.equal(decoder, word):
            raise ValueError("HF model has an untied LM decoder; ours ties it to the word "
                             "embeddings")
    prefix = "bert." if pretraining else ""
    ours = dict(model.named_parameters())
    for name, sources in _mapping(config.num_layers, prefix, prefix, pretraining).items():
        if not all(s in hf_state for s in sources):
            if "pooler" in name:
                continue
            raise ValueError(f"HF model lacks {sources[0]}")
        ours[name].copy_(torch.cat([hf_state[s] for s in sources], 0))
    reference = next(hf_model.parameters())
    return model.to(device=reference.device, dtype=reference.dtype)


@torch.no_grad()
def to_hf(model):
    """An HF ``BertForPreTraining`` / ``BertModel`` (eval mode) with our model's weights."""
    import transformers

    hf_config = config_to_hf(model.config)
    pretraining = isinstance(model, BertForPreTraining)
    cls = transformers.BertForPreTraining if pretraining else transformers.BertModel
    hf_model = cls(hf_config).eval()
    hf_state = hf_model.state_dict()
    ours = dict(model.named_parameters())
    prefix = "bert." if pretraining else ""
    for name, targets in _mapping(model.config.num_layers, prefix, prefix, pretraining).items():
        value = ours[name]
        for i, t in enumerate(targets):
            rows = value.shape[0] // len(targets)
            hf_state[t].copy_(value[i * rows:(i + 1) * rows])
    if pretraining:  # tied in HF too; copy explicitly in case a version keeps separate tensors
        for key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            if key in hf_state:
                src = "bert.embeddings.word_embeddings.weight" if key.endswith("weight") \
                    else "lm_head.bias"
                hf_state[key].copy_(ours[src])
    reference = next(model.parameters())
    return hf_model.to(device=reference.device, dtype=reference.dtype)


def hf_hidden_states(model, hidden_states) -> tuple:
    """Our Post-LN ``hidden_states`` (embedding output, then each layer's residual stream) in HF's
    convention: each passed through the LayerNorm that follows it (layer i+1's LN1 or final_ln)."""
    bert = model.bert if hasattr(model, "bert") else model
    if model.config.ln != "post":
        raise ValueError("HF hidden states exist only for Post-LN models")
    norms = [layer.ln1 for layer in bert.layers] + [bert.final_ln]
    return tuple(ln(h) for ln, h in zip(norms, hidden_states))
