"""A training DataLoader that can resume in the middle of an epoch.

The order of each epoch is a pure function of (seed, epoch): a seeded permutation, optionally
length-grouped so that batches hold samples of similar length (less padding). The training loop sets
the position before each epoch (``set_position(epoch, done)``; ``done`` > 0 only for a resumed run),
so a resumed run trains on exactly the batches the uninterrupted run would have, including when the
checkpoint was taken at an epoch's last step (the epoch then yields nothing and the next one starts).
Batches are sharded across data-parallel ranks (every rank gets the same number).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Deterministic batches per epoch; ``skip`` batches are dropped from the start of the next epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                 rank: int = 0, world_size: int = 1, group: int = 50):
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self.rank, self.world_size, self.group = rank, world_size, group
        self.epoch = 0
        self.skip = 0

    def _rank(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return self.rank, self.world_size

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``.

        A global batch is ``batch_size * world_size`` samples; rank r takes its r-th slice. One
        process with ``batch_size * world_size`` therefore sees exactly the same global batches,
        which is what makes a data-parallel run comparable to a single-device one.
        """
        rank, world = self._rank()
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        global_bs = self.batch_size * world
        if self.lengths is not None and global_bs > 1:
            # sort within mega-batches (less padding), keep the mega-batch order random
            mega = global_bs * self.group
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda i: -self.lengths[i])]
        groups = [order[k:k + global_bs] for k in range(0, len(order), global_bs)]
        if world > 1:
            # every rank needs a full slice of every global batch; an incomplete last one waits for the next epoch
            groups = [g for g in groups if len(g) == global_bs]
        if self.lengths is not None and global_bs > 1:
            rng.shuffle(groups)
        return [g[rank * self.batch_size:(rank + 1) * self.batch_size] for g in groups]

    def __len__(self) -> int:
        return len(self.batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip:]


class ResumableLoader(DataLoader):
    """DataLoader over an ``EpochBatchSampler`` with Lightning's stateful-loader interface."""

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, collate_fn: Any, num_workers: int = 0,
                 pin_memory: bool = False, worker_init_fn: Callable[[int], None] | None = None):
        # A private generator: creating the iterator must not draw from the global RNG, or a
        # resumed run's dropout masks would drift from the uninterrupted run's.
        # pin_memory: page-locked batches, so the copy to the GPU does not block the training process
        # (+8.5% samples/s at batch 2 on an H100, bench/results/results.jsonl, run train_speed_3b_pinned).
        # persistent_workers: the worker processes live through the run instead of being started again for each
        # epoch. New workers cost each epoch's first step ~0.3 s in a tiny CPU run (0.41-0.50 s against 0.20-0.25
        # with kept workers and 0.13-0.15 with none); on an H200 each epoch's first 8 steps took ~1.2 s more than
        # its last 8 (2026-12-03e), not yet measured with kept workers.
        # Nothing they hold changes between epochs: the order is drawn here, in the training process, when an
        # epoch's iteration begins (set_position included), and the kept-features flags live in shared memory.
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                         persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(sampler.seed),
                         pin_memory=pin_memory, worker_init_fn=worker_init_fn)
        self._sampler = sampler

    def __len__(self) -> int:
        return len(self._sampler)

    def set_position(self, epoch: int, done: int = 0) -> None:
        """The next iteration yields ``epoch``'s batches after the first ``done`` (a resumed run's position)."""
        self._sampler.epoch, self._sampler.skip = epoch, done


class RankShardBatchSampler(Sampler[list[int]]):
    """Validation batches for this rank: samples rank, rank+world, ..., and every rank gets the same
    number of batches.

    Ranks must stay in step through validation: each one takes part in the end-of-epoch gather of
    scores, and under FSDP in every forward pass of generation. A rank whose share is one sample
    short gets a repeat instead (index ``n + i`` stands for sample ``i``, see ``RankPadded``); it is
    generated but not scored, so every sample is scored exactly once.
    """

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def _indices(self) -> list[int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        own = list(range(rank, self.n, world))
        per_rank = -(-self.n // world)  # the largest share
        # repeats for the missing slots: samples this rank already holds, else sample 0
        repeats = [self.n + (own[k % len(own)] if own else 0) for k in range(per_rank - len(own))]
        return own + repeats

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for k in range(0, len(idx), self.batch_size):
            yield idx[k:k + self.batch_size]

    def __len__(self) -> int:
        return (len(self._indices()) + self.batch_size - 1) // self.batch_size


class RankPadded(Dataset):
    """``dataset`` with the repeat indices of ``RankShardBatchSampler``: item ``n + i`` is item ``i``
    marked ``padding=True`` (generated to keep the ranks in step, never scored)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.dataset)  # type: ignore[arg-type]
        return {**self.dataset[i % n], "padding": i >= n}
