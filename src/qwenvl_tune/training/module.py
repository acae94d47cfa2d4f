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
from ..modeling.fast import answer_only_loss
from ..inference.generate import MODEL_INPUTS, generate_batch, stop_token_ids


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

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.config.model.fast_path:
            loss = answer_only_loss(self.model, inputs, batch["labels"])
        else:
            loss = self.model(**inputs, labels=batch["labels"]).loss
        # Checked once per optimizer step (on_before_optimizer_step), not here: reading the loss on the
        # host would stall the GPU after every forward pass.
        self._pending.append((loss.detach(), batch_idx, batch.get("ids")))
        n = batch["input_ids"].shape[0]
        self._samples += n
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        # averaged over ranks (a scalar all-reduce) so data-parallel runs log the global batch's loss
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=self.trainer.world_size > 1)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=n)
        if elapsed > 0:
            # all ranks together (every rank processes the same number of samples per step)
            self.log("samples_per_s", self._samples * self.trainer.world_size / elapsed, prog_bar=True, batch_size=n)
        # wall time since training started, when this batch began: steady-state rates come from differences
        self.log("train/elapsed_s", elapsed, batch_size=n)
        if loss.device.type == "cuda":
            self.log("gpu_peak_gib", torch.cuda.max_memory_allocated(loss.device) / 2**30, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights: one host sync per optimizer step.

        Under data parallelism a non-finite gradient on one rank reaches every rank through the gradient
        reduction, so all ranks stop at the same step."""
        pending, self._pending = self._pending, []
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        values = [loss.float().reshape(1) for loss, _, _ in pending]
        if grads:
            values.append(torch.nn.utils.get_total_norm(grads, foreach=True).float().reshape(1))
        if not values or bool(torch.isfinite(torch.cat(values)).all()):
            return
        step, epoch = self.trainer.global_step, self.current_epoch
        for loss, batch_idx, ids in pending:
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({float(loss)}) at global step {step}, epoch {epoch}, batch "
                                     f"{batch_idx}; samples: {ids}. The run stopped; checkpoints written before this "
                                     f"step are intact.")
        raise NonFiniteError(f"non-finite gradient before optimizer step {step}; samples of this step: "
                             f"{[i for _, _, ids in pending for i in (ids or [])]}. The run stopped; checkpoints "
                             f"written before this step are intact.")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from .distributed import is_fsdp

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
        for text, gold, cut in zip(texts, batch["targets"], truncated):
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
