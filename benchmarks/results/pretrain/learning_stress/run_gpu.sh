#!/bin/bash
# The device call behind this folder (run from the repository root on a 4-GPU machine; OUT = where
# results go). The nine 96-layer Post-LN runs of `--suite deep-stress` (dslm / megatron / xavier x lr
# 1e-3 / 3e-3 / 1e-2, no warmup, no clipping, CUDA graphs) are spread over GPUS (default 1-3)
# and cut after TIME_LIMIT seconds; GPU 0 stays free for other work. Snapshots every 20 s.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?} TIME_LIMIT=${TIME_LIMIT:-240}
RUNS=/tmp/learning_stress
mkdir -p $RUNS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RUNS/gpu.txt"
python -m dslm prepare-data > "$RUNS/prepare.log" 2>&1
snapshot() { (cd $RUNS 2>/dev/null && tar czf "$OUT/.stress.tmp" --ignore-failed-read gpu.txt learning.log runs_status.json curves.png */metrics.jsonl */stdout.log */final_metrics.json 2>/dev/null; mv -f "$OUT/.stress.tmp" "$OUT/stress.tar.gz"); }
( while sleep 20; do snapshot; done ) & SNAP=$!
python benchmarks/bench_pretrain.py learning --suite deep-stress --parallel --gpus ${GPUS:-1 2 3} --time-limit "$TIME_LIMIT" \
    --num-workers 2 --out $RUNS > "$RUNS/learning.log" 2>&1
python benchmarks/bench_pretrain.py plot --suite deep-stress --out $RUNS >> "$RUNS/learning.log" 2>&1
kill $SNAP
snapshot
exit 0
