"""`dslm figures --arch gpt`: the decoder at the small CPU preset (96 layers, d 256, L 128, batch 8),
xavier and dslm, end to end; its next-token batch; BERT stays the default.

Tolerances (measured dslm forward variance, Pre-LN: [0.992, 1.066] at seed 1234, [0.966, 1.026]
and [0.962, 1.117] at seeds 1 and 2; Post-LN: [0.990, 1.014], [0.988, 1.014], [0.989, 1.009]):
- dslm Pre-LN: the stream is lam x + beta block, so every layer's block adds its own draw of
  weights; at d 256 one layer's block variance fluctuates by ~10 % and the stream keeps a
  geometric memory of ~N layers of them, so the stream drifts a few % off 1: band 1 +- 0.15.
- dslm Post-LN: the stream is lam b + beta block with b = LN(h) of unit variance per token, so its
  variance is lam^2 + beta^2 var(block) and a block's fluctuation reaches it times beta^2 = 1/96:
  band 1 +- 0.03.
- prediction against measurement: forward variance within the same relative errors (the
  prediction is 1.000 +- 0.002); correlation within 0.1 absolute (measured max |error| 0.03-0.05
  Pre-LN, 0.03-0.06 Post-LN over the three seeds, at correlations up to 0.61); xavier Pre-LN's
  linear growth (to ~177 at layer 96) with R^2 > 0.98 and every layer within 15 % (measured 8 %).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dslm import figures
from dslm.cli import main

SMALL = ["--arch", "gpt", "--preset", "small", "--device", "cpu", "--quiet"]
PNGS = ("preln_forward.png", "preln_backward.png", "postln_forward.png", "postln_backward.png",
        "correlation.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")


@pytest.fixture(scope="module")
def records(tmp_path_factory, data_dir):
    """init -> (folder, signal_propagation.json) of the small preset."""
    out = {}
    for init, extra in (("xavier", []), ("dslm", ["--r0", "auto"])):
        folder = tmp_path_factory.mktemp(init)
        assert main(["figures", "--init", init, "--out", str(folder), "--data", str(data_dir),
                     *SMALL, *extra]) == 0
        out[init] = folder, json.loads((folder / "signal_propagation.json").read_text())
    return out


def _run(record, ln) -> dict:
    [run] = [r for r in record["runs"] if r["ln"] == ln]
    return run


@pytest.mark.parametrize("init", ["xavier", "dslm"])
def test_small_preset_writes_the_figures_and_the_record(records, init):
    folder, record = records[init]
    for name in PNGS:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert record["arch"] == "gpt" and record["preset"] == "small"
    assert [r["ln"] for r in record["runs"]] == ["pre", "post"]
    for run in record["runs"]:
        c = run["config"]
        assert c["tie_word_embeddings"] is True and "type_vocab_size" not in c
        assert (c["num_layers"], c["hidden_size"], c["max_position_embeddings"]) == (96, 256, 128)
        assert run["batch"] == {"sequences": 8, "seq_len": 128, "real_tokens": 1024, "mean_length": 128.0}
        for key in ("forward_variance", "correlation", "grad_norm"):
            assert len(run[key]) == len(run["predicted_" + key]) == 96
            assert np.isfinite(run[key]).all() and np.isfinite(run["predicted_" + key]).all()
        assert 8.0 < run["loss"] < 10.0   # next-token loss at init: about ln(8192 tokens) = 9.0
    if init == "dslm":   # --r0 auto: measured on the decoder's word + position embeddings
        assert all(0 < r["config"]["r0"] < 0.1 for r in record["runs"])


@pytest.mark.parametrize("ln, band", [("pre", 0.15), ("post", 0.03)])
def test_dslm_keeps_the_decoder_stream_at_unit_variance(records, ln, band):
    run = _run(records["dslm"][1], ln)
    measured = np.array(run["forward_variance"])
    assert np.abs(measured - 1).max() < band, measured
    assert run["agreement"]["forward_variance"]["max_rel_error"] < band
    err = np.abs(np.array(run["predicted_correlation"]) - run["correlation"])
    assert err.max() < 0.1, err
    assert run["correlation"][-1] > 5 * run["correlation"][0]   # the stream correlates with depth


def test_xavier_pre_ln_variance_grows_as_predicted(records):
    run = _run(records["xavier"][1], "pre")
    assert run["forward_variance"][-1] > 100 * run["forward_variance"][0]
    a = run["agreement"]["forward_variance"]
    assert a["r2"] > 0.98 and a["max_rel_error"] < 0.15, a


def test_the_batch_is_next_token_windows(data_dir):
    from dslm.figures.decoder import next_token_windows

    batch, vocab = next_token_windows(data_dir, seq_len=64, batch=5, seed=3)
    assert set(batch) == {"input_ids", "targets"} and batch["input_ids"].shape == (5, 64)
    assert (batch["targets"][:, :-1] == batch["input_ids"][:, 1:]).all()
    assert int(batch["input_ids"].max()) < vocab == 8192
    again, _ = next_token_windows(data_dir, seq_len=64, batch=5, seed=3)
    other, _ = next_token_windows(data_dir, seq_len=64, batch=5, seed=4)
    assert (again["input_ids"] == batch["input_ids"]).all() and (other["input_ids"] != batch["input_ids"]).any()


def _parsed(argv):
    parser = argparse.ArgumentParser()
    figures.add_arguments(parser)
    return parser.parse_args(argv)


def test_bert_is_the_default_and_gpt_has_its_own_folder():
    assert _parsed([]).arch == "bert"
    assert figures._out(_parsed(["--init", "dslm"])) == Path("outputs/figures/dslm")
    assert figures._out(_parsed(["--arch", "gpt", "--init", "dslm"])) == Path("outputs/figures/gpt/dslm")
    args = _parsed(["--arch", "gpt", "--preset", "small", "--layers", "4", "--seq-len", "32"])
    figures._resolve(args, torch.device("cpu"))
    c = figures._config(args, "post", vocab_size=100)
    assert (type(c).__name__, c.causal, c.embedding_tables, c.max_position_embeddings) == ("GPTConfig", True, 2, 32)
