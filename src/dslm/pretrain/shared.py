"""What the pretraining tasks share: a config with r0 measured on data, the compile policy and the
parameter count before anything is built."""
from __future__ import annotations

import torch
from torch import nn

from dslm.model.config import TransformerConfig

WHOLE_MODEL_COMPILE_LAYERS = 24


def with_measured_r0(config: TransformerConfig, embeddings: nn.Module, batch: dict) -> TransformerConfig:
    """``config`` with the r0 that ``embeddings`` give on ``batch`` (:func:`dslm.probe.measure_r0`):
    ``--r0 auto``, the DSLM init drawn for the cross-token correlation of this data."""
    from dslm.probe import measure_r0

    r0 = measure_r0(embeddings, batch)
    print(f"measured r0 = {r0:.4f}", flush=True)
    return type(config).from_dict({**config.to_dict(), "r0": r0})


def compile_whole_or_per_layer(model: nn.Module, layers: nn.ModuleList, head: str | None = None) -> None:
    """Up to 24 layers: one graph for the whole model and loss (BERT-base on an H100: 486k tokens/s
    against 456k per layer). Deeper: each transformer layer (one graph reused by all of them) and the
    method ``head`` of ``model`` (the head + loss, where the model has it as a method), so that
    compile time does not grow with depth."""
    if len(layers) <= WHOLE_MODEL_COMPILE_LAYERS:
        model.compile()
        return
    for layer in layers:
        layer.compile()
    if head is not None:
        setattr(model, head, torch.compile(getattr(model, head)))


def parameter_count(model_class: type[nn.Module], config: TransformerConfig) -> int:
    """Parameters of ``model_class(config)``, counted on the meta device (nothing allocated; a tied
    matrix once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config, init=False).parameters())
