"""Init schemes: every weight's std matches THEORY.md section 3's table and DeepNorm's closed forms
(exact plan, sampled values within sampling error), biases 0, LayerNorms 1/0, the DSLM s_vo
recursion per layer (with scaling and init-only), logit scale."""
import math

import numpy as np
import pytest
import torch

from dslm.model import BertConfig, BertForPreTraining, init_plan, scheme_stds
from dslm.probe import measure_r0
from dslm.theory.dslm_init import dslm_stds


D, N, HEADS, P = 128, 6, 4, 0.1


def _config(init, **kw):
    return BertConfig(vocab_size=2000, hidden_size=D, num_layers=N, num_heads=HEADS,
                      max_position_embeddings=128, hidden_dropout=P, init=init, **kw)


def _deepnorm_expected(role, d, n):
    """DeepNet's encoder init as torchscale sets it, written out (d_f = 4d): Q/K/V Xavier over (d, d)
    with gain 1/sqrt(2), output Xavier, FFN Xavier; V, output and FFN divided by (8N)^(1/4)."""
    b = (8 * n) ** -0.25
    return {"embedding": math.sqrt(1 / d), "q": math.sqrt(1 / (2 * d)), "k": math.sqrt(1 / (2 * d)),
            "v": math.sqrt(1 / (2 * d)) * b, "attn_out": math.sqrt(1 / d) * b,
            "ffn_in": math.sqrt(2 / (5 * d)) * b, "ffn_out": math.sqrt(2 / (5 * d)) * b,
            "lm_dense": 1 / math.sqrt(d), "pooler": 1 / math.sqrt(d),
            "binary": math.sqrt(2 / (d + 2))}[role]


def _expected(init, role, layer):
    """THEORY.md section 3's table written out (d_h = 32, d_f = 4d)."""
    d, d_h = D, D // HEADS
    if init == "megatron":
        return 0.02
    if init == "deepnorm":
        return _deepnorm_expected(role, D, N)
    if init == "xavier":
        return {"embedding": math.sqrt(1 / d), "q": math.sqrt(2 / (d + d_h)),
                "k": math.sqrt(2 / (d + d_h)), "v": math.sqrt(2 / (d + d_h)),
                "attn_out": math.sqrt(1 / d), "ffn_in": math.sqrt(2 / (5 * d)),
                "ffn_out": math.sqrt(2 / (5 * d)), "lm_dense": 1 / math.sqrt(d),
                "pooler": 1 / math.sqrt(d), "binary": math.sqrt(2 / (d + 2))}[role]
    vo = dslm_stds(d, N, P, 1 - 1 / N, 1 / N, 0.221).vo
    return {"embedding": math.sqrt((1 - P) / 3), "q": math.sqrt(1 / d), "k": math.sqrt(1 / d),
            "v": vo[layer] if layer is not None else None,
            "attn_out": vo[layer] if layer is not None else None,
            "ffn_in": math.sqrt(math.sqrt((1 - P) / 2) / d),
            "ffn_out": math.sqrt(math.sqrt((1 - P) / 2) / d),
            "lm_dense": 1 / math.sqrt(d), "pooler": 1 / math.sqrt(d), "binary": 1 / math.sqrt(d)}[role]


@pytest.mark.parametrize("init", ["megatron", "xavier", "dslm", "deepnorm"])
def test_init_stds_match_table(init):
    torch.manual_seed(0)
    config = _config(init)
    model = BertForPreTraining(config)
    params = dict(model.named_parameters())
    plan = init_plan(model)
    covered = {e.name for e in plan}
    roles = {e.role for e in plan}
    assert roles == {"embedding", "q", "k", "v", "attn_out", "ffn_in", "ffn_out", "lm_dense",
                     "pooler", "binary"}
    for entry in plan:
        expected = _expected(init, entry.role, entry.layer)
        assert entry.std == pytest.approx(expected, rel=1e-12), entry
        w = params[entry.name].detach()
        if entry.rows is not None:
            w = w[entry.rows[0]:entry.rows[1]]
        n = w.numel()
        # the sample std of n normal values has standard error std / sqrt(2n); 5 of them
        assert abs(w.std().item() - expected) < 5 * expected / math.sqrt(2 * n) + 1e-12, entry
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(n), entry
    # everything else: biases 0, LayerNorm gain 1
    for name, p in params.items():
        if name in covered:
            continue
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert ("ln" in name) and torch.all(p == 1), name


def test_dslm_vo_per_layer_follow_the_recursion():
    torch.manual_seed(1)
    config = _config("dslm", r0=0.3)
    model = BertForPreTraining(config)
    ref = dslm_stds(D, N, P, 1 - 1 / N, 1 / N, 0.3).vo
    assert ref[0] / ref[-1] > 1.1  # the per-layer change is far above the sampling error below
    for i, layer in enumerate(model.bert.layers):
        v = layer.attention.qkv.weight.detach()[2 * D:]
        o = layer.attention.out.weight.detach()
        tol = 5 * ref[i] / math.sqrt(2 * D * D)
        assert abs(v.std().item() - ref[i]) < tol
        assert abs(o.std().item() - ref[i]) < tol
    np.testing.assert_allclose(scheme_stds(config)["v"], ref, rtol=1e-12)


def test_paper_reference_values_through_config():
    config = BertConfig(vocab_size=30522, hidden_size=1024, num_layers=192, num_heads=16,
                        init="dslm", lam2=0.995, beta2=0.005)
    s = scheme_stds(config)
    assert s["embedding"] == pytest.approx(0.547723, abs=1e-6)
    assert s["qk"] == pytest.approx(0.031250, abs=1e-6)
    assert s["ffn"] == pytest.approx(0.025595, abs=1e-6)
    for layer, value in ((1, 0.04558), (10, 0.04360), (96, 0.03616), (192, 0.03379)):
        assert s["v"][layer - 1] == pytest.approx(value, abs=1e-5)
    assert config.logit_scale() == pytest.approx(1 / math.sqrt(0.3 * 1024))


def test_logit_scale_applied_only_with_dslm_init():
    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (2, 8))
    dslm = BertForPreTraining(_config("dslm")).eval()
    assert dslm.lm_head.logit_scale == pytest.approx(1 / math.sqrt(0.3 * D))
    head = dslm.lm_head
    h = dslm.bert(ids).last_hidden_state
    manual = head.ln(torch.relu(head.dense(h))) / math.sqrt(0.3 * D)
    manual = manual @ dslm.bert.embeddings.word_embeddings.weight.T + head.bias
    torch.testing.assert_close(dslm(ids).mlm_logits, manual, rtol=1e-5, atol=1e-5)
    assert BertForPreTraining(_config("dslm", dslm_mode="scaling")).lm_head.logit_scale == 1.0
    assert BertForPreTraining(_config("xavier")).lm_head.logit_scale == 1.0


def test_scaling_only_uses_megatron_weights():
    torch.manual_seed(0)
    model = BertForPreTraining(_config("dslm", dslm_mode="scaling"))
    assert all(e.std == 0.02 for e in init_plan(model))
    layer = model.bert.layers[0]
    assert layer.beta ** 2 == pytest.approx(1 / N) and layer.lam ** 2 == pytest.approx(1 - 1 / N)


@pytest.mark.parametrize("layers", [6, 200])
def test_deepnorm_stds_closed_forms_at_two_depths(layers):
    d = 32
    config = BertConfig(vocab_size=300, hidden_size=d, num_layers=layers, num_heads=4,
                        max_position_embeddings=16, init="deepnorm")
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    params = dict(model.named_parameters())
    pooled = {}
    for entry in init_plan(model):
        assert entry.std == pytest.approx(_deepnorm_expected(entry.role, d, layers), rel=1e-12), entry
        w = params[entry.name].detach()
        if entry.rows is not None:
            w = w[entry.rows[0]:entry.rows[1]]
        pooled.setdefault(entry.role, []).append(w.reshape(-1))
    for role, ws in pooled.items():   # the drawn values, pooled over layers
        w = torch.cat(ws)
        expected = _deepnorm_expected(role, d, layers)
        assert abs(w.std().item() - expected) < 5 * expected / math.sqrt(2 * w.numel()), role
    # the down-scaled roles differ by (8N)^(-1/4) between the two depths: 0.2 at N = 200
    s = scheme_stds(config)
    assert s["v"] == [pytest.approx(math.sqrt(1 / (2 * d)) * (8 * layers) ** -0.25)] * layers
    assert model.bert.layers[0].lam == pytest.approx((2 * layers) ** 0.25)
    assert model.bert.layers[-1].beta == 1.0


def _init_only_vo(d, n, p, r0):
    """The s_vo recursion of THEORY.md section 3 with plain residual adds, lam^2 = beta^2 = 1."""
    r, s, out = r0 * (1 - p), 1.0, []
    for _ in range(n):
        out.append(math.sqrt(math.sqrt((1 - p) / r) / d))
        r, s = (r * s + (1 - p)) / (s + 1), s + 1                        # attention
        blk = (1 - p) * (r + (math.sqrt(1 - r * r) - r * math.acos(r)) / math.pi)
        r, s = (r * s + blk) / (s + 1), s + 1                            # FFN
    return np.array(out)


def test_dslm_init_only_recursion_uses_plain_residual_adds():
    config = _config("dslm", dslm_mode="init", r0=0.3)
    assert config.residual_variances() == (1.0, 1.0)
    vo = np.array(scheme_stds(config)["v"])
    np.testing.assert_allclose(vo, _init_only_vo(D, N, P, 0.3), rtol=1e-12)
    np.testing.assert_allclose(scheme_stds(config)["attn_out"], vo, rtol=0)
    # the recursion with DSLM's own scales (beta^2 = 1/N) gives other stds from layer 2 on
    scaled = dslm_stds(D, N, P, 1 - 1 / N, 1 / N, 0.3).vo
    assert vo[0] == pytest.approx(scaled[0])
    assert np.all(np.abs(vo[1:] / scaled[1:] - 1) > 0.01)
    torch.manual_seed(2)
    layer = BertForPreTraining(config).bert.layers[-1]
    v = layer.attention.qkv.weight.detach()[2 * D:]
    assert abs(v.std().item() - vo[-1]) < 5 * vo[-1] / math.sqrt(2 * D * D)
    assert layer.lam == 1.0 and layer.beta == 1.0


def test_non_default_ffn_width_keeps_dslm_block_variance():
    config = BertConfig(vocab_size=100, hidden_size=64, num_layers=4, num_heads=4, ffn_size=128,
                        init="dslm", hidden_dropout=P)
    s = scheme_stds(config)["ffn"]
    # ReLU FFN output variance d_f s^2 d s^2 / 2 must stay 1 - p
    assert 128 * 64 * s ** 4 / 2 == pytest.approx(1 - P)


def test_measure_r0():
    torch.manual_seed(0)
    model = BertForPreTraining(_config("dslm"))
    same = {"input_ids": torch.full((4, 64), 7), "token_type_ids": torch.zeros(4, 64, dtype=torch.long)}
    # same word and type everywhere: two of the three equal-variance tables are shared
    assert measure_r0(model, same) == pytest.approx(2 / 3, abs=0.06)
    g = torch.Generator().manual_seed(0)
    mixed = {"input_ids": torch.randint(0, 2000, (8, 64), generator=g),
             "token_type_ids": torch.randint(0, 2, (8, 64), generator=g),
             "attention_mask": torch.ones(8, 64, dtype=torch.long)}
    # distinct words, a random type per token: only the type table is shared, half the time
    assert measure_r0(model.bert.embeddings, mixed) == pytest.approx(1 / 6, abs=0.04)
