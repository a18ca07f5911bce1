"""Measure a model's signal propagation in one forward/backward pass (THEORY.md sections 2 and 4).

:func:`probe_model` runs the model's pretraining loss on a batch in training mode (dropout on), with
forward hooks on the embeddings and on every layer, and reads back per layer:

- the variance and mean cross-token correlation of the residual stream after the layer (for Post-LN:
  the sum after the second residual add, before the next LayerNorm);
- the variance and cross-token correlation of the loss gradient w.r.t. that stream (and w.r.t. the
  embedding output: the input-gradient variance);
- the L2 norm of the gradient of each weight matrix (Q, K, V, attention out, FFN in, FFN out) and
  of the six together.

Micro-batching accumulates gradients with each micro-batch's loss weighted by its share of the
masked tokens / labelled sequences, so the gradients are those of the full batch's loss (up to
dropout's random draws); the statistics are pooled sums, so they are the full batch's too. No
parameter is updated; gradients are cleared before and after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dslm.probe.stats import TokenMoments
from dslm.theory.profile import GRAD_MATRICES, SignalProfile

MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "binary_labels")
IGNORE_INDEX = -100


@dataclass
class ProbeResult(SignalProfile):
    """Measured per-layer moments (bottom first), the gradient at the input and the losses."""

    input_grad_variance: float = float("nan")    # d loss / d (embedding output)
    input_grad_correlation: float = float("nan")
    loss: float = float("nan")
    mlm_loss: float | None = None
    binary_loss: float | None = None


def _split(batch: dict, size: int):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def probe_model(model, batch: dict, micro_batch_size: int | None = None) -> ProbeResult:
    """One forward/backward of ``model``'s pretraining loss on ``batch`` in training mode.

    ``model``: a :class:`dslm.model.bert.BertForPreTraining` (also one converted from HF).
    ``batch``: the data layer's dict (input_ids, token_type_ids, attention_mask, mlm_labels,
    binary_labels); tensors are moved to the model's device. ``micro_batch_size``: sequences per
    forward/backward (None = the whole batch at once).
    """
    if not (hasattr(model, "bert") and hasattr(model.bert, "layers")):
        raise TypeError("probe_model needs a dslm BertForPreTraining (convert HF models with "
                        "dslm.model.hf.from_hf first)")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_KEYS and v is not None}
    if "mlm_labels" not in batch and "binary_labels" not in batch:
        raise ValueError("probe_model needs mlm_labels and/or binary_labels in the batch")
    n_seq = batch["input_ids"].shape[0]
    micro = n_seq if not micro_batch_size else int(micro_batch_size)
    if micro <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")

    layers = list(model.bert.layers)
    modules = [model.bert.embeddings] + layers
    fwd = [TokenMoments(device) for _ in modules]
    bwd = [TokenMoments(device) for _ in modules]
    state = {"mask": None}

    def make_hook(i):
        def hook(module, inputs, output):
            fwd[i].add(output, state["mask"])
            if output.requires_grad:
                output.register_hook(lambda g: bwd[i].add(g, state["mask"]))
        return hook

    totals = {}
    for key in ("mlm_labels", "binary_labels"):
        if key in batch:
            totals[key] = (batch[key] != IGNORE_INDEX).sum().clamp(min=1)

    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    loss_sum = torch.zeros((), device=device)
    parts = {"mlm_labels": torch.zeros((), device=device),
             "binary_labels": torch.zeros((), device=device)}
    try:
        for mb in _split(batch, micro):
            state["mask"] = mb.get("attention_mask")
            out = model(**mb)
            loss = torch.zeros((), device=device)
            if "mlm_labels" in totals:   # per-token mean over the micro-batch -> share of the batch
                term = out.mlm_loss * (out.mlm_count / totals["mlm_labels"])
                parts["mlm_labels"] += term.detach()
                loss = loss + term
            if "binary_labels" in totals:
                term = out.binary_loss * (out.binary_count / totals["binary_labels"])
                parts["binary_labels"] += term.detach()
                loss = loss + term
            loss.backward()
            loss_sum += loss.detach()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    d = model.config.hidden_size
    norms = []
    for layer in layers:
        qkv = layer.attention.qkv.weight.grad
        grads = [qkv[:d], qkv[d:2 * d], qkv[2 * d:], layer.attention.out.weight.grad,
                 layer.ffn.fc_in.weight.grad, layer.ffn.fc_out.weight.grad]
        norms.append(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    norms = torch.stack(norms).double().cpu().numpy()          # (N, 6), one host transfer
    model.zero_grad(set_to_none=True)

    f = np.array([m.result() for m in fwd])                    # (N+1, 3): mean, var, corr
    g = np.array([m.result() for m in bwd])
    return ProbeResult(
        forward_variance=f[1:, 1], correlation=f[1:, 2],
        grad_norm=np.sqrt((norms ** 2).sum(1)),
        grad_norms={name: norms[:, j] for j, name in enumerate(GRAD_MATRICES)},
        grad_variance=g[1:, 1], grad_correlation=g[1:, 2],
        embedding_variance=float(f[0, 1]), embedding_correlation=float(f[0, 2]),
        input_grad_variance=float(g[0, 1]), input_grad_correlation=float(g[0, 2]),
        loss=float(loss_sum),
        mlm_loss=float(parts["mlm_labels"]) if "mlm_labels" in totals else None,
        binary_loss=float(parts["binary_labels"]) if "binary_labels" in totals else None,
    )
