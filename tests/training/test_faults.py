"""Fault injection: a real `qwenvl-tune train` process killed at chosen moments, then resumed.

Every scenario compares the resumed run with one uninterrupted run of the same config: the per-step
losses and the final weights must be bit-identical on CPU. The kill points are placed by a small wrapper
around the CLI (``_KILLER``) that SIGKILLs its own process when the named moment is reached, so the
product carries no test hooks.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, tiny_overrides
from qwenvl_tune.rundir import MARKER, is_complete

pytestmark = pytest.mark.slow

# 6 training samples at batch 2: 3 optimizer steps an epoch, 3 epochs; a checkpoint every 3 steps (each epoch's
# last step), validation after every epoch, dropout on (so the RNG must be restored too).
SETTINGS = {"train.max_epochs": 3, "train.checkpoint_every_n_steps": 3, "train.check_val_every_n_epoch": 1,
            "train.lr": 5e-3, "train.warmup_steps": 2, "lora.dropout": 0.1, "generate.max_new_tokens": 4,
            "train.keep_checkpoints": 10}

_KILLER = textwrap.dedent("""
    import os, signal, sys
    from qwenvl_tune import cli
    from qwenvl_tune.training import loop, checkpoints
    point, arg = os.environ["FAULT"], int(os.environ.get("FAULT_ARG", "0"))

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after_step":  # right after optimizer step `arg` (0-based), before anything is saved
        real_step = loop.optimizer_step
        def optimizer_step(lp, pending):
            real_step(lp, pending)
            if lp.progress.step == arg + 1:
                die()
        loop.optimizer_step = optimizer_step
    elif point == "pause_after_step":  # after optimizer step `arg`: say so, then wait for the test's go-ahead
        import pathlib, time
        real_step = loop.optimizer_step
        def optimizer_step(lp, pending):
            real_step(lp, pending)
            if lp.progress.step == arg + 1:
                pathlib.Path(os.environ["PAUSED"]).touch()
                while not pathlib.Path(os.environ["GO_ON"]).exists():
                    time.sleep(0.05)
        loop.optimizer_step = optimizer_step
    elif point == "inside_save":  # while writing the checkpoint of step `arg` (weights written, marker not)
        real_save = checkpoints.save_checkpoint
        def save_checkpoint(model, processor, dest, meta, *a, **k):
            if meta.get("global_step") == arg:
                class Dying:
                    def save_pretrained(self, path):
                        die()
                processor = Dying()
            return real_save(model, processor, dest, meta, *a, **k)
        loop.save_checkpoint = save_checkpoint
    elif point == "validation":  # during the validation after step `arg`
        real_validate = loop.validate
        def validate(lp):
            if lp.progress.step == arg:
                die()
            return real_validate(lp)
        loop.validate = validate
    elif point == "publish_last":  # while last/ is being published at the end
        from qwenvl_tune import rundir
        real_copy = rundir.copy_checkpoint
        def copy_checkpoint(src, dest):
            if str(dest).endswith("last"):
                import shutil
                shutil.copytree(src, dest.with_name(".last.tmp-killed"))  # half a copy, as a kill leaves it
                die()
            return real_copy(src, dest)
        loop.copy_checkpoint = copy_checkpoint
    sys.exit(cli.main(sys.argv[1:]))
""")


def _args(data: Path, model: Path, out: Path, name: str, **extra) -> list[str]:
    over = tiny_overrides(data, model, out, **{"run.name": name, **SETTINGS, **extra})
    return ["train", *[f"--{k}={v}" for k, v in over.items()]]


def _run(args: list[str], fault: str | None = None, arg: int = 0, expect: int | None = 0) -> subprocess.CompletedProcess:
    env = {**ENV, **({"FAULT": fault, "FAULT_ARG": str(arg)} if fault else {})}
    cmd = [sys.executable, "-c", _KILLER, *args] if fault else [sys.executable, "-m", "qwenvl_tune.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if expect is not None:
        assert done.returncode == expect, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    return done


def _losses(run: Path) -> dict[int, float]:
    """Per-step losses over every log of the run (a step trained again after a kill: its last record)."""
    out: dict[int, float] = {}
    for f in sorted(run.glob("logs/**/metrics.csv"), key=lambda p: (len(p.parts), str(p))):
        for row in csv.DictReader(open(f)):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.fixture(scope="module")
def reference(sample_data, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    _run(_args(sample_data, tiny_dir, out, "reference"))
    run = out / "reference"
    losses = _losses(run)
    assert sorted(losses) == list(range(9))
    return out, losses, load_file(run / "last" / "adapter_model.safetensors")


def _assert_same_as_reference(run: Path, reference) -> None:
    _, losses, weights = reference
    assert _losses(run) == losses  # bit-identical on CPU, every step
    final = load_file(run / "last" / "adapter_model.safetensors")
    assert final.keys() == weights.keys()
    assert all(torch.equal(final[k], weights[k]) for k in weights)
    assert json.loads((run / "last" / MARKER).read_text())["global_step"] == 9
    assert is_complete(run / "best")
    assert not list(run.glob(".*tmp*")) and not list((run / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("fault,arg", [
    ("after_step", 5),     # an epoch's last step, before its checkpoint: resumes from the step-3 one
    ("after_step", 4),     # mid-epoch
    ("inside_save", 6),    # inside the checkpoint of an epoch's last step
    ("inside_save", 9),    # inside the final checkpoint
    ("validation", 3),     # during the validation after epoch 0 (its checkpoint is written before)
    ("validation", 9),     # during the final validation
    ("publish_last", 0),   # during the final publish of last/
], ids=lambda x: str(x))
def test_kill_then_resume_equals_the_uninterrupted_run(fault, arg, reference, sample_data, tiny_dir):
    out = reference[0]
    name = f"{fault}-{arg}"
    killed = _run(_args(sample_data, tiny_dir, out, name), fault, arg, expect=None)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = out / name
    _run(["train", "--resume", str(run)])
    _assert_same_as_reference(run, reference)


def test_sigterm_saves_and_exits_nonzero_then_resume_equals(reference, sample_data, tiny_dir):
    out = reference[0]
    run = out / "sigterm"
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_tune.cli", *_args(sample_data, tiny_dir, out, "sigterm")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints").is_dir():
        time.sleep(0.05)  # the first checkpoint (step 3) exists: training is under way
    proc.send_signal(signal.SIGTERM)  # what kill, timeout, docker stop and schedulers send
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (stdout[-2000:], stderr[-2000:])
    assert "SIGTERM" in stdout + stderr and "--resume" in stderr
    assert is_complete(run / "last")
    # starting the same name again without --resume refuses and deletes nothing
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = _run(_args(sample_data, tiny_dir, out, "sigterm"), expect=2)
    assert "--resume" in again.stderr and "already holds checkpoints" in again.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    _run(["train", "--resume", str(run)])
    _assert_same_as_reference(run, reference)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_to_the_whole_process_group_saves_then_resume_equals(sig, reference, sample_data, tiny_dir):
    """A scheduler signals every process of a job (SLURM at its time limit, `kill -TERM -- -PGID`), the loader's
    worker processes included. Those used to die of it, and the training process then raised "DataLoader worker
    ... is killed by signal" in the middle of its checkpoint save (exit 1). The workers now leave stop signals to
    the training process, which finishes its step and saves as for a signal to it alone."""
    out = reference[0]
    name = f"group-{sig}"
    run, paused, go_on = out / name, out / f"{name}.paused", out / f"{name}.go"
    env = {**ENV, "FAULT": "pause_after_step", "FAULT_ARG": "4", "PAUSED": str(paused), "GO_ON": str(go_on)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLER, *_args(sample_data, tiny_dir, out, name,
                                                                   **{"data.num_workers": 2})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        import time

        deadline = time.time() + 300
        while not paused.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert paused.exists(), proc.communicate()[1][-2000:]  # mid-epoch 1: the loader's workers are running
        os.killpg(proc.pid, getattr(signal, sig))
        time.sleep(0.5)  # the signal reaches every process of the group before the run goes on
        go_on.touch()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (stdout[-2000:], stderr[-3000:])
    assert "is killed by signal" not in stderr
    assert stdout.count(f"{sig}: finishing this step and saving a checkpoint") == 1  # the workers said nothing
    saved = json.loads((run / "last" / MARKER).read_text())["global_step"]
    assert is_complete(run / "last") and saved == 5, saved  # step 4 (0-based) finished, then saved
    _run(["train", "--resume", str(run)])
    _assert_same_as_reference(run, reference)


def test_a_second_copy_of_a_running_train_refuses_and_the_first_is_unharmed(reference, sample_data, tiny_dir):
    """Two copies of one command (a double-submitted job, a retry while the first still runs) must not both write
    checkpoints, best/ and last/ into one run folder, nor one delete the other's unfinished writes as stale."""
    out = reference[0]
    run, paused, go_on = out / "twice", out / "twice.paused", out / "twice.go"
    env = {**ENV, "FAULT": "pause_after_step", "FAULT_ARG": "4", "PAUSED": str(paused), "GO_ON": str(go_on)}
    first = subprocess.Popen([sys.executable, "-c", _KILLER, *_args(sample_data, tiny_dir, out, "twice")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.time() + 300
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert paused.exists(), first.communicate()[1][-2000:]  # mid-epoch, a checkpoint (step 3) on disk
        for again in (_args(sample_data, tiny_dir, out, "twice"), ["train", "--resume", str(run)],
                      _args(sample_data, tiny_dir, out, "twice") + ["--resume", "auto"]):
            refused = _run(again, expect=2)
            assert f"run folder {run} is being trained now by" in refused.stderr, refused.stderr[-2000:]
            assert f"pid {first.pid}" in refused.stderr
    finally:
        go_on.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    _assert_same_as_reference(run, reference)
    # the lock goes with its process: the finished run resumes (nothing left to train) without a word about it
    assert "being trained now" not in _run(["train", "--resume", str(run)]).stderr
