"""dslm.runtime: one device resolver and one main-process test for every command."""
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
