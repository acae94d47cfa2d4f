"""The training recipe, top to bottom: check data, load, fit, save.

    from qwenvl_tune.config import build_config
    from qwenvl_tune.training.run import train
    run_dir = train(build_config("configs/qwen2_5_vl_3b_lora.yaml", {"data.path": "./Data"}))
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from ..config import Config
from ..data.check import SplitReport, check_split, write_problems
from ..data.collate import Encoder, GenerateCollator, RecordDataset, TrainCollator
from ..data.records import DataError
from ..modeling.load import count_parameters, load_base_model, load_processor, prepare_for_training
from ..modeling.fast import prefer_flash_sdpa
from .checkpoints import copy_checkpoint, is_complete, prune, save_checkpoint
from .module import FineTuneModule

log = logging.getLogger(__name__)


class RunCheckpoint(Callback):
    """Writes checkpoints/epoch=E-step=S each epoch, best/ when the monitored metric improves, last/ at the end."""

    def __init__(self, run_dir: Path, processor: Any, monitor: str, mode: str, keep: int):
        self.run_dir, self.processor, self.monitor, self.mode, self.keep = run_dir, processor, monitor, mode, keep
        self.best: float | None = None
        self.validated_step = -1

    def _meta(self, trainer: pl.Trainer, **extra: Any) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics, **extra}

    def _save(self, trainer: pl.Trainer, module: FineTuneModule, name: str, **extra: Any) -> Path:
        return save_checkpoint(module.model, self.processor, self.run_dir / name, self._meta(trainer, **extra))

    def on_validation_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.validated_step = trainer.global_step
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            self._save(trainer, module, "best", monitor=self.monitor, value=value)
            print(f"best/ updated: {self.monitor}={value:.4f} (epoch {trainer.current_epoch}, step {trainer.global_step})")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        name = f"checkpoints/epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}"
        self._save(trainer, module, name)
        prune(self.run_dir / "checkpoints", self.keep)

    def on_train_end(self, trainer: pl.Trainer, module: FineTuneModule) -> None:
        self._save(trainer, module, "last")
        if not is_complete(self.run_dir / "best"):
            # No validation happened (e.g. max_steps hit first): best/ is the final state, said so in its marker.
            copy_checkpoint(self.run_dir / "last", self.run_dir / "best")


def _run_dir(config: Config) -> Path:
    name = config.run.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _setup_data(config: Config, processor: Any, run_dir: Path) -> tuple[SplitReport, SplitReport]:
    d = config.data
    kw = dict(processor=processor, system_message=d.system_message, max_length=d.max_length,
              max_image_pixels=d.max_image_pixels, workers=max(1, d.num_workers))
    reports = [check_split(d.path, "train", **kw), check_split(d.path, "valid", **kw)]
    n_problems = write_problems(run_dir / "data_problems.jsonl", reports)
    errors = [p for rep in reports for p in rep.errors]
    for rep in reports:
        s = rep.summary()
        print(f"data {s['split']:<5} {s['folder']}: {s['rows']} rows, {s['usable']} usable, {s['errors']} errors, "
              f"{s['warnings']} warnings, longest sample {s['max_tokens']} tokens")
    if errors:
        listing = "\n".join(f"  {p}" for p in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        if not d.skip_invalid:
            raise DataError(f"{len(errors)} invalid row(s); fix them or pass --data.skip_invalid true "
                            f"(all {n_problems} problems in {run_dir / 'data_problems.jsonl'}):\n{listing}")
        print(f"skipping {len(errors)} invalid row(s) (data.skip_invalid); listed in {run_dir / 'data_problems.jsonl'}:\n{listing}")
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
    common = dict(num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    train_loader = DataLoader(RecordDataset(train.records, enc, "train", d.max_image_pixels), batch_size=t.batch_size,
                              shuffle=True, collate_fn=TrainCollator(enc.pad_id), **common)
    val_loader = DataLoader(RecordDataset(valid.records, enc, "generate", d.max_image_pixels),
                            batch_size=config.generate.batch_size, shuffle=False,
                            collate_fn=GenerateCollator(enc.pad_id), **common)
    return train_loader, val_loader


def _setup_trainer(config: Config, run_dir: Path, processor: Any) -> tuple[pl.Trainer, RunCheckpoint]:
    t = config.train
    ckpt = RunCheckpoint(run_dir, processor, t.monitor, config.monitor_mode, t.keep_checkpoints)
    callbacks: list[Callback] = [ckpt, TQDMProgressBar(refresh_rate=1)]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=config.monitor_mode, patience=t.early_stopping_patience,
                                       check_on_train_epoch_end=False, verbose=True))
    loggers = [CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="logs", version="")]
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, max_epochs=t.max_epochs,
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers, enable_checkpointing=False, default_root_dir=run_dir,
        deterministic=False,
    )
    return trainer, ckpt


def train(config: Config) -> Path:
    """Fine-tune per ``config``; returns the run folder (config.yaml, logs/, checkpoints/, best/, last/)."""
    config.validate()
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    prefer_flash_sdpa(config.model.fast_path)
    run_dir = _run_dir(config)
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    print(f"run folder: {run_dir}\nresolved config:\n{config.to_yaml()}")

    processor = load_processor(config.model.name_or_path, config.data.min_pixels, config.data.max_pixels)
    train_rep, valid_rep = _setup_data(config, processor, run_dir)
    model = _setup_model(config)
    train_loader, val_loader = _setup_loaders(config, processor, train_rep, valid_rep)
    module = FineTuneModule(model, processor, config)
    trainer, ckpt = _setup_trainer(config, run_dir, processor)

    trainer.fit(module, train_loader, val_loader)
    if not trainer.interrupted and ckpt.validated_step != trainer.global_step:
        # The last epoch was not a validation epoch: validate the final weights so best/ considers them.
        trainer.validate(module, val_loader, verbose=False)
    print(f"done: {run_dir} (best/: {ckpt.monitor}={ckpt.best})")
    return run_dir
