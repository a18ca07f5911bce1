"""BertConfig: validation of impossible configs (one-line ValueError), derived values, round trip."""
import math

import pytest

from dslm.model import BertConfig

SMALL = dict(vocab_size=100, hidden_size=32, num_layers=4, num_heads=4)


@pytest.mark.parametrize("changes, words", [
    (dict(num_heads=5), "num_heads"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(hidden_dropout=-0.1), "hidden_dropout"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(ffn_size=0), "ffn_size"),
    (dict(ln="middle"), "ln"),
    (dict(activation="tanh"), "activation"),
    (dict(init="kaiming"), "init"),
    (dict(dslm_mode="all"), "dslm_mode"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(r0=0.0), "r0"),
    (dict(r0=1.5), "r0"),
    (dict(init="dslm", lam2=0.9, beta2=0.2), "lam^2 + beta^2"),
    (dict(init="dslm", dslm_k=4.0), "k"),
    (dict(pad_token_id=100), "pad_token_id"),
    (dict(init="deepnorm", ln="pre"), "init='deepnorm'"),
])
def test_impossible_configs_raise_one_line_value_error(changes, words):
    with pytest.raises(ValueError) as info:
        BertConfig(**{**SMALL, **changes})
    message = str(info.value)
    assert "\n" not in message and words in message


def test_defaults_and_derived_values():
    c = BertConfig(**SMALL)
    assert c.ffn_size == 128 and c.head_dim == 8
    assert c.residual_variances() == (1.0, 1.0) and c.logit_scale() == 1.0
    assert c.weight_scheme == "megatron"


def test_dslm_modes():
    both = BertConfig(**SMALL, init="dslm", hidden_dropout=0.1)
    lam2, beta2 = both.residual_variances()
    assert beta2 == pytest.approx(1 / 4) and lam2 + beta2 == pytest.approx(1.0)
    assert both.logit_scale() == pytest.approx(1 / math.sqrt(0.3 * 32))
    init_only = BertConfig(**SMALL, init="dslm", dslm_mode="init")
    assert init_only.residual_variances() == (1.0, 1.0) and init_only.weight_scheme == "dslm"
    assert init_only.logit_scale() == pytest.approx(both.logit_scale())
    scaling = BertConfig(**SMALL, init="dslm", dslm_mode="scaling", lam2=0.995)
    assert scaling.residual_variances() == pytest.approx((0.995, 0.005))
    assert scaling.weight_scheme == "megatron" and scaling.logit_scale() == 1.0
    k2 = BertConfig(**SMALL, init="dslm", dslm_k=2.0)
    assert k2.residual_variances()[1] == pytest.approx(0.5)


def test_deepnorm_is_post_ln_only():
    with pytest.raises(ValueError) as info:
        BertConfig(**SMALL, init="deepnorm", ln="pre")
    assert "ln='post'" in str(info.value) and "ln='pre'" in str(info.value)
    assert BertConfig(**SMALL, init="deepnorm").ln == "post"


@pytest.mark.parametrize("layers", [6, 1000])
def test_deepnorm_residual_scales(layers):
    c = BertConfig(**{**SMALL, "num_layers": layers}, init="deepnorm")
    lam2, beta2 = c.residual_variances()
    # alpha = (2N)^(1/4) on the stream, the block added unscaled
    assert math.sqrt(lam2) == pytest.approx((2 * layers) ** 0.25, rel=1e-12) and beta2 == 1.0
    assert c.weight_scheme == "deepnorm" and c.logit_scale() == 1.0
    assert not c.uses_residual_scaling and not c.uses_dslm_init


def test_dict_round_trip():
    c = BertConfig(**SMALL, ln="pre", activation="gelu", init="dslm", r0=0.3, lam2=0.9)
    assert BertConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        BertConfig.from_dict({**c.to_dict(), "colour": 1})
