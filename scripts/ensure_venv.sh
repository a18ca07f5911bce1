# Sourced by run_all.sh and run_tests.sh: create or reuse the virtual environment in $DSLM_VENV
# (default .venv), install the package with the requested extras, and activate it.
#   DSLM_TORCH   pip requirement used when torch is missing (default torch==2.13.0; set it to your
#                own build, e.g. a CUDA wheel, or pre-install torch in the venv to keep yours)
#   DSLM_EXTRAS  extras to install (default dev)
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DSLM_VENV="${DSLM_VENV:-$_root/.venv}"
if [ ! -x "$DSLM_VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $DSLM_VENV"
    python3 -m venv "$DSLM_VENV"
fi
# shellcheck disable=SC1091
. "$DSLM_VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing ${DSLM_TORCH:-torch==2.13.0}"
    python -m pip install -q "${DSLM_TORCH:-torch==2.13.0}"
fi
_stamp="$DSLM_VENV/.dslm-installed"
if [ ! -f "$_stamp" ] || [ "$_root/pyproject.toml" -nt "$_stamp" ]; then
    echo "[setup] installing dslm[${DSLM_EXTRAS:-dev}] (editable)"
    python -m pip install -q -e "$_root[${DSLM_EXTRAS:-dev}]"
    touch "$_stamp"
fi
export MPLBACKEND=Agg
