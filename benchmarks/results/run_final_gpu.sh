#!/bin/bash
# The one-H100 device call behind this round's final numbers (run from the repository root; OUT =
# where results go): the simulate paper grids (run_simulate_final_gpu.sh, then a second process),
# BERT-base throughput against HF with HF measured before and after ours (one process per variant),
# the GPU tests of --cuda-graphs, and a kernel profile of the whole-model compiled step.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
GPU=0 bash benchmarks/results/run_simulate_final_gpu.sh
timeout 100 python benchmarks/bench_simulate.py --paper --out $OUT/sim/simulate_run2.json > $OUT/sim/run2.log 2>&1
W=/tmp/throughput; mkdir -p $W
for v in hf ours-compiled-full ours-compiled-full-ro hf; do
  timeout 150 python benchmarks/bench_pretrain.py throughput --sizes bert-base --variants $v --out $W/default
done > $W/throughput.log 2>&1
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_train_graphs.py > $W/graphs_tests.log 2>&1
timeout 100 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled-full --out $W/profile > $W/profile.log 2>&1
(cd $W && tar czf "$OUT/throughput.tar.gz" .)
(cd $OUT && tar czf sim.tar.gz sim && rm -rf sim)
