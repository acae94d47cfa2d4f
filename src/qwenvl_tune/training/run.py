"""The training recipe, top to bottom: check data, load, fit, save.

    from qwenvl_tune.config import build_config
    from qwenvl_tune.training.run import train
    run_dir = train(build_config("configs/qwen2_5_vl_3b_lora.yaml", {"data.path": "./Data"}))
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..data.check import SplitReport, check_split, write_problems
from ..data.collate import Encoder, GenerateCollator, RecordDataset, TrainCollator
from ..data.loader import EpochBatchSampler, RankPadded, RankShardBatchSampler, ResumableLoader
from ..data.records import DataError
from ..modeling.load import (check_model_source, count_parameters, load_base_model, load_model_config,
                             load_processor, prepare_for_training)
from ..modeling.fast import prefer_flash_sdpa
from ..modeling.positions import VisionIndex
from ..inference.structured import infer_schema, save_schema
from .checkpoints import read_run_config
from .checkpoints import (TRAINER_STATE, CheckpointError, copy_checkpoint, is_complete, latest_resumable, prune,
                          save_checkpoint)
from .distributed import build_strategy, gathered_state_dict, is_fsdp
from .module import FineTuneModule



class RunCheckpoint(Callback):
    """Writes resumable checkpoints (HF-format weights + processor + trainer state) atomically.

    - ``checkpoints/step=S-epoch=E``: at each epoch end, every ``checkpoint_every_n_steps``, and on Ctrl-C;
      the newest ``keep`` are kept.
    - ``best/``: whenever the monitored validation metric improves.
    - ``last/``: at the end of training (and on Ctrl-C).
    A non-finite loss or gradient stops the run without writing anything, so the last good
    checkpoint stays as it was.
    """

    def __init__(self, run_dir: Path, processor: Any, monitor: str, mode: str, keep: int, every_n_steps: int = 0,
                 train_loader: ResumableLoader | None = None):
        self.run_dir, self.processor, self.monitor, self.mode, self.keep = run_dir, processor, monitor, mode, keep
        self.train_loader = train_loader
        self.every_n_steps = every_n_steps
        self.best: float | None = None
        self.validated_step = -1
        self.stop_requested = False  # set by the first Ctrl-C
        self.stopped_by_user: Path | None = None
        self.final_state: Path | None = None
        self._first_batch = False  # the next batch is the first of this fit (set in on_train_start)

    def _meta(self, trainer: pl.Trainer, **extra: Any) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics, **extra}

    def _save(self, trainer: pl.Trainer, module: FineTuneModule, name: str, with_state: bool = True, **extra: Any) -> Path:
        """Only global rank 0 writes the weights; with trainer state, every rank takes part (Lightning's save is
        collective, and under FSDP each rank writes its shard)."""
        def trainer_state(tmp: Path) -> None:
            trainer.save_checkpoint(tmp / TRAINER_STATE, weights_only=False)

        dest = self.run_dir / name
        weights = gathered_state_dict(trainer)  # collective under FSDP (sharded weights); None otherwise
        if not with_state and not trainer.is_global_zero:
            return dest
        path = save_checkpoint(module.model, self.processor, dest, self._meta(trainer, **extra),
                               trainer_state if with_state else None, is_main=trainer.is_global_zero,
                               tmp_name=f".{dest.name}.tmp-step{trainer.global_step}", state_dict=weights)
        if with_state and trainer.world_size > 1:
            trainer.strategy.barrier("checkpoint")
        return path

    def _save_resumable(self, trainer: pl.Trainer, module: FineTuneModule, **extra: Any) -> Path:
        name = f"checkpoints/step={trainer.global_step:07d}-epoch={trainer.current_epoch:03d}"
        path = self._save(trainer, module, name, **extra)
        if trainer.is_global_zero:
            prune(self.run_dir / "checkpoints", self.keep)
        return path

    def _publish(self, trainer: pl.Trainer, src: Path, name: str) -> None:
        if trainer.is_global_zero:
            copy_checkpoint(src, self.run_dir / name)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")

    def on_validation_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.validated_step = trainer.global_step
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            self._save(trainer, module, "best", with_state=False, monitor=self.monitor, value=value)
            if trainer.is_global_zero:
                print(f"best/ updated: {self.monitor}={value:.4f} (epoch {trainer.current_epoch}, step {trainer.global_step})")

    def on_train_start(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        self._first_batch = True

    def on_train_batch_start(self, trainer: pl.Trainer, module: FineTuneModule, batch: Any, batch_idx: int) -> None:
        # Lightning's logging step counts optimizer steps. On restore it adds one, for checkpoints that
        # Lightning saves before counting the step; ours from the end of an epoch are saved after it, so
        # the resumed run's metrics would be logged one step late. Runs start at a step boundary, where
        # the two counts agree.
        if self._first_batch:
            self._first_batch = False
            loop = trainer.fit_loop.epoch_loop
            if isinstance(getattr(loop, "_batches_that_stepped", None), int):
                loop._batches_that_stepped = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        # Not called when a run is restored mid-epoch: the loader then continues from its saved position.
        if self.train_loader is not None:
            self.train_loader.start_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, module: FineTuneModule, outputs, batch, batch_idx: int) -> None:
        # This callback runs first among the batch-end hooks: the batch is trained, so a checkpoint
        # written from here on (periodic, epoch end, Ctrl-C) resumes after it.
        if self.train_loader is not None:
            self.train_loader.mark_completed()
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        saved = None
        if self.every_n_steps and step_done and trainer.global_step % self.every_n_steps == 0:
            saved = self._save_resumable(trainer, module)
        if self.stop_requested and step_done:
            # Stop at a step boundary: a clean state that resumes exactly.
            path = saved or self._save_resumable(trainer, module, interrupted=True)
            self._publish(trainer, path, "last")
            self.stopped_by_user = path
            trainer.should_stop = True
        elif step_done and 0 < trainer.max_steps <= trainer.global_step:
            # The run ends here, possibly mid-epoch: save the resumable state now, at the step boundary
            # (Lightning's epoch-end bookkeeping afterwards would mark the epoch as finished).
            self.final_state = saved or self._save_resumable(trainer, module)
            self._validate_before_leaving(trainer)
        elif (self.train_loader is not None and trainer.current_epoch >= trainer.max_epochs - 1
              and self.train_loader.completed >= len(self.train_loader)):
            self._validate_before_leaving(trainer)

    def _validate_before_leaving(self, trainer: pl.Trainer) -> None:
        """The last batch of the run: have Lightning validate the final weights now, inside fit.

        A separate ``trainer.validate`` after fit would do, except under FSDP, where Lightning does not
        wrap the model again and generation would meet sharded weights. Lightning validates at a batch
        when asked to stop there, in an epoch that validates."""
        if trainer.enable_validation and self.validated_step != trainer.global_step:
            trainer.check_val_every_n_epoch = 1
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        loader = self.train_loader
        if self.stopped_by_user or self.final_state or (loader is not None and loader.completed < len(loader)):
            return  # stopped mid-epoch: the step-boundary checkpoint is the resumable one
        self._save_resumable(trainer, module, end_of_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        if self.stopped_by_user or trainer.interrupted:
            return  # last/ was written at the stop; nothing to publish from an aborted state
        if self.final_state is not None:
            self._publish(trainer, self.final_state, "last")
        else:
            self._save(trainer, module, "last")
        if trainer.is_global_zero and not is_complete(self.run_dir / "best"):
            # No validation happened (e.g. max_steps hit first): best/ is the final state, said so in its marker.
            copy_checkpoint(self.run_dir / "last", self.run_dir / "best")



def _run_dir(config: Config, resuming: bool) -> Path:
    # Data-parallel workers are started later than rank 0 and must land in the same folder.
    name = config.run.name or os.environ.get(RUN_NAME_ENV) or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_NAME_ENV] = name
    run_dir = Path(config.run.output_dir) / name
    if not resuming and (run_dir / "best").exists() and env_rank() == 0:
        raise ConfigError(f"run folder {run_dir} already holds a trained run; continue it with --resume {run_dir} "
                          f"or choose another --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    return run_dir


def _setup_data(config: Config, processor: Any, run_dir: Path, write: bool = True) -> tuple[SplitReport, SplitReport]:
    d = config.data
    kw = dict(processor=processor, system_message=d.system_message, max_length=d.max_length,
              max_image_pixels=d.max_image_pixels, workers=max(1, d.num_workers))
    reports = [check_split(d.path, "train", **kw), check_split(d.path, "valid", **kw)]
    errors = [p for rep in reports for p in rep.errors]
    n_problems = write_problems(run_dir / "data_problems.jsonl", reports) if write else len(errors)
    for rep in reports if write else []:
        s = rep.summary()
        print(f"data {s['split']:<5} {s['folder']}: {s['rows']} rows, {s['usable']} usable, {s['errors']} errors, "
              f"{s['warnings']} warnings, longest sample {s['max_tokens']} tokens")
    if errors:
        listing = "\n".join(f"  {p}" for p in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        if not d.skip_invalid:
            raise DataError(f"{len(errors)} invalid row(s); fix them or pass --data.skip_invalid true "
                            f"(all {n_problems} problems in {run_dir / 'data_problems.jsonl'}):\n{listing}")
        if write:
            print(f"skipping {len(errors)} invalid row(s) (data.skip_invalid); listed in "
                  f"{run_dir / 'data_problems.jsonl'}:\n{listing}")
    if write:
        (run_dir / "data_summary.json").write_text(json.dumps(
            {"splits": [r.summary() for r in reports], "skipped": len(errors)}, indent=2))
    for rep in reports:
        if not rep.records:
            raise DataError(f"split '{rep.split}' has no usable rows", rep.folder)
    return reports[0], reports[1]


def _setup_model(config: Config) -> torch.nn.Module:
    model = load_base_model(config.model)
    model = prepare_for_training(model, config)
    trainable, total = count_parameters(model)
    print(f"model {config.model.name_or_path} [{config.model.method}]: {trainable:,} trainable of {total:,} "
          f"parameters ({100 * trainable / max(total, 1):.2f}%)")
    return model


def _setup_loaders(config: Config, processor: Any, train: SplitReport, valid: SplitReport):
    d, t = config.data, config.train
    enc = Encoder(processor, d.system_message, d.max_length)
    # the fast path takes the vision tower's index tensors from the loader, where this transformers reads them
    vision = VisionIndex.for_config(load_model_config(config.model.name_or_path)) if config.model.fast_path else None
    common = dict(num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    lengths = [train.tokens[r.id]["total"] for r in train.records] if train.tokens else None
    sampler = EpochBatchSampler(len(train.records), t.batch_size, t.seed, lengths)
    train_loader = ResumableLoader(RecordDataset(train.records, enc, "train", d.max_image_pixels), sampler,
                                   TrainCollator(enc.pad_id, vision), num_workers=d.num_workers,
                                   pin_memory=torch.cuda.is_available() and t.accelerator != "cpu")
    val_loader = DataLoader(RankPadded(RecordDataset(valid.records, enc, "generate", d.max_image_pixels)),
                            batch_sampler=RankShardBatchSampler(len(valid.records), config.generate.batch_size),
                            collate_fn=GenerateCollator(enc.pad_id), **common)
    return train_loader, val_loader


def _setup_trainer(config: Config, run_dir: Path, processor: Any, train_loader: ResumableLoader,
                   log_version: str = "") -> tuple[pl.Trainer, RunCheckpoint]:
    t = config.train
    ckpt = RunCheckpoint(run_dir, processor, t.monitor, config.monitor_mode, t.keep_checkpoints,
                         t.checkpoint_every_n_steps, train_loader)
    # a live bar in a terminal; in logs (CI, nohup, pipes) an update every 50 steps instead of every step
    callbacks: list[Callback] = [ckpt, TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50)]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=config.monitor_mode, patience=t.early_stopping_patience,
                                       check_on_train_epoch_end=False, verbose=True))
    loggers = [CSVLogger(run_dir, name="logs", version=log_version),
               TensorBoardLogger(run_dir, name="logs", version=log_version)]
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = _trainer(t, callbacks, loggers, run_dir)
    # Lightning's word on an impossible accelerator/strategy/devices combination, or a strategy whose
    # package is missing (deepspeed)
    except (ValueError, MisconfigurationException) as e:
        raise ConfigError(f"train.accelerator={t.accelerator!r}, train.strategy={t.strategy!r}, "
                          f"train.devices={t.devices}: {e}") from None
    return trainer, ckpt


def _trainer(t: Any, callbacks: list, loggers: list, run_dir: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t),
        precision=t.precision, max_epochs=t.max_epochs,
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers, enable_checkpointing=False, default_root_dir=run_dir,
        deterministic=False, use_distributed_sampler=False,  # the loader shards and orders batches itself
    )


RUN_NAME_ENV = "QWENVL_TUNE_RUN_NAME"


def env_rank() -> int:
    """Global rank known before Lightning sets up (launchers export RANK, or LOCAL_RANK + NODE_RANK)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable checkpoint."""

    def __init__(self, run_dir: Path, checkpoint: Path):
        self.run_dir, self.checkpoint = run_dir, checkpoint
        super().__init__(f"interrupted: saved {checkpoint} (and last/); continue with "
                         f"qwenvl-tune train --resume {run_dir}")


@contextlib.contextmanager
def _graceful_ctrl_c(ckpt: RunCheckpoint):
    """First Ctrl-C: finish the current optimizer step, save a resumable checkpoint, stop.
    Second Ctrl-C: abort at once (the newest checkpoint already on disk is what resume uses)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if ckpt.stop_requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        ckpt.stop_requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort without saving)",
              flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_output_dir(run_dir: Path, config: Config) -> None:
    """Fail before any model loads if the run folder is not writable or has no room for a checkpoint."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    need = estimate_checkpoint_bytes(config)
    free = shutil.disk_usage(run_dir).free
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


def find_resume(spec: str, config: Config) -> tuple[Path | None, Path | None]:
    """``--resume RUN_DIR`` or ``--resume auto`` (the run named by run.output_dir/run.name, if it has a checkpoint)."""
    if spec == "auto":
        if not config.run.name:
            raise ConfigError("--resume auto needs --run.name to know which run to continue")
        run_dir = Path(config.run.output_dir) / config.run.name
        return (run_dir, latest_resumable(run_dir)) if run_dir.is_dir() else (None, None)
    run_dir = Path(spec)
    ckpt = latest_resumable(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete resumable checkpoint (checkpoints/step=*/ or last/ with "
                                f"{TRAINER_STATE})")
    return run_dir, ckpt


def train(config: Config, resume: str | None = None) -> Path:
    """Fine-tune per ``config``; returns the run folder (config.yaml, logs/, checkpoints/, best/, last/).

    With ``resume`` (a run folder, or "auto"), training continues from the newest complete
    checkpoint of that run: weights, optimizer and scheduler, step, position in the epoch and RNG.
    """
    ckpt_path = None
    if resume:
        run_dir, ckpt = find_resume(resume, config)
        if ckpt is not None:
            config = _resumed_config(run_dir, config)
            ckpt_path = ckpt / TRAINER_STATE
    config.validate()
    check_model_source(config.model.name_or_path)  # a mistyped local path fails before anything is written
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    prefer_flash_sdpa(config.model.fast_path)
    run_dir = _run_dir(config, resuming=ckpt_path is not None)
    main = env_rank() == 0
    if main:
        _check_output_dir(run_dir, config)
    log_version = ""
    if ckpt_path:
        log_version = f"resume-{len(list((run_dir / 'logs').glob('resume-*'))) + 1}"
        print(f"resuming {run_dir} from {ckpt_path.parent.name} (logs in logs/{log_version})")
    elif main:
        (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    if main:
        print(f"run folder: {run_dir}\nresolved config:\n{config.to_yaml()}")

    processor = load_processor(config.model.name_or_path, config.data.min_pixels, config.data.max_pixels)
    train_rep, valid_rep = _setup_data(config, processor, run_dir, write=main)
    if not ckpt_path and main:
        save_schema(run_dir, infer_schema(r.suffix for r in train_rep.records))
    train_loader, val_loader = _setup_loaders(config, processor, train_rep, valid_rep)
    # the trainer before the model: an impossible accelerator/strategy setting fails before weights load
    trainer, ckpt = _setup_trainer(config, run_dir, processor, train_loader, log_version)
    model = _setup_model(config)
    module = FineTuneModule(model, processor, config)
    module.batches_per_epoch = len(train_loader._sampler.batches(0)) if hasattr(train_loader, "_sampler") else None

    try:
        with _graceful_ctrl_c(ckpt):
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except BaseException:
        _close_progress_bars(trainer)  # so the error is the last thing printed
        raise
    if ckpt.stopped_by_user:
        raise TrainingInterrupted(run_dir, ckpt.stopped_by_user)
    if trainer.interrupted:
        return run_dir
    if ckpt.validated_step != trainer.global_step and not is_fsdp(trainer):
        # Normally validated inside fit (RunCheckpoint._validate_before_leaving); this catches the rest.
        trainer.validate(module, val_loader, verbose=False)
    if trainer.is_global_zero:
        print(f"done: {run_dir} (best/: {ckpt.monitor}={ckpt.best})")
    return run_dir


def _close_progress_bars(trainer: pl.Trainer) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, TQDMProgressBar):
            for name in ("_train_progress_bar", "_val_progress_bar"):
                bar = getattr(cb, name, None)
                if bar is not None:
                    bar.close()


def _resumed_config(run_dir: Path, overrides: Config) -> Config:
    """The saved config of the run; training-length settings may be raised on the command line."""
    saved = read_run_config(run_dir)
    default = Config()
    for field in ("max_epochs", "max_steps"):
        value = getattr(overrides.train, field)
        if value != getattr(default.train, field) and value != getattr(saved.train, field):
            setattr(saved.train, field, value)
    saved.run.output_dir, saved.run.name = str(run_dir.parent), run_dir.name
    return saved
