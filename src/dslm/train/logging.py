"""Run output on rank 0: a tqdm bar, console lines, TensorBoard scalars and ``metrics.jsonl``.

Every record is one JSON line ``{"step": s, "split": "train" | "<eval name>", "time": ..., <metric>: value}``
in ``<out_dir>/metrics.jsonl`` and the same scalars under ``<split>/<metric>`` in TensorBoard
(``<out_dir>/tensorboard``). On other ranks every method is a no-op.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from dslm.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.bar = self.writer = None
        self._file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS_FILE
        if path.exists():  # a resumed run: drop records the interrupted run wrote after its checkpoint
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))   # a kill now keeps one whole file
        self._file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / TB_DIR), purge_step=start_step or None)
            except ImportError:  # tensorboard not installed: JSONL only
                self.writer = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, split: str, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "split": split, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"{split}/{k}", v, step)
            self.writer.flush()
        if split == "train" and self.bar is not None and "loss" in clean:
            self.bar.set_postfix(loss=f"{clean['loss']:.4f}", refresh=False)
        if console:
            self.print(f"step {step} {split}: " + " ".join(f"{k} {_fmt(v)}" for k, v in clean.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._file is not None:
            self._file.close()
        self.bar = self.writer = self._file = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 1 << 62


def read_metrics(out_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (those of one split if given)."""
    path = Path(out_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
