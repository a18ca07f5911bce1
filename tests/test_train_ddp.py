"""Two CPU processes (torchrun, gloo DDP) follow the same loss curve as one process accumulating."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.train.engine import TrainConfig, train
from dslm.train.logging import read_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from train_ddp_worker import tiny_task  # noqa: E402


def test_ddp_two_processes_match_accumulation(tmp_path):
    from dslm.data import ensure_embedded_dataset
    from dslm.data.manifest import read_manifest

    data = ensure_embedded_dataset(tmp_path / "embedded")
    vocab = read_manifest(data)["vocab_size"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "train_ddp_worker.py"), str(data), str(vocab), str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "gloo" in proc.stderr.lower() and "not" in proc.stderr.lower():
        pytest.skip("gloo unavailable")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one process: micro-batch 4 x 2 accumulation steps = the same global batch of 8
    cfg = TrainConfig(out_dir=str(tmp_path / "single"), steps=4, global_batch=8, micro_batch=4, lr=1e-3, warmup=1,
                      precision="fp32", eval_every=0, eval_iters=1, save_every=0, log_every=1, num_workers=0,
                      device="cpu", progress=False)
    train(tiny_task(data, vocab), cfg)
    a, b = read_metrics(tmp_path / "ddp", "train"), read_metrics(tmp_path / "single", "train")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["mlm_acc"] == pytest.approx(rb["mlm_acc"], abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
