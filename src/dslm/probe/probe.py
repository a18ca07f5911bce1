"""Measure a model's signal propagation in one forward/backward pass (THEORY.md sections 2 and 4).

:func:`probe_model` runs the model's pretraining loss on a batch in training mode (dropout on), with
forward hooks on the residual stream at the embeddings and after every block, and reads back per
layer:

- the variance and mean cross-token correlation of the residual stream after the layer (for Post-LN:
  the sum after the second residual add, before the next LayerNorm);
- the variance and cross-token correlation of the loss gradient w.r.t. that stream (and w.r.t. the
  embedding output: the input-gradient variance);
- the L2 norm of the gradient of each weight matrix (Q, K, V, attention out, FFN in, FFN out) and
  of the six together.

The loss is BERT's (masked-LM ``mlm_labels`` and/or the binary head's ``binary_labels``) or a
decoder's next-token loss (``targets``: the token each position predicts, -100 for none).

Where the stream is, which matrix plays which role and what the loss terms are come from a
:class:`dslm.probe.adapters.ProbeAdapter`: they ship for dslm's and HF's BERT and GPT(-2), and any
model can be probed through one written for it. Micro-batching accumulates gradients with each
micro-batch's loss weighted by its share of the masked tokens / labelled sequences / targets, so the gradients
are those of the full batch's loss (up to dropout's random draws); the statistics are pooled sums,
so they are the full batch's too. No parameter is updated; gradients are cleared before and after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dslm.model.bert import IGNORE_INDEX
from dslm.probe.adapters import ProbeAdapter, Tap, adapter_for
from dslm.probe.stats import TokenMoments
from dslm.theory.profile import GRAD_MATRICES, SignalProfile

MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "binary_labels", "targets")
LABELS = {"mlm": "mlm_labels", "binary": "binary_labels", "lm": "targets"}   # loss term -> its labels


@dataclass
class ProbeResult(SignalProfile):
    """Measured per-layer moments (bottom first), the gradient at the input and the losses."""

    input_grad_variance: float = float("nan")    # d loss / d (embedding output)
    input_grad_correlation: float = float("nan")
    loss: float = float("nan")
    mlm_loss: float | None = None
    binary_loss: float | None = None
    lm_loss: float | None = None


def _split(batch: dict, size: int):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def _watch(tap: Tap, fwd: TokenMoments, bwd: TokenMoments, state: dict):
    """Hook ``tap``: the stream's moments into ``fwd``, its gradient's into ``bwd``."""
    def hook(module, inputs, output):
        x = inputs[0] if tap.input else output
        if isinstance(x, tuple):
            x = x[0]
        fwd.add(x, state["mask"])
        if x.requires_grad:
            x.register_hook(lambda g: bwd.add(g, state["mask"]))
    return tap.module.register_forward_hook(hook)


def _grad_norms(adapter: ProbeAdapter, blocks: list) -> np.ndarray:
    """(N, 6) L2 norms of each block's role gradients, in GRAD_MATRICES order (one transfer)."""
    norms = []
    for block in blocks:
        grads = adapter.grads(block)
        if set(grads) != set(GRAD_MATRICES):
            raise ValueError(f"adapter grads gave roles {sorted(grads)}, expected {GRAD_MATRICES}")
        norms.append(torch.stack([torch.linalg.vector_norm(grads[role].float())
                                  for role in GRAD_MATRICES]))
    return torch.stack(norms).double().cpu().numpy()


def _accumulate(model, adapter: ProbeAdapter, batch: dict, micro: int, state: dict) -> tuple:
    """Backward each micro-batch's loss terms, each weighted by the micro-batch's share of the
    batch's labels, so the gradients are the full batch's; returns the batch's loss and terms."""
    device = batch["input_ids"].device
    totals = {name: (batch[key] != IGNORE_INDEX).sum().clamp(min=1)
              for name, key in LABELS.items() if key in batch}
    loss_sum = torch.zeros((), device=device)
    parts = {}
    for mb in _split(batch, micro):
        state["mask"] = mb.get("attention_mask")
        loss = torch.zeros((), device=device)
        for name, (mean, count) in adapter.losses(model, mb).items():
            term = mean * (count / totals[name])   # mean over the micro-batch -> share of the batch
            parts[name] = parts.get(name, 0) + term.detach()
            loss = loss + term
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum, parts


def probe_model(model, batch: dict, micro_batch_size: int | None = None,
                adapter: ProbeAdapter | None = None) -> ProbeResult:
    """One forward/backward of ``model``'s pretraining loss on ``batch`` in training mode.

    ``model``: any model ``adapter`` reads. ``batch``: the data layer's dict (BERT: input_ids,
    token_type_ids, attention_mask, mlm_labels, binary_labels; a decoder: input_ids, targets);
    tensors are moved to the model's device. ``micro_batch_size``: sequences per forward/backward
    (None = the whole batch at once). ``adapter``: None = the shipped one for the model's class
    (:func:`adapter_for`: dslm's and HF transformers' ``BertForPreTraining``, dslm's
    ``GPTLMHeadModel`` and HF's ``GPT2LMHeadModel``).
    """
    adapter = adapter or adapter_for(model)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_KEYS and v is not None}
    if not any(key in batch for key in LABELS.values()):
        raise ValueError("probe_model needs mlm_labels and/or binary_labels, or targets, in the batch")
    micro = batch["input_ids"].shape[0] if not micro_batch_size else int(micro_batch_size)
    if micro <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")

    blocks = adapter.blocks(model)
    taps = [adapter.embedding(model)] + [adapter.stream(block) for block in blocks]
    fwd = [TokenMoments(device) for _ in taps]
    bwd = [TokenMoments(device) for _ in taps]
    state = {"mask": None}
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    handles = [_watch(tap, f, b, state) for tap, f, b in zip(taps, fwd, bwd)]
    try:
        loss_sum, parts = _accumulate(model, adapter, batch, micro, state)
        norms = _grad_norms(adapter, blocks)                   # (N, 6)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
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
        mlm_loss=float(parts["mlm"]) if "mlm" in parts else None,
        binary_loss=float(parts["binary"]) if "binary" in parts else None,
        lm_loss=float(parts["lm"]) if "lm" in parts else None,
    )
