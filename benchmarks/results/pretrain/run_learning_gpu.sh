#!/bin/bash
# A device call behind learning_long/ (SUITE=deep-long) and learning_stress/ (SUITE=deep-stress):
# run from the repository root on a multi-GPU machine with OUT = where results go. The suite's
# 96-layer Post-LN runs (bench_pretrain.py, one process each, CUDA graphs) are spread over GPUS
# (default 1-3, GPU 0 left for other work) and cut after TIME_LIMIT seconds; a snapshot of every
# metrics.jsonl is tarred to $OUT/learning.tar.gz every 20 s.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?} SUITE=${SUITE:?deep-long or deep-stress} TIME_LIMIT=${TIME_LIMIT:-450}
RUNS=/tmp/learning_$SUITE
mkdir -p $RUNS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RUNS/gpu.txt"
python -m dslm prepare-data > "$RUNS/prepare.log" 2>&1
snapshot() { (cd $RUNS 2>/dev/null && tar czf "$OUT/.learning.tmp" --ignore-failed-read gpu.txt learning.log runs_status.json curves.png */metrics.jsonl */stdout.log */final_metrics.json 2>/dev/null; mv -f "$OUT/.learning.tmp" "$OUT/learning.tar.gz"); }
( while sleep 20; do snapshot; done ) & SNAP=$!
python benchmarks/bench_pretrain.py learning --suite $SUITE --parallel --gpus ${GPUS:-1 2 3} --time-limit "$TIME_LIMIT" \
    --num-workers 2 --out $RUNS > "$RUNS/learning.log" 2>&1
python benchmarks/bench_pretrain.py plot --suite $SUITE --out $RUNS >> "$RUNS/learning.log" 2>&1
kill $SNAP
snapshot
exit 0
