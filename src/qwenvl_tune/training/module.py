"""The LightningModule: training step, validation by generation, optimizer and schedule. Nothing else."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch

from ..config import Config
from ..evaluation.metrics import SCALAR_METRICS, aggregate, score_sample
from ..modeling.fast import answer_only_loss
from ..inference.generate import MODEL_INPUTS, generate_batch, stop_token_ids


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
        self.processor = processor
        self.config = config
        self._val_scores: list = []
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
        n = batch["input_ids"].shape[0]
        self._samples += n
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=n)
        if elapsed > 0:
            self.log("samples_per_s", self._samples / elapsed, prog_bar=True, batch_size=n)
        return loss

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
        if not self._val_scores:
            return
        agg = aggregate(self._val_scores)
        for name in SCALAR_METRICS:
            self.log(f"val/{name}", float(agg[name]), prog_bar=name in ("field_f1", "edit_distance", "json_valid"))
        self._val_scores = []

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.config.train
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(t.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
