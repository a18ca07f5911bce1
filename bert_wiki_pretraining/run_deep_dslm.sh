#!/usr/bin/env bash
# A deep DeepScaleLM model with the same engine and recipe: 192 layers, d 1024, 16 heads, Post-LN,
# DSLM init + residual scaling (beta^2 = 1/192), L 256, r0 measured on the data. Extra flags override,
# e.g. --ln pre, --layers 96, --data data/wiki. Launches like run_bert_wiki.sh (all visible GPUs;
# FSDP2 is used automatically when the model + AdamW state do not fit one GPU; --fsdp forces it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/run_bert_wiki.sh" --layers 192 --hidden 1024 --heads 16 --seq-len 256 --init dslm --dslm-mode both \
    --r0 auto --out-dir outputs/pretrain_deep_dslm "$@"
