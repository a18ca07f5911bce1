"""HF transformers interop (exact both ways, fp32, eval) and save_pretrained / from_pretrained."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dslm.errors import UsageError  # noqa: E402
from dslm.model import BertConfig, BertForPreTraining, BertModel, from_pretrained  # noqa: E402
from dslm.model.hf import from_hf, hf_hidden_states, to_hf  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(vocab=120, b=3, s=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    types = torch.randint(0, 2, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, types, mask


def _hf_config(act, eps):
    return transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=80, hidden_act=act, layer_norm_eps=eps, max_position_embeddings=32,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _perturb(model, seed=0):
    """Random LayerNorm gains/biases and biases, so no mapping is hidden by a trivial 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _compare(ours_out, hf_out, model, pretraining):
    if pretraining:
        torch.testing.assert_close(ours_out.mlm_logits, hf_out.prediction_logits, **TOL)
        torch.testing.assert_close(ours_out.binary_logits, hf_out.seq_relationship_logits, **TOL)
    else:
        torch.testing.assert_close(ours_out.last_hidden_state, hf_out.last_hidden_state, **TOL)
        torch.testing.assert_close(ours_out.pooled_output, hf_out.pooler_output, **TOL)
    ours_h = hf_hidden_states(model, ours_out.hidden_states)
    assert len(ours_h) == len(hf_out.hidden_states) == 4
    for a, b in zip(ours_h, hf_out.hidden_states):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("pretraining", [False, True])
@pytest.mark.parametrize("act, eps", [("gelu", 1e-12), ("relu", 1e-7)])
def test_hf_to_ours_exact(pretraining, act, eps):
    torch.manual_seed(0)
    cls = transformers.BertForPreTraining if pretraining else transformers.BertModel
    hf = cls(_hf_config(act, eps)).eval()
    _perturb(hf)
    ours = from_hf(hf).eval()
    assert isinstance(ours, BertForPreTraining if pretraining else BertModel)
    assert ours.config.activation == act and ours.config.layer_norm_eps == eps
    assert ours.config.ln == "post"
    ids, types, mask = _inputs()
    with torch.no_grad():
        hf_out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask,
                    output_hidden_states=True)
        ours_out = ours(ids, types, mask, output_hidden_states=True)
    _compare(ours_out, hf_out, ours, pretraining)


@pytest.mark.parametrize("pretraining", [False, True])
@pytest.mark.parametrize("act, eps", [("gelu", 1e-5), ("relu", 1e-9)])
def test_ours_to_hf_exact_and_back(pretraining, act, eps):
    torch.manual_seed(1)
    config = BertConfig(vocab_size=120, hidden_size=48, num_layers=3, num_heads=4, ffn_size=80,
                        activation=act, layer_norm_eps=eps, max_position_embeddings=32,
                        init="xavier")
    ours = (BertForPreTraining if pretraining else BertModel)(config).eval()
    _perturb(ours, seed=2)
    hf = to_hf(ours)
    ids, types, mask = _inputs(seed=3)
    with torch.no_grad():
        hf_out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask,
                    output_hidden_states=True)
        ours_out = ours(ids, types, mask, output_hidden_states=True)
    _compare(ours_out, hf_out, ours, pretraining)
    back = from_hf(hf)
    for (name, a), (name_b, b) in zip(ours.named_parameters(), back.named_parameters()):
        assert name == name_b and torch.equal(a, b), name


def test_untranslatable_models_are_refused():
    base = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match="Post-LN"):
        to_hf(BertModel(BertConfig(**base, ln="pre")))
    with pytest.raises(ValueError, match="DSLM"):
        to_hf(BertModel(BertConfig(**base, init="dslm")))
    hf_config = _hf_config("gelu_new", 1e-12)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(transformers.BertModel(hf_config))


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_save_and_load_pretrained(tmp_path, ln):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_layers=2, num_heads=2, ln=ln,
                        init="dslm", r0=0.3)
    model = BertForPreTraining(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    loaded = BertForPreTraining.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == config
    ids, types, mask = _inputs(vocab=60)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, types, mask).mlm_logits,
                                   model(ids, types, mask).mlm_logits, rtol=0, atol=0)
        encoder = BertModel.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(encoder(ids, types, mask).last_hidden_state,
                                   model.bert(ids, types, mask).last_hidden_state, rtol=0, atol=0)
    assert isinstance(from_pretrained(tmp_path / "ckpt"), BertForPreTraining)
    with pytest.raises(UsageError, match="config.json"):
        BertModel.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification", "BertForNextSentencePrediction"])
def test_hf_encoder_of_any_head_class(head):
    """The encoder of an HF head class converts exactly into our BertModel (hidden states; the pooler
    too where HF has one)."""
    torch.manual_seed(0)
    hf = getattr(transformers, head)(_hf_config("gelu", 1e-12)).eval()
    _perturb(hf)
    ours = from_hf(hf).eval()
    assert isinstance(ours, BertModel)
    ids, types, mask = _inputs()
    with torch.no_grad():
        hf_out = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        ours_out = ours(ids, types, mask, output_hidden_states=True)
    torch.testing.assert_close(ours_out.last_hidden_state, hf_out.last_hidden_state, **TOL)
    for a, b in zip(hf_hidden_states(ours, ours_out.hidden_states), hf_out.hidden_states):
        torch.testing.assert_close(a, b, **TOL)
    if hf.bert.pooler is not None:
        torch.testing.assert_close(ours_out.pooled_output, hf_out.pooler_output, **TOL)
