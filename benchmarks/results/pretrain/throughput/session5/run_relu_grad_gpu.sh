#!/bin/bash
# One-H100 device call (session 5, second): BERT-base with the full set of session-5 changes (bias+ReLU
# GEMM epilogue and one-pass Triton ReLU/bias backward, additive attention bias made once per
# forward, clipping folded into fused AdamW) against HF, measured before and after, with the
# PyTorch-backward A/B; the GPU tests of the new kernel; an eager profile with input shapes.
# (As run at the commit that had src/dslm/model/relu_grad.py: the one-pass Triton ReLU/bias
# backward gained nothing (+epilogue-only 522.7k vs 521.1k / 520.2k with it) and was removed, with
# its --relu epilogue A/B mode and its tests; h100_gpu_tests.log is that commit's GPU test run.)
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
mkdir -p $OUT/tp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_model_ops.py tests/test_train_graphs.py > $OUT/gpu_tests.log 2>&1
B="python benchmarks/bench_pretrain.py throughput --sizes bert-base --out $OUT/tp"
{
  timeout 90 $B --variants hf
  timeout 120 $B --variants ours-compiled-full-ro
  timeout 120 $B --variants ours-compiled-full-ro --relu epilogue --label +epilogue-only
  timeout 90 $B --variants hf --label x
  timeout 120 $B --variants ours-compiled-full-ro --label +again
  timeout 90 $B --variants hf
} 2>&1 | grep -v -i "softmax\|warn\|^\s*$" > $OUT/tp/throughput.log
timeout 100 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours --record-shapes \
  --rows 60 --out $OUT/tp > /dev/null 2> $OUT/tp/profile.err
exit 0
