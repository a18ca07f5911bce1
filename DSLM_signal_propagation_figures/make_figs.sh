#!/usr/bin/env bash
# Signal-propagation figures of the dslm init scheme (THEORY.md section 4): preln_forward.png,
# preln_backward.png, postln_backward.png (+ postln_forward.png, correlation.png) and
# signal_propagation.json in this folder, measured and predicted by the theory.
# Preset: paper on a GPU, small on a CPU; other flags go to `dslm figures` (e.g. --preset small).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
. "$root/scripts/ensure_venv.sh"
cd "$root"
exec python -m dslm figures --init dslm --out "$here" "$@"
