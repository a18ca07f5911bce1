"""Data-layer speed and memory: preprocessing MB/s and peak memory, sample building samples/s.

Preprocessing runs ``dslm prepare-data`` in a fresh process (so its memory is measured alone; the
peak is the largest proportional set size of the whole process tree, workers included, polled
every 20 ms)
on the embedded corpus and on a larger generated JSONL file (the embedded documents repeated with
their sentences shuffled, ``--big-mb`` MB). Sample building times ``PretrainingDataset.get_batch``
(what one loader worker runs per batch) and single ``__getitem__`` calls in this process.

    python benchmarks/bench_data.py [--big-mb 40] [--json outputs/bench_data.json]
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

from dslm.data import PretrainingDataset
from dslm.data.sentences import split_sentences
from dslm.data.sources import EMBEDDED_CORPUS, EMBEDDED_VOCAB, DocumentReader, SkipLog


def _tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (Linux /proc): resident memory
    with pages shared between processes (forked workers) counted once in total."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_prepare(label: str, source: str, out: Path, extra: list[str]) -> dict:
    """One ``dslm prepare-data`` run: wall seconds, text MB, MB/s, peak memory of the process tree."""
    cmd = [sys.executable, "-m", "dslm", "prepare-data", "--source", source, "--out", str(out), "--no-progress", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_bytes(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare-data failed ({proc.returncode}): {stderr.strip()}")
    manifest = json.loads((out / "dataset.json").read_text())
    mb = manifest["counts"]["text_bytes"] / 1e6
    return {"case": label, "args": " ".join(extra), "text_mb": round(mb, 2), "tokens": manifest["counts"]["tokens"],
            "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2), "peak_pss_mb": round(peak / 1e6, 1),
            "summary": stdout.strip().splitlines()[0]}


def generate_corpus(path: Path, megabytes: float) -> None:
    """The embedded documents over and over, each copy with its sentences in a new order."""
    docs = list(DocumentReader([EMBEDDED_CORPUS], SkipLog()))
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for text in docs:
                sentences = split_sentences(text)
                rng.shuffle(sentences)
                line = json.dumps({"text": " ".join(sentences)}) + "\n"
                f.write(line)
                written += len(line.encode())


def time_samples(data_dir: Path, seq_len: int, batch: int, seconds: float) -> dict:
    """Samples per second of wall time and per CPU second of this process (the latter is what one
    loader worker delivers on a core of its own, whatever else runs on the machine)."""
    ds = PretrainingDataset(data_dir, seq_len=seq_len, seed=0)
    ds.get_batch(range(batch))  # warm the page cache and the epoch permutation
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - wall < seconds:
        ds.get_batch(range(n, n + batch))
        n += batch
    batched = (n / (time.perf_counter() - wall), n / (time.process_time() - cpu))
    wall, cpu, m = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - wall < seconds / 2:
        ds[m]
        m += 1
    single = (m / (time.perf_counter() - wall), m / (time.process_time() - cpu))
    return {"seq_len": seq_len, "batch": batch, "batched_per_s_wall": round(batched[0]),
            "batched_per_cpu_s": round(batched[1]), "single_per_s_wall": round(single[0]),
            "single_per_cpu_s": round(single[1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=float, default=40.0, help="size of the generated corpus")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per sample-building case")
    parser.add_argument("--json", default="outputs/bench_data.json", help="where to write the results")
    args = parser.parse_args()
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "python": platform.python_version(), "load_avg_1m_before": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep = [run_prepare("embedded, shipped vocab", "embedded", tmp / "emb", workers),
                run_prepare("embedded, vocab trained (8192)", "embedded", tmp / "emb_trained",
                            ["--vocab-size", "8192", *workers])]
        generate_corpus(tmp / "big.jsonl", args.big_mb)
        prep.append(run_prepare(f"generated {args.big_mb:g} MB JSONL, given vocab", str(tmp / "big.jsonl"),
                                tmp / "big", ["--vocab", str(EMBEDDED_VOCAB), *workers]))
        samples = [time_samples(tmp / "emb", L, 64, args.seconds) for L in (512, 128)]
    results.update(prepare=prep, samples=samples, load_avg_1m_after=os.getloadavg()[0])

    print(f"{'preprocessing':<42} {'MB':>7} {'s':>7} {'MB/s':>7} {'peak mem MB':>12}")
    for r in prep:
        print(f"{r['case']:<42} {r['text_mb']:>7.1f} {r['seconds']:>7.2f} {r['mb_per_s']:>7.2f} {r['peak_pss_mb']:>12.0f}")
    print(f"\n{'sample building (one process), samples/s':<42} {'batch wall':>10} {'batch CPU':>10} "
          f"{'item wall':>10} {'item CPU':>10}")
    for r in samples:
        print(f"{'L=' + str(r['seq_len']) + ', get_batch of ' + str(r['batch']):<42} {r['batched_per_s_wall']:>10} "
              f"{r['batched_per_cpu_s']:>10} {r['single_per_s_wall']:>10} {r['single_per_cpu_s']:>10}")
    print(f"\nload average (1 min) before/after: {results['machine']['load_avg_1m_before']:.2f} / "
          f"{results['load_avg_1m_after']:.2f} on {results['machine']['cpus']} CPUs")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
