#!/bin/bash
# One-H100 device call (session 5): does the FFN's fused bias+ReLU GEMM epilogue (dslm.model.ops)
# and Inductor's coordinate-descent tuning of its own Triton kernels close BERT-base's gap to 2.0x HF?
# HF is measured first and last; one process per row; then a full kernel profile of the fused model.
# (As run; the A/B flag --relu unfused --label +unfused-relu is now --relu unfused. The CDT row
# did not finish compiling within its 240 s and is absent from the log.)
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:?}
mkdir -p $OUT/tp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
timeout 60 python benchmarks/bench_attention.py > $OUT/attention.json 2>&1
B="python benchmarks/bench_pretrain.py throughput --sizes bert-base --out $OUT/tp"
{
  timeout 90 $B --variants hf
  timeout 120 $B --variants ours-compiled-full-ro
  timeout 120 $B --variants ours-compiled-full-ro --relu unfused --label +unfused-relu
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout 240 $B --variants ours-compiled-full-ro --label +cdt
  timeout 90 $B --variants hf
  timeout 120 $B --variants ours-compiled-full-ro --label +again
} > $OUT/tp/throughput.log 2>&1
timeout 150 python benchmarks/bench_pretrain.py profile --sizes bert-base --variants ours-compiled-full-ro \
  --rows 120 --out $OUT/tp > /dev/null 2> $OUT/tp/profile.err
exit 0
