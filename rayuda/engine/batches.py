"""Deterministic batch streams: the batch of iteration ``i`` depends only on (seed, i).

That makes a resumed run draw exactly the batches the uninterrupted run would have drawn, and it lets
source and target batches be drawn in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class _EpochItems(Dataset):
    """Wraps a rayuda dataset so an index ``(i, epoch)`` seeds its augmentation with the epoch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, int]):
        item, epoch = index
        self.dataset.epoch = epoch
        return self.dataset[item]


class _IterationBatches(Sampler):
    """Yields the index lists of iterations ``start .. stop-1``: epoch ``e`` is a seeded permutation."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int):
        if size < batch_size:
            batch_size = size
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop = start, stop
        self.per_epoch = size // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for i in range(self.start, self.stop):
            e, k = divmod(i, self.per_epoch)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
            chunk = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield [(int(j), e) for j in chunk]


def batch_stream(
    dataset: Dataset, batch_size: int, *, seed: int, start: int, stop: int, num_workers: int = 0,
    pin_memory: bool | None = None,
) -> Iterator[dict]:
    """Batches for iterations ``start .. stop-1`` (dicts of stacked tensors, as the default collate makes).

    ``pin_memory`` (default: whether CUDA is available) pins batches for asynchronous copies to the GPU.
    """
    sampler = _IterationBatches(len(dataset), batch_size, seed, start, stop)
    loader = DataLoader(
        _EpochItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # one loader spans the stage; its workers live as long
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    return iter(loader)
