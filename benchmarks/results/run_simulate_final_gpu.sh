#!/bin/bash
# The device call behind results/simulate/h100_final.json (repository root; OUT = where results go): the
# paper grids of all seven components at the default precision with the package's defaults,
# bf16/tf32/fp32 percentiles on subsets and determinism (run_simulate_gpu.sh also compares SDPA backends).
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${GPU:-0}
OUT=${OUT:?}
mkdir -p $OUT/sim
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/sim/gpu.txt
timeout 240 python benchmarks/bench_simulate.py --paper --determinism --precision-check --out $OUT/sim/simulate.json > $OUT/sim/simulate.log 2>&1
