"""`dslm figures` takes its model flags from dslm.model.flags: the preset fills what is not given, the
flags reach the BertConfig through config_from_args, and --help explains every flag."""
import argparse

import pytest
import torch

from dslm import figures
from dslm.model.flags import MODEL_FLAGS

CPU = torch.device("cpu")


def _resolved(argv):
    parser = argparse.ArgumentParser()
    figures.add_arguments(parser)
    args = parser.parse_args(argv)
    return args, figures._resolve(args, CPU)


def test_shared_flags_reach_the_config():
    args, _ = _resolved(["--preset", "small", "--init", "dslm", "--layers", "6", "--hidden", "32", "--heads", "2",
                         "--ffn", "48", "--activation", "gelu", "--dslm-mode", "scaling", "--dslm-k", "2",
                         "--r0", "0.3", "--dropout", "0.05"])
    c = figures._config(args, "pre", vocab_size=100)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_size, c.activation) == (6, 32, 2, 48, "gelu")
    assert (c.ln, c.init, c.dslm_mode, c.dslm_k, c.r0) == ("pre", "dslm", "scaling", 2.0, 0.3)
    assert c.hidden_dropout == c.attention_dropout == 0.05
    assert c.max_position_embeddings == 128 and c.residual_variances() == pytest.approx((1 - 2 / 6, 2 / 6))
    assert figures._config(args, "post", vocab_size=100, r0=0.5).r0 == 0.5     # a measured r0 wins


def test_a_flag_given_wins_over_the_preset():
    args, settings = _resolved(["--preset", "paper", "--init", "dslm", "--layers", "3", "--seq-len", "16"])
    assert (args.layers, args.hidden, args.heads, args.seq_len, args.batch) == (3, 1024, 16, 16, 64)
    assert (settings["layers"], settings["hidden"], settings["preset"]) == (3, 1024, "paper")
    c = figures._config(args, "post", vocab_size=100)
    assert c.residual_variances() == pytest.approx((0.995, 0.005))            # the paper's pair
    args, _ = _resolved(["--preset", "paper", "--init", "dslm", "--beta2", "0.01"])
    assert figures._config(args, "post", 100).residual_variances() == pytest.approx((0.99, 0.01))


def test_preset_residual_scales_are_dslm_only():
    args, _ = _resolved(["--preset", "small", "--init", "dslm", "--layers", "8"])
    assert figures._config(args, "post", 100).residual_variances() == pytest.approx((7 / 8, 1 / 8))   # 1/layers
    args, settings = _resolved(["--preset", "paper"])                       # xavier: plain residual adds
    c = figures._config(args, "post", 100)
    assert (c.lam2, c.beta2, c.residual_variances()) == (None, None, (1.0, 1.0))
    assert (settings["lam2"], settings["beta2"]) == (0.995, 0.005)          # the preset, as recorded


def test_help_explains_every_flag(capsys):
    from dslm.cli import main

    with pytest.raises(SystemExit):
        main(["figures", "--help"])
    text = capsys.readouterr().out
    shared = ["--" + dest.replace("_", "-") for dest in MODEL_FLAGS if dest != "ln"]
    for flag in shared + ["--dropout", "--seq-len", "--batch", "--micro-batch", "--preset", "--placements"]:
        assert flag + " " in text, flag
    assert "--ln " not in text
    parser = argparse.ArgumentParser()
    figures.add_arguments(parser)
    assert [a.dest for a in parser._actions if not a.help] == []
    assert "preset paper 192, small 96" in parser.format_help()
