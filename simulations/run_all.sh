#!/usr/bin/env bash
# Run all seven component simulations and print the error report (THEORY.md section 4).
# Grid: paper when a GPU is present, quick otherwise; --paper or --quick forces one.
# Other flags go to `dslm simulate` (e.g. --json OUT.json, --seed 1, --precision fp32).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/ensure_venv.sh"
grid=""
args=()
for a in "$@"; do
    case "$a" in
        --paper) grid=paper ;;
        --quick) grid=quick ;;
        *) args+=("$a") ;;
    esac
done
if [ -z "$grid" ]; then
    grid=$(python -c "import torch; print('paper' if torch.cuda.is_available() else 'quick')")
fi
exec python -m dslm simulate --component all --grid "$grid" "${args[@]}"
