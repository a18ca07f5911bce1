"""The training engine on the CPU: schedule, learning, exact resume, accumulation, non-finite steps,
checkpoint errors, logging outputs and the `dslm pretrain` flags."""
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dslm.errors import UsageError
from dslm.model import BertConfig
from dslm.train import checkpoint as ckpt_io
from dslm.train.engine import NonFiniteLoss, TrainConfig, train
from dslm.train.logging import read_metrics
from dslm.pretrain.bert import PretrainTask
from dslm.train.schedule import lr_factor, warmup_steps
from dslm.train.task import Task



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset
    from dslm.data.manifest import read_manifest

    path = ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")
    return path, read_manifest(path)["vocab_size"]


def cfg(out, **kw):
    base = dict(out_dir=str(out), steps=6, global_batch=8, micro_batch=8, lr=1e-3, warmup=1, precision="fp32",
                eval_every=0, eval_iters=1, save_every=0, log_every=1, num_workers=0, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def pretrain_task(data, dropout=0.1, layers=2):
    path, vocab = data
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=2, max_position_embeddings=64,
                        hidden_dropout=dropout, attention_dropout=dropout)
    return PretrainTask(path, config, seq_len=32, seed=7, num_workers=0)


# ---- a toy regression task (loss = mean over items, so any batch split gives the same update) ----
class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=64, poison=()):
        g = torch.Generator().manual_seed(0)
        self.x, self.w = torch.randn(n, 6, generator=g), torch.randn(6, generator=g)
        self.poison = set(poison)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        y = self.x[i] @ self.w
        return {"x": self.x[i], "y": y if i not in self.poison else torch.tensor(float("nan"))}


class ToyTask:
    name = "toy"

    def __init__(self, poison=(), sequential=False):
        self.data, self.sequential = ToyData(poison=poison), sequential

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 1))

    def train_dataset(self):
        return self.data

    def eval_datasets(self):
        return {"valid": ToyData(16)}

    def loss_and_metrics(self, model, batch):
        err = model(batch["x"]).squeeze(-1) - batch["y"]
        return (err ** 2).mean(), {"sq_sum": (err ** 2).sum(), "count": torch.tensor(float(len(err)))}

    def summarize(self, sums):
        return {"mse": sums["sq_sum"] / sums["count"]}


class SequentialToyTask(ToyTask):
    """With its own loader: step s = items [s G, (s + 1) G) in order (modulo the dataset)."""

    def make_loader(self, dataset, batch_size, rank, world_size, start_step, num_steps, train):
        n = len(dataset)
        steps = num_steps if num_steps is not None else n // (batch_size * world_size)
        for s in range(start_step, steps):
            first = (s * world_size + rank) * batch_size
            items = [dataset[i % n] for i in range(first, first + batch_size)]
            yield torch.utils.data.default_collate(items)


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(ckpt_io.step_dirs(Path(out) / "checkpoints")[-1] / "model.safetensors"))


def test_task_protocol():
    assert isinstance(ToyTask(), Task)


def test_schedule_values():
    assert warmup_steps(0.01, 488_281) == 4883
    assert warmup_steps(10, 100) == 10 and warmup_steps(0, 100) == 0
    assert lr_factor(0, 4, 10) == pytest.approx(0.25)
    assert lr_factor(3, 4, 10) == pytest.approx(1.0)
    assert lr_factor(4, 4, 10) == pytest.approx(1.0)
    assert lr_factor(7, 4, 10) == pytest.approx(0.5)
    assert lr_factor(9, 4, 10) == pytest.approx(1 / 6)
    assert lr_factor(10, 4, 10) == 0.0
    assert lr_factor(5, 0, 10) == pytest.approx(0.5)


def test_tiny_bert_learns_and_writes_logs(data, tmp_path):
    out = tmp_path / "run"
    result = train(pretrain_task(data), cfg(out, steps=30, global_batch=16, micro_batch=16, lr=3e-3, warmup=3,
                                            log_every=5, eval_every=15, eval_iters=1))
    rows = read_metrics(out, "train")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] - 1.0
    assert {"mlm_acc", "binary_acc", "lr", "grad_norm", "tokens_per_s", "skipped_steps"} <= set(rows[0])
    assert [r["step"] for r in read_metrics(out, "valid")] == [15, 30] and read_metrics(out, "test")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert set(result) >= {"train", "eval", "steps", "tokens_per_s"} and result["steps"] == 30
    assert set(result["eval"]) == {"valid", "test"} and "ppl" in result["eval"]["valid"]
    ck = Path(result["checkpoint"])
    assert (ck / "config.json").is_file() and (ck / "model.safetensors").is_file()
    from dslm.model import from_pretrained

    assert type(from_pretrained(ck)).__name__ == "BertForPreTraining"


def test_exact_resume(data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(pretrain_task(data), cfg(full, steps=8))
    stopped = train(pretrain_task(data), cfg(part, steps=8, stop_at=4))
    assert stopped["steps"] == 4 and ckpt_io.step_dirs(part / "checkpoints")[-1].name == "step_00000004"
    train(pretrain_task(data), cfg(part, steps=8, load=str(part)))
    a, b = read_metrics(full, "train"), read_metrics(part, "train")
    assert [r["step"] for r in b] == list(range(1, 9))  # the resumed log continues without duplicates
    assert b[-1]["loss"] == a[-1]["loss"]
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_accumulation_equivalence(tmp_path):
    train(ToyTask(), cfg(tmp_path / "a", steps=5, global_batch=16, micro_batch=16))
    train(ToyTask(), cfg(tmp_path / "b", steps=5, global_batch=16, micro_batch=4))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    la, lb = read_metrics(tmp_path / "a", "train"), read_metrics(tmp_path / "b", "train")
    assert [r["mse"] for r in la] == pytest.approx([r["mse"] for r in lb], rel=1e-5)


def test_nonfinite_steps_are_skipped(tmp_path):
    # items 16..23 = step 2 (global batch 8) carry NaN targets: that step is skipped, the others train
    clean = train(SequentialToyTask(), cfg(tmp_path / "clean", steps=2, save_every=0))
    result = train(SequentialToyTask(poison=range(16, 24)), cfg(tmp_path / "bad", steps=4))
    rows = read_metrics(tmp_path / "bad", "train")
    assert result["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1
    assert math.isnan(rows[2]["grad_norm"]) and math.isfinite(rows[3]["loss"])
    # the skipped step changed nothing: 3 good steps of the poisoned run = clean steps 1, 2 and step 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "bad").values())
    assert clean["steps"] == 2


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    # bad from step 2 on; the flag is read one step late, so the stop comes at step 5, and the checkpoint
    # written there counts step 5 too
    with pytest.raises(NonFiniteLoss, match=r"step 5: 4 consecutive steps.*\(4 skipped in all\).*last good weights are in .*step_00000005"):
        train(SequentialToyTask(poison=range(8, 64)), cfg(tmp_path / "bad", steps=8, max_bad_steps=3))


def test_corrupt_checkpoint_is_a_one_line_error(data, tmp_path):
    out = tmp_path / "run"
    train(ToyTask(), cfg(out, steps=2))
    ck = ckpt_io.step_dirs(out / "checkpoints")[-1]
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UsageError, match="model.safetensors: corrupt") as e:
        train(ToyTask(), cfg(tmp_path / "r2", steps=4, load=str(out)))
    assert "\n" not in str(e.value)
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(UsageError, match="meta.json: corrupt"):
        train(ToyTask(), cfg(tmp_path / "r2", steps=4, load=str(ck)))
    with pytest.raises(UsageError, match="no checkpoint"):
        train(ToyTask(), cfg(tmp_path / "r2", steps=4, load=str(tmp_path)))
    # another model's checkpoint
    train(pretrain_task(data, layers=1), cfg(tmp_path / "one", steps=1))
    with pytest.raises(UsageError, match="incompatible model_config: num_layers"):
        train(pretrain_task(data, layers=2), cfg(tmp_path / "r3", steps=2, load=str(tmp_path / "one")))


def test_keep_last_checkpoints(tmp_path):
    train(ToyTask(), cfg(tmp_path / "k", steps=6, save_every=1, keep_last=2))
    assert [p.name for p in ckpt_io.step_dirs(tmp_path / "k" / "checkpoints")] == ["step_00000005", "step_00000006"]
    assert not list((tmp_path / "k" / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--global-batch", "10", "--micro-batch", "4"], "--global-batch 10 is not a multiple of --micro-batch 4"),
    (["--heads", "3"], "num_heads=3 does not divide"),
    (["--precision", "fp8"], "invalid choice"),
    (["--eval-iters", "x"], "--eval-iters"),
])
def test_bad_flags_one_line_exit_2(data, tmp_path, capsys, argv, message):
    from dslm.cli import main

    rc = main(["pretrain", "--preset", "tiny", "--data", str(data[0]), "--out-dir", str(tmp_path), "--device", "cpu",
               "--steps", "1", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("dslm pretrain: error:")


def test_pretrain_cli_tiny(data, tmp_path, capsys):
    from dslm.cli import main

    out = tmp_path / "cli"
    rc = main(["pretrain", "--preset", "tiny", "--data", str(data[0]), "--out-dir", str(out), "--device", "cpu",
               "--steps", "4", "--layers", "1", "--hidden", "32", "--seq-len", "32", "--eval-every", "2",
               "--no-progress", "--num-workers", "0"])
    assert rc == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 4 and "valid" in final["eval"]
    config = json.loads((Path(final["checkpoint"]) / "config.json").read_text())
    assert config["num_layers"] == 1 and config["hidden_size"] == 32


def test_a_skipped_step_does_not_poison_its_logging_interval(tmp_path):
    """log_every 4 with step 3 non-finite: the interval's loss and metric are the 3 good steps'."""
    train(SequentialToyTask(poison=range(16, 24)), cfg(tmp_path, steps=4, log_every=4))
    (row,) = read_metrics(tmp_path, "train")
    assert row["skipped_steps"] == 1
    assert math.isfinite(row["loss"]) and math.isfinite(row["mse"])


def test_skipped_step_at_a_checkpoint_is_counted_after_resume(tmp_path):
    full = train(SequentialToyTask(poison=range(8, 16)), cfg(tmp_path / "full", steps=4))
    train(SequentialToyTask(poison=range(8, 16)), cfg(tmp_path / "part", steps=4, stop_at=2))
    resumed = train(SequentialToyTask(poison=range(8, 16)), cfg(tmp_path / "part", steps=4, load=str(tmp_path / "part")))
    assert full["skipped_steps"] == resumed["skipped_steps"] == 1


def test_fallback_eval_loss_is_a_per_item_mean(tmp_path):
    """17 eval items in batches of 4 (the last holds 1): the engine's loss equals the task's mse."""
    class Uneven(ToyTask):
        def eval_datasets(self):
            return {"valid": ToyData(17)}

    result = train(Uneven(), cfg(tmp_path, steps=2, eval_iters=None, eval_batch=4))
    valid = result["eval"]["valid"]
    assert valid["loss"] == pytest.approx(valid["mse"], rel=1e-6)


def test_pretraining_eval_reads_every_sample_once(data):
    """Evaluation is one full pass: every stored sample once, the last batch short, on any number of
    ranks; a cap of k batches reads the first k."""
    task = pretrain_task(data)
    valid = task.eval_datasets()["valid"]
    n = len(valid)
    batch = next(b for b in range(5, 20) if n % b and 0 < n % (4 * b) <= 3 * b)   # short, misses rank 3
    batches = list(task.make_loader(valid, batch, 0, 1, 0, None, False))
    assert len(batches) == -(-n // batch) and len(batches[-1]["input_ids"]) == n % batch
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), valid.get_batch(range(n))["input_ids"])
    per_rank = [list(task.make_loader(valid, batch, rank, 4, 0, None, False)) for rank in range(4)]
    assert sum(len(b["input_ids"]) for bs in per_rank for b in bs) == n
    assert len(per_rank[0]) == len(per_rank[3]) + 1   # the last global batch does not reach rank 3
    assert len(list(task.make_loader(valid, batch, 0, 1, 0, 2, False))) == 2


@pytest.mark.parametrize("workers, to_group", [(0, False), (1, True)])
def test_sigterm_writes_a_checkpoint_exits_143_and_resumes(data, tmp_path, workers, to_group):
    """A SIGTERM mid-run (as torchrun or a scheduler sends it) finishes the step, writes a checkpoint
    and exits 128 + 15 (checkpointed, not finished: a && chain stops); --load continues from that
    step, and a planned --stop-at exits 0. Sent to the whole process group (as `timeout`, Slurm and
    Kubernetes do), the data-loader worker leaves it to the main process."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "dslm", "pretrain", "--preset", "tiny", "--data", str(data[0]), "--out-dir",
            str(out), "--device", "cpu", "--layers", "1", "--hidden", "32", "--seq-len", "32", "--eval-every", "0",
            "--log-every", "1", "--no-progress", "--num-workers", str(workers), "--steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=to_group)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (
                (out / "metrics.jsonl").is_file() and len(read_metrics(out, "train")) >= 3):
            time.sleep(0.2)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if to_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM" in stdout and "Traceback" not in stderr
    step = max(r["step"] for r in read_metrics(out, "train"))
    assert ckpt_io.step_dirs(out / "checkpoints")[-1].name == f"step_{step:08d}"
    resumed = subprocess.run(args + ["--load", str(out), "--stop-at", str(step + 2)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(out, "train")) == step + 2


def test_eval_iters_count_global_batches_whatever_the_micro_batch(tmp_path):
    """--eval-iters 2 with global batch 8 reads 16 eval items for micro-batch 8 and for 4 x 2."""
    from dslm.train.engine import evaluate

    class Counting(ToyTask):
        def eval_datasets(self):
            return {"valid": ToyData(64)}

        def summarize(self, sums):
            return {"items": sums["count"]}

    task = Counting()
    model = task.build_model()
    for micro in (8, 4):
        result = evaluate(task, model, task.eval_datasets(), cfg(tmp_path, micro_batch=micro, eval_iters=2))
        assert result["valid"]["items"] == 16


def test_resuming_an_older_checkpoint_next_to_a_newer_one_is_refused(tmp_path, capsys):
    train(SequentialToyTask(), cfg(tmp_path, steps=4, save_every=2, keep_last=3))
    older = ckpt_io.step_dirs(tmp_path / "checkpoints")[0]
    with pytest.raises(UsageError, match="already holds a later checkpoint .step_00000004"):
        train(SequentialToyTask(), cfg(tmp_path, steps=4, save_every=2, load=str(older)))


@pytest.mark.parametrize("scale", [0.01, 100.0])   # gradient norm below / far above max_norm = 1
def test_clipping_folded_into_fused_adamw_equals_clip_then_step(scale):
    """clip_grad_norm(params, 1, fused_optimizer) leaves the gradients alone and has the optimizer's
    kernel divide them by max(1, (norm + 1e-6) / max_norm): the same update as
    torch.nn.utils.clip_grad_norm_ followed by the step."""
    from dslm.train.optim import build_optimizer, clip_grad_norm

    results = []
    for fold in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3))
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.01, fused=True)
        params = list(model.parameters())
        for _ in range(3):
            (model(torch.randn(8, 6)).square().sum() * scale).backward()
            raw = [p.grad.clone() for p in params]
            norm = clip_grad_norm(params, 1.0, opt if fold else None)
            assert norm == pytest.approx(torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])).item(),
                                         rel=1e-5)
            if fold:
                assert all(torch.equal(p.grad, g) for p, g in zip(params, raw))     # left to the kernel
                assert opt.grad_scale.item() == pytest.approx(max(1.0, norm.item() + 1e-6))
            opt.step()
            opt.zero_grad()
            opt.grad_scale = None
        results.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-7)
    # a non-fused optimizer gets the gradients clipped in place
    model = nn.Linear(6, 3)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0, fused=False)
    (model(torch.randn(8, 6)).square().sum() * 100).backward()
    clip_grad_norm(list(model.parameters()), 1.0, opt)
    assert getattr(opt, "grad_scale", None) is None
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("field, value, flag", [("keep_last", 0, "--keep-last 0"), ("eval_batch", 0, "--eval-batch 0"),
                                                ("stop_at", 0, "--stop-at 0"), ("save_every", -1, "--save-every -1")])
def test_flags_that_would_lose_work_or_mean_nothing_are_refused(tmp_path, field, value, flag):
    """The library names the config field, the CLI the flag."""
    from dslm.errors import ConfigError
    from dslm.train.engine import validate

    with pytest.raises(ConfigError, match=f"^{field} {value}: must be") as e:
        validate(cfg(tmp_path, **{field: value}))
    assert e.value.for_cli().startswith(f"{flag}: must be")
    validate(cfg(tmp_path, **{field: 1}))


def test_a_fresh_run_does_not_take_over_another_runs_folder(tmp_path):
    """Without --load, an --out-dir that holds a run is refused (its checkpoints and metrics stay as
    they were); --overwrite replaces it."""
    from dslm.train.engine import claim_run_dir

    run = tmp_path / "run"
    claim_run_dir(run, overwrite=False)            # nothing there: fine
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    (run / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(UsageError, match=r"already holds a run \(checkpoints, metrics.jsonl\); resume it with load"):
        claim_run_dir(run, overwrite=False)
    assert (run / "checkpoints" / "step_00000010").is_dir() and (run / "metrics.jsonl").is_file()
    claim_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["vocab.txt"]
