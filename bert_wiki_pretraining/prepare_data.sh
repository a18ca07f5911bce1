#!/usr/bin/env bash
# Prepare a BERT pretraining dataset directory: a thin wrapper over `dslm prepare-data`.
#   bert_wiki_pretraining/prepare_data.sh                          # embedded corpus, no download
#   bert_wiki_pretraining/prepare_data.sh --source tfds --vocab bert-base-uncased-vocab.txt --out data/wiki
# All flags: bert_wiki_pretraining/prepare_data.sh --help
set -euo pipefail
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/ensure_venv.sh"
exec python -m dslm prepare-data "$@"
