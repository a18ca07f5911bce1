#!/bin/bash
# One-H100 device call (session 5): the deep narrow model (96 x 256, L 256) with --compile --cuda-graphs
# (per-layer Inductor kernels captured, dropout through ATen's RNG) against --cuda-graphs alone, then
# the GPU test that the captured compiled step trains like the compiled one.
# (Ran against a since-reverted change: the engine allowed --compile --cuda-graphs under Inductor's
# fallback_random, and bench_pretrain had an ours-compiled-graphs variant. Result: fp32 without
# dropout captured and matched --compile; bf16 with dropout recompiled during capture and failed.)
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
mkdir -p $OUT/tp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
B="python benchmarks/bench_pretrain.py throughput --sizes deep-narrow --out $OUT/tp"
timeout 150 $B --variants ours-compiled-graphs > $OUT/tp/compiled_graphs.log 2>&1
timeout 60 $B --variants ours-graphs 2>&1 | grep "^deep-narrow" >> $OUT/tp/throughput.log
grep "^deep-narrow" $OUT/tp/compiled_graphs.log >> $OUT/tp/throughput.log
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_train_graphs.py -k compiled_and_graphed > $OUT/gpu_test.log 2>&1
exit 0
