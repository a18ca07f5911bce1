"""Measure a model: per-layer forward variance / correlation, gradient norms and variances; any
model through a :class:`ProbeAdapter` (shipped for dslm's and HF transformers' BERT and GPT(-2))."""
from dslm.probe.r0 import measure_r0  # noqa: F401
from dslm.probe.adapters import (  # noqa: F401
    DSLM_BERT, DSLM_GPT, HF_BERT, HF_GPT2, ProbeAdapter, Tap, adapter_for,
)
from dslm.probe.probe import GRAD_MATRICES, ProbeResult, probe_model  # noqa: F401
from dslm.probe.stats import TokenMoments, token_moments  # noqa: F401
