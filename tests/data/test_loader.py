"""The training loader's worker processes: kept for the whole run, and still yielding each epoch's (and a resumed
epoch's) batches in the sampler's order."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from qwenvl_tune.data.loader import EpochBatchSampler, ResumableLoader


class _WhoLoads(Dataset):
    """Item i is (i, the pid of the process that loaded it, the shared flag of i as it was then)."""

    def __init__(self, n: int):
        self.flags = torch.zeros(n, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.flags)

    def __getitem__(self, i: int):
        return i, os.getpid(), bool(self.flags[i])


def _collate(items):
    return [i for i, _, _ in items], {pid for _, pid, _ in items}, [flag for _, _, flag in items]


def test_loader_workers_live_through_the_run_and_keep_each_epoch_s_order():
    n, lengths = 12, [5, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11, 12]
    data = _WhoLoads(n)
    sampler = EpochBatchSampler(n, 2, seed=3, lengths=lengths)
    loader = ResumableLoader(data, sampler, _collate, num_workers=2)
    pids_by_epoch = []
    for epoch in range(3):
        loader.set_position(epoch)
        batches = list(loader)
        assert [b[0] for b in batches] == sampler.batches(epoch)  # the order of a one-process loader
        pids_by_epoch.append(set().union(*(b[1] for b in batches)))
        if epoch == 0:  # what the feature cache does as it keeps a document: flags set in the training process
            data.flags[:] = True
    assert os.getpid() not in pids_by_epoch[0] and len(pids_by_epoch[0]) == 2
    assert pids_by_epoch[0] == pids_by_epoch[1] == pids_by_epoch[2]  # the same two workers, not new ones each epoch
    # the workers started before any flag was set, and read the flags the training process set later
    loader.set_position(3)
    assert all(all(b[2]) for b in loader)
    # a resumed run's position (epoch 1 after its first 2 batches), taken by the same workers
    loader.set_position(1, 2)
    again = list(loader)
    assert [b[0] for b in again] == sampler.batches(1)[2:] and set().union(*(b[1] for b in again)) == pids_by_epoch[0]


def test_no_workers_loads_in_the_training_process():
    sampler = EpochBatchSampler(4, 2, seed=0)
    loader = ResumableLoader(_WhoLoads(4), sampler, _collate, num_workers=0)
    assert not loader.persistent_workers
    assert [b[1] for b in loader] == [{os.getpid()}, {os.getpid()}]
