#!/bin/bash
# One-H100 device call (session 5, final code): BERT-base against HF with HF measured first, between
# and last; ours as the engine's --compile (whole model, ours-compiled-full) and with torch.compile's
# CUDA graphs (ours-compiled-full-ro); the deep narrow model (96 x 256, L 256) with --cuda-graphs.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
mkdir -p $OUT/tp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
B="python benchmarks/bench_pretrain.py throughput --out $OUT/tp"
for args in "bert-base hf" "bert-base ours-compiled-full" "bert-base ours-compiled-full-ro" "bert-base hf" \
            "bert-base ours-compiled-full" "bert-base hf" "deep-narrow hf" "deep-narrow ours-graphs"; do
  set -- $args
  timeout 150 $B --sizes $1 --variants $2 2>&1 | grep "^$1 " >> $OUT/tp/throughput.log
done
exit 0
