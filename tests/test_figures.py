"""`dslm figures` end to end on a tiny preset (PNGs + JSON with every key), and bad flags."""
import json

import pytest

from dslm.cli import main

TINY = ["--preset", "small", "--layers", "4", "--hidden", "32", "--heads", "4", "--seq-len", "32",
        "--batch", "4", "--micro-batch", "2", "--device", "cpu", "--quiet"]


# signal_propagation.json's keys: docs/figures.md, replot and the plots read them
RECORD_KEYS = {"command", "arch", "init", "preset", "settings", "seed", "device", "device_name", "torch", "data",
               "peak_memory_gib", "runs", "total_seconds", "notes"}
SETTINGS_KEYS = {"layers", "hidden", "heads", "seq_len", "batch", "micro_batch", "dropout", "lam2", "beta2",
                 "preset", "r0"}
CURVES = ("forward_variance", "correlation", "grad_norm", "grad_norms", "grad_variance", "grad_correlation",
          "embedding_variance")
RUN_KEYS = {"init", "ln", "config", "batch", "r0_input", *CURVES, *("predicted_" + c for c in CURVES),
            "predicted_grad_norm_relative", "grad_norm_scale", "loss", "agreement", "summary", "seconds"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dslm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded")


@pytest.mark.parametrize("init", ["xavier", "dslm"])
def test_figures_end_to_end(tmp_path, data_dir, init, capsys):
    out = tmp_path / init
    extra = ["--r0", "auto"] if init == "dslm" else []
    assert main(["figures", "--init", init, "--out", str(out), "--data", str(data_dir), *TINY, *extra]) == 0
    for name in ("preln_forward.png", "preln_backward.png", "postln_forward.png",
                 "postln_backward.png", "correlation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    record = json.loads((out / "signal_propagation.json").read_text())
    assert set(record) == RECORD_KEYS and set(record["settings"]) == SETTINGS_KEYS
    assert [r["ln"] for r in record["runs"]] == ["pre", "post"]
    for run in record["runs"]:
        assert set(run) == RUN_KEYS
        assert set(run["grad_norms"]) == set(run["predicted_grad_norms"]) == {"q", "k", "v", "attn_out",
                                                                               "ffn_in", "ffn_out"}
        scale = run["grad_norm_scale"]
        assert run["predicted_grad_norm"] == pytest.approx([scale * g for g in run["predicted_grad_norm_relative"]])
        assert run["init"] == init and run["config"]["num_layers"] == 4
        for key in ("forward_variance", "predicted_forward_variance", "correlation",
                    "predicted_correlation", "grad_norm", "predicted_grad_norm"):
            assert len(run[key]) == 4, key
        for curve in ("forward_variance", "correlation", "grad_norm"):
            assert set(run["agreement"][curve]) >= {"r2", "max_rel_error"}
    if init == "dslm":
        assert record["runs"][0]["config"]["r0"] != 0.221       # measured on the batch
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]   # no temporary file left
    assert "Pre-LN" in capsys.readouterr().out


def test_one_placement(tmp_path, data_dir):
    out = tmp_path / "pre"
    assert main(["figures", "--out", str(out), "--data", str(data_dir), "--placements", "pre", *TINY]) == 0
    assert (out / "preln_backward.png").exists() and not (out / "postln_backward.png").exists()


def test_deepnorm_draws_post_ln_only(tmp_path, data_dir, capsys):
    out = tmp_path / "deepnorm"
    assert main(["figures", "--init", "deepnorm", "--out", str(out), "--data", str(data_dir), *TINY]) == 0
    for name in ("postln_forward.png", "postln_backward.png", "correlation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob("preln_*"))
    record = json.loads((out / "signal_propagation.json").read_text())
    [run] = record["runs"]
    assert run["ln"] == "post" and run["init"] == "deepnorm"
    # 4 layers: the stream after each layer is ~alpha^2 = sqrt(8), measured and predicted
    alpha2 = 8 ** 0.5
    for key in ("forward_variance", "predicted_forward_variance"):
        assert len(run[key]) == 4 and all(abs(v / alpha2 - 1) < 0.05 for v in run[key]), key
    assert run["agreement"]["forward_variance"]["max_rel_error"] < 0.05
    assert "deepnorm Post-LN" in capsys.readouterr().out
    assert main(["figures", "--init", "deepnorm", "--placements", "pre", "--out", str(tmp_path / "x"),
                 "--data", str(data_dir), *TINY]) == 2
    err = capsys.readouterr().err
    assert "Post-LN scheme" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, words", [
    (["--heads", "5"], "does not divide"),
    (["--dropout", "1.0"], "--dropout"),
    (["--init", "kaiming"], "invalid choice"),
    (["--r0", "2"], "--r0"),
    (["--lam2", "0.9"], "--init dslm only"),
    (["--placements", "middle"], "invalid choice"),
    (["--ffn", "0"], "ffn_size must be a positive integer"),
    (["--dslm-mode", "sideways"], "invalid choice"),
    (["--dslm-k", "two"], "--dslm-k"),
    (["--activation", "tanh"], "invalid choice"),
    (["--ln", "pre"], "unrecognized arguments: --ln"),      # --placements chooses the LayerNorms
    (["--batch", "0"], "--batch must be positive"),
    (["--seq-len", "4"], "--seq-len must be >= 8"),
])
def test_bad_flags_one_line_exit_2(tmp_path, flags, words, capsys):
    argv = ["figures", "--out", str(tmp_path / "x"), *TINY]
    # later flags win in argparse: put the bad one last
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and err.startswith("dslm figures: error:"), err
    assert not (tmp_path / "x").exists()


def test_shared_model_flags_reach_the_record(tmp_path, data_dir):
    out = tmp_path / "flags"
    assert main(["figures", "--out", str(out), "--data", str(data_dir), *TINY, "--placements", "post",
                 "--init", "dslm", "--dslm-mode", "init", "--ffn", "48", "--dslm-k", "2", "--activation", "gelu"]) == 0
    [run] = json.loads((out / "signal_propagation.json").read_text())["runs"]
    c = run["config"]
    assert (c["ffn_size"], c["dslm_mode"], c["dslm_k"], c["activation"], c["ln"]) == (48, "init", 2.0, "gelu", "post")
    assert c["max_position_embeddings"] == 32          # exactly --seq-len
