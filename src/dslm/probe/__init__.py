"""Measure a model: per-layer forward variance / correlation, gradient norms and variances; any
model through a :class:`ProbeAdapter` (shipped for dslm's and HF transformers' BERT)."""
from dslm.probe.r0 import measure_r0  # noqa: F401
from dslm.probe.adapters import DSLM_BERT, HF_BERT, ProbeAdapter, Tap, adapter_for  # noqa: F401
from dslm.probe.probe import GRAD_MATRICES, ProbeResult, probe_model  # noqa: F401
from dslm.probe.stats import TokenMoments, token_moments  # noqa: F401
