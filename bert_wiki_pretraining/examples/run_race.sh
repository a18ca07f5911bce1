#!/usr/bin/env bash
# RACE finetuning sweep (THEORY.md section 4): lr {1,2,3,4,5}e-5 x 5 seeds, 5 epochs, batch 8 questions x 4 options, warmup 0.06,
# L 512, weight decay 0.01, linear decay, clip 1.0, bf16, dropout 0.1; ends with the results table
# (per lr: mean, median, std over seeds; best lr per metric) in $OUT/results.{md,csv,json}.
#
#   RACE_DATA=data/RACE INIT_FROM=outputs/pretrain VOCAB=outputs/data/tfds bert_wiki_pretraining/examples/run_race.sh
#
# Environment overrides:
#   RACE_DATA  the RACE folder (train|dev|test/{middle,high}/*.txt), or "hf" for the HF hub (default data/RACE)
#   INIT_FROM  pretrained checkpoint: a pretraining run folder, a checkpoint or an HF BERT folder
#              (default outputs/pretrain; empty: train from scratch)
#   VOCAB      the pretraining vocab.txt or its dataset folder (not needed for an HF folder)
#   LRS, SEEDS comma-separated lists (default 1e-5,2e-5,3e-5,4e-5,5e-5 and 1,2,3,4,5)
#   EPOCHS     (default 5)    OUT  sweep folder (default outputs/finetune/race_sweep)
#   NPROC      processes per run (default auto: every visible GPU, through torchrun)
# Extra arguments go to every `dslm finetune` run, e.g. a quick small sweep:
#   LRS=2e-5,3e-5 SEEDS=1,2 EPOCHS=1 bert_wiki_pretraining/examples/run_race.sh --max-train 20000
# Finished runs are skipped when the script is run again; interrupted ones resume.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/ensure_venv.sh"
args=(--data "${RACE_DATA:-data/RACE}" --epochs "${EPOCHS:-5}")
init="${INIT_FROM-outputs/pretrain}"
[ -n "$init" ] && args+=(--init-from "$init")
[ -n "${VOCAB:-}" ] && args+=(--vocab "$VOCAB")
exec python -m dslm finetune-sweep --task race --lrs "${LRS:-1e-5,2e-5,3e-5,4e-5,5e-5}" --seeds "${SEEDS:-1,2,3,4,5}" \
    --out "${OUT:-outputs/finetune/race_sweep}" --nproc "${NPROC:-auto}" -- "${args[@]}" "$@"
