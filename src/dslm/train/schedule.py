"""Learning-rate schedule: linear warmup from 0, then linear decay to 0 at the last step."""
from __future__ import annotations

import torch


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of ``total_steps``; otherwise a number of steps."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    n = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(n, total_steps)


def lr_factor(step: int, warmup: int, total_steps: int) -> float:
    """Multiplier of the peak lr used for the update of optimizer step ``step`` (0-based):
    ``(step + 1) / warmup`` during warmup, then ``(total - step) / (total - warmup)``."""
    if step < warmup:
        return (step + 1) / warmup
    if total_steps <= warmup:
        return 1.0
    return max(0.0, (total_steps - step) / (total_steps - warmup))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total_steps: int):
    """A ``LambdaLR`` that applies :func:`lr_factor` (its state_dict is the step counter)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
