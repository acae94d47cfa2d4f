"""The training loop, in the order a step happens: micro-batches, the non-finite check, clipping, the
optimizer step, logging, checkpoints, validation, early stopping, publishing.

``fit`` runs on Lightning Fabric, which supplies the device, the strategy (DDP, FSDP) and the
precision; everything else is here, with no framework state: a resume needs only ``Progress`` and
the objects it restores (``state.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..evaluation.metrics import SCALAR_METRICS, aggregate, score_sample
from ..modeling.generate import generate_batch, stop_token_ids
from ..rundir import RunDir, copy_checkpoint, trainer_state
from .best import mark_best, ranking_key, tie_reason
from .checkpoints import save_checkpoint
from .distributed import fabric_is_fsdp, gathered_state_dict
from .state import Progress, save_state
from .step import non_finite_error, step_stats_tensor

@dataclass
class Loop:
    """Everything ``fit`` uses, set up by the recipe (``run.py``)."""

    fabric: Any
    module: Any  # the Fabric-wrapped TrainStep
    optimizer: Any
    scheduler: Any
    train_loader: Any  # ResumableLoader
    val_loader: Any
    run: RunDir
    processor: Any
    config: Config
    progress: Progress
    stop: Any  # StopRequest: this process's signals
    console: Any  # Console
    stop_agreed: str | None = None  # a stop every rank has agreed on (from the step statistics)
    records: list = field(default_factory=list)  # optimizer steps whose statistics are not read yet

    @property
    def main(self) -> bool:
        return self.fabric.is_global_zero

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.config.train.accumulate_grad_batches)

    def total_steps(self) -> int:
        t = self.config.train
        return t.max_steps if t.max_steps > 0 else self.steps_per_epoch() * t.max_epochs

    def finished(self) -> bool:
        t, p = self.config.train, self.progress
        return p.epoch >= t.max_epochs or (t.max_steps > 0 and p.step >= t.max_steps)


class Stopped(Exception):
    """Raised inside ``fit`` after a requested stop was saved; carries the checkpoint."""

    def __init__(self, checkpoint: Path, reason: str):
        self.checkpoint, self.reason = checkpoint, reason
        super().__init__(reason)


def fit(loop: Loop) -> Path:
    """Train until ``max_epochs``/``max_steps`` or early stopping; returns the final resumable checkpoint.

    Raises:
        Stopped: a stop was requested (signal); the checkpoint and ``last/`` were saved first.
        NonFiniteError: a loss or gradient became NaN/inf; nothing was written for that step.
    """
    t, p = loop.config.train, loop.progress
    n_batches = len(loop.train_loader)
    early_stop = False
    loop.module.train()
    while not loop.finished() and not early_stop:
        loop.train_loader.set_position(p.epoch, p.batch_in_epoch)
        pending: list[tuple[torch.Tensor, int, list | None]] = []
        for batch in loop.train_loader:
            idx = p.batch_in_epoch
            ends_step = (idx + 1) % t.accumulate_grad_batches == 0 or idx + 1 == n_batches
            pending.append(micro_batch(loop, batch, ends_step))
            p.batch_in_epoch += 1
            if not ends_step:
                continue
            optimizer_step(loop, pending)
            pending = []
            saved = None
            if t.checkpoint_every_n_steps and p.step % t.checkpoint_every_n_steps == 0:
                saved = save_resumable(loop)
            if stop_decided(loop):
                saved = saved or save_resumable(loop, interrupted=True)
                publish(loop, saved, "last")
                raise Stopped(saved, loop.stop_agreed or loop.stop.reason)
            if t.max_steps > 0 and p.step >= t.max_steps:
                break
        if p.batch_in_epoch >= n_batches:  # the epoch is trained
            # saved before validating, so a kill during validation loses no training
            save_resumable(loop, end_of_epoch=True)
            if (p.epoch + 1) % t.check_val_every_n_epoch == 0:
                early_stop = validate(loop)
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    final = save_resumable(loop)
    if p.validated_step != p.step:
        validate(loop)  # the final weights, whatever the epoch's validation rhythm
    return final


def micro_batch(loop: Loop, batch: dict[str, Any], ends_step: bool) -> tuple[torch.Tensor, int, list | None]:
    """Forward and backward of one micro-batch; returns (loss, its index in the epoch, its sample ids)."""
    batch = loop.fabric.to_device(batch)
    # gradients are synchronised across ranks only on the micro-batch that ends a step
    with loop.fabric.no_backward_sync(loop.module, enabled=not ends_step):
        loss = loop.module(batch)
        loop.fabric.backward(loss / loop.config.train.accumulate_grad_batches)
    loop.console.samples += batch["input_ids"].shape[0] * loop.fabric.world_size
    return loss.detach(), loop.progress.batch_in_epoch, batch.get("ids")


@dataclass
class StepRecord:
    """An optimizer step's statistics (``stats``, a host copy unless ``event`` is None) and its micro-batches'
    (loss, index, sample ids) for the error message; read one step later."""

    step: int
    epoch: int
    lr: float
    stats: torch.Tensor
    event: Any
    pending: list


def optimizer_step(loop: Loop, pending: list[tuple[torch.Tensor, int, list | None]]) -> None:
    """Check, clip, step and log after a step's micro-batches. ``fit`` and the benchmark (bench/train_speed.py)
    both call this and ``micro_batch``.

    The step's loss, non-finite flags and stop requests are summed over ranks in one all-reduce. With a fused
    optimizer the host does not wait for them: a non-finite step is skipped on the device (the optimizer's
    ``found_inf``, as mixed-precision scaling uses it), and the host reads the statistics one step later, when
    they are long computed, and raises naming the step. Every checkpoint, validation and stop first reads all
    outstanding statistics, so nothing is written after a non-finite step. Without a fused optimizer the host
    reads them before the update (one wait per step).
    """
    t, p, fabric = loop.config.train, loop.progress, loop.fabric
    if t.gradient_clip_val:
        norm = fabric.clip_gradients(loop.module, loop.optimizer, max_norm=t.gradient_clip_val,
                                     error_if_nonfinite=False)
    else:
        grads = [q.grad for q in loop.module.parameters() if q.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    stats = step_stats_tensor([loss for loss, _, _ in pending], norm, loop.stop.reason is not None, fabric.world_size)
    lr = loop.optimizer.param_groups[0]["lr"]  # the rate this step uses
    inner = getattr(loop.optimizer, "optimizer", loop.optimizer)
    deferred = stats.is_cuda and bool(inner.defaults.get("fused"))
    if deferred:
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        inner.found_inf = (stats[1] + stats[2]).clamp(max=1.0)  # skip the update on the device if non-finite
        try:
            loop.optimizer.step()
        finally:
            inner.found_inf = None
        loop.records.append(StepRecord(p.step, p.epoch, lr, host, event, pending))
        drain(loop, keep=1)  # the previous step's statistics: finished long ago, so no wait
    else:
        loop.records.append(StepRecord(p.step, p.epoch, lr, stats, None, pending))
        drain(loop)  # read now, before the update: a non-finite step never reaches the weights
        loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    p.step += 1


def drain(loop: Loop, keep: int = 0) -> None:
    """Read outstanding step statistics (all but the newest ``keep``): log them, stop on a non-finite step,
    record a stop that the ranks agreed on."""
    world = loop.fabric.world_size
    while len(loop.records) > keep:
        record = loop.records.pop(0)
        if record.event is not None:
            record.event.synchronize()
        total_loss, bad_loss, bad_grad, stop = record.stats.tolist()
        if bad_loss or bad_grad:
            loop.records.clear()
            raise non_finite_error(record.step, record.epoch, record.pending, bad_grad, world)
        if stop and loop.stop_agreed is None:
            loop.stop_agreed = loop.stop.reason or "stop requested on another rank"
        loop.console.step(record.step, record.epoch, total_loss / world, record.lr)


def stop_decided(loop: Loop) -> bool:
    """Whether to stop at this step boundary: a signal to this process when it trains alone, else only a stop
    every rank has read from the same step's statistics (so all ranks save and stop together)."""
    if loop.fabric.world_size == 1:
        return loop.stop.reason is not None
    return loop.stop_agreed is not None


def save_resumable(loop: Loop, **extra: Any) -> Path:
    """A resumable checkpoint at the current step (every rank takes part); reused if it already exists."""
    p, fabric = loop.progress, loop.fabric
    drain(loop)  # nothing is written after a non-finite step, and the step's loss is logged before its checkpoint
    existing = loop.run.checkpoint_at_step(p.step)
    if existing is not None:  # e.g. the epoch-end checkpoint of a step already saved periodically
        return existing
    dest = loop.run.step_checkpoint(p.step, p.epoch)
    loop.console.flush()  # the step's logged loss reaches metrics.csv before its checkpoint
    weights = gathered_state_dict(fabric, loop.module)  # collective under FSDP; None otherwise
    sharded = fabric_is_fsdp(fabric)

    def state(tmp: Path) -> None:
        save_state(fabric, trainer_state(tmp), loop.module, loop.optimizer, loop.scheduler, p, sharded)

    meta = {"epoch": p.epoch, "global_step": p.step, "batch_in_epoch": p.batch_in_epoch, "data": p.data, **extra}
    save_checkpoint(loop.module.module.model, loop.processor, dest, meta, state, is_main=loop.main,
                    tmp_name=f".{dest.name}.tmp-step{p.step}", state_dict=weights)
    fabric.barrier()
    if loop.main:
        loop.run.prune(loop.config.train.keep_checkpoints)
    return dest


def publish(loop: Loop, src: Path, name: str) -> None:
    if loop.main:  # published checkpoints are written by rank 0 only
        copy_checkpoint(src, loop.run.published(name))


@torch.no_grad()
def validate(loop: Loop) -> bool:
    """Generate for the validation split (sharded over ranks), score, log, update ``best/``.

    Returns:
        Whether early stopping says to stop.
    """
    t, p, fabric = loop.config.train, loop.progress, loop.fabric
    drain(loop)
    loop.module.eval()
    stop_ids = stop_token_ids(loop.module, loop.processor)
    scores = []
    limit = t.limit_val_batches
    n = len(loop.val_loader)
    if limit is not None:
        n = min(n, int(limit) if float(limit).is_integer() and limit > 1 else max(1, int(n * limit)))
    for i, batch in enumerate(loop.val_loader):
        if i >= n:
            break
        with fabric.autocast():  # the training precision (on one device Fabric adds it only to forward calls)
            texts, cut = generate_batch(loop.module, loop.processor, batch, loop.config.generate.max_new_tokens,
                                        stop_ids)
        for text, gold, c, pad in zip(texts, batch["targets"], cut, batch.get("padding") or [False] * len(texts)):
            if not pad:  # a repeat that only keeps this rank in step with the others
                scores.append(score_sample(text, gold, truncated=c, **loop.config.metric_options()))
    loop.module.train()
    if fabric.world_size > 1:
        gathered: list = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    p.validated_step = p.step
    if not scores:
        return False
    metrics = {m: float(v) for m, v in aggregate(scores).items() if m in SCALAR_METRICS}
    loop.console.validation(p.step, p.epoch, metrics)
    key = ranking_key(metrics, t.monitor, loop.config.monitor_mode)
    improved = p.best is None or key[0] > p.best[0]
    if p.best is None or key >= p.best:  # ties all the way down: the later validation
        why = ("first validation" if p.best is None else
               f"{t.monitor} improved" if improved else
               f"{t.monitor} tied; {tie_reason(key, p.best)}")
        p.best, p.best_step = key, p.step
        src = save_resumable(loop)  # the one already written at this step, normally
        if loop.main:
            copy_checkpoint(src, loop.run.published("best"))
            mark_best(loop.run.published("best"), t.monitor, metrics, why)
        loop.console.note(f"best/ is now step {p.step} (epoch {p.epoch}): {why}")
    p.bad_validations = 0 if improved else p.bad_validations + 1
    return 0 < t.early_stopping_patience <= p.bad_validations
