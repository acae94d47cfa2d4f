"""train.batch_size=auto: the largest batch whose measured peak fits the budget, stated and saved."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import ConfigError, build_config
from qwenvl_tune.training.autobatch import accumulation_for, choose

GIB = 2.0 ** 30


def test_choose_keeps_the_largest_size_under_the_budget():
    tried = []

    def peak(b):  # 10 GiB of weights plus 3 GiB a sample
        tried.append(b)
        return (10 + 3 * b) * GIB

    probe = choose(peak, budget=40 * GIB, limit=100)
    assert probe.chosen == 8 and tried == [1, 2, 3, 4, 6, 8, 12]  # 12 needs 46 GiB: the search stops there
    assert "train.batch_size=auto: 8" in probe.describe() and "12: 46.0 GiB" in probe.describe()


def test_choose_stops_at_out_of_memory_and_at_the_split_size():
    def peak(b):
        if b >= 6:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return b * GIB

    probe = choose(peak, budget=100 * GIB, limit=100)
    assert probe.chosen == 4 and probe.measured[-1] == (6, None) and "ran out of memory" in probe.stopped_by
    assert choose(lambda b: GIB, budget=100 * GIB, limit=3).chosen == 3  # no batch larger than the data
    with pytest.raises(RuntimeError, match="not even one sample fits"):
        choose(lambda b: 50 * GIB, budget=40 * GIB, limit=10)


def test_accumulation_keeps_the_defaults_samples_per_step():
    assert [accumulation_for(b) for b in (1, 2, 3, 4, 8, 16)] == [8, 4, 3, 2, 1, 1]


def test_auto_on_a_cpu_trains_with_the_default_and_saves_the_number(sample_data, tiny_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="must be an integer.*one of \\['auto'\\]"):
        build_config(None, {"train.batch_size": "big"})
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.batch_size": "auto", "train.max_steps": 1, "train.accumulate_grad_batches": 1}))
    run = api.train(cfg)
    assert "train.batch_size=auto: 2 (no CUDA device to measure)" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 2 and saved["train"]["accumulate_grad_batches"] == 1  # the user's, kept


def test_the_probe_leaves_the_peak_counter_to_training(monkeypatch):
    """The probe tries sizes above the budget; the peak the run then logs must be training's, not that try's."""
    import contextlib

    from qwenvl_tune.training import autobatch

    mem = {"now": 2 * GIB, "peak": 2 * GIB}

    class Fabric:
        device, world_size = torch.device("cuda", 0), 1

        def to_device(self, batch):
            return batch

        def no_backward_sync(self, module, enabled):
            return contextlib.nullcontext()

        def backward(self, loss):
            pass

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

        def forward(self, batch):  # 5 GiB a sample at the peak, freed after the step
            mem["peak"] = max(mem["peak"], mem["now"] + 5 * GIB * batch["n"])
            return self.w.sum()

    def reset(device=None):
        mem["peak"] = mem["now"]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 100 * GIB}))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None: contextlib.nullcontext())
    module = Module()
    probe = autobatch.probe_batch_size(Fabric(), module, torch.optim.SGD(module.parameters()),
                                       lambda b: {"n": b}, limit=64, fraction=0.5)
    assert probe.chosen == 8 and probe.measured[-1][0] == 12  # 12 x 5 + 2 GiB is over the 50 GiB budget
    assert mem["peak"] == mem["now"]  # what training logs next starts from here, not from the probe's 62 GiB
