"""scripts/ensure_venv.sh, the environment choice every driver script makes.

Each case sources the script from a copy of the checkout in tmp_path (its src/ links to the real
one), so the `.venv` it would create is the copy's and the real checkout is never touched. pip is
shadowed by a fake package (and a fake `pip` on PATH) that records any call and fails, except in the
offline case, where the real pip runs with no index and nothing to find.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dslm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DRIVER = '. scripts/ensure_venv.sh; echo driver-continued; python -c "import dslm, sys; print(sys.prefix)"'

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"),
    pytest.mark.skipif(not (BIN / "python").exists(), reason="the test interpreter's bin/ has no `python`"),
    pytest.mark.skipif(not Path(dslm.__file__).resolve().is_relative_to(REPO / "src"),
                       reason="dslm is not installed from this checkout"),
]


def _checkout(tmp_path, extra_dependency=None):
    """A copy of what the script reads: scripts/ensure_venv.sh, pyproject.toml, src/ (a link)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "ensure_venv.sh", root / "scripts")
    text = (REPO / "pyproject.toml").read_text()
    if extra_dependency:
        text = text.replace('"torch>=2.4",', f'"torch>=2.4", "{extra_dependency}",', 1)
        assert extra_dependency in text
    (root / "pyproject.toml").write_text(text)
    (root / "src").symlink_to(REPO / "src")
    return root


def _fake_pip(tmp_path):
    """A `pip` package and `pip` commands that append to a record file and fail."""
    record = tmp_path / "pip-calls"
    pkg = tmp_path / "fakepip" / "pip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"import sys\nopen({str(record)!r}, 'a').write(repr(sys.argv) + '\\n')\nsys.exit('fake pip')\n")
    (pkg / "__main__.py").write_text("")
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    for name in ("pip", "pip3"):
        (bindir / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {record}\nexit 1\n")
        (bindir / name).chmod(0o755)
    return record, pkg.parent, bindir


def _env(path, **extra):
    """The caller's environment without any active env, DSLM_* or PIP_* setting, plus `extra`."""
    drop = ("VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("DSLM_", "PIP_"))}
    env.update(PATH=os.pathsep.join(str(p) for p in path), **extra)
    return env


def _run(root, env):
    return subprocess.run([shutil.which("bash"), "-c", DRIVER], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def _setup_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("[setup]")]


@pytest.mark.parametrize("active", ["VIRTUAL_ENV", "CONDA_PREFIX", None])
def test_a_usable_environment_is_used_as_is(tmp_path, active):
    root = _checkout(tmp_path)
    record, fakepip, fakebin = _fake_pip(tmp_path)
    extra = {active: sys.prefix} if active else {}
    env = _env([fakebin, BIN, "/usr/bin", "/bin"], PYTHONPATH=str(fakepip), **extra)
    r = _run(root, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == sys.prefix           # the job ran in that environment
    want = (f"[setup] using the active environment {sys.prefix} (torch {torch.__version__})" if active
            else f"[setup] using {BIN / 'python'} from PATH, environment {sys.prefix} (torch {torch.__version__})")
    assert _setup_lines(r.stderr) == [want]
    assert not (root / ".venv").exists()
    assert not record.exists(), record.read_text()           # pip never ran


def _tools(tmp_path):
    """A PATH entry with the few commands the script runs, and no Python."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("dirname", "mktemp", "rm", "ln"):
        (tools / name).symlink_to(shutil.which(name))
    return tools


def test_a_bare_python3_on_path_also_answers_to_python(tmp_path):
    root = _checkout(tmp_path)
    record, fakepip, fakebin = _fake_pip(tmp_path)
    wrap = tmp_path / "wrap"                                 # only `python3`, no `python`, on PATH
    wrap.mkdir()
    (wrap / "python3").write_text(f'#!/bin/sh\nexec "{BIN / "python"}" "$@"\n')
    (wrap / "python3").chmod(0o755)
    env = _env([fakebin, wrap, _tools(tmp_path)], PYTHONPATH=str(fakepip))
    r = _run(root, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == sys.prefix
    assert _setup_lines(r.stderr) == [
        f"[setup] using {wrap / 'python3'} from PATH, environment {sys.prefix} (torch {torch.__version__})"]
    assert not (root / ".venv").exists() and not record.exists()


def test_nothing_usable_means_a_new_venv(tmp_path):
    root = _checkout(tmp_path)
    record, fakepip, fakebin = _fake_pip(tmp_path)
    bare = tmp_path / "bare"                                 # a Python that cannot import torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    tools = _tools(tmp_path)
    creating = f"[setup] no usable environment active: creating the virtual environment {root / '.venv'}"

    for extra, lines in [({}, [creating]),
                         ({"VIRTUAL_ENV": str(bare)},
                          [f"[setup] the active environment {bare} cannot import torch: not using it", creating])]:
        env = _env([fakebin, bare / "bin", tools], PYTHONPATH=str(fakepip), DSLM_SETUP_DRY_RUN="1", **extra)
        r = _run(root, env)
        assert r.returncode == 0, r.stderr
        assert _setup_lines(r.stderr) == lines
        assert "driver-continued" not in r.stdout            # the dry run stops the driver
        assert not (root / ".venv").exists()
        assert not record.exists()


def test_offline_missing_package_is_one_line_and_a_failure(tmp_path):
    missing = "dslm-no-such-package>=1"
    root = _checkout(tmp_path, extra_dependency=missing)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = _env([BIN, "/usr/bin", "/bin"], VIRTUAL_ENV=sys.prefix, PIP_CONFIG_FILE=os.devnull,
               PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    r = _run(root, env)
    assert r.returncode == 1
    assert "driver-continued" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr                        # pip's own output stays in its log
    assert errors[0].startswith(f"[setup] error: cannot install {missing} into {sys.prefix}")
    assert errors[0].endswith(f"install it with: {BIN / 'python'} -m pip install '{missing}'")
    assert not (root / ".venv").exists()
