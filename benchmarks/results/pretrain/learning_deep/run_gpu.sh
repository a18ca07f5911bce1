#!/bin/bash
# The one device call behind this folder (run from the repository root; OUT = where results go).
# Six 96-layer Post-LN runs (dslm / megatron / xavier x lr 2e-3 / 5e-3) share one GPU, one process each,
# and are cut after TIME_LIMIT seconds; a snapshot of every metrics.jsonl is tarred every 15 s.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?} TIME_LIMIT=${TIME_LIMIT:-175}
RUNS=/tmp/learning_deep
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
python -c "import torch; print(torch.__version__)" >> "$OUT/gpu.txt"
snapshot() { (cd $RUNS 2>/dev/null && tar czf "$OUT/.runs.tmp" --ignore-failed-read runs_status.json curves.png */metrics.jsonl */stdout.log */final_metrics.json 2>/dev/null; mv -f "$OUT/.runs.tmp" "$OUT/runs.tar.gz"); }
( while sleep 15; do snapshot; done ) & SNAP=$!
python benchmarks/bench_pretrain.py learning --suite deep --parallel --time-limit "$TIME_LIMIT" --num-workers 1 \
    --out $RUNS > "$OUT/learning.log" 2>&1
python benchmarks/bench_pretrain.py plot --suite deep --out $RUNS >> "$OUT/learning.log" 2>&1
kill $SNAP
snapshot
cp $RUNS/curves.png "$OUT/curves.png" 2>/dev/null
nvidia-smi >> "$OUT/gpu.txt" 2>&1
exit 0
