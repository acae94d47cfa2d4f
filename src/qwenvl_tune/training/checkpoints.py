"""Run-folder checkpoints in Hugging Face format, written atomically.

A checkpoint is a folder holding the adapter (LoRA/QLoRA) or the full weights,
the processor, and a ``COMPLETE`` marker written last. It is written under a
temporary name in the same folder and renamed into place, so an interrupted
save never becomes ``best/`` or ``last/``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import Config, config_from_dict
from .distributed import save_weights

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are untouched."""


def read_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a qwenvl-tune run folder?")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``, replacing an existing ``dest`` with at most a moment where neither name exists."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model: Any, processor: Any, dest: str | Path, meta: dict[str, Any],
                    extra: Callable[[Path], None] | None = None, *, is_main: bool = True,
                    tmp_name: str | None = None, state_dict: dict[str, Any] | None = None) -> Path:
    """Save adapter-or-weights + processor (+ ``extra(tmp_dir)``, e.g. the trainer state) to ``dest``.

    Written under a temporary name in the same folder, flushed, marked complete last, then
    renamed into place: an interrupted save never replaces ``dest``.

    In a data-parallel run every rank calls this with the same ``tmp_name``: ``extra`` may be
    collective (Lightning's ``save_checkpoint`` is), everything else is done by the main rank.
    ``state_dict`` overrides the model's own tensors (under FSDP: the weights gathered from all ranks).

    Raises:
        CheckpointError: the disk (or quota) is full, or the folder is not writable.
    """
    dest = Path(dest)
    tmp = dest.with_name(tmp_name or f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    if not is_main:
        if extra is not None:
            extra(tmp)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_weights(model, tmp, state_dict)
        processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, dest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise CheckpointError(f"could not save checkpoint {dest}: {e.strerror or e}; "
                                  f"earlier checkpoints in {dest.parent} are intact") from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def copy_checkpoint(src: str | Path, dest: str | Path) -> Path:
    """Publish a complete checkpoint under another name (hard links where possible, else copies)."""
    src, dest = Path(src), Path(dest)
    if not (src / MARKER).is_file():
        raise FileNotFoundError(f"{src} is not a complete checkpoint")
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        def link(s: str, d: str) -> None:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

        shutil.copytree(src, tmp, copy_function=link)
        _replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with trainer state and the highest global step (checkpoints/* and last/)."""
    run_dir = Path(run_dir)
    candidates = [p for p in [*(run_dir / "checkpoints").glob("step=*"), run_dir / "last"]
                  if p.is_dir() and is_complete(p) and (p / TRAINER_STATE).exists()]  # a folder when sharded (FSDP)
    if not candidates:
        return None

    def step(p: Path) -> int:
        return int(json.loads((p / MARKER).read_text()).get("global_step", -1))

    return max(candidates, key=lambda p: (step(p), p.name != "last"))


def prune(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints in ``folder`` (and any stale temporaries)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for stale in folder.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted((p for p in folder.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)
    for p in done[: max(0, len(done) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
