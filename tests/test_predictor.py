"""The whole-model predictor (dslm.theory.predictor) against the probe on small deep models: the
predicted curves follow the measured ones (forward variance, correlation, relative gradient norms),
and the THEORY.md section 2 behaviours come out of the component formulas alone."""
import numpy as np
import pytest
import torch

from dslm.model import BertConfig, BertForPreTraining
from dslm.probe import measure_r0
from dslm.probe import probe_model
from dslm.theory import agreement, normalise, predict


def _text_like_batch(b=8, s=64, vocab=2000, seed=0):
    """Zipf-distributed tokens (repeats give the inputs a cross-token correlation, as text does),
    two segments, a little padding, 15 % masked-LM labels."""
    g = np.random.default_rng(seed)
    ids = np.minimum(g.zipf(1.3, size=(b, s)) + 4, vocab - 1)
    mask = np.ones((b, s), dtype=np.int64)
    mask[1::3, -7:] = 0
    types = np.zeros((b, s), dtype=np.int64)
    types[:, s // 2:] = 1
    labels = np.where((g.random((b, s)) < 0.15) & (mask == 1), ids, -100)
    t = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return dict(input_ids=t(ids) * t(mask), token_type_ids=t(types) * t(mask), attention_mask=t(mask),
                mlm_labels=t(labels), binary_labels=t(g.integers(0, 2, b)))


def _measure_and_predict(init, ln, layers=48, d=128, heads=4, seed=0, **kw):
    config = BertConfig(vocab_size=2000, hidden_size=d, num_layers=layers, num_heads=heads,
                        max_position_embeddings=64, ln=ln, init=init, **kw)
    batch = _text_like_batch()
    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    r0 = measure_r0(model, batch)
    measured = probe_model(model, batch)
    pred = predict(config, lengths=batch["attention_mask"].sum(1).numpy(), r0=r0)
    return measured, pred


@pytest.fixture(scope="module")
def runs():
    return {(init, ln): _measure_and_predict(init, ln, **({"beta2": 0.02} if init == "dslm" else {}))
            for init in ("xavier", "dslm") for ln in ("pre", "post")}


def test_unpadded_shape_and_api():
    config = BertConfig(vocab_size=100, hidden_size=64, num_layers=5, num_heads=4, init="xavier")
    pred = predict(config, seq_len=32, batch_size=2)
    assert pred.num_layers == 5 and set(pred.grad_norms) == {"q", "k", "v", "attn_out", "ffn_in", "ffn_out"}
    total = np.sqrt(sum(v ** 2 for v in pred.grad_norms.values()))
    np.testing.assert_allclose(pred.grad_norm, total)
    assert pred.to_dict()["forward_variance"] == pred.forward_variance.tolist()
    # embeddings: 3 tables of std sqrt(1/d), then dropout 0.1; r0 * (1 - p)
    assert pred.embedding_variance == pytest.approx(3 / 64 / 0.9)
    assert pred.embedding_correlation == pytest.approx(config.r0 * 0.9)
    with pytest.raises(ValueError):
        predict(config, seq_len=1)


def test_xavier_preln_forward_variance_slope_and_correlation(runs):
    measured, pred = runs["xavier", "pre"]
    fv, pv = measured.forward_variance, pred.forward_variance
    layers = np.arange(1, len(fv) + 1)
    slope_m, slope_p = np.polyfit(layers, fv, 1)[0], np.polyfit(layers, pv, 1)[0]
    assert slope_p > 1.0 and slope_p == pytest.approx(slope_m, rel=0.2)   # ~2 per layer
    assert agreement(pv, fv)["r2"] > 0.9
    # d = 128: the stream's common vector makes each layer's measurement noisy (~10 %)
    assert np.max(np.abs(pred.correlation - measured.correlation)) < 0.15
    assert np.max(np.abs(pred.correlation[6:] - measured.correlation[6:])) < 0.05


def test_xavier_preln_gradient_shape(runs):
    measured, pred = runs["xavier", "pre"]
    st = agreement(normalise(pred.grad_norm, measured.grad_norm), measured.grad_norm, log=True)
    assert st["r2"] > 0.85 and st["max_rel_error"] < 0.35
    # falls toward the output, by about sqrt(N) between the bottom and the top
    assert pred.grad_norm[0] / pred.grad_norm[-1] > 4


def test_dslm_flat_variance_and_gradients(runs):
    for ln in ("pre", "post"):
        measured, pred = runs["dslm", ln]
        assert np.all(np.abs(pred.forward_variance - 1) < 0.05), ln
        assert np.max(np.abs(pred.forward_variance - measured.forward_variance)
                      / measured.forward_variance) < 0.2, ln
        assert pred.grad_norm.max() / pred.grad_norm.min() < 1.3, ln
        p = normalise(pred.grad_norm, measured.grad_norm)
        assert np.max(np.abs(p - measured.grad_norm) / measured.grad_norm) < 0.3, ln
        assert agreement(pred.correlation, measured.correlation)["r2"] > 0.85, ln
        # gradient variance of the stream: lam^2 < 1 makes it shrink toward the input
        gv = agreement(normalise(pred.grad_variance, measured.grad_variance), measured.grad_variance, log=True)
        assert gv["r2"] > 0.8, ln


def test_xavier_postln_gradients_grow_toward_output(runs):
    measured, pred = runs["xavier", "post"]
    assert np.all(np.abs(pred.forward_variance[1:] - pred.forward_variance[-1]) < 1e-6)
    assert np.max(np.abs(pred.forward_variance - measured.forward_variance)
                  / measured.forward_variance) < 0.3
    layers = np.arange(len(pred.grad_norm))
    per_layer = np.exp(np.polyfit(layers, np.log(pred.grad_norm), 1)[0])
    assert 1.005 < per_layer < 1.05     # THEORY.md: about 1.024 per layer at the paper's size
    assert agreement(pred.correlation, measured.correlation)["r2"] > 0.8


def test_deepnorm_forward_variance_and_flat_gradients():
    layers = 24
    measured, pred = _measure_and_predict("deepnorm", "post", layers=layers, d=64)
    alpha2 = (2 * layers) ** 0.5
    # the stream after each layer is alpha^2 LN(.) plus a block of variance ~0.04/N: ~alpha^2
    assert np.all(np.abs(pred.forward_variance - alpha2) / alpha2 < 0.01)
    assert np.max(np.abs(pred.forward_variance - measured.forward_variance)
                  / measured.forward_variance) < 0.2
    assert np.max(np.abs(pred.correlation - measured.correlation)) < 0.05
    # alpha keeps Post-LN's gradients from vanishing toward the input
    assert pred.grad_norm.max() / pred.grad_norm.min() < 1.05
    p = normalise(pred.grad_norm, measured.grad_norm)
    assert np.max(np.abs(p - measured.grad_norm) / measured.grad_norm) < 0.3


def test_agreement_and_normalise():
    m = np.array([1.0, 2.0, 4.0])
    assert agreement(m, m) == {"r2": 1.0, "max_rel_error": 0.0, "log": False, "flat": False}
    np.testing.assert_allclose(normalise(m / 7, m), m)
    assert agreement(np.ones(3), np.array([1.0, 1.05, 0.97]))["flat"]
