#!/bin/bash
# The device call behind results/simulate/h100_fused*.{json,log} (repository root; OUT = where results
# go): the fused-kernel tests on the GPU, the fused kernel's block-size sweep, then the paper grids of
# all seven components with the fused LayerNorm/dropout kernels in two fresh processes (the first one
# compiles the Triton kernels in its start-up, the second loads them from Triton's cache), the
# fused-vs-PyTorch percentiles and determinism.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${GPU:-0}
OUT=${OUT:?}
mkdir -p $OUT/sim
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 120 python -m pytest -q -p no:cacheprovider tests/test_sim_fused.py 2>&1 | tail -5
} > $OUT/sim/tests.log 2>&1
timeout 200 python benchmarks/bench_simulate.py --paper --fused on --determinism --out $OUT/sim/fused.json > $OUT/sim/fused.log 2>&1
timeout 120 python benchmarks/bench_simulate.py --paper --fused on --out $OUT/sim/fused_run2.json > $OUT/sim/fused_run2.log 2>&1
timeout 150 python benchmarks/bench_simulate.py --fused-check --fused-tune --out $OUT/sim/fused_check.json > $OUT/sim/fused_check.log 2>&1
