#!/bin/bash
# The device call behind simulate_h100.json (run from the repository root; OUT = where results go;
# GPU = which device, default 0): the paper grids of all seven components at the default precision
# (bf16 matmuls), bf16/tf32/fp32 percentiles on subsets, determinism, a kernel profile, and the
# reference's method timed on 12 random configurations per component.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${GPU:-0}
OUT=${OUT:?}
W=/tmp/simulate; mkdir -p $W
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 300 python benchmarks/bench_simulate.py --paper --determinism --precision-check --profile --out $W/simulate.json
  timeout 200 python benchmarks/bench_simulate.py --reference-style 12 --out $W/reference_style.json
} > $W/simulate.log 2>&1
(cd $W && tar czf "$OUT/simulate.tar.gz" .)
