"""dslm pretrain --grad-profile: per-layer signal profiles at init and after training, taken without
changing the run (same losses as the run without it)."""
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def embedded_data(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")


def _run(out, data, *extra):
    cmd = [sys.executable, "-m", "dslm", "pretrain", "--preset", "tiny", "--layers", "3", "--hidden", "32",
           "--heads", "2", "--seq-len", "32", "--global-batch", "8", "--steps", "12", "--eval-every", "12",
           "--device", "cpu", "--no-progress", "--num-workers", "0", "--init", "dslm", "--data", str(data),
           "--out-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "train"]
    return json.loads((out / "final_metrics.json").read_text()), losses


def test_grad_profile_at_init_and_end_leaves_training_unchanged(tmp_path, embedded_data):
    plain, plain_losses = _run(tmp_path / "a", embedded_data)
    profiled, losses = _run(tmp_path / "b", embedded_data, "--grad-profile")
    assert "grad_profile" not in plain and losses == plain_losses and len(losses) > 0
    assert profiled["eval"]["valid"]["mlm_loss"] == plain["eval"]["valid"]["mlm_loss"]
    prof = profiled["grad_profile"]
    for when in ("init", "final"):
        p = prof[when]
        assert len(p["grad_norm"]) == len(p["forward_variance"]) == len(p["correlation"]) == 3
        assert set(p["grad_norms"]) == {"q", "k", "v", "attn_out", "ffn_in", "ffn_out"}
        assert all(g > 0 for g in p["grad_norm"])
    assert prof["final"]["grad_norm"] != prof["init"]["grad_norm"]
    assert prof["final"]["loss"] < prof["init"]["loss"]
