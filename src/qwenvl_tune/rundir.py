"""The run folder: the one place that knows its layout.

    runs/<name>/
      config.yaml            the resolved config (everything evaluate/predict/serve/export/resume need)
      overrides.yaml         the keys the user set (preset + command line), so a resume knows what was asked for
      answer_schema.json     JSON Schema learnt from the training answers
      data_summary.json      rows, usable, skipped per split;  data_problems.jsonl: every problem found
      holdout.json           the training documents held out to validate on (data.valid_fraction)
      logs/                  metrics.csv + TensorBoard events (logs/resume-N/ for each resume)
      checkpoints/step=S-epoch=E/   resumable checkpoints
      best/  last/           published checkpoints
      eval/<split>/          (eval/<split>-last/ for the last checkpoint)

A checkpoint folder holds the weights (adapter or full), the processor, optionally the trainer state
(``trainer_state.ckpt``), and a ``COMPLETE`` marker written last. Every folder is written under a
temporary name in the same parent and renamed into place, so an interrupted write never takes a real
name. Nothing outside this module spells one of these names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .config import Config, apply, config_from_dict
from .errors import QwenVLTuneError, RunFolderError

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
SCHEMA_FILE = "answer_schema.json"
SUMMARY_FILE = "data_summary.json"
HOLDOUT_FILE = "holdout.json"  # the training documents held out to validate on (data.valid_fraction)
PROBLEMS_FILE = "data_problems.jsonl"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.ckpt"
PUBLISHED = ("best", "last")
# files of a checkpoint folder that belong to this package, not to the Hugging Face layout
PRIVATE_FILES = (MARKER, TRAINER_STATE)
EXPORT_INFO = "qwenvl_tune_export.json"
LOCK_FILE = ".training.lock"  # who trains the run now (kept: unlinking a lock file races with a third process)


class RunBusy(QwenVLTuneError):
    """Another process is training (or resuming) the same run folder."""


class CheckpointError(QwenVLTuneError, RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are untouched."""


# --------------------------------------------------------------------------- a lock held while working


@contextlib.contextmanager
def held(path: Path, busy: Callable[[str], Exception], remove: bool = False) -> Iterator[None]:
    """Hold ``path`` (made if needed) for this process: an advisory ``flock`` on a file naming its holder (host and
    pid), which the kernel drops when the process dies, so a killed command never leaves it held. Used for the run
    folder while it trains (``RunDir.training_lock``) and for bulk extraction's output file.

    Raises ``busy(holder)`` when another process holds it.

    ``remove``: delete the file when done (tidier beside a user's file; a third process that opened it just before
    could then lock the removed file, so keep it where two holders at once would do harm).
    """
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise busy(holder) from None
    except OSError as e:  # a file system without locks (Lustre mounted without -o flock, some FUSE mounts)
        fh.close()
        print(f"warning: cannot lock {path} ({e.strerror}): this file system has no file locks, so a second copy of "
              f"this command would not be stopped")
        yield
        return
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        else:
            fh.seek(0)
            fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def run_folder_hint(path: str | Path) -> str:
    """' (PATH is a run folder, not a dataset; the run trained on DATA)' when a run folder is given where a dataset
    goes, to end a 'split not found' message with; else ''."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return ""
    try:
        trained_on = (yaml.safe_load((path / CONFIG_FILE).read_text()) or {}).get("data", {}).get("path")
    except (OSError, yaml.YAMLError, AttributeError):
        trained_on = None
    return f" ({path} is a run folder, not a dataset" + (f"; the run trained on {trained_on}" if trained_on else "") + ")"


# --------------------------------------------------------------------------- one checkpoint folder


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """What the marker of a complete checkpoint records (epoch, global_step, metrics, ...)."""
    return json.loads((Path(path) / MARKER).read_text())


def annotate(path: str | Path, **fields: Any) -> None:
    """Add fields to a complete checkpoint's marker. The marker is replaced, never edited in place: a
    published checkpoint shares its other files with the checkpoint it was published from (hard links)."""
    marker = Path(path) / MARKER
    meta = {**json.loads(marker.read_text()), **fields}
    tmp = marker.with_name(f".{MARKER}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, marker)


def trainer_state(path: str | Path) -> Path:
    return Path(path) / TRAINER_STATE


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


def write_checkpoint(dest: str | Path, meta: dict[str, Any], write: Callable[[Path], None], *,
                     tmp_name: str | None = None) -> Path:
    """``write(tmp)`` fills a temporary folder; it is flushed, marked complete, and renamed to ``dest``.

    Raises:
        CheckpointError: the disk (or quota) is full, or the folder is not writable.
    """
    dest = Path(dest)
    tmp = dest.with_name(tmp_name or f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
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
    if not is_complete(src):
        raise RunFolderError(f"{src} is not a complete checkpoint")
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


def copy_public_files(ckpt: str | Path, out: str | Path) -> None:
    """Copy a checkpoint's Hugging Face files (weights or adapter, processor) without this package's own."""
    for f in Path(ckpt).iterdir():
        if f.name not in PRIVATE_FILES:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, Path(out) / f.name)


# --------------------------------------------------------------------------- the run folder


def _absolute_if_local(value: str) -> str:
    """A local path made absolute, so the run folder works from any directory; hub ids stay as they are."""
    p = Path(value).expanduser()
    return str(p.resolve()) if value and p.exists() else value


@dataclass
class RunDir:
    """A run folder. ``RunDir.open(path)`` for an existing run, ``RunDir.create(...)`` for a new one."""

    path: Path
    _config: Config | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # ---- finding and making
    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise RunFolderError(f"{path / CONFIG_FILE} not found: is {path} a qwenvl-tune run folder?")
        return cls(path)

    @classmethod
    def at(cls, output_dir: str | Path, name: str) -> "RunDir":
        return cls(Path(output_dir) / name)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def training_lock(self) -> contextlib.AbstractContextManager[None]:
        """The run folder to this process alone while it trains: a second ``train`` (or ``--resume``) of the same
        run refuses, naming the host and pid that hold it, instead of both writing checkpoints, ``best/`` and
        ``last/`` into one folder (and one deleting the other's unfinished writes as stale). The lock file stays."""
        return held(self.path / LOCK_FILE, lambda holder: RunBusy(
            f"run folder {self} is being trained now by {holder}; wait for it to end (then --resume {self} "
            f"continues it), or choose another --name"))

    def exists(self) -> bool:
        return self.path.is_dir()

    # ---- files at the top
    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = read_config(self.path / CONFIG_FILE)
        return self._config

    def with_overrides(self, values: dict[str, Any] | None) -> "RunDir":
        """This run with some config keys changed for this use only (``--generate.max_new_tokens 256``);
        nothing is written to the folder."""
        if not values:
            return self
        config = apply(read_config(self.path / CONFIG_FILE), values, "command line").validate()
        return RunDir(self.path, config)

    def write_config(self, config: Config) -> None:
        """Save the resolved config (local data and model paths absolute) and the keys the user set."""
        config.data.path = _absolute_if_local(config.data.path)
        config.model.name_or_path = _absolute_if_local(config.model.name_or_path.strip())
        (self.path / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
        explicit = {k: v for k, v in config.flat().items() if k in config.explicit}
        (self.path / OVERRIDES_FILE).write_text(yaml.safe_dump(explicit, sort_keys=True, allow_unicode=True),
                                                encoding="utf-8")
        self._config = config

    @property
    def schema_path(self) -> Path:
        return self.path / SCHEMA_FILE

    def schema(self) -> dict[str, Any] | None:
        return json.loads(self.schema_path.read_text(encoding="utf-8")) if self.schema_path.is_file() else None

    def write_schema(self, schema: dict[str, Any] | None) -> Path | None:
        if schema is None:
            return None
        self.schema_path.write_text(json.dumps(schema, indent=2, ensure_ascii=False), encoding="utf-8")
        return self.schema_path

    @property
    def problems_path(self) -> Path:
        return self.path / PROBLEMS_FILE

    def holdout(self) -> list[str] | None:
        """The ids of the training documents this run validates on (``data.valid_fraction``), or None."""
        path = self.path / HOLDOUT_FILE
        return json.loads(path.read_text(encoding="utf-8"))["ids"] if path.is_file() else None

    def write_holdout(self, ids: list[str], fraction: float, seed: int) -> Path:
        path = self.path / HOLDOUT_FILE
        path.write_text(json.dumps({"from": "train", "fraction": fraction, "seed": seed, "ids": ids}, indent=1),
                        encoding="utf-8")
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def next_log_version(self) -> str:
        return f"resume-{len(list(self.logs_dir.glob('resume-*'))) + 1}"

    def eval_dir(self, split: str, which: str = "best") -> Path:
        """Reports of different checkpoints are kept apart: eval/<split>/ for best, eval/<split>-last/ for last."""
        return self.path / "eval" / (split if which == "best" else f"{split}-{which}")

    # ---- checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def published(self, which: str) -> Path:
        if which not in PUBLISHED:
            raise ValueError(f"checkpoint must be one of {PUBLISHED}, got {which!r}")
        return self.path / which

    def checkpoint(self, which: str = "best") -> Path:
        """The complete ``best``/``last`` checkpoint folder, or a clear error."""
        path = self.published(which)
        if not is_complete(path):
            raise RunFolderError(f"{path} is missing or incomplete; has the run finished a validation or an epoch?")
        return path

    def step_checkpoint(self, step: int, epoch: int) -> Path:
        return self.checkpoints_dir / f"step={step:07d}-epoch={epoch:03d}"

    def checkpoint_at_step(self, step: int) -> Path | None:
        """A complete resumable checkpoint taken after ``step`` optimizer steps, if one exists."""
        found = [p for p in self.checkpoints_dir.glob(f"step={step:07d}-*") if is_complete(p)]
        return sorted(found)[-1] if found else None

    def resumable(self) -> list[Path]:
        """Complete checkpoints with trainer state (checkpoints/* and last/), oldest first."""
        candidates = [p for p in [*self.checkpoints_dir.glob("step=*"), self.path / "last"]
                      if p.is_dir() and is_complete(p) and trainer_state(p).exists()]  # a folder when sharded (FSDP)
        return sorted(candidates, key=lambda p: (int(checkpoint_meta(p).get("global_step", -1)), p.name != "last"))

    def latest_resumable(self) -> Path | None:
        found = self.resumable()
        return found[-1] if found else None

    def holds_training(self) -> bool:
        """Whether starting afresh here would overwrite earlier training (any checkpoint, complete or not)."""
        return any(self.checkpoints_dir.glob("step=*")) or any((self.path / w).exists() for w in PUBLISHED)

    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints in checkpoints/ (and stale temporaries)."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        for stale in folder.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted((p for p in folder.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)
        removed = []
        for p in done[: max(0, len(done) - keep)]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed

    def clean_stale(self) -> list[Path]:
        """Remove temporaries left by an interrupted write (``.NAME.tmp-*``, ``.NAME.old-*``)."""
        stale = [p for folder in (self.path, self.checkpoints_dir) if folder.is_dir()
                 for pattern in (".*.tmp-*", ".*.old-*") for p in folder.glob(pattern)]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return stale


def read_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path} not found: is {path.parent} a qwenvl-tune run folder?")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def read_overrides(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / OVERRIDES_FILE
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
