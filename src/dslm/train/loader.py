"""The engine's generic loader for tasks without ``make_loader``: deterministic, sharded, resumable.

Training: optimizer-micro-step ``s`` holds items ``[s * G, (s + 1) * G)`` of an endless stream
(``G = batch_size * world_size``; rank ``r`` takes the ``r``-th slice), and the stream visits the
dataset in a fresh seeded permutation every epoch. So the global batch does not depend on how it is
split over ranks and micro-steps, and ``start_step`` resumes exactly. Evaluation: one pass, rank ``r``
takes items ``r, r + W, r + 2W, ...`` in order. Items are ``dict[str, Tensor]``, stacked with
``default_collate`` (or built in one call by the dataset's ``get_batch(indices)`` when it has one).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate

from dslm.runtime import WorkerLoader


class _Batches(Dataset):
    def __init__(self, dataset, batch_size, rank, world_size, start_step, num_steps, train, seed):
        self.dataset, self.b, self.rank, self.world = dataset, batch_size, rank, world_size
        self.start, self.train, self.seed = start_step, train, seed
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the dataset is empty")
        if train:
            self.length = None if num_steps is None else max(0, num_steps - start_step)
        else:
            mine = len(range(rank, self.n, world_size))
            full = -(-mine // batch_size)
            self.length = full if num_steps is None else min(full, num_steps)
        self._perm_epoch, self._perm = -1, None

    def __len__(self):
        return self.length if self.length is not None else 1 << 62

    def _index(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[j])

    def __getitem__(self, k):
        if self.length is not None and not 0 <= k < self.length:
            raise IndexError(k)
        if self.train:
            first = ((self.start + k) * self.world + self.rank) * self.b
            idx = [self._index(i) for i in range(first, first + self.b)]
        else:
            idx = list(range(self.rank, self.n, self.world))[k * self.b:(k + 1) * self.b]
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(idx)
        return default_collate([self.dataset[i] for i in idx])


class _Endless(torch.utils.data.IterableDataset):
    def __init__(self, batches: _Batches):
        self.batches = batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, step = (0, 1) if info is None else (info.id, info.num_workers)
        while True:
            yield self.batches[k]
            k += step


def default_loader(dataset, batch_size: int, rank: int, world_size: int, start_step: int,
                   num_steps: int | None, train: bool, num_workers: int = 0, seed: int = 0,
                   pin_memory: bool = False):
    batches = _Batches(dataset, batch_size, rank, world_size, start_step, num_steps, train, seed)
    if batches.length is None:  # endless training stream; workers interleave in order
        if num_workers > 0:
            return WorkerLoader(_Endless(batches), batch_size=None, num_workers=num_workers,
                              pin_memory=pin_memory)
        return WorkerLoader(_Endless(batches), batch_size=None, pin_memory=pin_memory)
    return WorkerLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
