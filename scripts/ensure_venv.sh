# Sourced by every driver script: choose the Python environment the job runs in, make sure it imports
# torch, this checkout's dslm and the dependencies of the requested extras, put its `python` first on
# PATH and print one line naming it. The first usable choice wins:
#   1. $DSLM_VENV, when set: that virtual environment (created, with torch, when missing);
#   2. the activated environment ($VIRTUAL_ENV, else $CONDA_PREFIX) when it imports torch;
#   3. the first `python` / `python3` on PATH that imports torch and imports dslm from this checkout
#      or can take it (pip present, site-packages writable, not an externally managed system Python);
#   4. .venv in the checkout, created when missing.
# torch is installed only into a virtual environment of steps 1 and 4 that has none, so a CUDA build
# already present is never replaced. Missing dependencies are installed alone, and dslm with --no-deps
# (editable). pip runs without retries; if it fails (e.g. offline), one line names what is missing and
# the command that installs it, and the driver stops with status 1.
#   DSLM_VENV           force this virtual environment (steps 2-4 are skipped)
#   DSLM_TORCH          torch requirement for a new virtual environment (default torch==2.13.0; e.g. a CUDA wheel)
#   DSLM_EXTRAS         extras whose dependencies must be importable (default dev)
#   DSLM_SETUP_DRY_RUN  when 1: print the choice (and what would be installed) and exit 0
set -euo pipefail
export MPLBACKEND=Agg
# A driver started by another driver (run_all.sh) inherits the environment chosen: nothing to redo.
if [ -n "${DSLM_SETUP_PYTHON:-}" ] && [ "$DSLM_SETUP_PYTHON" = "$(command -v python || true)" ]; then
    return 0
fi
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${DSLM_EXTRAS:-dev}"

# Probe an interpreter; four lines: torch version (empty without torch), 1 if dslm imports from this
# checkout, the missing requirements (space-separated), 1 if pip can install into it, 1 if its own
# setuptools can build dslm (>= 70.1: no build isolation, so no download).
_dslm_probe() {
    "$1" - "$_root" "$_extras" 2>/dev/null <<'PY' || true
import importlib.util as iu, os, re, sys, sysconfig
root, extras = sys.argv[1], sys.argv[2]
try:
    import torch
except Exception:
    print(""); sys.exit()
try:
    import tomllib
except ImportError:                     # Python 3.10: pip's copy of the same parser
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for e in filter(None, extras.split(",")):
    reqs += project["optional-dependencies"][e]
missing = []
for s in reqs:
    r = Requirement(s)
    if r.name != "torch" and (r.marker is None or r.marker.evaluate()) \
            and iu.find_spec(r.name.replace("-", "_")) is None:
        missing.append(s.split(";")[0].replace(" ", ""))
spec = iu.find_spec("dslm")
src = os.path.realpath(os.path.join(root, "src")) + os.sep
mine = bool(spec and spec.origin and os.path.realpath(spec.origin).startswith(src))
managed = sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
can = iu.find_spec("pip") is not None and not managed and os.access(sysconfig.get_path("purelib"), os.W_OK)
try:
    import setuptools
    build = tuple(map(int, setuptools.__version__.split(".")[:2])) >= (70, 1)
except Exception:
    build = False
print(torch.__version__, int(mine), " ".join(missing), int(can), int(build), sep="\n")
PY
}

_py="" _env="" _venv=""
if [ -n "${DSLM_VENV:-}" ]; then
    _venv="$DSLM_VENV"
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    _env="${VIRTUAL_ENV:-$CONDA_PREFIX}"
    mapfile -t _p < <(_dslm_probe "$_env/bin/python")
    if [ -n "${_p[0]:-}" ]; then
        _py="$_env/bin/python"
        echo "[setup] using the active environment $_env (torch ${_p[0]})" >&2
    else
        echo "[setup] the active environment $_env cannot import torch: not using it" >&2
    fi
fi
if [ -z "$_py" ] && [ -z "$_venv" ]; then
    for _c in python python3; do
        _c="$(command -v "$_c" || true)"
        [ -n "$_c" ] || continue
        mapfile -t _p < <(_dslm_probe "$_c")
        if [ -n "${_p[0]:-}" ] && { [ "${_p[1]}" = 1 ] || [ "${_p[3]}" = 1 ]; }; then
            _py="$_c" _env="$("$_c" -c 'import sys; print(sys.prefix)')"
            echo "[setup] using $_c from PATH, environment $_env (torch ${_p[0]})" >&2
            break
        fi
    done
fi
if [ -z "$_py" ]; then   # steps 1 and 4: a virtual environment of our own
    _venv="${_venv:-$_root/.venv}"
    _env="$_venv"
    if [ ! -x "$_venv/bin/python" ]; then
        echo "[setup] no usable environment active: creating the virtual environment $_venv" >&2
        [ "${DSLM_SETUP_DRY_RUN:-}" = 1 ] && exit 0
        python3 -m venv "$_venv"
    fi
    _py="$_venv/bin/python"
    mapfile -t _p < <(_dslm_probe "$_py")
    if [ -z "${_p[0]:-}" ]; then
        echo "[setup] installing ${DSLM_TORCH:-torch==2.13.0} into $_venv" >&2
        _p=("" 0 "" 1)
    else
        echo "[setup] using the virtual environment $_venv (torch ${_p[0]})" >&2
    fi
fi
if [ "${DSLM_SETUP_DRY_RUN:-}" = 1 ]; then
    echo "[setup] dry run; missing: ${_p[2]:-}$([ "${_p[1]:-}" = 1 ] || echo ' dslm')" >&2
    exit 0
fi

# pip install "$@" into the chosen environment without retries; on failure one line naming what
# ($1) and the command to run by hand, then stop.
_dslm_pip() {
    local what="$1" log cmd="" a
    shift
    log="$(mktemp)"
    if ! "$_py" -m pip install --retries 0 --timeout 15 -q "$@" >"$log" 2>&1; then
        for a in "$@"; do case "$a" in -*) cmd+=" $a" ;; *) cmd+=" '$a'" ;; esac; done
        echo "[setup] error: cannot install $what into $_env (pip failed, offline? its output: $log);" \
             "install it with: $_py -m pip install$cmd" >&2
        exit 1
    fi
    rm -f "$log"
}
if [ -z "${_p[0]}" ]; then
    _dslm_pip "${DSLM_TORCH:-torch==2.13.0}" "${DSLM_TORCH:-torch==2.13.0}"
    mapfile -t _p < <(_dslm_probe "$_py")
fi
if [ -n "${_p[2]:-}" ]; then
    echo "[setup] installing the missing ${_p[2]} into $_env" >&2
    read -ra _m <<<"${_p[2]}"
    _dslm_pip "${_p[2]}" "${_m[@]}"
fi
if [ "${_p[1]:-}" != 1 ]; then
    echo "[setup] installing dslm from $_root into $_env (editable, --no-deps)" >&2
    _i=()
    [ "${_p[4]:-}" = 1 ] && _i=(--no-build-isolation)
    _dslm_pip dslm --no-deps "${_i[@]}" -e "$_root"
fi

# Drivers call `python`: make it the chosen interpreter (a bare python3 gets a `python` link).
PATH="$(dirname "$_py"):$PATH"
if [ "$(command -v python)" != "$_py" ]; then
    _bin="$(mktemp -d)"
    ln -s "$_py" "$_bin/python"
    PATH="$_bin:$PATH"
fi
[ -n "$_venv" ] && export VIRTUAL_ENV="$_venv"
DSLM_SETUP_PYTHON="$(command -v python)"
export PATH DSLM_SETUP_PYTHON
unset _root _extras _py _env _venv _p _c _m _i _bin
