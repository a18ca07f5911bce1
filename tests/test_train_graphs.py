"""`--cuda-graphs`: the captured step must train exactly like the eager engine (GPU tests, skipped on a
CPU-only machine), and asking for it where it cannot work is a one-line error (CPU)."""
import pytest
import torch
from safetensors.torch import load_file

from dslm.errors import UsageError
from dslm.model import BertConfig
from dslm.train.engine import TrainConfig, train
from dslm.train.logging import read_metrics
from dslm.pretrain.bert import PretrainTask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset
    from dslm.data.manifest import read_manifest

    path = ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")
    return path, read_manifest(path)["vocab_size"]


def task(data, dropout=0.0, layers=3):
    path, vocab = data
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=2, max_position_embeddings=64,
                        hidden_dropout=dropout, attention_dropout=dropout)
    return PretrainTask(path, config, seq_len=32, seed=7, num_workers=0)


def cfg(out, **kw):
    base = dict(out_dir=str(out), steps=10, global_batch=16, micro_batch=8, lr=5e-3, warmup=2, precision="fp32",
                eval_every=5, eval_iters=1, save_every=0, log_every=1, num_workers=0, device="cuda", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def final_weights(out):
    return load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_match_eager_steps(data, tmp_path, precision):
    # no dropout: both runs do the same arithmetic; 2 micro-steps per step exercise accumulation into
    # the persistent gradients, the schedule exercises the lr copied into the captured optimizer
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    train(task(data), cfg(eager, precision=precision))
    train(task(data), cfg(graphed, precision=precision, cuda_graphs=True))
    a, b = read_metrics(eager, "train"), read_metrics(graphed, "train")
    assert [r["step"] for r in b] == list(range(1, 11))
    tol = 1e-5 if precision == "fp32" else 2e-2
    for ra, rb in zip(a, b):
        assert rb["lr"] == ra["lr"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=tol)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=10 * tol)
    assert b[-1]["loss"] < b[0]["loss"]
    wa, wb = final_weights(eager), final_weights(graphed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=10 * tol, rtol=10 * tol)
    va, vb = read_metrics(eager, "valid"), read_metrics(graphed, "valid")
    assert [r["step"] for r in vb] == [5, 10] and vb[-1]["mlm_loss"] == pytest.approx(va[-1]["mlm_loss"], rel=10 * tol)


@cuda
def test_graphed_dropout_draws_fresh_masks_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    stopped = train(task(data, dropout=0.1), cfg(out, precision="bf16", cuda_graphs=True, stop_at=6))
    assert stopped["steps"] == 6
    result = train(task(data, dropout=0.1), cfg(out, precision="bf16", cuda_graphs=True, load=str(out)))
    rows = read_metrics(out, "train")
    assert result["steps"] == 10 and [r["step"] for r in rows] == list(range(1, 11))
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert len(set(losses)) == len(losses)   # replays do not repeat the captured step's masks and data


def test_cuda_graphs_need_one_gpu_process(data, tmp_path):
    with pytest.raises(UsageError, match="cuda_graphs needs one process on a CUDA device"):
        train(task(data), cfg(tmp_path / "cpu", device="cpu", cuda_graphs=True))


def test_cuda_graphs_and_compile_are_exclusive(data, tmp_path):
    with pytest.raises(UsageError, match="cuda_graphs cannot be combined with compile"):
        train(task(data), cfg(tmp_path / "both", device="cpu", cuda_graphs=True, compile=True))
