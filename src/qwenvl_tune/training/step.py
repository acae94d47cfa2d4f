"""One training step's arithmetic: the loss of a micro-batch, the learning-rate schedule, and the check
that stops a run before a non-finite loss or gradient reaches the weights.

``TrainStep`` wraps the model so that Fabric's strategy wrapper (DDP, FSDP) and precision see the
whole loss computation as one forward pass: the fast path calls parts of the model directly (the
language-model head outside its forward), which a strategy only allows inside its own forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from ..config import Config
from ..errors import QwenVLTuneError
from ..modeling.compiled import CompiledLayers
from ..modeling.fastpath import FastPath
from ..modeling.loss import answer_only_loss, with_loader_indices
from ..modeling.generate import MODEL_INPUTS
from ..modeling.positions import PositionCheck


class NonFiniteError(QwenVLTuneError, FloatingPointError):
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


class TrainStep(torch.nn.Module):
    """The model plus how a training batch becomes a loss; its state dict is the model's under ``model.``."""

    def __init__(self, model: torch.nn.Module, fast: FastPath | bool = True, features: Any = None):
        super().__init__()
        self.model = model
        self.fast = fast if isinstance(fast, FastPath) else (FastPath() if fast else FastPath.off())
        self.positions = PositionCheck()  # the loader's rope position ids, checked against the model's once
        self.features = features  # an ImageFeatureCache (training/features.py), or None
        # the language model's decoder layers compiled, used by training forward passes only (modeling/compiled.py)
        self.compiled = CompiledLayers(model, vision=self.fast.compile_vision) if self.fast.compile_layers else None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        positions = False
        if self.fast.loader_indices:
            # the loader's rope ids (checked once against the model's own) and vision-tower indices
            positions = "position_ids" in batch and self.positions.usable(self.model, batch)
            inputs = with_loader_indices(inputs, batch, positions)
        if not self.fast.answer_only_loss:
            return self.model(**inputs, labels=batch["labels"], use_cache=False).loss
        scope = contextlib.nullcontext()
        if self.features is not None and self.training and positions:
            # kept image features in place of the pixels, or a scope that keeps the tower's output
            inputs, scope = self.features.inputs(self.model, inputs, batch)
        compiled = self.compiled.active() if self.compiled is not None and self.training else contextlib.nullcontext()
        with scope, compiled:
            return answer_only_loss(self.model, inputs, batch["labels"], batch.get("answer_positions"),
                                    chunked=self.fast.chunked_loss)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """The model's ``generate`` (marked as a forward method, so it runs inside the strategy's wrapper)."""
        return self.model.generate(**kwargs)

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(config.train.warmup_steps, total_steps))


def step_stats_tensor(losses: Sequence[torch.Tensor], grad_norm: torch.Tensor, stop: bool, world: int) -> torch.Tensor:
    """On the device: [sum over ranks of the step's mean loss, ranks that saw a non-finite loss, ranks whose
    gradient norm is non-finite, ranks asked to stop]. One all-reduce, no host sync.

    Under FSDP each rank holds a shard of the gradients, so a NaN may be visible on one rank only; summing the
    flags over ranks makes every rank decide the same way at the same step.
    """
    stacked = torch.stack([loss.detach().float().reshape(()) for loss in losses])
    stats = torch.stack([torch.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0).mean(),
                         (~torch.isfinite(stacked)).any().float(),
                         (~torch.isfinite(grad_norm.to(stacked.device).float())).float(),
                         torch.tensor(float(stop), device=stacked.device)])
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats


def step_stats(losses: Sequence[torch.Tensor], grad_norm: torch.Tensor, stop: bool, world: int) -> list[float]:
    """``step_stats_tensor`` read on the host: [mean loss over ranks, bad-loss ranks, bad-gradient ranks, stop ranks]."""
    mean, bad_loss, bad_grad, stop_any = step_stats_tensor(losses, grad_norm, stop, world).tolist()
    return [mean / world, bad_loss, bad_grad, stop_any]


def non_finite_error(step: int, epoch: int, pending: Sequence[tuple[torch.Tensor, int, list | None]],
                     bad_grad_ranks: float, world: int) -> NonFiniteError:
    """The error naming where the run went non-finite: the micro-batch and its samples, or the step's samples."""
    for loss, batch_idx, ids in pending:
        if not torch.isfinite(loss):
            return NonFiniteError(f"non-finite loss ({float(loss)}) at global step {step}, epoch {epoch}, batch "
                                  f"{batch_idx}; samples: {ids}. The run stopped; checkpoints written before this "
                                  f"step are intact.")
    where = "" if world == 1 else (" on this or another rank" if bad_grad_ranks else
                                   " (from a non-finite loss on another rank)")
    mine = " on this rank" if world > 1 else ""
    return NonFiniteError(f"non-finite gradient before optimizer step {step}{where}; samples of this step{mine}: "
                          f"{[i for _, _, ids in pending for i in (ids or [])]}. The run stopped; checkpoints "
                          f"written before this step are intact.")
