"""Train / valid / test split by document.

Documents, not samples, are split so no text is shared between the splits. Weights are given per
mille-like integers (default 980/10/10). Each split gets its exact share of the documents (largest
remainder; at least one document for every split with a positive weight when there are enough
documents), and the held-out documents are spread evenly over the corpus: documents are ranked
by the golden-ratio sequence frac((d + 1) * 0.618...), the first ranks go to valid, the next to
test, the rest to train. The rule needs only the document count, so the manifest and every reader
agree without storing the lists.
"""
from __future__ import annotations

import numpy as np

from dslm.errors import ConfigError

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = (980, 10, 10)
_GOLDEN = (5 ** 0.5 - 1) / 2


def parse_split(spec: str) -> tuple[int, int, int]:
    """``"980,10,10"`` -> (980, 10, 10); three non-negative integers with a positive train weight."""
    try:
        weights = tuple(int(x) for x in spec.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or min(weights) < 0 or weights[0] == 0:
        raise ConfigError(f"{{split}} {spec}: expected three non-negative integers train,valid,test "
                          "with train > 0, e.g. 980,10,10")
    return weights


def split_counts(n_docs: int, weights: tuple[int, int, int]) -> dict[str, int]:
    """How many documents each split gets."""
    shares = np.array(weights, dtype=np.float64) * n_docs / sum(weights)
    counts = np.floor(shares).astype(np.int64)
    counts[np.argsort(-(shares - counts), kind="stable")[: n_docs - counts.sum()]] += 1
    for k in (1, 2):
        if weights[k] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k], counts[0] = 1, counts[0] - 1
    return dict(zip(SPLITS, counts.tolist()))


def split_documents(n_docs: int, weights: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The sorted document ids of each split."""
    counts = split_counts(n_docs, weights)
    order = np.argsort(((np.arange(n_docs) + 1) * _GOLDEN) % 1.0, kind="stable")
    n_valid, n_test = counts["valid"], counts["test"]
    return {"valid": np.sort(order[:n_valid]), "test": np.sort(order[n_valid:n_valid + n_test]),
            "train": np.sort(order[n_valid + n_test:])}
