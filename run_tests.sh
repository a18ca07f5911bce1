#!/usr/bin/env bash
# Set up (or reuse) the virtual environment and run the test suite. CI runs exactly this.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k theory, ./run_tests.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_venv.sh
python -m pytest -q "$@"
