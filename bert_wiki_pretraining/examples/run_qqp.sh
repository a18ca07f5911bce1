#!/usr/bin/env bash
# QQP finetuning sweep (THEORY.md section 4): lr {1,2,3,4,5}e-5 x 5 seeds, 5 epochs, batch 32, warmup 0.1,
# L 512, weight decay 0.01, linear decay, clip 1.0, bf16, dropout 0.1; ends with the results table
# (per lr: mean, median, std over seeds; best lr per metric) in $OUT/results.{md,csv,json}.
#
#   QQP_DATA=data/glue/QQP INIT_FROM=outputs/pretrain VOCAB=outputs/data/tfds bert_wiki_pretraining/examples/run_qqp.sh
#
# Environment overrides:
#   QQP_DATA  GLUE's QQP folder (train.tsv, dev.tsv), or "hf" for the HF hub (default data/glue/QQP)
#   INIT_FROM  pretrained checkpoint: a pretraining run folder, a checkpoint or an HF BERT folder
#              (default outputs/pretrain; empty: train from scratch)
#   VOCAB      the pretraining vocab.txt or its dataset folder (not needed for an HF folder)
#   LRS, SEEDS comma-separated lists (default 1e-5,2e-5,3e-5,4e-5,5e-5 and 1,2,3,4,5)
#   EPOCHS     (default 5)    OUT  sweep folder (default outputs/finetune/qqp_sweep)
#   NPROC      processes per run (default auto: every visible GPU, through torchrun)
# Extra arguments go to every `dslm finetune` run, e.g. a quick small sweep:
#   LRS=2e-5,3e-5 SEEDS=1,2 EPOCHS=1 bert_wiki_pretraining/examples/run_qqp.sh --max-train 20000
# Finished runs are skipped when the script is run again; interrupted ones resume.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/ensure_venv.sh"
args=(--data "${QQP_DATA:-data/glue/QQP}" --epochs "${EPOCHS:-5}")
init="${INIT_FROM-outputs/pretrain}"
[ -n "$init" ] && args+=(--init-from "$init")
[ -n "${VOCAB:-}" ] && args+=(--vocab "$VOCAB")
exec python -m dslm finetune-sweep --task qqp --lrs "${LRS:-1e-5,2e-5,3e-5,4e-5,5e-5}" --seeds "${SEEDS:-1,2,3,4,5}" \
    --out "${OUT:-outputs/finetune/qqp_sweep}" --nproc "${NPROC:-auto}" -- "${args[@]}" "$@"
