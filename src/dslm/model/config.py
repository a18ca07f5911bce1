"""The BERT configuration: one dataclass, validated on construction.

Everything that changes what the model computes is here: sizes, LayerNorm placement, activation,
dropout, and the init scheme with DeepScaleLM's options. The derived DSLM quantities (residual scales
lam/beta and the LM-logit scale) come from :mod:`dslm.theory.dslm_init`, the one source of truth.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from dslm.theory.dslm_init import REFERENCE_R0, dslm_stds, residual_scales

LN_CHOICES = ("post", "pre")
ACTIVATION_CHOICES = ("relu", "gelu")
INIT_CHOICES = ("megatron", "xavier", "dslm")
DSLM_MODE_CHOICES = ("both", "init", "scaling")


@dataclass
class BertConfig:
    """Configuration of :class:`dslm.model.bert.BertModel` / ``BertForPreTraining``.

    ``ln``: "post" or "pre", the Megatron convention of THEORY.md section 3.
    ``init``: "megatron" (all 0.02), "xavier" or "dslm" (THEORY.md section 3's table).
    ``dslm_mode`` (only with ``init="dslm"``): "both" = DSLM init + residual scaling, "init" = DSLM
    init with plain residual adds (lam = beta = 1), "scaling" = residual scaling on the megatron init.
    ``lam2``/``beta2``: residual scales (lam^2 + beta^2 = 1); None derives beta^2 = dslm_k / N.
    ``r0``: correlation of the summed input embeddings used by the s_vo recursion.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int | None = None          # None -> 4 * hidden_size
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    ln: str = "post"
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    init: str = "megatron"
    dslm_mode: str = "both"
    lam2: float | None = None
    beta2: float | None = None
    dslm_k: float = 1.0
    r0: float = REFERENCE_R0
    pad_token_id: int = 0

    def __post_init__(self):
        if self.ffn_size is None:
            self.ffn_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size="
                             f"{self.hidden_size}")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        for name, choices in (("ln", LN_CHOICES), ("activation", ACTIVATION_CHOICES),
                              ("init", INIT_CHOICES), ("dslm_mode", DSLM_MODE_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {'|'.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.r0, (int, float)) or not 0.0 < self.r0 <= 1.0:
            raise ValueError(f"r0 must be in (0, 1], got {self.r0!r}")
        self.r0 = float(self.r0)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")
        if self.init == "dslm":  # the s_vo recursion needs lam^2/beta^2 even without scaling
            residual_scales(self.num_layers, self.dslm_k, self.lam2, self.beta2)  # raises ValueError

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def uses_dslm_init(self) -> bool:
        """DSLM's init table (and its LM-logit scale) is in use."""
        return self.init == "dslm" and self.dslm_mode in ("both", "init")

    @property
    def uses_residual_scaling(self) -> bool:
        """The residual adds are x_next = lam x + beta block (lam^2 + beta^2 = 1)."""
        return self.init == "dslm" and self.dslm_mode in ("both", "scaling")

    @property
    def weight_scheme(self) -> str:
        """The init table column applied to the weights (DSLM scaling-only uses megatron's)."""
        if self.init == "dslm" and not self.uses_dslm_init:
            return "megatron"
        return self.init

    def residual_scales(self) -> tuple[float, float]:
        """(lam, beta) of both residual adds: (1, 1) unless DSLM residual scaling is on."""
        if not self.uses_residual_scaling:
            return 1.0, 1.0
        lam2, beta2 = residual_scales(self.num_layers, self.dslm_k, self.lam2, self.beta2)
        return math.sqrt(lam2), math.sqrt(beta2)

    def dslm_stds(self):
        """:class:`dslm.theory.dslm_init.DSLMStds` for this config (its lam2/beta2; for the
        init-only variant, the ones residual scaling would use)."""
        lam2, beta2 = residual_scales(self.num_layers, self.dslm_k, self.lam2, self.beta2)
        return dslm_stds(self.hidden_size, self.num_layers, self.hidden_dropout, lam2, beta2,
                         self.r0)

    def logit_scale(self) -> float:
        """Multiplier of the LM-head output before the tied decoder: 1/sqrt(d s_emb^2) with the DSLM
        init, else 1."""
        if not self.uses_dslm_init:
            return 1.0
        return float(self.dslm_stds().logit_scale)

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BertConfig keys: {', '.join(unknown)}")
        return cls(**data)
