"""Data-parallel paths on CPU: DDP training with 2 gloo processes, and sharded, resumable bulk prediction."""

from __future__ import annotations

import csv
import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, equal_length_data, swatch, tiny_overrides, write_split
from qwenvl_tune.data.loader import EpochBatchSampler
from qwenvl_tune.inference.bulk import bulk_predict, completed_inputs

pytestmark = pytest.mark.slow  # subprocesses and trained runs: tens of seconds on 2 CPU cores



def test_rank_slices_rebuild_the_single_process_batches():
    single = EpochBatchSampler(10, 4, seed=7).batches(3)
    ranks = []
    for r in range(2):
        s = EpochBatchSampler(10, 2, seed=7, rank=r, world_size=2)
        ranks.append(s.batches(3))
    rebuilt = [a + b for a, b in zip(*ranks)]
    assert rebuilt == [b for b in single if len(b) == 4]


@pytest.mark.parametrize("n,world,bs", [(2, 4, 1), (3, 2, 4), (7, 3, 2), (8, 4, 2), (1, 2, 1)])
def test_validation_shards_keep_ranks_in_step_and_score_each_sample_once(n, world, bs, monkeypatch):
    from qwenvl_tune.data.loader import RankPadded, RankShardBatchSampler

    per_rank = []
    for r in range(world):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=r: r)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
        sampler = RankShardBatchSampler(n, bs)
        per_rank.append(list(sampler))
        assert len(sampler) == len(per_rank[-1])
    # every rank runs the same number of batches (2 documents on 4 GPUs: ranks 2 and 3 too)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) >= 1
    data = RankPadded([{"ids": f"s{i}"} for i in range(n)])
    items = [data[i] for batches in per_rank for b in batches for i in b]
    scored = sorted(it["ids"] for it in items if not it["padding"])
    assert scored == sorted(f"s{i}" for i in range(n))  # each sample scored exactly once


def _losses(run: Path) -> dict[int, float]:
    rows = [r for f in run.glob("logs/**/metrics.csv") for r in csv.DictReader(open(f))]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _train(data, model, out, name, devices, batch, **extra):
    over = tiny_overrides(data, model, out, **{
        "run.name": name, "train.devices": devices, "train.strategy": "ddp" if devices > 1 else "auto",
        "train.batch_size": batch, "train.max_steps": 3, "train.lr": 2e-2, "lora.dropout": 0.0,
        "lora.target_modules": "all-linear", "generate.max_new_tokens": 12, **extra})
    _cli(*[f"--{k}={v}" for k, v in over.items()])
    return out / name


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "train", *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_ddp_two_cpu_processes_match_one_process(tiny_dir, tmp_path):
    data = equal_length_data(tmp_path)
    one = _train(data, tiny_dir, tmp_path / "runs", "one", devices=1, batch=4)
    two = _train(data, tiny_dir, tmp_path / "runs", "two", devices=2, batch=2)
    a = load_file(one / "last" / "adapter_model.safetensors")
    b = load_file(two / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    base = {k: v for k, v in a.items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in base.values())  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # the logged loss is the global batch's (rank 0's alone would be the loss of half of it)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [0, 1, 2]
    assert [l1[k] for k in l1] == pytest.approx([l2[k] for k in l1], abs=1e-5)
    # validation was split across the ranks and gathered: every sample scored once, same metrics
    m1 = json.loads((one / "best" / "COMPLETE").read_text())["metrics"]
    m2 = json.loads((two / "best" / "COMPLETE").read_text())["metrics"]
    assert m1 and m1 == pytest.approx(m2, abs=1e-6)
    # only rank 0 wrote the run folder: no stray temporaries, one set of files
    assert not list(two.rglob(".*tmp*"))


def test_ddp_resume_from_an_epoch_end_checkpoint_reaches_the_uninterrupted_weights(tiny_dir, tmp_path):
    import shutil

    data = equal_length_data(tmp_path)
    # 8 documents, 2 ranks x 2: two steps an epoch; the step-2 checkpoint is the end of epoch 0
    run = _train(data, tiny_dir, tmp_path / "runs", "full", devices=2, batch=2, **{"model.method": "full"})
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "last")
    for p in (cut / "checkpoints").glob("step=*"):
        if not p.name.startswith("step=0000002"):
            shutil.rmtree(p)
    _cli("--resume", str(cut))
    a, b = load_file(run / "last" / "model.safetensors"), load_file(cut / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


@pytest.fixture(scope="module")
def bulk_run(tiny_dir, sample_data, tmp_path_factory):
    from qwenvl_tune import api
    from qwenvl_tune.config import build_config

    out = tmp_path_factory.mktemp("bulk")
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, out, **{
        "train.max_steps": 2, "generate.max_new_tokens": 16, "generate.constrained": False}))
    return api.train(cfg)


def _inputs(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        swatch((7 * i % 255, 90, 160), (112, 140), text=str(i)).save(folder / f"{i:04d}.png")
    (folder / "0003.png").write_bytes(b"broken")  # one unreadable input
    return folder


def test_bulk_sharded_equals_single_process_and_records_errors(bulk_run, tmp_path):
    folder = _inputs(tmp_path, 10)
    c1 = bulk_predict(bulk_run, folder, tmp_path / "one.jsonl", devices=1, progress=False)
    c2 = bulk_predict(bulk_run, folder, tmp_path / "two.jsonl", devices=2, progress=False)
    assert c1["total"] == c2["total"] == 10 and c1["errors"] == c2["errors"] == 1
    one = {r["input"]: r for r in map(json.loads, (tmp_path / "one.jsonl").read_text().splitlines())}
    two = {r["input"]: r for r in map(json.loads, (tmp_path / "two.jsonl").read_text().splitlines())}
    assert len(one) == len(two) == 10 and one.keys() == two.keys()
    for k in one:
        assert one[k].get("output") == two[k].get("output") and ("error" in one[k]) == ("error" in two[k])
    again = bulk_predict(bulk_run, folder, tmp_path / "two.jsonl", devices=2, progress=False)
    assert again["skipped"] == 10 and again["written"] == 0  # nothing written twice


def test_bulk_killed_halfway_then_restarted_writes_each_input_once(bulk_run, tmp_path):
    folder = _inputs(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "predict", "--run", str(bulk_run), "--input", str(folder),
           "--output", str(out), "--devices", "2", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 10):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
    proc.wait()
    with open(out, "a") as fh:
        fh.write('{"input": "half-writ')  # as if killed mid-line
    partial = len(completed_inputs(out))
    assert 10 <= partial < 40
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    # exit code 1: one input (0003.png) could not be read, and the summary counts it
    assert done.returncode == 1 and "1 unreadable" in done.stdout, done.stderr[-2000:]
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    inputs = [l["input"] for l in lines]
    assert len(inputs) == len(set(inputs)) == 40
    assert f"{partial} already in" in done.stdout


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_bulk_workers_die_with_a_killed_command_and_the_rerun_writes_each_input_once(bulk_run, tmp_path):
    folder = _inputs(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "predict", "--run", str(bulk_run), "--input", str(folder),
           "--output", str(out), "--devices", "2", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len([w for w in workers if Path(f"/proc/{w}").exists()]) >= 2
    proc.send_signal(signal.SIGKILL)  # the command only, as `kill -9 PID` or an OOM kill does
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                         "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]]
    assert not alive, f"workers outlived their command: {alive}"
    lines_after_kill = len(out.read_text().splitlines())
    time.sleep(1)
    assert len(out.read_text().splitlines()) == lines_after_kill  # nobody writes any more
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "1 unreadable" in done.stdout, done.stderr[-2000:]
    inputs = [json.loads(line)["input"] for line in out.read_text().splitlines()]
    assert len(inputs) == len(set(inputs)) == 40


def test_a_second_bulk_command_on_the_same_output_refuses(bulk_run, tmp_path):
    from qwenvl_tune.inference.bulk import output_lock

    folder = _inputs(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "predict", "--run", str(bulk_run), "--input", str(folder),
           "--output", str(out)]
    with output_lock(out):  # as a first command running now
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"being written by another qwenvl-tune predict ({socket.gethostname()} pid {os.getpid()})" in done.stderr
    assert not out.exists() or out.read_text() == ""  # it wrote nothing
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)  # free again: it runs
    assert done.returncode == 1  # one of the inputs is unreadable (0003.png)
    assert len(out.read_text().splitlines()) == 4
