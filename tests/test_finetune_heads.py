"""Finetuning heads: shapes, init stds per scheme, loading from our checkpoints and from HF BERT."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dslm.errors import UsageError
from dslm.finetune.heads import MultipleChoice, SequenceClassifier, head_std, load_encoder
from dslm.model import BertConfig, BertForPreTraining, BertModel



def small(init="megatron", d=32, **kw):
    return BertConfig(vocab_size=50, hidden_size=d, num_layers=2, num_heads=2, max_position_embeddings=64,
                      init=init, **kw)


def test_shapes():
    torch.manual_seed(0)
    cfg = small()
    ids = torch.randint(5, 50, (3, 10))
    assert SequenceClassifier(cfg, 3)(ids, torch.zeros_like(ids), torch.ones_like(ids)).shape == (3, 3)
    mc = MultipleChoice(cfg, 4).eval()
    ids4 = torch.randint(5, 50, (2, 4, 10))
    out = mc(ids4, torch.zeros_like(ids4), torch.ones_like(ids4))
    assert out.shape == (2, 4)
    # options are scored independently: option 2 of example 0 alone gives the same score
    single = mc.head(mc.bert(ids4[0, 2:3]).pooled_output)
    torch.testing.assert_close(out[0, 2], single[0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme, n_out, expected", [
    ("megatron", 3, 0.02), ("xavier", 3, math.sqrt(2 / (512 + 3))), ("dslm", 3, 1 / math.sqrt(512)),
    ("xavier", 1, math.sqrt(2 / (512 + 1))), ("dslm", 1, 1 / math.sqrt(512)),
    ("deepnorm", 3, math.sqrt(2 / (512 + 3)))])
def test_head_init_std(scheme, n_out, expected):
    cfg = BertConfig(vocab_size=8, hidden_size=512, num_layers=2, num_heads=8, init=scheme)
    assert head_std(cfg, n_out) == pytest.approx(expected)
    enc = BertModel(small())  # any encoder: only the head's draw is looked at
    torch.manual_seed(1)
    model = (SequenceClassifier(cfg, n_out, encoder=enc) if n_out > 1 else MultipleChoice(cfg, 4, encoder=enc))
    w = model.head.weight
    assert w.shape == (n_out, 512)
    assert w.std().item() == pytest.approx(expected, rel=0.12)
    assert model.head.bias.abs().max() == 0


def test_load_encoder_from_our_checkpoints(tmp_path):
    torch.manual_seed(0)
    pre = BertForPreTraining(small("dslm"))
    pre.save_pretrained(tmp_path / "pre")
    enc, desc = load_encoder(tmp_path / "pre", dropout=0.05)
    assert "dslm checkpoint" in desc and enc.config.hidden_dropout == 0.05 and enc.config.init == "dslm"
    for k, v in pre.bert.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    # the engine's layout: <run>/checkpoints/step_*/ -> the newest step
    for step in (10, 20):
        d = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        BertModel(small()).save_pretrained(d)
        (d / "meta.json").write_text(json.dumps({"step": step}))
    BertModel(small(), init=False).save_pretrained(tmp_path / "run" / "checkpoints" / "step_00000020")
    enc, desc = load_encoder(tmp_path / "run")
    assert desc.endswith("step_00000020")
    # a finetuned model (ours) also serves as an encoder
    clf = SequenceClassifier(small(), 3)
    clf.save_pretrained(tmp_path / "clf")
    again = SequenceClassifier.from_pretrained(tmp_path / "clf")
    torch.testing.assert_close(again.head.weight, clf.head.weight)
    enc, _ = load_encoder(tmp_path / "clf")
    torch.testing.assert_close(enc.pooler.dense.weight, clf.bert.pooler.dense.weight)


def test_load_encoder_errors(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_encoder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    BertModel(small()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UsageError, match="corrupt or unreadable"):
        load_encoder(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{oops")
    with pytest.raises(UsageError, match="unreadable"):
        load_encoder(tmp_path / "m")


def test_load_encoder_from_hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    enc, desc = load_encoder(tmp_path / "hf", dropout=0.1)
    assert desc.startswith("HF BERT") and enc.config.layer_norm_eps == hf_cfg.layer_norm_eps
    enc.eval()
    ids = torch.randint(5, 60, (2, 9))
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = enc(ids, types, mask).pooled_output
        theirs = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
