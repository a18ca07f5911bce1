#!/bin/bash
# The one-H100 device call behind this round's final numbers (run from the repository root; OUT =
# where results go, at most 8 files): the simulate paper grids (run_simulate_final_gpu.sh, then a
# second process), BERT-base throughput against HF with HF measured before and after ours (one
# process per variant), and a kernel profile of the whole-model compiled step. Results are written
# straight under OUT so that a run cut by the time limit keeps what finished.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
GPU=0 bash benchmarks/results/run_simulate_final_gpu.sh
timeout 100 python benchmarks/bench_simulate.py --paper --out $OUT/sim/simulate_run2.json > $OUT/sim/run2.log 2>&1
mkdir -p $OUT/tp
for v in hf ours-compiled-full ours-compiled-full-ro hf; do
  timeout 150 python benchmarks/bench_pretrain.py throughput --sizes bert-base --variants $v --out $OUT/tp
done > $OUT/tp/throughput.log 2>&1
timeout 100 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled-full --out /tmp/profile > $OUT/tp/profile.log 2>&1
exit 0
