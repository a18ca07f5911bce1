"""dslm.runtime: one device resolver and one main-process test for every command; loader workers
that never hold up the exit."""
import subprocess
import sys

import pytest
import torch

from dslm.errors import UsageError
from dslm.runtime import is_main_process, resolve_device


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


@pytest.mark.parametrize("rank, main", [(None, True), ("", True), ("0", True), ("1", False)])
def test_is_main_process(monkeypatch, rank, main):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert is_main_process() is main


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    from dslm.runtime import require_package

    require_package("torch", "train")
    with pytest.raises(UsageError, match=r"^the 'no_such_pkg_x' package is needed here: pip install 'dslm\[train\]'"):
        require_package("no_such_pkg_x", "train")


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_commands_check_safetensors_before_any_work(monkeypatch, tmp_path, command, capsys):
    """Without safetensors the command stops before training (it used to crash after it)."""
    import importlib.util

    from dslm.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else real(name, *a))
    argv = [command, "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    argv += ["--preset", "tiny"] if command == "pretrain" else ["--task", "demo"]
    assert main(argv) == 2
    assert "pip install 'dslm[train]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


STUCK_WORKER = '''
import time, torch
from dslm.runtime import WorkerLoader

class Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        while i >= 2:                   # a worker busy for ever (it ignores SIGTERM by design)
            time.sleep(0.1)
        return torch.tensor(i)

if __name__ == "__main__":
    batches = iter(WorkerLoader(Stuck(), batch_size=1, num_workers=1, prefetch_factor=2))
    print("first batch", next(batches).item(), flush=True)
'''


def test_exit_does_not_wait_for_a_busy_loader_worker(tmp_path):
    """A worker still inside __getitem__ when the process exits is killed: the exit neither hangs
    (multiprocessing would join it for ever) nor reports the kill as a loader failure."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_WORKER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "first batch 0" and "killed by signal" not in done.stderr
