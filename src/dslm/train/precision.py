"""Mixed precision: parameters, gradients and optimizer state stay fp32 ("master weights"); with
``bf16`` the forward (and so the backward) runs under ``torch.autocast(dtype=torch.bfloat16)``.
bf16 has fp32's exponent range, so no loss scaling is needed."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp32")


def autocast(device: torch.device, precision: str):
    """The context to run forward passes in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    # inside a CUDA-graph capture the cast-weight cache would hold tensors of the capture's pool
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not capturing)
