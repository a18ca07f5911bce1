"""The signal profile of a transformer: per-layer forward and backward moments, the record that the
theory predicts (:class:`dslm.theory.Prediction`) and the probe measures
(:class:`dslm.probe.ProbeResult`), so the two compare field by field."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dslm.records import jsonable_fields

# the weight matrices of a layer, in the order of every per-matrix table (the roles of the init plan)
GRAD_MATRICES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")


@dataclass
class SignalProfile:
    """Per-layer moments; arrays have one entry per layer, bottom (input side) first."""

    forward_variance: np.ndarray       # residual stream after each layer
    correlation: np.ndarray            # its mean cross-token correlation
    grad_norm: np.ndarray              # L2 norm of the six weight-matrix gradients together
    grad_norms: dict = field(default_factory=dict)  # name in GRAD_MATRICES -> per-layer L2 norm
    grad_variance: np.ndarray = None   # variance of d loss / d (layer output)
    grad_correlation: np.ndarray = None  # its cross-token correlation
    embedding_variance: float = float("nan")     # the embedding output (after dropout)
    embedding_correlation: float = float("nan")

    @property
    def num_layers(self) -> int:
        return len(self.forward_variance)

    def to_dict(self) -> dict:
        """JSON-ready (lists and floats)."""
        return jsonable_fields(self)
