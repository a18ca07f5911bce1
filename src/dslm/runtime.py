"""Where a job runs: the device a ``--device`` name means, and whether this process is the one that
writes (rank 0 of a torchrun job, or a plain process)."""
from __future__ import annotations

import importlib.util
import os

import torch

from dslm.errors import UsageError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is a usage error.
    ``local_rank`` picks the GPU of a multi-process job (default: torchrun's LOCAL_RANK, else 0)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {name!r}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA device is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return torch.device("cuda", index)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process started without one (RANK unset or empty)."""
    return os.environ.get("RANK", "0") in ("0", "")


def require_package(module: str, extra: str) -> None:
    """Stop with one line naming the extra to install when ``module`` is missing; called before a
    job's work starts, so a missing package never costs a finished training run."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"the '{module}' package is needed here: pip install 'dslm[{extra}]' (or pip install {module})")
