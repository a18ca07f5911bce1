#!/usr/bin/env bash
# The main job on the embedded defaults: runs on a CPU-only machine whose only network is the
# package index. Sets up (or reuses) .venv, then runs every job's small default; outputs land in
# outputs/ (override with DSLM_OUT). Each step prints its own report.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_venv.sh
out="${DSLM_OUT:-outputs}"
mkdir -p "$out"

step() { printf '\n==== %s ====\n' "$*"; }

step "component simulations (quick grid)"
simulations/run_all.sh --quick --quiet --json "$out/simulations.json"

step "ReLU / FFN correlation approximations"
python simulations/approximations.py --out "$out/approximations"

step "pretraining dataset from the embedded corpus"
bert_wiki_pretraining/prepare_data.sh --out "$out/data/embedded"

step "signal-propagation figures, xavier (small preset on a CPU)"
xavier_signal_propagation_figures/make_figs.sh --data "$out/data/embedded" --out "$out/figures/xavier" --quiet

step "signal-propagation figures, DSLM (small preset on a CPU)"
DSLM_signal_propagation_figures/make_figs.sh --data "$out/data/embedded" --out "$out/figures/dslm" --quiet

step "tiny BERT pretraining on the embedded corpus (CPU preset)"
resume=()   # a second ./run_all.sh continues (or, if finished, only re-evaluates) the earlier run
[ -d "$out/pretrain_tiny/checkpoints" ] && resume=(--load "$out/pretrain_tiny")
python -m dslm pretrain --preset tiny --data "$out/data/embedded" --out-dir "$out/pretrain_tiny" --device cpu \
    --no-progress "${resume[@]}"

# The demo starts from a fresh 2-layer model: the 300-step tiny pretraining is too short to help it
# (dev accuracy 0.67 from that checkpoint vs 0.79 fresh); `--init-from "$out/pretrain_tiny"` runs the
# pretrained path (the run directory carries its vocab.txt).
step "finetuning demo (shipped MNLI-format pairs, fresh tiny model)"
python -m dslm finetune --task demo --device cpu --no-progress --out-dir "$out/finetune_demo" \
    --cache-dir "$out/finetune_cache" --overwrite

printf '\nall done; outputs in %s/\n' "$out"
