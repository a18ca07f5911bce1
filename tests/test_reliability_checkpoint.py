"""Checkpoints load without running code from the pickles, and re-saving a step never leaves a
moment without a whole ``step_N`` on disk."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from dslm.errors import UsageError
from dslm.train import checkpoint as ckpt_io
from dslm.train import distributed as D
from dslm.train.optim import build_optimizer
from dslm.train.schedule import build_scheduler

ENV = D.DistEnv()
META = {"task": "toy", "model_config": {"d": 4}, "global_batch": 2}
EXPECTED = dict(META)


class RunsCode:
    """Unpickling this creates ``path`` (a stand-in for any code run by ``__reduce__``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def parts(seed=0, steps=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = build_optimizer(model, 1e-2, 0.01)
    sched = build_scheduler(opt, 2, 10)
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def save(root, step, model, opt, sched, keep_last=2):
    return ckpt_io.save(root, step, model, opt, sched, ENV, META, {"counters": {"skipped": 1, "consecutive": 0}},
                        keep_last)


def load(path, seed=1):
    model, opt, sched = parts(seed)
    ck, meta, trainer = ckpt_io.load(path, model, opt, sched, ENV, EXPECTED)
    return ck, meta, trainer, model, opt, sched


def test_round_trip_restores_optimizer_scheduler_rng_and_weights(tmp_path):
    model, opt, sched = parts(steps=3)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save(tmp_path, 3, model, opt, sched)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck, meta, trainer, m2, o2, s2 = load(path)
    assert ck == path and meta["step"] == 3 and trainer["counters"] == {"skipped": 1, "consecutive": 0}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    sa, sb = opt.state_dict(), o2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for k in sa["state"] for n in sa["state"][k])
    assert s2.state_dict() == sched.state_dict()
    ckpt_io.set_rng_state(trainer["rng"])
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[:2] == expect[:2] and torch.equal(got[2], expect[2])


@pytest.mark.parametrize("name", ["rng_rank0.pt", "trainer.pt"])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, name):
    path = save(tmp_path / "ck", 1, *parts(steps=1))
    marker = tmp_path / "code_ran"
    payload = torch.load(path / name, weights_only=False)   # our own file
    payload["extra"] = RunsCode(marker)
    torch.save(payload, path / name)
    with pytest.raises(UsageError, match=rf"{name}: refused: it holds (builtins|io)\.open") as e:
        load(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_rng_file_with_a_numpy_array_still_loads(tmp_path):
    """RNG files that hold numpy's state as an array (the earlier layout) load and restore."""
    path = save(tmp_path, 1, *parts(steps=1))
    np.random.seed(11)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expect = np.random.rand(4)
    torch.save(state, path / "rng_rank0.pt")
    *_, trainer = load(path)[:3]
    ckpt_io.set_rng_state(trainer["rng"])
    assert (np.random.rand(4) == expect).all()


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_resave_failing_between_the_renames_keeps_a_whole_checkpoint(tmp_path, monkeypatch):
    first = save(tmp_path, 4, *parts(seed=0, steps=1))
    before = _files(first)
    real = os.replace

    def fail_new_in(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError("disk vanished")
        return real(src, dst)

    monkeypatch.setattr(ckpt_io.os, "replace", fail_new_in)
    with pytest.raises(OSError, match="disk vanished"):
        save(tmp_path, 4, *parts(seed=1, steps=2))
    monkeypatch.setattr(ckpt_io.os, "replace", real)
    # the old step_4 is there (possibly still aside), whole: resolve puts it back and it loads
    ck = ckpt_io.resolve(tmp_path)
    assert ck.name == "step_00000004" and _files(ck) == before
    load(ck)
    assert [p.name for p in ckpt_io.step_dirs(tmp_path)] == ["step_00000004"]
    assert not list(tmp_path.glob(".old-*"))


def test_resave_failing_at_cleanup_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 4, *parts(seed=0, steps=1))
    real = shutil.rmtree

    def fail_old_delete(path, *a, **k):
        if os.path.basename(path).startswith(".old-"):
            raise KeyboardInterrupt   # killed while deleting the old copy
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", fail_old_delete)
    model, opt, sched = parts(seed=1, steps=2)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, model, opt, sched)
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real)
    ck = ckpt_io.resolve(tmp_path)
    m2 = load(ck)[3]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))


def test_resave_replaces_the_step_and_fsyncs(tmp_path, monkeypatch):
    save(tmp_path, 4, *parts(seed=0, steps=1))
    synced = []
    real = os.fsync
    monkeypatch.setattr(ckpt_io.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    model = parts(seed=1, steps=2)
    path = save(tmp_path, 4, *model)
    assert len(synced) >= 5   # weights, trainer, rng, meta, the folder and its parent
    m2 = load(path)[3]
    assert all(torch.equal(a, b) for a, b in zip(model[0].state_dict().values(), m2.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_resumed_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
    """A resumed run drops the records written after its checkpoint through a temp file and a rename:
    a failure before the rename leaves every old record in place."""
    from dslm import files
    from dslm.train.logging import METRICS_FILE, RunLogger

    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in range(1, 7)]
    (tmp_path / METRICS_FILE).write_text("".join(line + "\n" for line in lines))

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        RunLogger(tmp_path, enabled=True, total_steps=10, start_step=4, progress=False, tensorboard=False)
    assert (tmp_path / METRICS_FILE).read_text().splitlines() == lines
    monkeypatch.undo()
    RunLogger(tmp_path, enabled=True, total_steps=10, start_step=4, progress=False, tensorboard=False).close()
    assert (tmp_path / METRICS_FILE).read_text().splitlines() == lines[:4]
