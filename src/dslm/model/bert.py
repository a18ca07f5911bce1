"""BERT with Pre-LN / Post-LN placement and DeepScaleLM residual scaling (THEORY.md section 3).

Modules in the order data flows through them:

    Embeddings        word + position + token-type, summed, dropout (no LayerNorm here)
    SelfAttention     fused QKV projection, SDPA with an additive padding bias and attention dropout,
                      output projection
    FeedForward       Linear(d -> d_f), ReLU/GeLU, Linear(d_f -> d)
    TransformerLayer  LN placement and the residual adds x_next = lam x + beta Dropout(block)
    BertModel         embeddings, layers, final LayerNorm, tanh pooler of token 0
    LMHead            dense, activation, LayerNorm, (DSLM logit scale), tied decoder + bias
    BertForPreTraining  BertModel + LM head (only at masked positions) + binary (NSP/SOP) head

Post-LN follows the Megatron convention: a = LN1(x); h = a + Attn(a); b = LN2(h); out = b + FFN(b),
so layer 1's LN1 is the original BERT's embedding LayerNorm and the final LN closes the last layer.
``hidden_states`` are the residual stream (the embedding output, then each layer's output, before
any following LayerNorm); :func:`dslm.model.hf.hf_hidden_states` maps them to HF's convention.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dslm.errors import UsageError
from dslm.model.config import BertConfig
from dslm.model.init import init_weights
from dslm.model.ops import attention_bias, compute_dtype, linear_relu

IGNORE_INDEX = -100
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _dense_activation(linear: nn.Linear, activation: str, x: torch.Tensor) -> torch.Tensor:
    """activation(linear(x)); ReLU as one GEMM with a fused bias + ReLU epilogue (the same values,
    :mod:`dslm.model.ops`), GeLU in its exact (erf) form, as HF's "gelu"."""
    if activation == "relu":
        return linear_relu(x, linear.weight, linear.bias)
    return F.gelu(linear(x))


class Embeddings(nn.Module):
    """word + position + token-type embeddings, summed, then dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """The summed embeddings before dropout, shape (batch, seq, d)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq_len]
        if token_type_ids is None:
            return x + self.token_type_embeddings.weight[0]
        return x + self.token_type_embeddings(token_type_ids)

    def forward(self, input_ids, token_type_ids=None):
        return self.dropout(self.embed(input_ids, token_type_ids))


class SelfAttention(nn.Module):
    """Multi-head self-attention. ``qkv.weight`` rows are [Q; K; V] (d rows each), heads are
    contiguous slices of d_h features inside each."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout_p = config.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.ffn_size)
        self.fc_out = nn.Linear(config.ffn_size, config.hidden_size)
        self.activation = config.activation

    def forward(self, x):
        return self.fc_out(_dense_activation(self.fc_in, self.activation, x))


class TransformerLayer(nn.Module):
    """One layer; both residual adds are x_next = lam x + beta Dropout(block(...)) (the block's
    bias included), with (lam^2, beta^2) = ``config.residual_variances()``: (1, 1) for plain adds,
    lam^2 + beta^2 = 1 with DSLM residual scaling, (alpha^2, 1) with DeepNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.pre_ln = config.ln == "pre"
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attention = SelfAttention(config)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        lam2, beta2 = config.residual_variances()
        self.lam, self.beta = math.sqrt(lam2), math.sqrt(beta2)

    def _residual(self, x, block):
        block = self.dropout(block)
        if self.lam == 1.0:
            return torch.add(x, block, alpha=self.beta) if self.beta != 1.0 else x + block
        return torch.add(x * self.lam, block, alpha=self.beta)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            h = self._residual(x, self.attention(self.ln1(x), mask))
            return self._residual(h, self.ffn(self.ln2(h)))
        a = self.ln1(x)
        h = self._residual(a, self.attention(a, mask))
        b = self.ln2(h)
        return self._residual(b, self.ffn(b))


class Pooler(nn.Module):
    """tanh(dense(h[:, 0]))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


@dataclass
class _Output:
    """Dataclass output that can also be read like a dict (``out["loss"]``)."""

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self)]


@dataclass
class BertOutput(_Output):
    last_hidden_state: torch.Tensor            # after the final LayerNorm
    pooled_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output, then each layer's


@dataclass
class PreTrainingOutput(_Output):
    loss: torch.Tensor | None = None           # mlm_loss + binary_loss (those given)
    mlm_loss: torch.Tensor | None = None       # mean over masked tokens
    binary_loss: torch.Tensor | None = None    # mean over labelled sequences
    mlm_loss_sum: torch.Tensor | None = None   # summed over masked tokens (mlm_loss = sum / count)
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    binary_loss_sum: torch.Tensor | None = None
    binary_correct: torch.Tensor | None = None
    binary_count: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None     # (predicted slots, vocab) with labels, else (B, L, vocab)
    binary_logits: torch.Tensor | None = None  # (B, 2)
    hidden_states: tuple[torch.Tensor, ...] | None = None


def save_weights_dir(module: nn.Module, directory, meta: dict, state: dict | None = None) -> Path:
    """Write ``module``'s weights (or ``state``, e.g. a state dict gathered from FSDP shards) to
    ``directory/model.safetensors`` (temporary file + rename) and ``meta`` to
    ``directory/config.json``; the layout every dslm model directory uses."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or module.state_dict()).items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


class _Pretrained:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)``: config.json + model.safetensors."""

    config: BertConfig

    def pretrained_meta(self) -> dict:
        """What ``config.json`` holds: the class and the config. The class is the model's own, not
        a wrapper's (FSDP's ``fully_shard`` swaps in a subclass named ``FSDP<name>``)."""
        arch = next(c for c in type(self).__mro__ if _Pretrained in c.__bases__)
        return {"architectures": [arch.__name__], **self.config.to_dict()}

    def save_pretrained(self, directory, state: dict | None = None) -> Path:
        return save_weights_dir(self, directory, self.pretrained_meta(), state)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu"):
        """Load a saved model. ``BertModel.from_pretrained`` also accepts a ``BertForPreTraining``
        checkpoint and takes its encoder."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = load_config(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise UsageError(f"{weights}: file not found (expected a saved dslm model)")
        state = load_file(str(weights), device=str(map_location))
        if cls is BertModel and any(k.startswith("bert.") for k in state):
            state = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
        model = cls(config)
        model.load_state_dict(state)
        return model


def load_config(directory) -> BertConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{path}: file not found (expected a dslm model config)")
    try:
        data = json.loads(path.read_text())
        data.pop("architectures", None)
        return BertConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a valid dslm BertConfig ({e})") from None


def from_pretrained(directory, map_location="cpu"):
    """Load whichever model class was saved in ``directory``."""
    path = Path(directory) / CONFIG_FILE
    name = "BertForPreTraining"
    if path.is_file():
        try:
            name = json.loads(path.read_text()).get("architectures", [name])[0]
        except (ValueError, AttributeError, IndexError):
            pass
    cls = {"BertModel": BertModel, "BertForPreTraining": BertForPreTraining}.get(name)
    if cls is None:
        raise UsageError(f"{path}: unknown architecture {name!r}")
    return cls.from_pretrained(directory, map_location)


class BertModel(nn.Module, _Pretrained):
    """The encoder: embeddings, N layers, final LayerNorm, pooler."""

    def __init__(self, config: BertConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = Pooler(config)
        if init:
            init_weights(self, config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                output_hidden_states: bool = False) -> BertOutput:
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:  # (B, 1, 1, L) additive: every query sees the real keys only
            mask = attention_bias(attention_mask, compute_dtype(x))
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.final_ln(x)
        return BertOutput(x, self.pooler(x), tuple(hidden) if hidden is not None else None)


class LMHead(nn.Module):
    """dense d->d, activation, LayerNorm, times ``logit_scale`` (DSLM), tied decoder + bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.dense = nn.Linear(d, d)
        self.activation = config.activation
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.logit_scale = config.logit_scale()

    def forward(self, h, decoder_weight):
        h = self.ln(_dense_activation(self.dense, self.activation, h))
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
        return F.linear(h, decoder_weight, self.bias)


def _predicted_positions(mlm_labels: torch.Tensor, max_predictions: int | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat indices (into B x L) of the positions the MLM head predicts: ``max_predictions`` slots per
    sequence (its predicted positions first, then others, whose labels are -100), or every
    predicted position (a data-dependent size: one host sync)."""
    predicted = mlm_labels != IGNORE_INDEX
    if max_predictions is None:
        return predicted.reshape(-1).nonzero().squeeze(1)
    b, length = mlm_labels.shape
    n = min(max_predictions, length)
    slots = predicted.to(dtype).topk(n, dim=1, sorted=False).indices
    return (slots + torch.arange(b, device=slots.device).unsqueeze(1) * length).reshape(-1)


class BertForPreTraining(nn.Module, _Pretrained):
    """BERT with the masked-LM head (decoder tied to the word embeddings) and a binary head on the
    pooled token 0 (next-sentence / sentence-order prediction)."""

    def __init__(self, config: BertConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, init=False)
        self.lm_head = LMHead(config)
        self.binary_head = nn.Linear(config.hidden_size, 2)
        if init:
            init_weights(self, config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                binary_labels=None, output_hidden_states: bool = False,
                max_predictions: int | None = None) -> PreTrainingOutput:
        """Encoder, heads and (with labels) losses; ``max_predictions``: see :meth:`head_loss`."""
        enc = self.bert(input_ids, token_type_ids, attention_mask, output_hidden_states)
        out = self.head_loss(enc.last_hidden_state, enc.pooled_output, mlm_labels, binary_labels, max_predictions)
        out.hidden_states = enc.hidden_states
        return out

    def head_loss(self, seq, pooled, mlm_labels=None, binary_labels=None,
                  max_predictions: int | None = None) -> PreTrainingOutput:
        """The two heads on the encoder output and their losses (means, with the sums and counts).

        Only the predicted positions go through the LM head (d x vocab per token is BERT's largest
        matmul). With ``max_predictions`` (the sampler predicts at most that many tokens per
        sequence) each sequence's predicted positions are gathered into that many slots, spare slots
        carrying label -100: static shapes and no host sync (training, torch.compile, CUDA graphs).
        Without it the positions are found with a boolean gather, whose size is data dependent (the
        one host sync). Both give the same loss, summed in the same order."""
        out = PreTrainingOutput()
        decoder = self.bert.embeddings.word_embeddings.weight
        if mlm_labels is None:
            out.mlm_logits = self.lm_head(seq, decoder)
        else:
            index = _predicted_positions(mlm_labels, max_predictions,
                                         seq.dtype if seq.is_floating_point() else torch.float32)
            labels = mlm_labels.reshape(-1).index_select(0, index)
            logits = self.lm_head(seq.reshape(-1, seq.shape[-1]).index_select(0, index), decoder)
            valid = labels != IGNORE_INDEX
            out.mlm_loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            out.mlm_count = valid.sum()
            out.mlm_loss = out.mlm_loss_sum / out.mlm_count.clamp(min=1)
            out.mlm_logits = logits
            out.mlm_correct = ((logits.argmax(-1) == labels) & valid).sum()
        out.binary_logits = self.binary_head(pooled)
        if binary_labels is not None:
            valid = binary_labels != IGNORE_INDEX
            out.binary_loss_sum = F.cross_entropy(out.binary_logits.float(), binary_labels,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
            out.binary_count = valid.sum()
            out.binary_loss = out.binary_loss_sum / out.binary_count.clamp(min=1)
            out.binary_correct = ((out.binary_logits.argmax(-1) == binary_labels) & valid).sum()
        losses = [x for x in (out.mlm_loss, out.binary_loss) if x is not None]
        if losses:
            out.loss = losses[0] if len(losses) == 1 else losses[0] + losses[1]
        return out
