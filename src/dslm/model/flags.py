"""The model flags that every command building a fresh BERT shares, and the :class:`BertConfig` they
describe: one spelling of each flag (``--hidden`` is ``hidden_size``, ``--dropout`` both dropouts)
for ``dslm pretrain`` and ``dslm finetune``."""
from __future__ import annotations

import argparse

from dslm.errors import UsageError
from dslm.model.config import INIT_CHOICES, BertConfig


def parse_r0(value: str):
    """``--r0``: a number, or ``auto`` (measured on a data batch by the command that supports it)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def add_model_arguments(group, defaults: dict | None = None) -> None:
    """Add the architecture and init flags to ``group`` (a parser or argument group). ``defaults``:
    flag dest -> default (a flag without one defaults to None: the caller resolves it)."""
    d = defaults or {}
    group.add_argument("--layers", type=int, default=d.get("layers"), help="transformer layers")
    group.add_argument("--hidden", type=int, default=d.get("hidden"), help="model width d")
    group.add_argument("--heads", type=int, default=d.get("heads"), help="attention heads")
    group.add_argument("--ffn", type=int, default=d.get("ffn"), help="FFN width (default 4 d)")
    group.add_argument("--ln", choices=("post", "pre"), default=d.get("ln"), help="LayerNorm placement")
    group.add_argument("--activation", choices=("relu", "gelu"), default=d.get("activation"), help="FFN activation")
    group.add_argument("--init", choices=INIT_CHOICES, default=d.get("init"),
                       help="init scheme (deepnorm: Post-LN only)")
    group.add_argument("--dslm-mode", choices=("both", "init", "scaling"), default="both",
                       help="with --init dslm: init + residual scaling, init only, or scaling only")
    group.add_argument("--lam2", type=float, default=None, help="DSLM lambda^2 (default 1 - beta^2)")
    group.add_argument("--beta2", type=float, default=None, help="DSLM beta^2 (default dslm_k / layers)")
    group.add_argument("--dslm-k", type=float, default=1.0, help="beta^2 = k / layers when --beta2 is not given")
    group.add_argument("--r0", type=parse_r0, default=None,
                       help="input correlation for the DSLM init: a number, or 'auto' where the command "
                            f"measures it on a data batch (dslm pretrain); default {BertConfig.r0:.3f}")


def config_from_args(args, vocab_size: int, seq_len: int) -> BertConfig:
    """The :class:`BertConfig` of the model flags in ``args`` (and ``args.dropout``); ``--r0 auto``
    leaves the default r0 for the caller to replace with a measurement. An impossible combination is
    a one-line :class:`UsageError`."""
    r0 = args.r0 if isinstance(args.r0, float) else None
    try:
        return BertConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.heads, ffn_size=args.ffn, max_position_embeddings=max(512, seq_len),
                          hidden_dropout=args.dropout, attention_dropout=args.dropout, ln=args.ln,
                          activation=args.activation, init=args.init, dslm_mode=args.dslm_mode,
                          lam2=args.lam2, beta2=args.beta2, dslm_k=args.dslm_k,
                          **({"r0": r0} if r0 is not None else {}))
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
