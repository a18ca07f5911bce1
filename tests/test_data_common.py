"""Shared helpers for the data tests: a synthetic corpus and a small prepared dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dslm.data.prepare import prepare_dataset

_SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vo", "zel", "pa", "di", "qua", "bes", "tor"]


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 1-12 sentences of 3-14 made-up words (2-3 syllables, so a small WordPiece
    vocabulary splits many of them into pieces), with paragraph breaks, commas and questions."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        paragraphs, sentences = [], []
        for _ in range(int(rng.integers(1, 13))):
            words = ["".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)))) for _ in range(int(rng.integers(3, 15)))]
            if len(words) > 5:
                words[2] += ","
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?"]))
            if rng.random() < 0.3:
                paragraphs.append(" ".join(sentences))
                sentences = []
        if sentences:
            paragraphs.append(" ".join(sentences))
        docs.append("\n".join(paragraphs))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"title": f"doc {i}", "text": d}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def prepare_small(tmp: Path, docs: list[str], **kwargs) -> Path:
    """Prepare ``docs`` into ``tmp/ds`` with a 200-token vocabulary, in this process."""
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    out = tmp / "ds"
    prepare_dataset(out, source=str(corpus), **{"vocab_size": 200, "workers": 0, "progress": False, **kwargs})
    return out
