"""The fault sweep's classifier (benchmarks/fault_sweep.py): a few of its fastest cases through its
own runner, hand-made results for the outcomes the real cases rarely produce, and the pickle
payload its checkpoint cases plant (it must run code when loaded unsafely, or those cases prove
nothing). The whole sweep is a benchmark, not a test."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_sweep():
    spec = importlib.util.spec_from_file_location("fault_sweep", ROOT / "benchmarks" / "fault_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_sweep"] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fs = _load_sweep()
CASES = {case.name: case for case in fs.all_cases()}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "logs").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["prepare_workers_negative", "approximations_points_0", "approximations_out_is_file",
                                  "approximations_points_3"])
def test_fast_cases_classify_as_expected(root, name):
    record = fs.run_case(CASES[name], root)
    assert record["outcome"] == record["expected"], record
    if record["expected"] == "clean_error":
        assert record["exit_code"] != 0 and record["last_stderr_line"].startswith("dslm ")


def test_a_failed_post_condition_is_data_lost(root):
    """approximations.json is rewritten by the command; a check that it must survive catches it."""
    case = fs.Case("overwritten", ["approximations", "--out", "out", "--points", "3"], "worked",
                   fs.files(out__approximations_dot_json="mine"), fs.unchanged("out/approximations.json"))
    record = fs.run_case(case, root)
    assert record["outcome"] == "data_lost"
    assert record["problem"].startswith("out/approximations.json changed")


def _result(code, stderr="", stdout="", timed_out=False):
    return fs.Result(code, stdout, stderr, timed_out, 1.0)


@pytest.mark.parametrize("expected, result, problem, outcome", [
    ("clean_error", _result(2, "dslm pretrain: error: --steps 0: must be >= 1\n"), None, "clean_error"),
    ("clean_error", _result(1, "Traceback (most recent call last):\n  ...\nValueError: x\n"), None, "traceback"),
    ("clean_error", _result(None, timed_out=True), None, "hang"),
    ("clean_error", _result(0), "run exists", "accepted"),
    ("clean_error", _result(2, "dslm pretrain: error: bad\n"), "run changed", "data_lost"),
    ("clean_error", _result(-9, "Killed\n"), None, "failed"),
    ("worked", _result(2, "dslm pretrain: error: bad\n"), None, "failed"),
    ("worked", _result(0, "a warning\n"), "PWNED exists", "data_lost"),
])
def test_classify(expected, result, problem, outcome):
    assert fs.classify(expected, result, problem) == outcome


def test_classify_a_signal_stop():
    message = "received SIGTERM: stopped at step 5 after writing run/checkpoints/step_00000005; resume with --load run"
    assert fs.classify("stopped", _result(143, stdout=message), None, stop_signal=15) == "stopped"
    assert fs.classify("stopped", _result(0, stdout="final metrics: x"), None, stop_signal=15) == "failed"
    assert fs.classify("stopped", _result(143, stdout=message), "run: no checkpoint", stop_signal=15) == "data_lost"


def test_the_pickle_payload_runs_code_when_loaded_unsafely(tmp_path):
    fs.malicious_pickle(tmp_path / "rng_rank0.pt", tmp_path / "PWNED")
    torch.load(tmp_path / "rng_rank0.pt", weights_only=False)
    assert (tmp_path / "PWNED").exists()


def test_checkpoint_problem_finds_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    step = tmp_path / "step_00000001"
    step.mkdir()
    save_file({"w": torch.zeros(64)}, str(step / "model.safetensors"))
    for name in ("trainer.pt", "rng_rank0.pt"):
        torch.save({"x": torch.ones(3)}, step / name)
    for name in ("config.json", "meta.json"):
        (step / name).write_text("{}")
    assert fs.checkpoint_problem(step) is None
    fs.truncate(step / "model.safetensors", 0.9)
    assert "model.safetensors" in fs.checkpoint_problem(step)
