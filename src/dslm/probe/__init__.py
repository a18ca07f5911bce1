"""Measure a model: per-layer forward variance / correlation, gradient norms and variances."""
from dslm.probe.r0 import measure_r0  # noqa: F401
from dslm.probe.probe import GRAD_MATRICES, ProbeResult, probe_model  # noqa: F401
from dslm.probe.stats import TokenMoments, token_moments  # noqa: F401
