"""Result records as JSON: the one conversion the probe and the predictor share."""
from __future__ import annotations

import numpy as np


def jsonable_fields(record) -> dict:
    """A result object's attributes as JSON-ready values: numpy arrays (also inside a dict of
    per-matrix curves) become lists, everything else is kept."""
    out = {}
    for name, value in vars(record).items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, dict):
            value = {k: np.asarray(v).tolist() for k, v in value.items()}
        out[name] = value
    return out
