"""Preparing a run: the run folder (named, checked for room, never started over an earlier run's
checkpoints), resume discovery, the data check and the data loaders."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..data.check import SplitReport, check_split, choose_holdout, hold_out, write_problems
from ..data.collate import Encoder, GenerateCollator, RecordDataset, TrainCollator
from ..data.documents import PageLimits
from ..data.formats import Columns
from ..data.loader import EpochBatchSampler, RankPadded, RankShardBatchSampler, ResumableLoader
from ..data.positions import VisionIndex
from ..data.records import DataError, SplitError
from ..errors import RunFolderError
from ..modeling.fastpath import FastPath
from ..modeling.load import load_model_config
from ..rundir import CheckpointError, RunDir, read_overrides, run_folder_hint
from .signals import leave_stop_signals_to_the_main_process


RUN_NAME_ENV = "QWENVL_TUNE_RUN_NAME"


def run_name(config: Config) -> str:
    """The run's name, also exported to the environment: data-parallel workers that the launcher starts
    later than rank 0 inherit it and land in the same folder."""
    name = config.run.name or os.environ.get(RUN_NAME_ENV) or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_NAME_ENV] = name
    return name


@contextlib.contextmanager
def run_folder(config: Config, resuming: bool, main: bool) -> Iterator[RunDir]:
    """The run folder, made if needed and held by the main process until the block ends (``training_lock``)."""
    run_dir = RunDir.at(config.run.output_dir, run_name(config))
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    with run_dir.training_lock() if main else contextlib.nullcontext():
        if not resuming and main and run_dir.holds_training():
            # never start over a run's checkpoints: that would delete them
            raise ConfigError(f"run folder {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                              f"(or --resume auto) or choose another --name")
        yield run_dir


def check_output_dir(run_dir: RunDir, config: Config) -> None:
    """Fail before any model loads if the run folder is not writable or has no room for a checkpoint."""
    probe = run_dir.path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    need = estimate_checkpoint_bytes(config)
    free = shutil.disk_usage(run_dir.path).free
    if free < need:
        raise CheckpointError(f"not enough free space in {run_dir}: {free / 2**30:.2f} GiB free, a checkpoint needs "
                              f"about {need / 2**30:.2f} GiB (method {config.model.method}); free space or set "
                              f"--run.output_dir elsewhere")


def estimate_checkpoint_bytes(config: Config) -> int:
    """Rough size of one checkpoint: adapters are small; full fine-tuning saves the weights plus optimizer state."""
    margin = 64 * 2**20
    if config.model.method != "full":
        return margin
    path = Path(config.model.name_or_path.strip())
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
    # weights (bf16/fp32 as saved) + AdamW moments in fp32 (~2x fp32 weights) in the trainer state
    return margin + weights + 4 * weights


def find_resume(spec: str, config: Config) -> tuple[RunDir | None, Path | None]:
    """``--resume RUN_DIR`` or ``--resume auto`` (the run named by run.output_dir/run.name, if it has a checkpoint)."""
    if spec == "auto":
        if not config.run.name:
            raise ConfigError("--resume auto needs --run.name to know which run to continue")
        run_dir = RunDir.at(config.run.output_dir, config.run.name)
        return (run_dir, run_dir.latest_resumable()) if run_dir.exists() else (None, None)
    run_dir = RunDir(Path(spec))
    ckpt = run_dir.latest_resumable()
    if ckpt is None:
        raise RunFolderError(f"{run_dir} has no complete resumable checkpoint (checkpoints/step=*/ or last/ with "
                             f"trainer state)")
    return run_dir, ckpt


# what a resumed run may change: how long it trains, and where its documents are (a resume checks that they are
# the documents it trained on: setup_data's trained_on)
RESUMABLE_KEYS = ("train.max_epochs", "train.max_steps", "data.path")


# what locates the run being resumed (``--resume auto`` finds it by them), not how it trains
_LOCATING_KEYS = ("run.output_dir", "run.name")


def _same_setting(key: str, asked: object, saved: object) -> bool:
    if key == "train.batch_size" and asked == "auto":
        return True  # the run saved the size its probe chose
    if key == "model.name_or_path" and isinstance(asked, str) and Path(asked.strip()).exists():
        return str(Path(asked.strip()).resolve()) == str(saved)  # the run saved local paths absolute
    return asked == saved


def resumed_config(run_dir: RunDir, asked: Config) -> Config:
    """The saved config of the run, with the training-length keys the user set explicitly now.

    Raises:
        ConfigError: a setting given now differs from the run's, as it would be ignored: the resumed run trains
            on as it started (the same command line given again is fine).
    """
    saved = run_dir.config
    mine, theirs = asked.flat(), saved.flat()
    differ = [k for k in sorted(asked.explicit) if k not in RESUMABLE_KEYS and k not in _LOCATING_KEYS
              and k in theirs and not _same_setting(k, mine[k], theirs[k])]
    if differ:
        said = ", ".join(f"{k} {mine[k]!r} (the run's: {theirs[k]!r})" for k in differ)
        raise ConfigError(f"a resumed run trains on with its own settings, and these differ from {run_dir}'s: {said}. "
                          f"Only {', '.join(RESUMABLE_KEYS[:-1])} and {RESUMABLE_KEYS[-1]} (the same documents "
                          f"elsewhere) change on a resume: drop the others, or start a new run with another --name")
    for key in RESUMABLE_KEYS:
        if key in asked.explicit:
            section, name = key.split(".")
            setattr(getattr(saved, section), name, getattr(getattr(asked, section), name))
    saved.explicit = set(read_overrides(run_dir.path)) | (asked.explicit & set(RESUMABLE_KEYS))
    saved.run.output_dir, saved.run.name = str(run_dir.path.parent), run_dir.name
    return saved


@contextlib.contextmanager
def naming_run_folder(data_path: str | Path) -> Iterator[None]:
    """A split not found in a run folder given as the data says that it is one, and what the run trained on."""
    try:
        yield
    except SplitError as e:
        hint = run_folder_hint(data_path)
        if not hint:
            raise
        raise SplitError(e.reason + hint, e.file, e.line, e.field) from None


MAX_AUTO_WORKERS = 8


def loader_workers(config: Config) -> tuple[int, str]:
    """``data.num_workers`` as a number, and how ``auto`` chose it ("" when it was set).

    Every page is decoded and (in the first epoch, or without the image feature cache) resized and cut into
    patches in the loader's workers: ~110-136 ms of CPU for a 1700x2200 page on the 2-core test machine, against
    an H200 training 12-20 documents a second. auto takes the CPUs this process may run on, shares them among the
    training processes of this machine, leaves one to each process's own work, and stops at 8. It is not the
    default: on the H200 machine (16 CPUs) 2 workers kept up at batch 2 (bench/results/LOG.md, 2026-12-03)."""
    import os

    d, t = config.data, config.train
    if d.num_workers != "auto":
        return int(d.num_workers), ""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = max(1, int(t.devices))
    n = max(1, min(MAX_AUTO_WORKERS, cpus // local - 1))
    return n, (f"data.num_workers=auto: {n} loader worker(s) per training process ({cpus} CPUs, {local} training "
               f"process(es) on this machine)")


def setup_data(config: Config, processor: Any, run_dir: RunDir, write: bool = True,
               trained_on: str | None = None) -> tuple[SplitReport, SplitReport]:
    """The train and valid splits checked (problems and summary written to the run folder, counts printed).

    Raises:
        DataError: bad rows (without ``data.skip_invalid``), an empty split, or (``trained_on``: a resumed run's
            fingerprint of its documents) training documents other than those, before anything is written.
    """
    d = config.data
    kw = dict(processor=processor, system_message=d.system_message, max_length=d.max_length,
              limits=PageLimits.from_config(d), columns=Columns.from_config(d),
              workers=max(1, loader_workers(config)[0]))
    with naming_run_folder(d.path):
        train = check_split(d.path, "train", **kw)
    held, said = None, ""
    try:
        valid = check_split(d.path, "valid", **kw)
        if d.valid_fraction and write:
            print(f"data.valid_fraction {d.valid_fraction} not used: the data has a valid split")
    except SplitError as e:
        if not d.valid_fraction:
            raise SplitError(f"{e.reason}. Training validates on it to choose best/ and to stop early: move some "
                             f"documents of the train split (rows and their files; 10% is usual) into it, or hold "
                             f"some out with --data.valid_fraction 0.1", e.file) from None
        # a resumed run validates on the documents it held out when it started
        held = run_dir.holdout() or choose_holdout(train, d.valid_fraction, config.train.seed)
        train, valid = hold_out(train, held)
        said = (f"data valid: {len(valid.records)} training documents held out to validate on (data.valid_fraction "
                f"{d.valid_fraction}, train.seed {config.train.seed}; the data has no valid split)")
    reports = [train, valid]
    now = train.fingerprint
    if trained_on is not None and trained_on != now:
        raise DataError(f"the training data is not what this run was trained on ({trained_on} then; {now} now): a "
                        f"resumed run continues exactly only on the same documents. Restore them (or point "
                        f"--data.path at them), or start a new run with another --name", train.folder)
    if held is not None and write:
        print(f"{said}, listed in {run_dir.write_holdout(held, d.valid_fraction, config.train.seed)}")
    errors = [p for rep in reports for p in rep.errors]
    n_problems = write_problems(run_dir.problems_path, reports) if write else len(errors)
    for rep in reports if write else []:
        s = rep.summary()
        pages = f", {s['pages']['multi_page_documents']} multi-page (max {s['pages']['max']} pages)" \
            if s["pages"]["multi_page_documents"] else ""
        print(f"data {s['split']:<5} {s['folder']}: {s['rows']} rows, {s['usable']} usable, {s['errors']} errors, "
              f"{s['warnings']} warnings{pages}, longest sample {s['max_tokens']} tokens")
        if s["ignored_keys"]:
            print(f"data {s['split']:<5} ignored key(s), not used for training: "
                  + ", ".join(f"{k} ({n} rows)" for k, n in s["ignored_keys"].items()))
    if errors:
        listing = "\n".join(f"  {p}" for p in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        if not d.skip_invalid:
            raise DataError(f"{len(errors)} invalid row(s); fix them or pass --data.skip_invalid true "
                            f"(all {n_problems} problems in {run_dir.problems_path}):\n{listing}")
        if write:
            print(f"skipping {len(errors)} invalid row(s) (data.skip_invalid); listed in "
                  f"{run_dir.problems_path}:\n{listing}")
    if write:
        run_dir.write_summary({"splits": [r.summary() for r in reports], "skipped": len(errors)})
        _warn_if_answers_outgrow_generation(config, reports)
    for rep in reports:
        if not rep.records:
            raise DataError(f"split '{rep.split}' has no usable rows", rep.folder)
    return reports[0], reports[1]


def _warn_if_answers_outgrow_generation(config: Config, reports: list[SplitReport]) -> None:
    """Validation, evaluate and predict stop at generate.max_new_tokens: answers longer than that would all be
    cut off (and scored invalid), which is a setting to raise before training, not a finding after it."""
    limit = config.generate.max_new_tokens
    longest = {rep.split: max((t["answer"] for t in rep.tokens.values()), default=0) for rep in reports}
    over = {split: n for split, n in longest.items() if n > limit}
    if over:
        said = ", ".join(f"the longest {split} answer is {n} tokens" for split, n in over.items())
        print(f"warning: {said}, more than generate.max_new_tokens ({limit}): validation would cut such answers off "
              f"and score them invalid; set --generate.max_new_tokens {max(over.values()) + 64} or more")


def _encoder_and_vision(config: Config, processor: Any, fast: FastPath | None):
    d = config.data
    enc = Encoder(processor, d.system_message, d.max_length)
    # the fast path takes the vision tower's index tensors from the loader, where this transformers reads them
    loader_indices = fast.loader_indices if fast is not None else config.model.fast_path
    vision = VisionIndex.for_config(load_model_config(config.model.name_or_path)) if loader_indices else None
    return enc, vision


def longest_batches(config: Config, processor: Any, train: SplitReport, fast: FastPath | None = None):
    """``batches(b)``: the b longest training samples as one collated batch (the worst batch of size b that
    length-grouping can make), for the batch-size probe."""
    enc, vision = _encoder_and_vision(config, processor, fast)
    order = sorted(range(len(train.records)), key=lambda i: -(train.tokens[train.records[i].id]["total"]
                                                              if train.tokens else 0))
    data = RecordDataset(train.records, enc, "train", PageLimits.from_config(config.data))
    collate = TrainCollator(enc.pad_id, vision)
    return lambda b: collate([data[i] for i in order[:b]])


def setup_loaders(config: Config, processor: Any, train: SplitReport, valid: SplitReport, fast: FastPath | None = None):
    d, t = config.data, config.train
    enc, vision = _encoder_and_vision(config, processor, fast)
    workers = loader_workers(config)[0]
    common = dict(num_workers=workers, persistent_workers=workers > 0,
                  worker_init_fn=leave_stop_signals_to_the_main_process)
    lengths = [train.tokens[r.id]["total"] for r in train.records] if train.tokens else None
    sampler = EpochBatchSampler(len(train.records), t.batch_size, t.seed, lengths)
    train_loader = ResumableLoader(RecordDataset(train.records, enc, "train", PageLimits.from_config(d)), sampler,
                                   TrainCollator(enc.pad_id, vision), num_workers=workers,
                                   pin_memory=torch.cuda.is_available() and t.accelerator != "cpu",
                                   worker_init_fn=leave_stop_signals_to_the_main_process)
    val_loader = DataLoader(RankPadded(RecordDataset(valid.records, enc, "generate", PageLimits.from_config(d))),
                            batch_sampler=RankShardBatchSampler(len(valid.records), config.generate.batch_size),
                            collate_fn=GenerateCollator(enc.pad_id), **common)
    return train_loader, val_loader
