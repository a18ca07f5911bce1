#!/bin/bash
# The device call behind results/pretrain/distributed/ (repository root, a 2-GPU host; OUT = where results
# go). First, on GPU 0 alone, the issue-2 simulation benchmark (paper grids with the fused kernels, twice,
# in fresh processes; block-size sweep; determinism) into $OUT/sim. Then `dslm pretrain` on the embedded
# corpus, BERT-base L 512, global batch 64, 50 steps, bf16, eager:
#   gpu1        one GPU, micro-batch 32 x 2 accumulation steps (the reference curve)
#   ddp2        torchrun, 2 GPUs, DDP (NCCL), micro-batch 32
#   fsdp2       torchrun, 2 GPUs, FSDP2 (fully_shard, NCCL), micro-batch 32
#   fsdp2_stop  as fsdp2, stopped with a checkpoint after step 25, then resumed (--load) to step 50
#   nodes2      bert_wiki_pretraining/run_bert_wiki.sh as two single-GPU torchrun "nodes" on this
#               host (NNODES=2, NODE_RANK 0/1, MASTER_ADDR 127.0.0.1): the multi-node launch path
# Each run's metrics.jsonl and log go to $OUT/pretrain.tar.gz. SIM=0 skips the simulation part; RUNS
# selects runs (default: gpu1 ddp2 fsdp2 fsdp2_stop nodes2).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:?}
RUNS=${RUNS:-gpu1 ddp2 fsdp2 fsdp2_stop nodes2}
want() { [[ " $RUNS " == *" $1 "* ]]; }
mkdir -p $OUT/sim
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
[ "${SIM:-1}" = 0 ] || (export CUDA_VISIBLE_DEVICES=0
 timeout 200 python benchmarks/bench_simulate.py --paper --fused on --determinism --fused-tune --out $OUT/sim/fused.json > $OUT/sim/fused.log 2>&1
 timeout 120 python benchmarks/bench_simulate.py --paper --fused on --out $OUT/sim/fused_run2.json > $OUT/sim/fused_run2.log 2>&1)

W=/tmp/dist; mkdir -p $W
timeout 120 python -m dslm prepare-data --out $W/data --no-progress > $W/prepare.log 2>&1
common=(--data $W/data --steps 50 --global-batch 64 --micro-batch 32 --log-every 5 --eval-every 1000
        --eval-iters 2 --no-save-final --no-progress)
run2() { timeout 150 python -m torch.distributed.run --standalone --nproc_per_node 2 -m dslm pretrain "$@"; }
want gpu1 && CUDA_VISIBLE_DEVICES=0 timeout 150 python -m dslm pretrain "${common[@]}" --out-dir $W/gpu1 > $W/gpu1.log 2>&1
want ddp2 && run2 "${common[@]}" --out-dir $W/ddp2 > $W/ddp2.log 2>&1
want fsdp2 && run2 "${common[@]}" --fsdp --out-dir $W/fsdp2 > $W/fsdp2.log 2>&1
if want fsdp2_stop; then
  run2 "${common[@]}" --fsdp --out-dir $W/fsdp2_stop --stop-at 25 --save-every 1000 > $W/fsdp2_stop.log 2>&1
  run2 "${common[@]}" --fsdp --out-dir $W/fsdp2_stop --load $W/fsdp2_stop > $W/fsdp2_resume.log 2>&1
fi
# run_bert_wiki.sh sources scripts/ensure_venv.sh: point it at this image's Python (no network for pip)
export DSLM_VENV=$(dirname $(dirname $(command -v python))); touch $DSLM_VENV/.dslm-installed
want nodes2 && for rank in 0 1; do
  NNODES=2 NODE_RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 NPROC=1 CUDA_VISIBLE_DEVICES=$rank \
    timeout 150 bert_wiki_pretraining/run_bert_wiki.sh "${common[@]}" --out-dir $W/nodes2 > $W/nodes2_rank$rank.log 2>&1 &
done
wait
(cd $W && rm -rf data && find . -name "*.safetensors" -o -name "*.pt" | xargs rm -f; tar czf "$OUT/pretrain.tar.gz" .)
