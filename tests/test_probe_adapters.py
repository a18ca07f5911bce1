"""The probe through adapters: dslm's BERT against a computation without hooks or adapters, HF's
BERT against its dslm original (the same function, so the same measurements), an unknown model
refused, and a model the library does not know probed through an adapter written for it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dslm.model import BertConfig, BertForPreTraining, BertModel
from dslm.probe import GRAD_MATRICES, ProbeAdapter, Tap, adapter_for, probe_model, token_moments
from test_probe import _batch

PER_LAYER = ("forward_variance", "correlation", "grad_norm", "grad_variance", "grad_correlation")
SCALARS = ("embedding_variance", "embedding_correlation", "input_grad_variance",
           "input_grad_correlation", "loss")


def _reference(streams, loss, mask, matrices) -> dict:
    """What the probe should report, computed directly: the moments of one forward's stream tensors
    (embedding output first) and of their gradients, and the norms of weight-gradient rows
    (``matrices``: per layer, role -> (weight, rows))."""
    for x in streams:
        x.retain_grad()
    loss.backward()
    f = np.array([token_moments(x, mask) for x in streams])
    g = np.array([token_moments(x.grad, mask) for x in streams])
    norms = {role: np.array([m[role][0].grad[m[role][1]].norm().item() for m in matrices])
             for role in GRAD_MATRICES}
    return dict(forward_variance=f[1:, 1], correlation=f[1:, 2], grad_variance=g[1:, 1],
                grad_correlation=g[1:, 2], embedding_variance=f[0, 1],
                embedding_correlation=f[0, 2], input_grad_variance=g[0, 1],
                input_grad_correlation=g[0, 2], loss=loss.item(),
                grad_norms=norms, grad_norm=np.sqrt(sum(n ** 2 for n in norms.values())))


def _fused_layer(qkv, attn_out, ffn_in, ffn_out) -> dict:
    """role -> (weight, rows) of a layer whose Q, K and V weights are stacked in one matrix."""
    d, every = qkv.shape[1], slice(None)
    return {"q": (qkv, slice(0, d)), "k": (qkv, slice(d, 2 * d)), "v": (qkv, slice(2 * d, 3 * d)),
            "attn_out": (attn_out, every), "ffn_in": (ffn_in, every), "ffn_out": (ffn_out, every)}


def _assert_same(result, expected, rtol):
    for key in PER_LAYER + SCALARS:
        np.testing.assert_allclose(getattr(result, key), expected[key], rtol=rtol, err_msg=key)
    for role in GRAD_MATRICES:
        np.testing.assert_allclose(result.grad_norms[role], expected["grad_norms"][role],
                                   rtol=rtol, err_msg=role)


def _config(**kw):
    return BertConfig(vocab_size=512, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
                      hidden_dropout=0.0, attention_dropout=0.0, init="xavier", **kw)


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_dslm_adapter_matches_a_direct_computation(ln):
    torch.manual_seed(0)
    model = BertForPreTraining(_config(ln=ln))
    batch = _batch(b=6, s=16)
    result = probe_model(model, batch)
    assert adapter_for(model) is adapter_for(BertForPreTraining(_config(ln=ln)))

    matrices = [_fused_layer(layer.attention.qkv.weight, layer.attention.out.weight,
                             layer.ffn.fc_in.weight, layer.ffn.fc_out.weight)
                for layer in model.bert.layers]
    out = model.train()(**batch, output_hidden_states=True)
    expected = _reference(out.hidden_states, out.loss, batch["attention_mask"], matrices)
    _assert_same(result, expected, rtol=1e-5)
    assert result.mlm_loss == pytest.approx(out.mlm_loss.item(), rel=1e-6)
    assert result.binary_loss == pytest.approx(out.binary_loss.item(), rel=1e-6)


def test_hf_adapter_measures_the_converted_model_alike():
    transformers = pytest.importorskip("transformers")
    from dslm.model.hf import to_hf

    torch.manual_seed(0)
    ours = BertForPreTraining(_config(ln="post"))
    with torch.no_grad():   # LayerNorm gains and biases off 1 / 0, so no mapping hides behind them
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf = to_hf(ours)
    assert isinstance(hf, transformers.BertForPreTraining)
    batch = _batch(b=6, s=16)
    expected = probe_model(ours, batch, micro_batch_size=4)   # uneven micro-batches: 4 + 2
    result = probe_model(hf, batch, micro_batch_size=4)
    assert not hf.training and all(p.grad is None for p in hf.parameters())
    assert expected.forward_variance[-1] > 1.5   # the stream before LayerNorm, not after it
    _assert_same(result, vars(expected), rtol=1e-4)
    assert result.mlm_loss == pytest.approx(expected.mlm_loss, rel=1e-5)
    assert result.binary_loss == pytest.approx(expected.binary_loss, rel=1e-5)


def test_unsupported_models_are_refused_by_name():
    batch = _batch(b=2, s=8)
    for model in (nn.Linear(4, 4), BertModel(_config())):
        with pytest.raises(TypeError, match=r"dslm\.model\.BertForPreTraining and "
                                            r"transformers\.BertForPreTraining"):
            probe_model(model, batch)


class TinyMLM(nn.Module):
    """A model the library has no adapter for: torch's own Pre-LN encoder layers (fused in_proj),
    a linear MLM head, no binary head."""

    def __init__(self, vocab=512, d=32, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask, streams=None):
        x = self.embed(input_ids)
        for layer in [None] + list(self.layers):
            x = x if layer is None else layer(x, src_key_padding_mask=attention_mask == 0)
            if streams is not None:
                streams.append(x)
        return self.head(x)


def _tiny_grads(layer):
    q, k, v = layer.self_attn.in_proj_weight.grad.chunk(3)
    return {"q": q, "k": k, "v": v, "attn_out": layer.self_attn.out_proj.weight.grad,
            "ffn_in": layer.linear1.weight.grad, "ffn_out": layer.linear2.weight.grad}


def _tiny_losses(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    labels = batch["mlm_labels"]
    return {"mlm": (F.cross_entropy(logits.flatten(0, 1), labels.flatten()),
                    (labels != -100).sum())}


TINY = ProbeAdapter(embedding=lambda m: Tap(m.embed), blocks=lambda m: list(m.layers),
                    grads=_tiny_grads, losses=_tiny_losses)


def test_a_custom_adapter_probes_any_model():
    torch.manual_seed(0)
    model = TinyMLM()
    batch = _batch(b=6, s=16)
    with pytest.raises(TypeError, match="TinyMLM"):
        adapter_for(model)
    result = probe_model(model, batch, micro_batch_size=4, adapter=TINY)
    assert result.num_layers == 2 and result.binary_loss is None

    matrices = [_fused_layer(layer.self_attn.in_proj_weight, layer.self_attn.out_proj.weight,
                             layer.linear1.weight, layer.linear2.weight) for layer in model.layers]
    streams = []
    logits = model.train()(batch["input_ids"], batch["attention_mask"], streams)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["mlm_labels"].flatten())
    expected = _reference(streams, loss, batch["attention_mask"], matrices)
    _assert_same(result, expected, rtol=1e-4)
    assert result.mlm_loss == pytest.approx(loss.item(), rel=1e-5)

    only_q = ProbeAdapter(TINY.embedding, TINY.blocks,
                          lambda layer: {"q": _tiny_grads(layer)["q"]}, TINY.losses)
    with pytest.raises(ValueError, match="roles"):
        probe_model(model, batch, adapter=only_q)


# ---------------------------------------------------------------------------------------------
# decoders: dslm's GPT against a direct computation, HF's GPT-2 against its dslm original


def _gpt_config(**kw):
    from dslm.model import GPTConfig

    return GPTConfig(vocab_size=512, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
                     max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                     init="xavier", activation="relu", **kw)


def _lm_batch(b=6, s=16, vocab=512, seed=0):
    """Next-token windows: input_ids and targets = the following token, no mask, no segments."""
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab, (b, s + 1), generator=g)
    return {"input_ids": window[:, :-1], "targets": window[:, 1:]}


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_dslm_gpt_adapter_matches_a_direct_computation(ln):
    from dslm.model import GPTLMHeadModel
    from dslm.probe import DSLM_GPT

    torch.manual_seed(0)
    model = GPTLMHeadModel(_gpt_config(ln=ln))
    assert adapter_for(model) is DSLM_GPT
    batch = _lm_batch()
    result = probe_model(model, batch, micro_batch_size=4)

    matrices = [_fused_layer(layer.attention.qkv.weight, layer.attention.out.weight,
                             layer.ffn.fc_in.weight, layer.ffn.fc_out.weight)
                for layer in model.transformer.layers]
    out = model.train()(batch["input_ids"], targets=batch["targets"], output_hidden_states=True)
    expected = _reference(out.hidden_states, out.loss, None, matrices)
    _assert_same(result, expected, rtol=1e-4)
    assert result.lm_loss == pytest.approx(out.loss.item(), rel=1e-6)
    assert result.mlm_loss is None and result.binary_loss is None
    assert (result.grad_norm > 0).all() and np.isfinite(result.correlation).all()


def _perturbed_gpt(ln="pre"):
    """A decoder whose LayerNorm gains and biases and linear biases are off 1 / 0, so no mapping
    hides behind them."""
    from dslm.model import GPTLMHeadModel

    torch.manual_seed(0)
    model = GPTLMHeadModel(_gpt_config(ln=ln))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_hf_gpt2_adapter_measures_the_converted_model_alike():
    transformers = pytest.importorskip("transformers")
    from dslm.model.hf_gpt2 import gpt2_to_hf
    from dslm.probe import HF_GPT2

    ours = _perturbed_gpt()
    hf = gpt2_to_hf(ours)
    assert isinstance(hf, transformers.GPT2LMHeadModel) and adapter_for(hf) is HF_GPT2
    batch = _lm_batch()
    expected = probe_model(ours, batch, micro_batch_size=4)   # uneven micro-batches: 4 + 2
    result = probe_model(hf, batch, micro_batch_size=4)
    assert not hf.training and all(p.grad is None for p in hf.parameters())
    assert expected.forward_variance[-1] > 1.5 * expected.forward_variance[0]   # Pre-LN: grows
    _assert_same(result, vars(expected), rtol=1e-4)
    assert result.lm_loss == pytest.approx(expected.lm_loss, rel=1e-5)
    # the roles are the right slices: Q, K and V differ from each other
    q, k, v = (expected.grad_norms[r] for r in ("q", "k", "v"))
    assert not np.allclose(q, k) and not np.allclose(k, v)


def test_measure_r0_reads_the_decoder_embeddings():
    from dslm.model import GPTLMHeadModel
    from dslm.probe import measure_r0

    torch.manual_seed(0)
    model = GPTLMHeadModel(_gpt_config())
    batch = _lm_batch(b=8)
    emb = model.transformer.embeddings
    x = emb.word_embeddings(batch["input_ids"]) + emb.position_embeddings.weight[:16]
    assert measure_r0(model, batch) == pytest.approx(max(token_moments(x)[2], 1e-6), rel=1e-6)
    assert measure_r0(model, batch) == measure_r0(emb, batch)
