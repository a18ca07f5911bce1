"""Conversion between HF transformers' GPT-2 (``GPT2Model`` / ``GPT2LMHeadModel``) and our decoder,
both directions, exact.

GPT-2 is our Pre-LN decoder with learned positions: ``h.i.ln_1`` / ``ln_2`` are ``layers.i.ln1`` /
``ln2``, ``ln_f`` is ``final_ln``. Its projections are ``Conv1D`` layers (y = x W + b, W of shape
(in, out)), ours ``nn.Linear`` (W of shape (out, in)): each weight converts by a transpose; the fused
``c_attn`` holds [Q | K | V] along its output axis, as our ``qkv`` does along its rows. In eval mode
logits and hidden states agree to float rounding (:func:`hf_hidden_states` maps ours to HF's list,
whose last entry is after ``ln_f``).

What GPT-2 cannot hold is refused with a one-line ValueError: Post-LN, residual scales (DSLM scaling,
DeepNorm's alpha) and the DSLM logit scale; HF's ``scale_attn_by_inverse_layer_idx`` and
``reorder_and_upcast_attn`` variants, and activations other than relu, gelu and the tanh GeLU.
"""
from __future__ import annotations

import torch

from dslm.model.config import GPTConfig
from dslm.model.gpt import GPTLMHeadModel, GPTModel

# HF activation_function -> ours ("gelu_new" and "gelu_pytorch_tanh" are the same tanh formula)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def gpt2_config_from_hf(hf_config) -> GPTConfig:
    """Our config for an HF ``GPT2Config`` (ValueError for what we cannot hold)."""
    act = _ACTIVATIONS.get(hf_config.activation_function)
    if act is None:
        raise ValueError(f"HF activation_function {hf_config.activation_function!r} is not supported "
                         f"({', '.join(_ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"HF GPT-2 with {flag}=True is not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("HF GPT-2 with scale_attn_weights=False is not supported")
    if hf_config.embd_pdrop != hf_config.resid_pdrop:
        raise ValueError(f"HF embd_pdrop {hf_config.embd_pdrop} differs from resid_pdrop "
                         f"{hf_config.resid_pdrop}; ours has one hidden dropout")
    return GPTConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.n_embd, num_layers=hf_config.n_layer,
        num_heads=hf_config.n_head, ffn_size=hf_config.n_inner or 4 * hf_config.n_embd,
        max_position_embeddings=hf_config.n_positions, hidden_dropout=float(hf_config.resid_pdrop),
        attention_dropout=float(hf_config.attn_pdrop), ln="pre", activation=act,
        layer_norm_eps=float(hf_config.layer_norm_epsilon), init="gpt2",
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)))


def gpt2_config_to_hf(config: GPTConfig):
    """An HF ``GPT2Config`` for our config (Pre-LN, plain residual adds, no logit scale)."""
    import transformers

    if config.ln != "pre":
        raise ValueError("only Pre-LN decoders convert to HF GPT-2 (ln='pre')")
    if config.residual_variances() != (1.0, 1.0) or config.logit_scale() != 1.0:
        raise ValueError("residual scales (DSLM scaling, DeepNorm's alpha) and the DSLM logit "
                         "scale have no HF GPT-2 equivalent")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation]
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.ffn_size, activation_function=act, resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout, attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=config.tie_word_embeddings)


def _mapping(n_layers: int, ours: str, hf: str) -> dict[str, tuple[str, bool]]:
    """our parameter name -> (HF parameter name, transposed: a Conv1D weight)."""
    m = {f"{ours}embeddings.word_embeddings.weight": (f"{hf}wte.weight", False),
         f"{ours}embeddings.position_embeddings.weight": (f"{hf}wpe.weight", False)}
    blocks = {"ln1": "ln_1", "attention.qkv": "attn.c_attn", "attention.out": "attn.c_proj",
              "ln2": "ln_2", "ffn.fc_in": "mlp.c_fc", "ffn.fc_out": "mlp.c_proj"}
    for i in range(n_layers):
        for a, b in blocks.items():
            m[f"{ours}layers.{i}.{a}.weight"] = (f"{hf}h.{i}.{b}.weight", not a.startswith("ln"))
            m[f"{ours}layers.{i}.{a}.bias"] = (f"{hf}h.{i}.{b}.bias", False)
    for s in ("weight", "bias"):
        m[f"{ours}final_ln.{s}"] = (f"{hf}ln_f.{s}", False)
    return m


def _layouts(model_is_lm: bool, n_layers: int, untied: bool) -> dict[str, tuple[str, bool]]:
    ours, hf = ("transformer.", "transformer.") if model_is_lm else ("", "")
    m = _mapping(n_layers, ours, hf)
    if model_is_lm and untied:
        m["lm_head.weight"] = ("lm_head.weight", False)
    return m


@torch.no_grad()
def gpt2_from_hf(hf_model):
    """Our ``GPTLMHeadModel`` from an HF ``GPT2LMHeadModel``, our ``GPTModel`` from an HF
    ``GPT2Model`` (or the ``.transformer`` of another GPT-2 head class)."""
    lm = hasattr(hf_model, "lm_head") and hasattr(hf_model, "transformer")
    if not lm and isinstance(getattr(hf_model, "transformer", None), torch.nn.Module):
        return gpt2_from_hf(hf_model.transformer)
    config = gpt2_config_from_hf(hf_model.config)
    model = GPTLMHeadModel(config, init=False) if lm else GPTModel(config, init=False)
    hf_state = hf_model.state_dict()
    ours = dict(model.named_parameters())
    for name, (source, transposed) in _layouts(lm, config.num_layers, not config.tie_word_embeddings).items():
        if source not in hf_state:
            raise ValueError(f"HF GPT-2 model has no parameter {source} (needed for our {name})")
        value = hf_state[source]
        ours[name].copy_(value.t() if transposed else value)
    reference = next(hf_model.parameters())
    return model.to(device=reference.device, dtype=reference.dtype)


@torch.no_grad()
def gpt2_to_hf(model):
    """An HF ``GPT2LMHeadModel`` / ``GPT2Model`` (eval mode) with our decoder's weights."""
    import transformers

    hf_config = gpt2_config_to_hf(model.config)
    lm = isinstance(model, GPTLMHeadModel)
    hf_model = (transformers.GPT2LMHeadModel if lm else transformers.GPT2Model)(hf_config).eval()
    hf_state = hf_model.state_dict()
    ours = dict(model.named_parameters())
    for name, (target, transposed) in _layouts(lm, model.config.num_layers,
                                               not model.config.tie_word_embeddings).items():
        value = ours[name]
        hf_state[target].copy_(value.t() if transposed else value)
    if lm and model.config.tie_word_embeddings and "lm_head.weight" in hf_state:
        hf_state["lm_head.weight"].copy_(ours["transformer.embeddings.word_embeddings.weight"])
    reference = next(model.parameters())
    return hf_model.to(device=reference.device, dtype=reference.dtype)


def hf_hidden_states(model, hidden_states) -> tuple:
    """Our ``hidden_states`` (embedding output, then each layer's output) in HF GPT-2's convention:
    the same, except that the last one is after ``ln_f``."""
    stack = model.transformer if hasattr(model, "transformer") else model
    return tuple(hidden_states[:-1]) + (stack.final_ln(hidden_states[-1]),)
