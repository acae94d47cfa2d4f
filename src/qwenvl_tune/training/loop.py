"""The training loop, in the order a step happens: micro-batches, the non-finite check, clipping, the
optimizer step, logging, checkpoints, validation, early stopping, publishing.

``fit`` runs on Lightning Fabric, which supplies the device, the strategy (DDP, FSDP) and the
precision; everything else is here, with no framework state: a resume needs only ``Progress`` and
the objects it restores (``state.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..evaluation.metrics import SCALAR_METRICS, aggregate, score_sample
from ..modeling.generate import generate_batch, stop_token_ids
from ..rundir import RunDir, annotate, copy_checkpoint, trainer_state
from .checkpoints import save_checkpoint
from .distributed import fabric_is_fsdp, gathered_state_dict
from .state import Progress, save_state
from .step import non_finite_error, step_stats

# Ties on the monitored metric are broken by these, in order (then the later validation wins).
TIE_BREAKERS = (("json_valid", 1), ("ted_accuracy", 1), ("edit_distance", -1))


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
    stop: Any  # StopRequest
    console: Any  # Console

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
            if loop.stop.reason is not None:  # agreed on by every rank in the step's all-reduce
                saved = saved or save_resumable(loop, interrupted=True)
                publish(loop, saved, "last")
                raise Stopped(saved, loop.stop.reason)
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


def optimizer_step(loop: Loop, pending: list[tuple[torch.Tensor, int, list | None]]) -> None:
    """Check, clip, step and log after a step's micro-batches: one all-reduce and one host sync per optimizer
    step. ``fit`` and the benchmark (bench/train_speed.py) both call this and ``micro_batch``."""
    t, p, fabric = loop.config.train, loop.progress, loop.fabric
    if t.gradient_clip_val:
        norm = fabric.clip_gradients(loop.module, loop.optimizer, max_norm=t.gradient_clip_val,
                                     error_if_nonfinite=False)
    else:
        grads = [q.grad for q in loop.module.parameters() if q.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    mean_loss, bad_loss, bad_grad, stop = step_stats([loss for loss, _, _ in pending], norm.to(pending[0][0].device),
                                                     loop.stop.reason is not None, fabric.world_size)
    if bad_loss or bad_grad:
        raise non_finite_error(p.step, p.epoch, pending, bad_grad, fabric.world_size)
    if stop and loop.stop.reason is None:
        loop.stop.reason = "stop requested on another rank"
    lr = loop.optimizer.param_groups[0]["lr"]  # the rate this step uses
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.console.step(p.step, p.epoch, mean_loss, lr)
    p.step += 1


def save_resumable(loop: Loop, **extra: Any) -> Path:
    """A resumable checkpoint at the current step (every rank takes part); reused if it already exists."""
    p, fabric = loop.progress, loop.fabric
    existing = loop.run.checkpoint_at_step(p.step)
    if existing is not None:  # e.g. the epoch-end checkpoint of a step already saved periodically
        return existing
    dest = loop.run.step_checkpoint(p.step, p.epoch)
    loop.console.flush()  # the step's logged loss reaches metrics.csv before its checkpoint
    weights = gathered_state_dict(fabric, loop.module)  # collective under FSDP; None otherwise
    sharded = fabric_is_fsdp(fabric)

    def state(tmp: Path) -> None:
        save_state(fabric, trainer_state(tmp), loop.module, loop.optimizer, loop.scheduler, p, sharded)

    meta = {"epoch": p.epoch, "global_step": p.step, "batch_in_epoch": p.batch_in_epoch, **extra}
    save_checkpoint(loop.module.module.model, loop.processor, dest, meta, state, is_main=loop.main,
                    tmp_name=f".{dest.name}.tmp-step{p.step}", state_dict=weights)
    fabric.barrier()
    if loop.main:
        loop.run.prune(loop.config.train.keep_checkpoints)
    return dest


def publish(loop: Loop, src: Path, name: str) -> None:
    if loop.main:
        copy_checkpoint(src, loop.run.published(name))


def ranking_key(metrics: dict[str, float], monitor: str, mode: str) -> list[float]:
    """Larger is better: the monitored metric, then the tie-breakers."""
    sign = 1.0 if mode == "max" else -1.0
    return [sign * metrics[monitor.split("/", 1)[1]]] + [s * metrics[m] for m, s in TIE_BREAKERS]


@torch.no_grad()
def validate(loop: Loop) -> bool:
    """Generate for the validation split (sharded over ranks), score, log, update ``best/``.

    Returns:
        Whether early stopping says to stop.
    """
    t, p, fabric = loop.config.train, loop.progress, loop.fabric
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
               f"{t.monitor} tied; {_tie_reason(key, p.best)}")
        p.best, p.best_step = key, p.step
        src = save_resumable(loop)  # the one already written at this step, normally
        if loop.main:
            copy_checkpoint(src, loop.run.published("best"))
            _mark_best(loop.run.published("best"), t.monitor, metrics, why)
        loop.console.note(f"best/ is now step {p.step} (epoch {p.epoch}): {why}")
    p.bad_validations = 0 if improved else p.bad_validations + 1
    return 0 < t.early_stopping_patience <= p.bad_validations


def _tie_reason(key: list[float], best: list[float]) -> str:
    for (name, _), a, b in zip(TIE_BREAKERS, key[1:], best[1:]):
        if a != b:
            return f"better {name}"
    return "equal on every tie-breaker, so the later weights"


def _mark_best(path: Path, monitor: str, metrics: dict[str, float], why: str) -> None:
    """Record in best/'s marker which metrics chose it, and why."""
    annotate(path, metrics={f"val/{k}": v for k, v in metrics.items()}, monitor=monitor,
             value=metrics[monitor.split("/", 1)[1]], chosen_because=why)
