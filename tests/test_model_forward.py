"""Forward pass: Pre-LN / Post-LN against a reference written with plain tensor ops, the residual
scaling (lam / beta on both adds, bias included), padding mask, MLM gather and losses, bf16."""
import math

import pytest
import torch
import torch.nn.functional as F

from dslm.model import BertConfig, BertForPreTraining, BertModel


V = 97


def _batch(b=3, s=12, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s), generator=g)
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[1, s - 4:] = 0
        mask[2, s - 1:] = 0
    labels = torch.full((b, s), -100)
    labels[0, 1], labels[0, 5], labels[1, 2], labels[2, 7] = 3, 9, 11, 50
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, mlm_labels=labels,
                binary_labels=torch.tensor([0, 1, 1])[:b])


def _randomise(model, seed=0):
    """Every parameter random (biases, LayerNorm gains and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _reference(model, ids, types, mask):
    """The model of THEORY.md section 3 from the raw parameters, no module code reused."""
    c = model.config
    P = dict(model.named_parameters())
    pre = "bert." if isinstance(model, BertForPreTraining) else ""
    act = (lambda t: torch.clamp(t, min=0)) if c.activation == "relu" else \
        (lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))))
    if c.uses_residual_scaling:
        beta2 = 1 - c.lam2 if c.lam2 is not None else c.dslm_k / c.num_layers
        lam, beta = math.sqrt(1 - beta2), math.sqrt(beta2)
    else:
        lam = beta = 1.0
    b, s = ids.shape
    H, dh, d = c.num_heads, c.hidden_size // c.num_heads, c.hidden_size
    x = (P[pre + "embeddings.word_embeddings.weight"][ids]
         + P[pre + "embeddings.position_embeddings.weight"][torch.arange(s)][None]
         + P[pre + "embeddings.token_type_embeddings.weight"][types])
    hidden = [x]
    neg = torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]

    def lin(t, name):
        return t @ P[name + ".weight"].T + P[name + ".bias"]

    def attention(t, i):
        w, bias = P[f"{pre}layers.{i}.attention.qkv.weight"], P[f"{pre}layers.{i}.attention.qkv.bias"]
        q = (t @ w[:d].T + bias[:d]).reshape(b, s, H, dh).transpose(1, 2)
        k = (t @ w[d:2 * d].T + bias[d:2 * d]).reshape(b, s, H, dh).transpose(1, 2)
        v = (t @ w[2 * d:].T + bias[2 * d:]).reshape(b, s, H, dh).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + neg, -1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, d)
        return lin(ctx, f"{pre}layers.{i}.attention.out")

    def ffn(t, i):
        return lin(act(lin(t, f"{pre}layers.{i}.ffn.fc_in")), f"{pre}layers.{i}.ffn.fc_out")

    def ln(t, name):
        return _ln(t, P[name + ".weight"], P[name + ".bias"], c.layer_norm_eps)

    for i in range(c.num_layers):
        L = f"{pre}layers.{i}."
        if c.ln == "pre":
            h = lam * x + beta * attention(ln(x, L + "ln1"), i)
            x = lam * h + beta * ffn(ln(h, L + "ln2"), i)
        else:
            a = ln(x, L + "ln1")
            h = lam * a + beta * attention(a, i)
            bb = ln(h, L + "ln2")
            x = lam * bb + beta * ffn(bb, i)
        hidden.append(x)
    last = ln(x, pre + "final_ln")
    pooled = torch.tanh(lin(last[:, 0], pre + "pooler.dense"))
    out = dict(hidden=hidden, last=last, pooled=pooled)
    if pre:
        t = _ln(act(lin(last, "lm_head.dense")), P["lm_head.ln.weight"], P["lm_head.ln.bias"],
                c.layer_norm_eps)
        if c.uses_dslm_init:
            t = t / math.sqrt(c.hidden_size * (1 - c.hidden_dropout) / 3)
        out["mlm"] = t @ P[pre + "embeddings.word_embeddings.weight"].T + P["lm_head.bias"]
        out["binary"] = lin(pooled, "binary_head")
    return out


@pytest.mark.parametrize("ln, activation, init", [
    ("pre", "relu", "xavier"), ("post", "relu", "xavier"),
    ("pre", "gelu", "dslm"), ("post", "gelu", "dslm"), ("post", "relu", "dslm")])
def test_forward_matches_plain_tensor_reference(ln, activation, init):
    config = BertConfig(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4,
                        max_position_embeddings=16, ln=ln, activation=activation, init=init,
                        layer_norm_eps=1e-6, lam2=0.7 if init == "dslm" else None)
    model = BertForPreTraining(config).eval()
    _randomise(model)
    batch = _batch()
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(ids, types, mask, output_hidden_states=True)
        ref = _reference(model, ids, types, mask)
    assert len(out.hidden_states) == 4
    for a, r in zip(out.hidden_states, ref["hidden"]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    enc = model.bert(ids, types, mask)
    torch.testing.assert_close(enc.last_hidden_state, ref["last"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.pooled_output, ref["pooled"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mlm_logits, ref["mlm"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.binary_logits, ref["binary"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_residual_scaling_on_both_adds_includes_bias(ln):
    # all weight matrices 0: attention returns its output bias c1 (V = value bias, rows of the
    # softmax sum to 1, out weight 0), the FFN returns c2; so the layer is pure residual arithmetic
    config = BertConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, ln=ln,
                        init="dslm", lam2=0.64, hidden_dropout=0.0, attention_dropout=0.0)
    layer = BertModel(config).layers[0].eval()
    lam, beta = 0.8, 0.6
    assert (layer.lam, layer.beta) == pytest.approx((lam, beta))
    c1, c2 = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.ln1.weight.fill_(1.0)
        layer.ln2.weight.fill_(1.0)
        layer.attention.out.bias.copy_(c1)
        layer.ffn.fc_out.bias.copy_(c2)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = layer(x, None)
    if ln == "pre":
        expected = lam * (lam * x + beta * c1) + beta * c2
    else:
        a = _ln(x, 1.0, 0.0, config.layer_norm_eps)
        expected = lam * _ln(lam * a + beta * c1, 1.0, 0.0, config.layer_norm_eps) + beta * c2
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_dropout_is_inside_the_beta_branch():
    # train mode, p = 0.5: the block contributes beta * (0 or 2 c) per element
    config = BertConfig(vocab_size=V, hidden_size=64, num_layers=1, num_heads=2, ln="pre",
                        init="dslm", lam2=0.75, hidden_dropout=0.5, attention_dropout=0.0)
    layer = BertModel(config).layers[0].train()
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.attention.out.bias.fill_(1.0)
    x = torch.zeros(4, 8, 64)
    torch.manual_seed(0)
    y = layer(x, None)
    # after the attention add: 0 or 2*beta; after the FFN add (block = 0): scaled by lam
    kept = y != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], math.sqrt(0.75) * 2 * 0.5))


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_padding_does_not_change_real_tokens(ln):
    config = BertConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ln=ln,
                        init="xavier")
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (1, 9), generator=g)
    padded = torch.cat([ids, torch.randint(0, V, (1, 7), generator=g)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 7)], 1).long()
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        with_pad = model(padded, attention_mask=mask).last_hidden_state[:, :9]
        no_mask = model(padded).last_hidden_state[:, :9]
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)
    assert (no_mask - alone).abs().max() > 1e-2  # the mask is what keeps them equal


def test_mlm_gather_losses_and_counts():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, init="xavier")
    model = BertForPreTraining(config).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        full = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    labels = batch["mlm_labels"]
    sel = labels != -100
    assert out.mlm_logits.shape == (int(sel.sum()), V) and full.mlm_logits.shape == (3, 12, V)
    torch.testing.assert_close(out.mlm_logits, full.mlm_logits[sel], rtol=1e-5, atol=1e-5)
    mlm = F.cross_entropy(full.mlm_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    binary = F.cross_entropy(full.binary_logits, batch["binary_labels"])
    torch.testing.assert_close(out.mlm_loss, mlm)
    torch.testing.assert_close(out.binary_loss, binary)
    torch.testing.assert_close(out.loss, mlm + binary)
    assert int(out.mlm_count) == 4 and int(out.binary_count) == 3
    assert int(out.mlm_correct) == int((full.mlm_logits[sel].argmax(-1) == labels[sel]).sum())
    assert int(out.binary_correct) == int((full.binary_logits.argmax(-1)
                                           == batch["binary_labels"]).sum())
    assert out["loss"] is out.loss


def test_no_masked_tokens_gives_zero_mlm_loss_not_nan():
    model = BertForPreTraining(BertConfig(vocab_size=V, hidden_size=16, num_layers=1,
                                          num_heads=2))
    batch = _batch()
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], -100)
    out = model(**batch)
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_bf16_autocast_forward_backward_on_cpu():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, init="dslm",
                        ln="pre")
    model = BertForPreTraining(config).eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.mlm_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    out.loss.backward()
    assert torch.isfinite(model.bert.layers[0].attention.qkv.weight.grad).all()


def test_sequence_longer_than_positions_raises():
    model = BertModel(BertConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2,
                                 max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))
