#!/bin/bash
# The device call behind throughput_h100.json (run from the repository root; OUT = where results go;
# GPU = which device, default 0): the GPU tests of --cuda-graphs, the throughput table (HF vs ours:
# eager, compiled, CUDA graphs, both), the same with the cuDNN attention backend, and a kernel profile.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${GPU:-0}
OUT=${OUT:?}
W=/tmp/throughput; mkdir -p $W
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 180 python -m pytest -q -p no:cacheprovider tests/test_train_graphs.py 2>&1 | tail -15
  timeout 300 python benchmarks/bench_pretrain.py throughput --sizes deep-narrow bert-base \
      --variants hf ours ours-graphs ours-compiled ours-compiled-graphs --out $W/default
  timeout 120 python benchmarks/bench_pretrain.py throughput --sizes bert-base \
      --variants ours-compiled ours-compiled-graphs --sdpa cudnn --out $W/cudnn
  timeout 120 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled --out $W/profile
} > $W/throughput.log 2>&1
(cd $W && tar czf "$OUT/throughput.tar.gz" .)
