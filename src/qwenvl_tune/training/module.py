"""The LightningModule: training step, validation by generation, optimizer and schedule. Nothing else."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np

import pytorch_lightning as pl
import torch

from ..config import Config
from ..evaluation.metrics import SCALAR_METRICS, aggregate, score_sample
from ..modeling.fast import answer_only_loss, with_loader_indices
from ..modeling.positions import PositionCheck
from ..inference.generate import MODEL_INPUTS, generate_batch, stop_token_ids
from .distributed import is_fsdp


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf; names the step and the batch's sample ids."""


def warmup_linear_decay(warmup: int, total: int):
    """LR multiplier: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        return max(0.0, (total - step) / (total - warmup))
    return fn


class FineTuneModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, processor: Any, config: Config):
        super().__init__()
        # from_pretrained returns eval mode; Lightning keeps each module's mode, so switch once here
        # (LoRA dropout is only active in train mode).
        self.model = model.train()
        # Lightning checkpoints hold only trainable weights (see state_dict), so loading is non-strict.
        self.strict_loading = False
        self.processor = processor
        self.config = config
        self._val_scores: list = []
        self._pending: list = []  # (loss, batch_idx, sample ids) of the micro-batches since the last optimizer step
        self.batches_per_epoch: int | None = None  # single-process batches per epoch, set by the recipe
        self._stop_ids: list[int] | None = None
        self._t0: float | None = None
        self._samples = 0
        self._positions = PositionCheck()  # the loader's rope position ids, checked against the model's once
        self._step_loss: tuple[float, float] | None = None  # the last optimizer step's (loss over ranks, lr)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.config.model.fast_path:
            # the loader's rope ids (checked once against the model's own) and vision-tower indices
            positions = "position_ids" in batch and self._positions.usable(self.model, batch)
            inputs = with_loader_indices(inputs, batch, positions)
            loss = answer_only_loss(self.model, inputs, batch["labels"], batch.get("answer_positions"),
                                    chunked=not (self._trainer is not None and is_fsdp(self._trainer)))
        else:
            loss = self.model(**inputs, labels=batch["labels"]).loss
        # Checked and logged once per optimizer step (on_before_optimizer_step), not here: reading the
        # loss on the host, logging a Python number (Lightning copies it to the GPU, which waits for the
        # stream) or `sync_dist` (a barrier) would stall the GPU in the middle of every step.
        self._pending.append((loss.detach(), batch_idx, batch.get("ids")))
        self._samples += batch["input_ids"].shape[0]
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights, and log the step.

        One host sync per optimizer step. Under data parallelism the step's mean loss and the
        non-finite flags are summed over ranks in the same all-reduce, so every rank logs the global
        batch's loss and every rank stops at the same step (under FSDP each rank holds only its shard
        of the gradients, so a NaN may be visible on one rank only)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        losses = torch.stack([loss.float().reshape(()) for loss, _, _ in pending])
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float() if grads else losses.new_zeros(())
        bad_loss = (~torch.isfinite(losses)).any().float()
        # mean loss, 1 if this rank saw a non-finite loss, 1 if its (local) gradient norm is non-finite
        stats = torch.stack([torch.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0).mean(), bad_loss,
                             (~torch.isfinite(norm)).float()])
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # no barrier: the host waits once, below
        mean_loss, bad_loss_ranks, bad_grad_ranks = stats.tolist()
        if not (bad_loss_ranks or bad_grad_ranks):
            # logged once the step is done (on_train_batch_end), with the learning rate this step uses
            # (the scheduler moves on before that hook)
            self._step_loss = (mean_loss / world, optimizer.param_groups[0]["lr"])
            return
        step, epoch = self.trainer.global_step, self.current_epoch
        for loss, batch_idx, ids in pending:
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({float(loss)}) at global step {step}, epoch {epoch}, batch "
                                     f"{batch_idx}; samples: {ids}. The run stopped; checkpoints written before this "
                                     f"step are intact.")
        where = "" if world == 1 else (" on this or another rank" if bad_grad_ranks else
                                       " (from a non-finite loss on another rank)")
        mine = " on this rank" if world > 1 else ""
        raise NonFiniteError(f"non-finite gradient before optimizer step {step}{where}; samples of this step{mine}: "
                             f"{[i for _, _, ids in pending for i in (ids or [])]}. The run stopped; checkpoints "
                             f"written before this step are intact.")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_loss is None:  # a micro-batch that did not end an optimizer step
            return
        (loss, lr), self._step_loss = self._step_loss, None
        self._log_step(loss, lr)

    def _log_step(self, loss: float, lr: float) -> None:
        """Per-step metrics as CPU tensors: logging a Python number makes Lightning copy it to the GPU,
        a blocking copy that waits for all queued work."""
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        cpu = lambda x: torch.tensor(float(x), dtype=torch.float32)  # noqa: E731
        # the mean over this optimizer step's micro-batches and over ranks: the global batch's loss
        self.log("train/loss", cpu(loss), prog_bar=True)
        self.log("lr", cpu(lr), prog_bar=True)
        if elapsed > 0:
            # all ranks together (every rank processes the same number of samples per step)
            self.log("samples_per_s", cpu(self._samples * self.trainer.world_size / elapsed), prog_bar=True)
        # wall time since training started, when this step's optimizer update was queued (the host waited
        # for the backward pass just before): steady-state rates come from differences between steps
        self.log("train/elapsed_s", cpu(elapsed))
        if self.device.type == "cuda":
            self.log("gpu_peak_gib", cpu(torch.cuda.max_memory_allocated(self.device) / 2**30))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and is_fsdp(self.trainer):
            # Lightning's FSDP precision refuses to clip by norm; FSDP's own clip takes the norm over all shards.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # Lightning checkpoints (the trainer state used to resume) carry only what training changes:
    # trainable weights, not the frozen multi-GB base model. Only when asked directly (DDP, one
    # device): under FSDP this module is a child of the FSDP root, which collects every shard into
    # its own dict, and the sharded checkpoint then holds the frozen shards too.
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        if args or kwargs.get("destination") is not None or kwargs.get("prefix"):
            return full
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in keep}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain tuples and tensors only, so the checkpoint loads with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng"] = {"python": random.getstate(),
                             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
                             "torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if rng:
            random.setstate(rng["python"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_train_start(self) -> None:
        self._t0, self._samples = time.perf_counter(), 0

    def on_validation_epoch_start(self) -> None:
        self._val_scores = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self.model, self.processor)
        texts, truncated = generate_batch(self.model, self.processor, batch, self.config.generate.max_new_tokens,
                                          self._stop_ids)
        padding = batch.get("padding") or [False] * len(texts)
        for text, gold, cut, pad in zip(texts, batch["targets"], truncated, padding):
            if pad:  # a repeat that only keeps this rank in step with the others
                continue
            self._val_scores.append(score_sample(text, gold, truncated=cut, **self.config.metric_options()))

    def on_validation_epoch_end(self) -> None:
        scores = self._val_scores
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            # each rank generated its own share of the validation split: gather every sample's score
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, scores)
            scores = [s for part in gathered for s in part]
        if not scores:
            return
        agg = aggregate(scores)
        for name in SCALAR_METRICS:
            # identical on every rank after the gather, so no further reduction
            self.log(f"val/{name}", float(agg[name]), prog_bar=name in ("field_f1", "edit_distance", "json_valid"),
                     rank_zero_only=False, sync_dist=False)
        self._val_scores = []

    def total_steps(self) -> int:
        """Optimizer steps of the whole run, for the LR schedule.

        Computed from the loader's size rather than ``trainer.estimated_stepping_batches``, which
        sets up the train loader before a checkpoint is restored and so loses its resume position.
        """
        t = self.config.train
        if t.max_steps and t.max_steps > 0:
            return t.max_steps
        if self.batches_per_epoch is None:
            return int(self.trainer.estimated_stepping_batches)
        per_rank = self.batches_per_epoch // max(1, self.trainer.world_size)
        return math.ceil(per_rank / t.accumulate_grad_batches) * t.max_epochs

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.config.train
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        total = self.total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(t.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
