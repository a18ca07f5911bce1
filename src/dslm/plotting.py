"""Headless matplotlib: every figure is written to a file, never shown."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND", "").lower() == "agg":
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary file + rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)
    return path


__all__ = ["plt", "save"]
