"""The model configurations: dataclasses validated on construction.

:class:`TransformerConfig` holds everything the encoder (BERT) and the decoder (GPT) share: sizes,
LayerNorm placement, activation, dropout, and the init scheme with DeepScaleLM's options. The residual
scales of every scheme are resolved in one place, :meth:`TransformerConfig.residual_variances`; the
DSLM quantities (lam^2/beta^2 of residual scaling, the s_vo recursion, the LM-logit scale) come from
:mod:`dslm.theory.dslm_init` and DeepNorm's constants from :mod:`dslm.theory.deepnorm`.
:class:`BertConfig` adds the token types of two-segment inputs, :class:`GPTConfig` the causal mask
and the output embedding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from dslm.theory.deepnorm import deepnorm_alpha
from dslm.theory.dslm_init import DECODER_R0, REFERENCE_R0, dslm_stds, residual_scales

LN_CHOICES = ("post", "pre")
ACTIVATION_CHOICES = ("relu", "gelu", "gelu_tanh")
INIT_CHOICES = ("megatron", "xavier", "dslm", "deepnorm", "gpt2")
DSLM_MODE_CHOICES = ("both", "init", "scaling")


@dataclass
class TransformerConfig:
    """What the encoder and the decoder share (see :class:`BertConfig`, :class:`GPTConfig`).

    ``ln``: "post" or "pre", the Megatron convention of THEORY.md section 3.
    ``activation``: "relu", "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation, GPT-2's).
    ``init``: "megatron" (all 0.02), "xavier" or "dslm" (THEORY.md section 3's table), "deepnorm"
    (DeepNet's Post-LN scheme: x_next = LN(alpha x + block), alpha = (2N)^(1/4), see
    :mod:`dslm.model.init`; requires ``ln="post"``) or "gpt2" (GPT-2's: 0.02, the attention-output
    and FFN-output projections 0.02 / sqrt(2N)).
    ``dslm_mode`` (only with ``init="dslm"``): "both" = DSLM init + residual scaling, "init" = DSLM
    init with plain residual adds (lam = beta = 1, and the s_vo recursion run with them),
    "scaling" = residual scaling on the megatron init.
    ``lam2``/``beta2``: DSLM residual scales (lam^2 + beta^2 = 1); None derives beta^2 = dslm_k / N.
    Used only where DSLM residual scaling is on (modes "both" and "scaling").
    ``r0``: correlation of the summed input embeddings used by the s_vo recursion.
    :meth:`residual_variances` gives the (lam^2, beta^2) the residual adds actually use.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int | None = None          # None -> 4 * hidden_size
    max_position_embeddings: int = 512
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

    causal = False           # does query t see only keys 1..t (a class constant, not a field)
    embedding_tables = 3     # how many embedding tables are summed into the stream

    def __post_init__(self):
        if self.ffn_size is None:
            self.ffn_size = 4 * self.hidden_size
        for name in self._positive_int_fields():
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
        if self.init == "deepnorm" and self.ln != "post":
            raise ValueError(f"init='deepnorm' is a Post-LN scheme: it needs ln='post', got ln={self.ln!r}")
        self.residual_variances()  # DSLM residual scaling: raises ValueError for impossible lam2/beta2

    def _positive_int_fields(self) -> tuple[str, ...]:
        return ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                "max_position_embeddings")

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
        """DSLM residual scaling: the residual adds are x_next = lam x + beta block with
        lam^2 + beta^2 = 1."""
        return self.init == "dslm" and self.dslm_mode in ("both", "scaling")

    @property
    def weight_scheme(self) -> str:
        """The init table column applied to the weights (DSLM scaling-only uses megatron's)."""
        if self.init == "dslm" and not self.uses_dslm_init:
            return "megatron"
        return self.init

    def residual_variances(self) -> tuple[float, float]:
        """(lam^2, beta^2) of both residual adds of every layer, x_next = lam x + beta Dropout(block):
        the one place they are resolved (the model, its init and the theory predictor all use it).

        - DSLM residual scaling (``dslm_mode`` "both" or "scaling"): lam^2 + beta^2 = 1 from
          ``lam2``/``beta2``, or beta^2 = dslm_k / N (:func:`dslm.theory.dslm_init.residual_scales`);
        - DeepNorm: (alpha^2, 1) with alpha = (2N)^(1/4);
        - otherwise plain adds, (1, 1) (DSLM init-only included).
        """
        if self.uses_residual_scaling:
            return residual_scales(self.num_layers, self.dslm_k, self.lam2, self.beta2)
        if self.init == "deepnorm":
            return deepnorm_alpha(self.num_layers) ** 2, 1.0
        return 1.0, 1.0

    def dslm_stds(self):
        """:class:`dslm.theory.dslm_init.DSLMStds` for this config, its s_vo recursion run with the
        residual adds' own (lam^2, beta^2): lam^2 = beta^2 = 1 for the init-only variant."""
        lam2, beta2 = self.residual_variances()
        return dslm_stds(self.hidden_size, self.num_layers, self.hidden_dropout, lam2, beta2,
                         self.r0, **self._dslm_attention())

    def _dslm_attention(self) -> dict:
        """The attention pattern and embedding count the DSLM init is derived for (bidirectional,
        three tables)."""
        return {}

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
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class BertConfig(TransformerConfig):
    """Configuration of :class:`dslm.model.bert.BertModel` / ``BertForPreTraining``: the shared
    fields of :class:`TransformerConfig` and the token types of two-segment inputs."""

    type_vocab_size: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")

    def _positive_int_fields(self) -> tuple[str, ...]:
        return super()._positive_int_fields() + ("type_vocab_size",)


@dataclass
class GPTConfig(TransformerConfig):
    """Configuration of :class:`dslm.model.gpt.GPTModel` / ``GPTLMHeadModel``: a decoder-only
    transformer, causal self-attention (query t sees keys 1..t), word + learned position embeddings,
    a next-token LM head. The defaults are GPT-2 small's (Pre-LN, tanh GeLU, GPT-2 init, 1024
    positions, 50257 tokens).

    ``tie_word_embeddings``: the LM head's output matrix is the word-embedding table (GPT-2's
    choice); untied, it is its own matrix drawn with the scheme's head std, and the DSLM logit scale
    is 1 (the head std already gives unit-variance logits).
    The DSLM init runs its s_vo recursion with causal attention over ``max_position_embeddings``
    tokens and two embedding tables (THEORY.md, "DSLM init for decoders"), from ``r0`` =
    :data:`dslm.theory.dslm_init.DECODER_R0` (single-segment English text; ``--r0 auto`` measures
    it on the data)."""

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    ln: str = "pre"
    activation: str = "gelu_tanh"
    init: str = "gpt2"
    r0: float = DECODER_R0
    tie_word_embeddings: bool = True

    causal = True
    embedding_tables = 2

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")

    def _dslm_attention(self) -> dict:
        return {"causal_len": self.max_position_embeddings, "embedding_tables": self.embedding_tables,
                "attention_dropout": self.attention_dropout}

    def logit_scale(self) -> float:
        """The DSLM logit scale of a tied head; 1 for an untied one (see the class docstring)."""
        return super().logit_scale() if self.tie_word_embeddings else 1.0
