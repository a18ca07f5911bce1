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

printf '\nall done; outputs in %s/\n' "$out"
