"""The decoder: causality, the next-token loss, init plans, save / load, and HF GPT-2 interop (exact
both ways, fp32, eval, checked against transformers)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dslm.model import GPTConfig, GPTLMHeadModel, GPTModel, from_pretrained, init_plan  # noqa: E402
from dslm.model.hf_gpt2 import gpt2_from_hf, gpt2_to_hf, hf_hidden_states  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, max_position_embeddings=32)


def _hf_gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=3, n_head=4,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_position_t_sees_no_future_token(ln):
    model = GPTLMHeadModel(GPTConfig(**SMALL, ln=ln)).eval()
    x = torch.randint(0, 300, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 300, (2, 7))
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_next_token_loss_equals_hf_labels_loss():
    hf = _hf_gpt2()
    ours = gpt2_from_hf(hf).eval()
    x = torch.randint(0, 300, (3, 20))
    hf_loss = hf(x, labels=x).loss
    targets = torch.cat([x[:, 1:], torch.full((3, 1), -100)], dim=1)
    out = ours(x, targets=targets)
    torch.testing.assert_close(out.loss, hf_loss, rtol=1e-5, atol=1e-5)
    assert out.count.item() == 3 * 19
    assert out.correct.item() == int((out.logits[:, :-1].argmax(-1) == x[:, 1:]).sum())
    torch.testing.assert_close(out.loss_sum / out.count, out.loss)


@pytest.mark.parametrize("kw", [{}, {"activation_function": "relu", "n_inner": 96},
                                {"activation_function": "gelu", "tie_word_embeddings": False}])
def test_hf_gpt2_round_trip_is_exact(kw):
    hf = _hf_gpt2(**kw)
    ours = gpt2_from_hf(hf).eval()
    x = torch.randint(0, 300, (2, 24))
    a, b = hf(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
    for h_hf, h_ours in zip(a.hidden_states, hf_hidden_states(ours, b.hidden_states), strict=True):
        torch.testing.assert_close(h_ours, h_hf, rtol=0, atol=1e-5)
    back = gpt2_to_hf(ours)
    for name, value in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0, msg=name)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    a, b = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], rtol=0, atol=1e-5)


def test_our_decoder_to_hf_and_base_model():
    ours = GPTLMHeadModel(GPTConfig(**SMALL, init="xavier", activation="relu")).eval()
    hf = gpt2_to_hf(ours)
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    base = gpt2_from_hf(hf.transformer).eval()
    assert isinstance(base, GPTModel)
    torch.testing.assert_close(base(x).last_hidden_state, ours.transformer(x).last_hidden_state,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(ln="post"), "Pre-LN"),
    (dict(init="dslm"), "residual scales"),
    (dict(init="megatron", ln="post"), "Pre-LN"),
])
def test_what_gpt2_cannot_hold_is_refused(kw, message):
    model = GPTLMHeadModel(GPTConfig(**SMALL, **kw))
    with pytest.raises(ValueError, match=message):
        gpt2_to_hf(model)


def test_gpt2_init_scales_the_residual_projections():
    n = 6
    model = GPTLMHeadModel(GPTConfig(**{**SMALL, "num_layers": n, "hidden_size": 256}))
    params = dict(model.named_parameters())
    stds = {e.role: params[e.name].std().item() for e in init_plan(model) if e.layer in (None, 0)
            and e.rows is None}
    assert stds["embedding"] == pytest.approx(0.02, rel=0.05)
    assert stds["attn_out"] == pytest.approx(0.02 / math.sqrt(2 * n), rel=0.05)
    assert stds["ffn_in"] == pytest.approx(0.02, rel=0.05)
    assert stds["ffn_out"] == pytest.approx(0.02 / math.sqrt(2 * n), rel=0.05)
    assert "decoder" not in stds                       # tied: no matrix of its own


def test_untied_head_is_its_own_matrix_with_the_head_std():
    config = GPTConfig(**SMALL, init="xavier", tie_word_embeddings=False)
    model = GPTLMHeadModel(config)
    assert model.output_embedding() is model.lm_head.weight
    assert model.lm_head.weight.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert config.logit_scale() == 1.0
    assert [e.role for e in init_plan(model)].count("embedding") == 2     # word and position


def test_save_and_load_dispatch(tmp_path):
    model = GPTLMHeadModel(GPTConfig(**SMALL)).eval()
    model.save_pretrained(tmp_path / "lm")
    x = torch.randint(0, 300, (1, 10))
    loaded = from_pretrained(tmp_path / "lm").eval()
    assert isinstance(loaded, GPTLMHeadModel)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    base = GPTModel.from_pretrained(tmp_path / "lm").eval()
    torch.testing.assert_close(base(x).last_hidden_state, model.transformer(x).last_hidden_state,
                               rtol=0, atol=0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPTConfig(**SMALL, tie_word_embeddings="yes")
    with pytest.raises(ValueError, match="deepnorm"):
        GPTConfig(**SMALL, init="deepnorm", ln="pre")
    with pytest.raises(ValueError, match="unknown GPTConfig keys: type_vocab_size"):
        GPTConfig.from_dict({**SMALL, "type_vocab_size": 2})


def test_decoder_r0_is_half_the_same_token_rate():
    """With word and position tables of equal std, only repeated tokens share a part: r0 equals
    half the chance that two tokens of a sequence are the same token (DECODER_R0's measurement)."""
    from dslm.probe.r0 import measure_r0
    from dslm.theory.dslm_init import DECODER_R0

    assert GPTConfig().r0 == DECODER_R0
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=300, hidden_size=1024, num_layers=2, num_heads=4,
                               max_position_embeddings=64, init="dslm", ln="pre"))
    ids = torch.randint(0, 8, (16, 64))                  # 8 tokens: P(same) = 1/8 up to sampling
    counts = torch.stack([torch.bincount(row, minlength=8) for row in ids]).double()
    same = ((counts * (counts - 1)).sum(1) / (64 * 63)).mean().item()
    assert measure_r0(model, {"input_ids": ids}) == pytest.approx(same / 2, abs=0.01)
    assert measure_r0(model, {"input_ids": torch.arange(64).repeat(16, 1)}) < 0.01   # no repeats
