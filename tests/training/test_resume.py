"""Resume exactly and survive crashes: Ctrl-C, SIGKILL, NaNs, full disks."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
import torch

from conftest import ROOT, tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.rundir import MARKER, TRAINER_STATE, CheckpointError, RunDir, is_complete
from qwenvl_tune.training.checkpoints import save_checkpoint
from qwenvl_tune.training import loop as loop_mod
from qwenvl_tune.training.step import NonFiniteError
from qwenvl_tune.errors import TrainingInterrupted



def _cfg(data, model, out, name, **kw):
    return build_config(None, tiny_overrides(data, model, out, **{
        "run.name": name, "train.max_epochs": 3, "train.check_val_every_n_epoch": 10, "train.lr": 5e-3,
        "train.warmup_steps": 2, "lora.dropout": 0.1, **kw}))


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for f in sorted(run.glob("logs/**/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.fixture
def interrupt_at(monkeypatch):
    """Send this process a real SIGINT (Ctrl-C) during a given optimizer step (after its backward pass)."""
    def arm(step: int):
        orig = loop_mod.optimizer_step
        state = {"fired": False}

        def patched(loop, pending):
            if loop.progress.step == step and not state["fired"]:
                state["fired"] = True
                os.kill(os.getpid(), signal.SIGINT)
            return orig(loop, pending)
        monkeypatch.setattr(loop_mod, "optimizer_step", patched)
    yield arm
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_identical_losses(sample_data, tiny_dir, tmp_path, interrupt_at, monkeypatch, workers):
    # 6 training samples, batch 2 -> 3 steps an epoch; 9 steps in all; LoRA dropout on (RNG must be restored).
    # The interrupted and resumed runs load with `workers` processes (kept through the run), the reference in its
    # own process: the same batches either way.
    full = api.train(_cfg(sample_data, tiny_dir, tmp_path, "full"))
    reference = _losses(full)
    assert len(reference) == 9

    interrupt_at(3)  # Ctrl-C during epoch 1's first batch: that step finishes, then the run stops mid-epoch
    with pytest.raises(TrainingInterrupted, match="--resume"):
        api.train(_cfg(sample_data, tiny_dir, tmp_path, "cut", **{"data.num_workers": workers}))
    run = tmp_path / "cut"
    ckpt = RunDir(run).latest_resumable()
    assert ckpt is not None and json.loads((ckpt / MARKER).read_text())["global_step"] == 4
    assert max(_losses(run)) == 3
    assert is_complete(run / "last") and not is_complete(run / "best")
    monkeypatch.undo()

    api.train(_cfg(sample_data, tiny_dir, tmp_path, "cut", **{"data.num_workers": workers}), resume=str(run))
    resumed = _losses(run)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert is_complete(run / "best") and (run / "logs" / "resume-1" / "metrics.csv").exists()


def test_resume_from_an_end_of_epoch_checkpoint_trains_the_same_steps(sample_data, tiny_dir, tmp_path):
    # The commonest checkpoint, in a run bounded by max_steps. After restoring one, Lightning's count of
    # epochs runs one ahead of the epoch being trained; the loader used to take it, and the resumed run
    # trained epoch 2's batches as epoch 1's.
    import shutil

    kw = {"train.check_val_every_n_epoch": 1, "generate.max_new_tokens": 4, "train.max_steps": 5}
    full = api.train(_cfg(sample_data, tiny_dir, tmp_path, "full", **{"train.keep_checkpoints": 5, **kw}))
    reference = _losses(full)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "logs")
    shutil.rmtree(cut / "last")
    for p in (cut / "checkpoints").glob("step=*"):
        if not p.name.startswith("step=0000003-"):  # the end of epoch 0 (3 steps an epoch)
            shutil.rmtree(p)
    api.train(_cfg(sample_data, tiny_dir, tmp_path, "cut", **kw), resume=str(cut))
    resumed = _losses(cut)
    # the resumed steps are the uninterrupted run's steps 3 and 4 (same batches, same weights), logged as such
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    a = load_file(full / "last" / "adapter_model.safetensors")
    b = load_file(cut / "last" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logged_learning_rate_is_the_one_each_step_used(sample_data, tiny_dir, tmp_path):
    from qwenvl_tune.training.step import warmup_linear_decay

    run = api.train(_cfg(sample_data, tiny_dir, tmp_path, "lr", **{"train.max_epochs": 1}))
    rows = [r for f in run.glob("logs/**/metrics.csv") for r in csv.DictReader(open(f)) if r.get("lr")]
    schedule = warmup_linear_decay(2, 3)
    assert {int(r["step"]): float(r["lr"]) for r in rows} == pytest.approx({s: 5e-3 * schedule(s) for s in range(3)})


def test_resume_auto_starts_fresh_then_continues(sample_data, tiny_dir, tmp_path):
    cfg = _cfg(sample_data, tiny_dir, tmp_path, "auto", **{"train.max_epochs": 1})
    run = api.train(cfg, resume="auto")  # nothing to resume: a fresh run
    assert json.loads((RunDir(run).latest_resumable() / MARKER).read_text())["global_step"] == 3
    cfg2 = _cfg(sample_data, tiny_dir, tmp_path, "auto", **{"train.max_epochs": 2})
    api.train(cfg2, resume="auto")
    assert max(_losses(run)) == 5  # steps 0..5 logged across the two invocations


def test_a_resume_refuses_settings_it_would_ignore_and_takes_the_same_command_again(sample_data, tiny_dir, tmp_path,
                                                                                     monkeypatch):
    from qwenvl_tune.config import ConfigError
    from qwenvl_tune.training.setup import resumed_config

    cfg = _cfg(sample_data, tiny_dir, tmp_path, "keep", **{"train.max_epochs": 1})
    run = api.train(cfg)
    before = sorted(p.name for p in run.rglob("*"))
    changed = _cfg(sample_data, tiny_dir, tmp_path, "keep", **{"train.max_epochs": 2, "train.lr": 0.5, "lora.r": 64})
    with pytest.raises(ConfigError) as e:
        api.train(changed, resume=str(run))
    said = str(e.value)
    assert "lora.r 64 (the run's: 8)" in said and "train.lr 0.5 (the run's: 0.005)" in said
    assert "train.max_epochs" in said.split("Only")[1] and "max_epochs 2" not in said  # a length may change
    assert sorted(p.name for p in run.rglob("*")) == before  # refused before anything was written
    # the same command again (relative paths, the preset's keys, a batch size the probe chose) is no change
    monkeypatch.chdir(sample_data.parent)
    again = _cfg(Path(sample_data.name), tiny_dir, tmp_path, "keep", **{"train.max_epochs": 2})
    assert again.data.path == sample_data.name
    again.explicit.add("train.batch_size")
    again.train.batch_size = "auto"
    assert resumed_config(RunDir(run), again).train.max_epochs == 2


def test_a_resume_on_other_training_documents_is_refused_before_anything_is_written(sample_data, tiny_dir, tmp_path):
    import shutil

    from qwenvl_tune.data.records import DataError
    from qwenvl_tune.rundir import checkpoint_meta

    data = tmp_path / "Data"
    shutil.copytree(sample_data, data)
    cfg = lambda epochs: _cfg(data, tiny_dir, tmp_path, "same-data", **{"train.max_epochs": epochs})  # noqa: E731
    run = api.train(cfg(1))
    ckpt = RunDir(run).latest_resumable()
    assert checkpoint_meta(ckpt)["data"].startswith("6 documents, sha256 ")
    ann = data / "train" / "annotations.jsonl"
    original = ann.read_text()
    rows = original.splitlines()
    summary = (run / "data_summary.json").read_text()
    for changed in ("\n".join(rows[:-1]) + "\n",                                      # a document fewer
                    original.replace(rows[2], rows[2].replace('"dock": "', '"dock": "X'))):  # an answer edited
        ann.write_text(changed)
        with pytest.raises(DataError) as e:
            api.train(cfg(2), resume=str(run))
        assert "the training data is not what this run was trained on (6 documents, sha256 " in str(e.value)
        assert (run / "data_summary.json").read_text() == summary and not (run / "logs" / "resume-1").exists()
    ann.write_text(original)  # the same documents again: the run continues
    api.train(cfg(2), resume=str(run))
    assert max(_losses(run)) == 5


def test_a_resume_may_find_its_documents_elsewhere_and_saves_its_new_length_and_place(sample_data, tiny_dir,
                                                                                       tmp_path):
    import shutil

    from qwenvl_tune.data.records import DataError

    first = tmp_path / "first" / "Data"
    shutil.copytree(sample_data, first)
    run = api.train(_cfg(first, tiny_dir, tmp_path, "moved", **{"train.max_epochs": 1}))
    moved = tmp_path / "moved" / "Data"
    shutil.move(str(first), str(moved))  # the same documents in another place
    api.train(_cfg(moved, tiny_dir, tmp_path, "moved", **{"train.max_epochs": 2}), resume=str(run))
    saved = RunDir(run).config
    assert saved.data.path == str(moved.resolve()) and saved.train.max_epochs == 2  # what the next resume reads
    assert max(_losses(run)) == 5
    # a plain resume now continues from the saved length and place: nothing is left to train
    api.train(_cfg(moved, tiny_dir, tmp_path, "moved", **{"train.max_epochs": 2}), resume=str(run))
    assert max(_losses(run)) == 5
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    (other / "train" / "annotations.jsonl").write_text(
        "\n".join((other / "train" / "annotations.jsonl").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match="not what this run was trained on"):
        api.train(_cfg(other, tiny_dir, tmp_path, "moved", **{"train.max_epochs": 3}), resume=str(run))
    assert RunDir(run).config.data.path == str(moved.resolve())  # refused: the saved place is unchanged


def test_nan_loss_stops_with_step_and_sample_ids(sample_data, tiny_dir, tmp_path, monkeypatch):
    # inject NaN through the data: a NaN pixel makes every activation NaN
    from qwenvl_tune.data import collate as collate_mod
    real = collate_mod.collate

    def nan_collate(items, pad_id, left, **options):
        b = real(items, pad_id, left, **options)
        if nan_collate.calls == 4:
            b["pixel_values"] = torch.full_like(b["pixel_values"], float("nan"))
        nan_collate.calls += 1
        return b
    nan_collate.calls = 0
    monkeypatch.setattr(collate_mod, "collate", nan_collate)
    # the NaN batch is in the second epoch, where the image feature cache would keep the pixels out of the model
    cfg = _cfg(sample_data, tiny_dir, tmp_path, "nan", **{"train.checkpoint_every_n_steps": 1,
                                                          "train.image_cache_gib": 0})
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* global step 4.*samples: \['train:"):
        api.train(cfg)
    run = tmp_path / "nan"
    ckpt = RunDir(run).latest_resumable()
    assert json.loads((ckpt / MARKER).read_text())["global_step"] == 4  # the last good step, intact
    state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
    assert state["model"] and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not is_complete(run / "last")


def test_full_disk_fails_clearly_and_keeps_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from qwenvl_tune.modeling.load import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    save_checkpoint(model, proc, tmp_path / "last", {"global_step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()}

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(proc), "save_pretrained", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        save_checkpoint(model, proc, tmp_path / "last", {"global_step": 2})
    assert {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # no temporary left behind
    AutoModelForImageTextToText.from_pretrained(tmp_path / "last")  # still loads


def test_preflight_refuses_unwritable_output_before_loading_a_model(sample_data, tiny_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    loaded = []
    import qwenvl_tune.training.run as run_mod
    monkeypatch.setattr(run_mod, "load_processor", lambda *a, **k: loaded.append(1))
    with pytest.raises(CheckpointError, match="not writable"):
        api.train(_cfg(sample_data, tiny_dir, blocker / "runs", "run"))
    assert loaded == []  # failed before loading anything


def test_preflight_refuses_when_disk_too_small(sample_data, tiny_dir, tmp_path, monkeypatch):
    import shutil as _sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match="not enough free space"):
        api.train(_cfg(sample_data, tiny_dir, tmp_path, "small"))


def _train_cmd(data, model, out, name, extra=()):
    args = [f"--{k}={v}" for k, v in tiny_overrides(data, model, out, **{
        "run.name": name, "train.max_epochs": 40, "train.check_val_every_n_epoch": 100,
        "train.checkpoint_every_n_steps": 2, "train.keep_checkpoints": 2}).items()]
    return [sys.executable, "-m", "qwenvl_tune.cli", "train", *args, *extra]


@pytest.mark.slow
def test_sigkill_during_training_then_resume(sample_data, tiny_dir, tmp_path):
    cmd = _train_cmd(sample_data, tiny_dir, tmp_path, "killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = RunDir(run).latest_resumable() if run.exists() else None
        if ck is not None and json.loads((ck / MARKER).read_text())["global_step"] >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = RunDir(run).latest_resumable()
    step = json.loads((ck / MARKER).read_text())["global_step"]
    assert step >= 6
    resume = _train_cmd(sample_data, tiny_dir, tmp_path, "killed", ["--resume", str(run), "--train.max_epochs=4"])
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("last", "best"):
        assert is_complete(run / name)
        from peft import PeftConfig
        PeftConfig.from_pretrained(run / name)  # loadable adapters
    assert json.loads((run / "last" / MARKER).read_text())["global_step"] == 12


def test_sigkill_during_checkpoint_write_never_publishes(tiny_dir, tmp_path):
    """A process killed while writing a checkpoint leaves only a temporary folder, which resume ignores."""
    script = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT / 'src')!r})
        from transformers import AutoModelForImageTextToText
        from qwenvl_tune.training.checkpoints import save_checkpoint
        class SlowProcessor:
            def save_pretrained(self, path):
                open({str(tmp_path / 'writing')!r}, 'w').close()
                time.sleep(60)
        model = AutoModelForImageTextToText.from_pretrained({str(tiny_dir)!r})
        save_checkpoint(model, SlowProcessor(), {str(tmp_path / 'run' / 'checkpoints' / 'step=0000009-epoch=003')!r},
                        {{"global_step": 9}})
    """)
    run = tmp_path / "run"
    good = run / "checkpoints" / "step=0000004-epoch=001"
    from transformers import AutoModelForImageTextToText

    from qwenvl_tune.modeling.load import load_processor
    save_checkpoint(AutoModelForImageTextToText.from_pretrained(tiny_dir), load_processor(tiny_dir, 784, 784), good,
                    {"global_step": 4}, lambda tmp: (tmp / TRAINER_STATE).write_bytes(b"state"))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(".tmp-" in n for n in leftovers) and "step=0000009-epoch=003" not in leftovers
    assert RunDir(run).latest_resumable() == good


def test_non_finite_gradient_is_caught_once_per_step_with_the_step_samples():
    from qwenvl_tune.training.step import non_finite_error, step_stats

    # all finite: the step's mean loss over its micro-batches, no flags
    pending = [(torch.tensor(2.0), 0, ["train:1"]), (torch.tensor(1.5), 1, ["train:2"])]
    mean, bad_loss, bad_grad, stop = step_stats([l for l, _, _ in pending], torch.tensor(3.0), False, 1)
    assert (mean, bad_loss, bad_grad, stop) == (pytest.approx(1.75), 0.0, 0.0, 0.0)
    # an infinite gradient norm (one host sync for the whole step): the step's samples are named
    pending = [(torch.tensor(2.0), 2, ["train:3"])]
    mean, bad_loss, bad_grad, _ = step_stats([l for l, _, _ in pending], torch.tensor(float("inf")), False, 1)
    assert bad_grad == 1.0 and bad_loss == 0.0
    err = non_finite_error(7, 1, pending, bad_grad, 1)
    assert isinstance(err, NonFiniteError)
    assert re.search(r"non-finite gradient before optimizer step 7; samples of this step: \['train:3'\]", str(err))
    # a NaN loss names its micro-batch
    pending = [(torch.tensor(1.0), 0, ["train:4"]), (torch.tensor(float("nan")), 1, ["train:5"])]
    _, bad_loss, _, _ = step_stats([l for l, _, _ in pending], torch.tensor(1.0), False, 1)
    assert bad_loss == 1.0
    assert "batch 1; samples: ['train:5']" in str(non_finite_error(3, 0, pending, 0.0, 1))
