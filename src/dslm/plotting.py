"""Headless matplotlib: every figure is written to a file, never shown."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

from dslm.files import atomic_output

if not os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND", "").lower() == "agg":
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its suffix names the format) through the atomic writer
    (:func:`dslm.files.atomic_output`: a cut run leaves the old picture or the new one) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(path, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


__all__ = ["plt", "save"]
