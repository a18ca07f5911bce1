"""The Trainer's public steps: a loop of one's own over ``train_step`` / ``train_metrics`` /
``evaluate`` / ``save`` / ``load`` reproduces :func:`train` exactly (CPU, fp32, dropout on,
gradient accumulation)."""
import os
import signal

import pytest
import torch

from dslm.train import checkpoint as ckpt_io
from dslm.train import distributed as D
from dslm.train.engine import Trainer, train
from dslm.train.logging import read_metrics
import test_train_engine
from test_train_engine import SequentialToyTask, cfg, pretrain_task, weights

data = test_train_engine.data   # the module's fixture: the embedded dataset, prepared once
STEPS = 5


def own_loop(task, config):
    """Every step by hand, metrics read after each one (train's log_every=1)."""
    trainer = Trainer(task, config, D.setup(config.device))
    batches = trainer.train_batches()
    losses = []
    while trainer.step < trainer.total:
        trainer.train_step(batches)
        losses.append(trainer.train_metrics()["loss"])
    return trainer, losses


def test_train_step_reproduces_train(data, tmp_path):
    config = dict(steps=STEPS, global_batch=8, micro_batch=4)      # 2 micro-steps per step
    result = train(pretrain_task(data), cfg(tmp_path / "train", **config))
    trainer, losses = own_loop(pretrain_task(data), cfg(tmp_path / "own", **config))
    assert trainer.accum == 2 and trainer.skipped == 0
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "train", "train")]
    assert losses[-1] == result["train"]["loss"]
    saved = weights(tmp_path / "train")
    own = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert set(saved) <= set(own) and all(torch.equal(saved[k], own[k]) for k in saved)


def test_evaluate_matches_the_final_metrics_of_train(data, tmp_path):
    result = train(pretrain_task(data), cfg(tmp_path / "train", steps=STEPS, eval_iters=2))
    trainer, _ = own_loop(pretrain_task(data), cfg(tmp_path / "own", steps=STEPS, eval_iters=2))
    assert set(result["eval"]) == {"valid", "test"}
    assert trainer.evaluate() == result["eval"]
    assert trainer.evaluate({"valid": trainer.eval_sets["valid"]}) == {"valid": result["eval"]["valid"]}
    # a Trainer restored from train()'s final checkpoint evaluates to the same numbers
    loaded = Trainer(pretrain_task(data), cfg(tmp_path / "loaded", steps=STEPS, eval_iters=2,
                                              load=result["checkpoint"]), D.setup("cpu"))
    assert loaded.step == STEPS and loaded.evaluate() == result["eval"]


def test_save_and_load_continue_the_same_steps(tmp_path):
    """save() mid-run, a fresh Trainer load()s it and its steps equal the uninterrupted ones."""
    full, _ = own_loop(SequentialToyTask(), cfg(tmp_path / "full", steps=6))
    first = Trainer(SequentialToyTask(), cfg(tmp_path / "part", steps=6), D.setup("cpu"))
    batches = first.train_batches()
    for _ in range(3):
        first.train_step(batches)
    path = first.save()
    assert path.name == "step_00000003" and ckpt_io.step_dirs(tmp_path / "part" / "checkpoints") == [path]
    second = Trainer(SequentialToyTask(), cfg(tmp_path / "part", steps=6), D.setup("cpu"))
    assert second.load(path) == 3
    batches = second.train_batches()
    while second.step < second.total:
        second.train_step(batches)
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_train_step_takes_a_list_of_micro_batches_and_refuses_too_few(tmp_path):
    trainer = Trainer(SequentialToyTask(), cfg(tmp_path, steps=2, global_batch=8, micro_batch=4), D.setup("cpu"))
    batches = trainer.train_batches()
    step = [next(batches), next(batches)]
    assert float(trainer.train_step(step)) == 0.0 and trainer.step == 1
    with pytest.raises(RuntimeError, match="loader ended at step 1"):
        trainer.train_step(step[:1])


class SignalledDuringEval(SequentialToyTask):
    """Sends this process a SIGTERM from inside its first evaluation forward (a preemption that
    lands during the final evaluation)."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def loss_and_metrics(self, model, batch):
        if self.armed and not model.training:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss_and_metrics(model, batch)


def test_a_signal_during_the_final_evaluation_checkpoints_and_resumes(tmp_path):
    """The evaluation ends at its next batch, the checkpoint of the last step is written and the run
    reports the signal (exit 143 from the CLI); --load then runs only the final evaluation, which
    equals that of an uninterrupted run."""
    config = dict(steps=6, eval_iters=None, eval_batch=4)       # 16 valid items: 4 batches
    full = train(SequentialToyTask(), cfg(tmp_path / "full", **config))
    stopped = train(SignalledDuringEval(), cfg(tmp_path / "run", **config))
    assert stopped["stopped"] == "SIGTERM" and stopped["steps"] == 6 and stopped["eval"] == {}
    assert ckpt_io.step_dirs(tmp_path / "run" / "checkpoints")[-1].name == "step_00000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL       # the run's handler is gone
    resumed = train(SequentialToyTask(), cfg(tmp_path / "run", load=str(tmp_path / "run"), **config))
    assert "stopped" not in resumed and resumed["eval"] == full["eval"]
