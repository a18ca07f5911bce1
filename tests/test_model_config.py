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
])
def test_impossible_configs_raise_one_line_value_error(changes, words):
    with pytest.raises(ValueError) as info:
        BertConfig(**{**SMALL, **changes})
    message = str(info.value)
    assert "\n" not in message and words in message


def test_defaults_and_derived_values():
    c = BertConfig(**SMALL)
    assert c.ffn_size == 128 and c.head_dim == 8
    assert c.residual_scales() == (1.0, 1.0) and c.logit_scale() == 1.0
    assert c.weight_scheme == "megatron"


def test_dslm_modes():
    both = BertConfig(**SMALL, init="dslm", hidden_dropout=0.1)
    lam, beta = both.residual_scales()
    assert beta ** 2 == pytest.approx(1 / 4) and lam ** 2 + beta ** 2 == pytest.approx(1.0)
    assert both.logit_scale() == pytest.approx(1 / math.sqrt(0.3 * 32))
    init_only = BertConfig(**SMALL, init="dslm", dslm_mode="init")
    assert init_only.residual_scales() == (1.0, 1.0) and init_only.weight_scheme == "dslm"
    assert init_only.logit_scale() == pytest.approx(both.logit_scale())
    scaling = BertConfig(**SMALL, init="dslm", dslm_mode="scaling", lam2=0.995)
    assert scaling.residual_scales() == pytest.approx((math.sqrt(0.995), math.sqrt(0.005)))
    assert scaling.weight_scheme == "megatron" and scaling.logit_scale() == 1.0
    k2 = BertConfig(**SMALL, init="dslm", dslm_k=2.0)
    assert k2.residual_scales()[1] ** 2 == pytest.approx(0.5)


def test_dict_round_trip():
    c = BertConfig(**SMALL, ln="pre", activation="gelu", init="dslm", r0=0.3, lam2=0.9)
    assert BertConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        BertConfig.from_dict({**c.to_dict(), "colour": 1})
