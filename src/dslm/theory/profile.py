"""The signal profile of a transformer: per-layer forward and backward moments, the record that the
theory predicts (:class:`dslm.theory.Prediction`) and the probe measures
(:class:`dslm.probe.ProbeResult`), so the two compare field by field."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dslm.records import jsonable_fields

# the weight matrices of a layer, in the order of every per-matrix table (the roles of the init plan)
GRAD_MATRICES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")

# the per-layer fields of a profile -> the power of the gradient scale they carry (a prediction's
# gradients are relative to the top gradient: its norms scale with the loss's gradient scale c, its
# variance with c^2)
LAYER_CURVES = {"forward_variance": 0, "correlation": 0, "grad_norm": 1, "grad_norms": 1,
                "grad_variance": 2, "grad_correlation": 0}


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

    def layer_curves(self, prefix: str = "", grad_scale: float = 1.0) -> dict:
        """The per-layer fields (:data:`LAYER_CURVES`) as JSON-ready lists, keyed ``prefix + name``
        (``predicted_forward_variance``, ...), so a measurement and a prediction sit side by side in
        one record. ``grad_scale``: the constant c that puts relative gradients on a measurement's
        scale (norms times c, variance times c^2)."""
        return {prefix + name: _scaled(getattr(self, name), grad_scale ** power)
                for name, power in LAYER_CURVES.items()}


def _scaled(curve, factor: float):
    """``curve`` (an array, a dict of arrays or None) times ``factor``, as lists."""
    if curve is None:
        return None
    if isinstance(curve, dict):
        return {k: _scaled(v, factor) for k, v in curve.items()}
    return (np.asarray(curve, dtype=float) * factor).tolist()
