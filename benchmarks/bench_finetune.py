"""Finetuning data speed: reading + tokenising an MNLI-sized GLUE TSV, and reloading it from the cache.

A synthetic ``train.tsv`` in GLUE's MNLI layout (all 12 columns, parse columns included, so the file
is about as large as the real 393k-pair file) is written once; then ``load_split`` (what `dslm
finetune` runs) is timed twice in fresh processes: the first run checksums, parses and tokenises
with the fast tokenizer's batch encoder (``RAYON_NUM_THREADS`` = the cores) and writes the cache,
the second finds the cache by the file's checksum and loads it.

    python benchmarks/bench_finetune.py [--pairs 392702] [--vocab VOCAB] [--json outputs/bench_finetune.json]
    python benchmarks/bench_finetune.py --throughput-only          # only the tokens/s comparison

Throughput: the engine's tokens/s of `dslm pretrain --preset tiny` (2 layers, d 128, L 128, batch 32,
fp32) against `dslm finetune --task demo` with the same model size, length and batch, every batch
padded to L (`--pad-to-max`) so that both process the same number of positions; each in a fresh
process, ``--steps`` steps, the engine's own measurement (first logging interval and evaluation
excluded). ``--device cuda --precision bf16 --size base`` runs the same comparison at BERT-base size
on a GPU.

Without ``--vocab`` the embedded 8,192-token vocabulary is used (bert-base-uncased's is not shipped;
its larger vocabulary splits fewer words and tokenises at about the same speed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
          "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
LABELS = ("entailment", "neutral", "contradiction")


def _words(vocab: Path) -> list[str]:
    tokens = [t for t in vocab.read_text(encoding="utf-8").split("\n") if t.isalpha() and t.islower()]
    rng = random.Random(0)
    made_up = ["".join(rng.choice("aeioukltnrsm") for _ in range(rng.randint(5, 11))) for _ in range(2000)]
    return tokens + made_up


def write_tsv(path: Path, pairs: int, vocab: Path) -> None:
    """Sentence 1 about 22 words, sentence 2 about 11 (MNLI's means), punctuation, parse columns."""
    rng = random.Random(1)
    words = _words(vocab)

    def sentence(mean):
        n = max(2, int(rng.gauss(mean, mean / 3)))
        s = " ".join(rng.choice(words) for _ in range(n))
        return s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"])

    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(HEADER) + "\n")
        for i in range(pairs):
            s1, s2 = sentence(22), sentence(11)
            b1, b2 = "( " + s1.replace(" ", " ) ( ") + " )", "( " + s2.replace(" ", " ) ( ") + " )"
            p1, p2 = "(ROOT (S " + s1.replace(" ", " (NN x)) ") + "))", "(ROOT (S " + s2.replace(" ", " (NN x)) ") + "))"
            label = LABELS[i % 3]
            f.write("\t".join([str(i), str(i), f"{i}e", "fiction", b1, b2, p1, p2, s1, s2, label, label]) + "\n")


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from dslm.data.vocab import Tokenizer
from dslm.finetune.tasks import SPECS, load_split
tok = Tokenizer.from_file(sys.argv[2])
t1 = time.perf_counter()
enc, meta = load_split(SPECS["mnli"], sys.argv[1], "train", tok, 512, cache_dir=__import__("pathlib").Path(sys.argv[3]))
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "startup_seconds": t1 - t0, "examples": len(enc), "tokens": int(enc.ids.size),
                  "fresh": bool(meta.get("fresh"))}))
"""


def timed_child(data: Path, vocab: Path, cache: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(vocab), str(cache)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


SIZES = {"tiny": dict(layers=2, hidden=128, heads=2, seq_len=128, batch=32),
         "base": dict(layers=12, hidden=768, heads=12, seq_len=512, batch=32)}


def throughput(work: Path, steps: int, device: str, precision: str, size: str) -> dict:
    """tokens/s of pretraining and of finetuning at the same size, length and batch (engine numbers)."""
    z = SIZES[size]
    common = ["--steps", str(steps), "--device", device, "--precision", precision, "--no-progress",
              "--log-every", str(max(1, steps // 4)), "--eval-every", "0", "--save-every", "0",
              "--global-batch", str(z["batch"]), "--num-workers", "1", "--layers", str(z["layers"]),
              "--hidden", str(z["hidden"]), "--heads", str(z["heads"]), "--dropout", "0.1", "--init", "megatron"]
    runs = {
        "pretrain": ["pretrain", "--preset", "tiny", "--seq-len", str(z["seq_len"]), "--eval-iters", "1",
                     "--out-dir", str(work / "pre")],
        "finetune": ["finetune", "--task", "demo", "--max-len", str(z["seq_len"]), "--pad-to-max", "--eval-iters", "1",
                     "--out-dir", str(work / "ft"), "--cache-dir", str(work / "ft_cache")],
    }
    out = {}
    for name, argv in runs.items():
        subprocess.run([sys.executable, "-m", "dslm", *argv, *common], check=True, capture_output=True, text=True)
        folder = work / ("pre" if name == "pretrain" else "ft")
        out[name] = json.loads((folder / "final_metrics.json").read_text())["tokens_per_s"]
    out["ratio"] = out["finetune"] / out["pretrain"]
    out.update(size=size, device=device, precision=precision, steps=steps, **z)
    return out


def main() -> int:
    from dslm.finetune.command import _embedded_vocab

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=392_702, help="training pairs (MNLI: 392,702)")
    ap.add_argument("--vocab", type=Path, default=None, help="vocab.txt (default: the embedded vocabulary)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the TSV and cache go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--throughput-only", action="store_true", help="skip the tokenisation benchmark")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per throughput run")
    ap.add_argument("--device", default="cpu", help="throughput runs: cpu or cuda")
    ap.add_argument("--precision", default="fp32", help="throughput runs: fp32 or bf16")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="throughput runs: model size")
    args = ap.parse_args()
    if args.throughput_only:
        with tempfile.TemporaryDirectory() as tmp:
            tp = throughput(Path(tmp), args.steps, args.device, args.precision, args.size)
        _print_throughput(tp)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"throughput": tp}, indent=2) + "\n")
        return 0
    vocab = args.vocab or _embedded_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data = work / "MNLI"
        data.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        t0 = time.perf_counter()
        write_tsv(data / "train.tsv", args.pairs, vocab)
        gen = time.perf_counter() - t0
        size = (data / "train.tsv").stat().st_size
        for old in cache.glob("*.npz") if cache.is_dir() else []:
            old.unlink()
        first = timed_child(data, vocab, cache)
        second = timed_child(data, vocab, cache)
        cache_mb = sum(p.stat().st_size for p in cache.glob("*.npz")) / 1e6
        tp = throughput(work, args.steps, args.device, args.precision, args.size)
    result = {"throughput": tp, "pairs": args.pairs, "tsv_mb": size / 1e6, "generate_seconds": gen, "vocab": str(vocab),
              "first_run": first, "cached_run": second, "cache_mb": cache_mb,
              "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "python": platform.python_version(),
              "machine": platform.processor() or platform.machine()}
    print(f"synthetic MNLI train.tsv: {args.pairs} pairs, {size / 1e6:.0f} MB ({gen:.0f} s to write)")
    print(f"read + tokenise + cache: {first['seconds']:.1f} s ({first['tokens'] / 1e6:.1f}M tokens, "
          f"{args.pairs / first['seconds']:.0f} pairs/s), whole process {first['process_seconds']:.1f} s")
    print(f"cached reload:            {second['seconds']:.2f} s, whole process {second['process_seconds']:.1f} s "
          f"(cache {cache_mb:.0f} MB)")
    _print_throughput(tp)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print_throughput(tp: dict) -> None:
    print(f"throughput ({tp['size']}: {tp['layers']} layers, d {tp['hidden']}, L {tp['seq_len']}, batch {tp['batch']}, "
          f"{tp['device']} {tp['precision']}): pretrain {tp['pretrain']:.0f} tokens/s, finetune {tp['finetune']:.0f} "
          f"tokens/s (ratio {tp['ratio']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
