"""The model flags that every command building a fresh model shares, and the config they describe
(:class:`BertConfig`, or :class:`GPTConfig` for ``dslm pretrain --arch gpt``): one spelling of each
flag (``--hidden`` is ``hidden_size``, ``--dropout`` both dropouts) for ``dslm pretrain``,
``dslm finetune`` and ``dslm figures``."""
from __future__ import annotations

import argparse

from dslm.errors import UsageError
from dslm.model.config import ACTIVATION_CHOICES, INIT_CHOICES, BertConfig, GPTConfig, TransformerConfig


def parse_r0(value: str):
    """``--r0``: a number in (0, 1], or ``auto`` (measured on a data batch by the command that supports it)."""
    if value == "auto":
        return value
    try:
        r0 = float(value)
    except ValueError:
        r0 = float("nan")   # fails the range check below
    if not 0.0 < r0 <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'auto', got {value!r}")
    return r0


# flag dest -> (the config field it sets, its argparse keywords; the default is None unless given)
MODEL_FLAGS = {
    "layers": ("num_layers", {"type": int, "help": "transformer layers"}),
    "hidden": ("hidden_size", {"type": int, "help": "model width d"}),
    "heads": ("num_heads", {"type": int, "help": "attention heads"}),
    "ffn": ("ffn_size", {"type": int, "help": "FFN width (default 4 d)"}),
    "ln": ("ln", {"choices": ("post", "pre"), "help": "LayerNorm placement"}),
    "activation": ("activation", {"choices": ACTIVATION_CHOICES,
                                  "help": "FFN activation (gelu: exact; gelu_tanh: GPT-2's tanh approximation)"}),
    "init": ("init", {"choices": INIT_CHOICES, "help": "init scheme (deepnorm: Post-LN only)"}),
    "dslm_mode": ("dslm_mode", {"choices": ("both", "init", "scaling"), "default": "both",
                                "help": "with --init dslm: init + residual scaling, init only, or scaling only"}),
    "lam2": ("lam2", {"type": float, "help": "DSLM lambda^2 (default 1 - beta^2)"}),
    "beta2": ("beta2", {"type": float, "help": "DSLM beta^2 (default dslm_k / layers)"}),
    "dslm_k": ("dslm_k", {"type": float, "default": 1.0, "help": "beta^2 = k / layers when --beta2 is not given"}),
    "r0": ("r0", {"type": parse_r0,
                  "help": "input correlation for the DSLM init: a number in (0, 1], or 'auto' where the command "
                          f"measures it on a data batch (dslm pretrain, dslm figures); default {BertConfig.r0:.3f}, "
                          f"decoders {GPTConfig.r0:.3f}"}),
}


def add_model_arguments(group, defaults: dict | None = None, exclude: tuple[str, ...] = ()) -> None:
    """Add the architecture and init flags to ``group`` (a parser or argument group). ``defaults``:
    flag dest -> default (a flag without one defaults to None: the caller resolves it); ``exclude``:
    dests of flags the command sets itself (``dslm figures`` draws several LayerNorm placements, so
    it has no ``--ln``)."""
    d = defaults or {}
    for dest, (_, keywords) in MODEL_FLAGS.items():
        if dest not in exclude:
            group.add_argument("--" + dest.replace("_", "-"),
                               **{**keywords, "default": d.get(dest, keywords.get("default"))})


def config_from_args(args, vocab_size: int, seq_len: int, config_class: type[TransformerConfig] = BertConfig,
                     **fields) -> TransformerConfig:
    """The ``config_class`` config (:class:`BertConfig` unless given) of the model flags in ``args``
    (and ``args.dropout``), with ``max(512, seq_len)`` positions; ``--r0 auto`` leaves the default r0
    for the caller to replace with a measurement. ``fields``: config fields the command sets itself
    (a flag it left out with ``exclude``, a measured r0, its own position count); they win over the
    flags. An impossible combination is a one-line :class:`UsageError`."""
    kw = {field: getattr(args, dest) for dest, (field, _) in MODEL_FLAGS.items() if hasattr(args, dest)}
    if not isinstance(kw.get("r0"), float):   # auto or not given: the default until measured
        kw.pop("r0", None)
    kw.update(vocab_size=vocab_size, max_position_embeddings=max(512, seq_len),
              hidden_dropout=args.dropout, attention_dropout=args.dropout)
    kw.update(fields)
    try:
        return config_class(**kw)
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
