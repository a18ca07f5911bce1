#!/usr/bin/env bash
# Signal-propagation figures of the DeepScaleLM (dslm) init scheme with its residual scaling
# (THEORY.md section 4): preln_forward.png, preln_backward.png, postln_backward.png
# (+ postln_forward.png, correlation.png) and signal_propagation.json, measured and predicted by
# the theory. Flags go to `dslm figures`; preset: paper on a GPU, small on a CPU.
# Where the files go: a paper-preset run with no other settings (--device and --quiet aside) writes
# into this folder, whose committed files are the paper-preset references; any other run (the small
# preset, or overrides such as --layers, --seed, --data) writes to ${DSLM_OUT:-outputs}/figures/dslm/
# and says so; --out DIR always wins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
. "$root/scripts/ensure_venv.sh"
cd "$root"
init=dslm
preset="" device=auto out="" other=0 help=0 prev=""
for a in "$@"; do
    if [ -n "$prev" ]; then
        case "$prev" in --preset) preset=$a ;; --device) device=$a ;; --out) out=$a ;; esac
        prev=""; continue
    fi
    case "$a" in
        --preset|--device|--out) prev=$a ;;
        --preset=*) preset=${a#*=} ;;
        --device=*) device=${a#*=} ;;
        --out=*) out=${a#*=} ;;
        -h|--help) help=1 ;;
        --quiet) ;;
        *) other=1 ;;
    esac
done
if [ "$help" = 1 ] || [ -n "$out" ]; then
    exec python -m dslm figures --init "$init" "$@"
fi
if [ -z "$preset" ]; then   # dslm figures' own default: paper on a GPU, small on a CPU
    case "$device" in
        cpu) preset=small ;;
        cuda) preset=paper ;;
        *) preset=$(python -c 'import torch; print("paper" if torch.cuda.is_available() else "small")') ;;
    esac
fi
if [ "$preset" = paper ] && [ "$other" = 0 ]; then
    dest="$here"
else
    dest="${DSLM_OUT:-outputs}/figures/$init"
    what="preset $preset"; [ "$other" = 1 ] && what="$what with other settings"
    echo "make_figs.sh: $what: writing to $dest/ (the paper-preset references in $(basename "$here")/ stay as they are)"
fi
exec python -m dslm figures --init "$init" --out "$dest" "$@"
