"""Write the demo task's data: small, deterministic sentence pairs in GLUE's MNLI TSV layout.

    python -m dslm.finetune.demo.generate [OUT_DIR]      # default: this folder

A premise states two facts about objects ("the file is empty and the queue is locked ."). The
hypothesis restates one of them (entailment), negates one (contradiction: "the queue is not
locked .") or states a fact about an object the premise does not mention (neutral). Matched splits
use one set of objects, the mismatched dev split another (a different "genre"). Every word is in the
embedded vocabulary, so a fresh tiny model can learn the task on a CPU in seconds.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

NOUNS = {
    "code": ["file", "list", "module", "socket", "thread", "buffer", "queue", "string"],
    "docs": ["object", "server", "process", "window", "table", "column", "path", "key"],
}
ADJECTIVES = ["empty", "open", "closed", "valid", "ready", "locked", "sorted", "frozen", "small", "large",
              "new", "old"]
HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
          "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
SIZES = {"train.tsv": ("code", 600, 1), "dev_matched.tsv": ("code", 150, 2), "dev_mismatched.tsv": ("docs", 150, 3)}
LABELS = ("entailment", "neutral", "contradiction")


def make_pair(rng: random.Random, nouns: list[str], label: str) -> tuple[str, str]:
    n1, n2, n3 = rng.sample(nouns, 3)
    a1, a2, a3 = (rng.choice(ADJECTIVES) for _ in range(3))
    premise = f"the {n1} is {a1} and the {n2} is {a2} ."
    noun, adj = rng.choice([(n1, a1), (n2, a2)])
    if label == "entailment":
        hypothesis = f"the {noun} is {adj} ."
    elif label == "contradiction":
        hypothesis = f"the {noun} is not {adj} ."
    else:
        hypothesis = f"the {n3} is {a3} ."
    return premise, hypothesis


def rows(genre: str, n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        label = LABELS[i % 3]
        s1, s2 = make_pair(rng, NOUNS[genre], label)
        yield [str(i), str(seed * 100000 + i), f"{seed}{i:05d}e", genre, "", "", "", "", s1, s2, label, label]


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (genre, n, seed) in SIZES.items():
        lines = ["\t".join(HEADER)] + ["\t".join(r) for r in rows(genre, n, seed)]
        (out_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
