"""The probe: token statistics against an explicit computation, micro-batching equals the full batch,
and on a 48-layer model the signal-propagation behaviours of THEORY.md section 2."""
import numpy as np
import pytest
import torch

from dslm.model import BertConfig, BertForPreTraining
from dslm.probe import GRAD_MATRICES, TokenMoments, probe_model, token_moments


def _batch(b=8, s=32, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    mask[::2, -5:] = 0
    labels = torch.full((b, s), -100)
    chosen = (torch.rand(b, s, generator=g) < 0.15) & mask.bool()
    labels[chosen] = ids[chosen]
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, mlm_labels=labels,
                binary_labels=torch.randint(0, 2, (b,), generator=g))


def _explicit_moments(x, mask):
    """Mean off-diagonal token covariance / variance, about the overall mean, with L x L loops."""
    x, mask = x.double(), mask.bool()
    real = x[mask]                                     # (n_tokens, d)
    mu = real.mean()
    var = ((real - mu) ** 2).mean()
    covs, counts = 0.0, 0
    for b in range(x.shape[0]):
        t = x[b][mask[b]] - mu                         # (n_b, d)
        prod = torch.einsum("if,jf->ijf", t, t)        # every token pair, per feature
        off = ~torch.eye(t.shape[0], dtype=torch.bool)
        covs += prod[off].sum().item()
        counts += off.sum().item() * x.shape[2]
    return mu.item(), var.item(), covs / counts / var.item()


def test_token_moments_match_explicit_computation_and_accumulate():
    g = torch.Generator().manual_seed(0)
    # equicorrelated tokens (r = 0.4) with a non-zero mean
    shared = torch.randn(5, 1, 24, generator=g)
    x = 0.7 + (0.4 ** 0.5) * shared + (0.6 ** 0.5) * torch.randn(5, 16, 24, generator=g)
    mask = torch.ones(5, 16, dtype=torch.long)
    mask[1, 10:] = 0
    mask[3, 3:] = 0
    expected = _explicit_moments(x, mask)
    np.testing.assert_allclose(token_moments(x, mask), expected, rtol=1e-6)
    assert expected[2] == pytest.approx(0.4, abs=0.15)
    acc = TokenMoments()
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])
    np.testing.assert_allclose(acc.result(), expected, rtol=1e-6)
    # no mask = all tokens real
    np.testing.assert_allclose(token_moments(x), _explicit_moments(x, torch.ones(5, 16)),
                               rtol=1e-6)


def test_micro_batching_equals_full_batch():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_layers=3, num_heads=4,
                        hidden_dropout=0.0, attention_dropout=0.0, init="xavier")
    model = BertForPreTraining(config)
    batch = _batch(b=6, s=16)
    full = probe_model(model, batch)
    micro = probe_model(model, batch, micro_batch_size=4)  # uneven split: 4 + 2
    for key in ("forward_variance", "correlation", "grad_norm", "grad_variance",
                "grad_correlation"):
        np.testing.assert_allclose(getattr(micro, key), getattr(full, key), rtol=1e-4, err_msg=key)
    for name in GRAD_MATRICES:
        np.testing.assert_allclose(micro.grad_norms[name], full.grad_norms[name], rtol=1e-4)
    assert micro.loss == pytest.approx(full.loss, rel=1e-5)
    assert micro.input_grad_variance == pytest.approx(full.input_grad_variance, rel=1e-4)
    # the grad norm is the one of the full batch's loss
    model.zero_grad()
    model.train()(**batch).loss.backward()
    assert torch.linalg.vector_norm(model.bert.layers[1].ffn.fc_out.weight.grad).item() == \
        pytest.approx(full.grad_norms["ffn_out"][1], rel=1e-4)


def test_probe_leaves_model_untouched():
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=512, hidden_size=32, num_layers=2,
                                          num_heads=4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe_model(model, _batch(b=4, s=16))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.num_layers == 2 and np.isfinite(result.to_dict()["grad_norm"]).all()
    with pytest.raises(ValueError, match="labels"):
        probe_model(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def _deep(init, ln, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=512, hidden_size=64, num_layers=48, num_heads=4,
                        max_position_embeddings=64, ln=ln, init=init)
    return BertForPreTraining(config)


@pytest.fixture(scope="module")
def deep_probes():
    """48 layers, d 64, L 32, dropout 0.1, training mode: the four scheme x placement runs, and
    three more xavier Post-LN models (at d = 64 one model's per-layer gains fluctuate enough to hide
    the Post-LN trend, which is a property of the random-init ensemble)."""
    batch = _batch()
    out = {(init, ln): probe_model(_deep(init, ln), batch, micro_batch_size=4)
           for init in ("xavier", "dslm") for ln in ("pre", "post")}
    out["xavier", "post", "seeds"] = [out["xavier", "post"]] + [
        probe_model(_deep("xavier", "post", seed), batch, micro_batch_size=4)
        for seed in (1, 2, 3)]
    return out


def test_xavier_preln_forward_variance_grows_linearly(deep_probes):
    var = deep_probes["xavier", "pre"].forward_variance
    layers = np.arange(1, 49)
    slope, intercept = np.polyfit(layers, var, 1)
    r2 = 1 - ((var - (slope * layers + intercept)) ** 2).sum() / ((var - var.mean()) ** 2).sum()
    assert slope > 0.5 and r2 > 0.9, (slope, r2)
    assert var[-1] > 20 * var[0]
    # gradients shrink toward the top, roughly like 1/sqrt(layer) (sqrt(48) = 6.9)
    g = deep_probes["xavier", "pre"].grad_norm
    assert g[0] / g[-1] > 3


def test_dslm_forward_variance_stays_near_one(deep_probes):
    for ln in ("pre", "post"):
        var = deep_probes["dslm", ln].forward_variance
        assert var.min() > 0.8 and var.max() < 1.25, (ln, var.min(), var.max())


def test_dslm_gradients_flat(deep_probes):
    for ln in ("pre", "post"):
        g = deep_probes["dslm", ln].grad_norm
        assert g.max() / g.min() < 2.0, (ln, g.max() / g.min())


def test_xavier_postln_gradients_vanish_toward_input(deep_probes):
    runs = deep_probes["xavier", "post", "seeds"]
    log_g = np.mean([np.log(r.grad_norm) for r in runs], 0)       # geometric mean over models
    per_layer_growth = np.exp(np.polyfit(np.arange(48), log_g, 1)[0])
    assert per_layer_growth > 1.01, per_layer_growth
    assert np.exp(log_g[-12:].mean() - log_g[:12].mean()) > 1.5
    log_gv = np.mean([np.log(r.grad_variance) for r in runs], 0)  # the stream gradient too
    assert np.exp(log_gv[-1] - log_gv[0]) > 3
    assert max(r.forward_variance.max() for r in runs) < 3        # LN keeps the forward tame


def test_correlation_rises_with_depth(deep_probes):
    for key in (("xavier", "pre"), ("xavier", "post"), ("dslm", "pre"), ("dslm", "post")):
        c = deep_probes[key].correlation
        assert 0 < c[0] < c[-1] < 1, key


def test_probe_and_prediction_share_the_signal_profile():
    """The measured and the predicted record are one type of record: the same fields compare."""
    from dataclasses import fields

    from dslm.probe import ProbeResult
    from dslm.theory import Prediction, SignalProfile

    shared = [f.name for f in fields(SignalProfile)]
    assert issubclass(ProbeResult, SignalProfile) and issubclass(Prediction, SignalProfile)
    assert [f.name for f in fields(ProbeResult)][:len(shared)] == shared
    assert [f.name for f in fields(Prediction)][:len(shared)] == shared
