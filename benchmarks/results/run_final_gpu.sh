#!/bin/bash
# The one-H100 device call behind this round's final numbers (run from the repository root; OUT =
# where results go, at most 8 files): the simulate paper grids with the package's defaults (bf16
# matmuls, fused LayerNorm/dropout kernels; precision check and determinism), again in a second
# process, then BERT-base throughput against HF with HF measured before and after ours (one process per
# variant: whole-model compile with mode="max-autotune" and with mode="reduce-overhead"). Results are
# written straight under OUT so that a run cut by the time limit keeps what finished.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
mkdir -p $OUT/sim $OUT/tp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
timeout 150 python benchmarks/bench_simulate.py --paper --determinism --precision-check --out $OUT/sim/simulate.json > $OUT/sim/simulate.log 2>&1
timeout 100 python benchmarks/bench_simulate.py --paper --out $OUT/sim/simulate_run2.json > $OUT/sim/run2.log 2>&1
for v in hf ours-compiled-full-ma ours-compiled-full-ro hf; do
  timeout $([ $v = ours-compiled-full-ma ] && echo 240 || echo 120) \
    python benchmarks/bench_pretrain.py throughput --sizes bert-base --variants $v --out $OUT/tp
done > $OUT/tp/throughput.log 2>&1
exit 0
