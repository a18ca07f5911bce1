"""``make_loader``: a sharded, resumable DataLoader of ready batches.

The batch of global step ``s`` is samples ``[s * G, (s + 1) * G)`` of the dataset, with
``G = batch_size * world_size``; rank ``r`` gets the slice ``[s * G + r * batch_size, ... +
batch_size)``. The global batch therefore does not depend on the number of ranks or workers, and
resuming at ``start_step`` continues exactly where the run stopped. Whole batches are built in the
background workers (one vectorised call per batch), not sample by sample.
"""
from __future__ import annotations

import torch

from dslm.errors import UsageError
from dslm.runtime import WorkerLoader


class StepBatches(torch.utils.data.Dataset):
    """Item ``k`` = this rank's batch of global step ``start_step + k``."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, start_step: int, num_steps: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size = rank, world_size
        self.start_step, self.num_steps = start_step, num_steps

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        first = ((self.start_step + k) * self.world_size + self.rank) * self.batch_size
        return self.dataset.get_batch(range(first, first + self.batch_size))


def make_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                start_step: int = 0, num_steps: int | None = None, pin_memory: bool = False,
                prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's batches (dicts of [batch_size, ...] tensors) for global steps
    ``start_step .. num_steps - 1``. ``dataset`` is anything with ``get_batch(indices)`` and ``len``
    (a :class:`~dslm.data.PretrainingDataset`); ``num_steps`` defaults to one epoch,
    ``len(dataset) // (batch_size * world_size)``. ``num_workers`` background processes build batches;
    the batches are identical for any worker count."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: need batch_size >= 1 "
                         "and 0 <= rank < world_size")
    if num_steps is None:
        num_steps = len(dataset) // (batch_size * world_size)
    if not 0 <= start_step <= num_steps:
        raise UsageError(f"start_step {start_step}: must be between 0 and num_steps {num_steps}")
    batches = StepBatches(dataset, batch_size, rank, world_size, start_step, num_steps)
    return WorkerLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=pin_memory,
                                       prefetch_factor=prefetch_factor if num_workers > 0 else None)


class EvalBatches(torch.utils.data.Dataset):
    """Item ``k`` = this rank's part of global evaluation batch ``k``: one pass over every item of
    ``dataset``, the last batch shorter where the items run out (a rank whose part would be empty
    gets one batch fewer), so no item is dropped and none is scored twice."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, max_batches: int | None = None):
        self.dataset, self.batch_size, self.rank = dataset, batch_size, rank
        self.per_global = batch_size * world_size
        n = len(dataset)
        count = max(0, -(-(n - rank * batch_size) // self.per_global))
        self.count = count if max_batches is None else min(count, max_batches)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < self.count:
            raise IndexError(k)
        first = k * self.per_global + self.rank * self.batch_size
        return self.dataset.get_batch(range(first, min(first + self.batch_size, len(self.dataset))))


def make_eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     max_batches: int | None = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of this rank's :class:`EvalBatches` (at most ``max_batches`` of them)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: need batch_size >= 1 "
                         "and 0 <= rank < world_size")
    return WorkerLoader(EvalBatches(dataset, batch_size, rank, world_size, max_batches),
                                       batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=pin_memory)
