"""Metrics of the finetuning tasks, from sums the engine accumulates over batches and ranks.

``batch_sums`` runs on the device without a host sync (the engine's contract); ``summarize`` turns
the summed floats into the reported numbers:

* ``acc``  = correct / count
* ``f1``   (QQP; positive class = duplicate, label 1) = 2 tp / (2 tp + fp + fn), and ``precision``,
  ``recall``
* RACE: ``acc`` over all questions, ``acc_middle`` and ``acc_high`` per level
* ``loss`` = mean cross-entropy per example
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, kind: str, level: torch.Tensor | None = None) -> dict:
    """Metric sums of one batch (0-dim tensors). ``kind``: "classify", "binary" (adds tp/fp/fn of
    class 1) or "race" (adds per-level counts; ``level`` 0 middle, 1 high)."""
    pred = logits.argmax(-1)
    hit = pred == labels
    sums = {"correct": hit.sum(), "count": torch.tensor(labels.shape[0], device=labels.device),
            "loss_sum": F.cross_entropy(logits.float(), labels, reduction="sum")}
    if kind == "binary":
        pos, gold = pred == 1, labels == 1
        sums.update(tp=(pos & gold).sum(), fp=(pos & ~gold).sum(), fn=(~pos & gold).sum())
    if kind == "race" and level is not None:
        for value, name in ((0, "middle"), (1, "high")):
            at = level == value
            sums[f"correct_{name}"] = (hit & at).sum()
            sums[f"count_{name}"] = at.sum()
    return sums


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(sums: dict) -> dict:
    out = {}
    if sums.get("count"):
        out["acc"] = _ratio(sums["correct"], sums["count"])
        out["loss"] = _ratio(sums["loss_sum"], sums["count"])
    if "tp" in sums:
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        out["f1"] = _ratio(2 * tp, 2 * tp + fp + fn) if (tp + fp + fn) else 0.0
        out["precision"] = _ratio(tp, tp + fp) if (tp + fp) else 0.0
        out["recall"] = _ratio(tp, tp + fn) if (tp + fn) else 0.0
    for name in ("middle", "high"):
        if sums.get(f"count_{name}"):
            out[f"acc_{name}"] = _ratio(sums[f"correct_{name}"], sums[f"count_{name}"])
    return out


def accuracy(pred, gold) -> float:
    """Plain-Python accuracy (for predictions files and tests)."""
    pred, gold = list(pred), list(gold)
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold) if gold else float("nan")


def f1_score(pred, gold, positive: int = 1) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 0.0
