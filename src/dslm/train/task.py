"""What the training engine needs to know about a job: the :class:`Task` protocol.

The engine (:func:`dslm.train.engine.train`) owns everything generic -- devices, DDP/FSDP,
precision, optimizer, schedule, gradient accumulation, checkpoints, logging, evaluation loops.
A task owns everything specific to one job (pretraining, a GLUE finetune, ...):

* ``build_model()`` returns the ``nn.Module`` already initialised (or loaded from a pretrained
  checkpoint) on the CPU; the engine moves, wraps and (optionally) compiles it.
* ``train_dataset()`` / ``eval_datasets()`` return map-style datasets whose items are
  ``dict[str, Tensor]``; ``eval_datasets`` names each split (``{"valid": ds}``,
  ``{"dev_matched": ..., "dev_mismatched": ...}``). A split named ``"test"`` is evaluated only
  at the end of the run; the others at every ``eval_every`` steps and at the end.
* ``loss_and_metrics(model, batch)`` runs the forward pass on one micro-batch (already on the
  device, inside autocast) and returns the scalar loss to back-propagate (mean over the
  micro-batch) and metric *sums* as 0-dim tensors (``{"mlm_correct": .., "mlm_count": ..,
  "loss_sum": ..}``). It must not call ``.item()`` or otherwise synchronise with the device: the
  engine accumulates the sums on the device and all-reduces them once per logging interval.
* ``summarize(sums)`` turns summed metrics (plain floats, summed over micro-batches, steps and
  ranks) into reported numbers (``{"mlm_acc": correct / count, "ppl": ...}``).
* ``make_loader(...)`` is optional. Without it the engine uses a generic deterministic sharded
  loader (:func:`dslm.train.engine.default_loader`). With it, the task yields ``batch_size``-item
  batches for ``rank`` of ``world_size``: for ``train=True`` the batches of optimizer-micro-steps
  ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever if ``None``), so that a
  resumed run sees exactly the data the uninterrupted run would have seen; for ``train=False``
  one pass over the dataset (``start_step`` 0, ``num_steps`` a cap or ``None``).

Optional attributes the engine reads if present: ``tokens_per_item`` (int, for tokens/s),
``flops_per_token(model)`` (float, for MFU), ``config_dict()`` (JSON-able dict saved in every
checkpoint so that ``--load`` can refuse an incompatible one), ``run_files()`` (``{name: path}``
copied into ``out_dir`` once a fresh run has claimed it, e.g. the vocabulary), ``parameter_count()``
(checked against the device's memory before the model is built).
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset


@runtime_checkable
class Task(Protocol):
    name: str

    def build_model(self) -> torch.nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def eval_datasets(self) -> dict[str, Dataset]: ...

    def loss_and_metrics(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]: ...


class LoaderTask(Task, Protocol):
    """A task that also supplies its own loader (see the module docstring)."""

    def make_loader(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                    start_step: int, num_steps: int | None, train: bool) -> Iterable[dict]: ...
