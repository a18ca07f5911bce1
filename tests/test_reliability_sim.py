"""``dslm simulate --json PATH`` checks PATH before the run, so a run never ends without its results."""
import os

import pytest

from dslm.cli import main
from dslm.sim import command


@pytest.fixture
def no_run(monkeypatch):
    """Any simulation reaching its run fails the test (the path must be refused before it)."""
    def fail(*args, **kwargs):
        raise AssertionError("the simulation ran before --json was checked")

    monkeypatch.setattr(command, "run_component", fail)
    monkeypatch.setattr(command, "warm_up", lambda *a, **k: 0.0)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dslm simulate: error: --json ")
    return err


def test_json_path_that_is_a_directory_is_refused_up_front(tmp_path, capsys, no_run):
    folder = tmp_path / "adir"
    folder.mkdir()
    err = _error(capsys, ["simulate", "--quiet", "--json", str(folder)])
    assert "is a directory" in err
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


def test_json_under_a_file_is_refused_up_front(tmp_path, capsys, no_run):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error(capsys, ["simulate", "--quiet", "--json", str(blocker / "out.json")])
    assert "cannot create its folder" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_json_in_a_read_only_folder_is_refused_up_front(tmp_path, capsys, no_run):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        err = _error(capsys, ["simulate", "--quiet", "--json", str(folder / "out.json")])
    finally:
        folder.chmod(0o755)
    assert "cannot write there" in err and not list(folder.iterdir())


def test_json_in_a_new_folder_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "warm_up", lambda *a, **k: 0.0)
    out = tmp_path / "new" / "deeper" / "r.json"
    grid = tmp_path / "g.json"
    grid.write_text('{"relu": {"s": [1.0], "r": [0.5], "g": [1.0], "r_g": [0.5], "L": [10], "samples": [200]}}')
    assert main(["simulate", "--grid", str(grid), "--quiet", "--json", str(out)]) == 0
    assert out.is_file() and not list(out.parent.glob("*.tmp"))


def test_unwritable_folder_is_refused_up_front_also_as_root(tmp_path, capsys, no_run, monkeypatch):
    """The same check where permissions do not apply (root): a folder where no file can be created."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(command.Path, "write_text", refuse)
    err = _error(capsys, ["simulate", "--quiet", "--json", str(tmp_path / "out.json")])
    assert "cannot write there (Permission denied)" in err
