"""The model flags shared by dslm pretrain, dslm finetune and dslm figures map onto BertConfig one way."""
import argparse

import pytest

from dslm.errors import UsageError
from dslm.model.flags import add_model_arguments, config_from_args, parse_r0


def _parse(argv, defaults=None):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, defaults)
    parser.add_argument("--dropout", type=float, default=0.1)
    return parser.parse_args(argv)


def test_flags_to_config():
    args = _parse(["--layers", "24", "--hidden", "128", "--heads", "2", "--ln", "pre", "--activation", "gelu",
                   "--init", "dslm", "--dslm-k", "2", "--r0", "0.3", "--dropout", "0.05"])
    c = config_from_args(args, vocab_size=1000, seq_len=1024)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_size) == (24, 128, 2, 512)
    assert (c.ln, c.activation, c.init, c.dslm_k, c.r0) == ("pre", "gelu", "dslm", 2.0, 0.3)
    assert c.hidden_dropout == c.attention_dropout == 0.05
    assert c.max_position_embeddings == 1024 and c.vocab_size == 1000
    assert c.residual_variances() == pytest.approx((1 - 2 / 24, 2 / 24))


def test_defaults_auto_r0_and_errors():
    fresh = dict(layers=2, hidden=64, heads=2, ln="post", activation="relu", init="megatron")
    c = config_from_args(_parse(["--r0", "auto"], fresh), vocab_size=100, seq_len=64)
    assert c.max_position_embeddings == 512 and c.r0 == pytest.approx(0.2207, abs=1e-3)
    with pytest.raises(SystemExit):
        _parse(["--r0", "high"], fresh)
    with pytest.raises(UsageError, match="^model: "):
        config_from_args(_parse(["--hidden", "63"], fresh), vocab_size=100, seq_len=64)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_commands_share_the_flags(command, capsys):
    from dslm.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--layers", "--hidden", "--heads", "--ffn", "--ln", "--activation", "--init", "--dslm-mode",
                 "--lam2", "--beta2", "--dslm-k", "--r0", "--dropout"):
        assert flag + " " in text, flag


def test_exclude_and_command_fields():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, {"init": "xavier", "activation": "relu"}, exclude=("ln",))
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args(["--layers", "2", "--hidden", "32", "--heads", "2"])
    assert not hasattr(args, "ln")
    with pytest.raises(SystemExit):
        parser.parse_args(["--ln", "pre"])
    c = config_from_args(args, vocab_size=100, seq_len=64, ln="pre", max_position_embeddings=64, r0=0.4)
    assert (c.ln, c.init, c.max_position_embeddings, c.r0) == ("pre", "xavier", 64, 0.4)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan", "high"])
def test_r0_out_of_range_is_a_flag_error(value):
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
        parse_r0(value)
    assert parse_r0("1") == 1.0 and parse_r0("auto") == "auto"
