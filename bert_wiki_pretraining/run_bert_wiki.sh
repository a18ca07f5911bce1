#!/usr/bin/env bash
# Reference BERT pretraining recipe (THEORY.md section 4): BERT-base, L 512, global batch 256,
# 488,281 steps, lr 1e-4, 1% warmup + linear decay, wd 0.01, clip 1.0, bf16, Post-LN, megatron init.
# Every flag of `dslm pretrain` can be appended and overrides the recipe, e.g.
#   bert_wiki_pretraining/run_bert_wiki.sh --data data/wiki --out-dir runs/base
#   bert_wiki_pretraining/run_bert_wiki.sh --preset tiny                 # CPU-sized
#   bert_wiki_pretraining/run_bert_wiki.sh --init dslm --layers 48 --ln pre
#   bert_wiki_pretraining/run_bert_wiki.sh --load runs/base             # resume
# GPUs: one torchrun process per visible GPU (CUDA_VISIBLE_DEVICES selects them; NPROC overrides).
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500) are passed to torchrun.
# No GPU: one CPU process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/ensure_venv.sh"
cd "$root"

gpus="$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
nproc="${NPROC:-$gpus}"
if [ "$nproc" -ge 1 ]; then
    launch=(python -m torch.distributed.run --nproc_per_node="$nproc")
    if [ "${NNODES:-1}" -gt 1 ]; then
        launch+=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" \
                 --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
    else
        launch+=(--standalone)
    fi
    exec "${launch[@]}" -m dslm pretrain "$@"
fi
exec python -m dslm pretrain "$@"
