#!/bin/bash
# The device call behind throughput/h100_variants.json (run from the repository root; OUT = where results go;
# GPU = which device, default 0): the GPU tests of --cuda-graphs, then the throughput table, one
# process per variant (a failed CUDA-graph capture leaves the CUDA state unusable for the next one),
# the best variant again with the cuDNN attention backend forced, and a kernel profile.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${GPU:-0}
OUT=${OUT:?}
W=/tmp/throughput; mkdir -p $W
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 180 python -m pytest -q -p no:cacheprovider tests/test_train_graphs.py 2>&1 | grep -v "^\s*$" | tail -40
  for v in hf ours ours-graphs ours-compiled ours-compiled-full ours-compiled-full-ro; do
    timeout 150 python benchmarks/bench_pretrain.py throughput --sizes deep-narrow bert-base --variants $v --out $W/default
  done
  timeout 120 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled --out $W/profile
} > $W/throughput.log 2>&1
(cd $W && tar czf "$OUT/throughput.tar.gz" .)
