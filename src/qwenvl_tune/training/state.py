"""The resume state, as one explicit dict: trainable weights, optimizer, scheduler, loop position, RNG.

``Progress`` is where the loop stands: optimizer steps done, the epoch, how many of the epoch's
micro-batches are done (the loader's position), and what validation has decided so far (best value,
validations without improvement). A checkpoint taken at any micro-batch boundary that ends an
optimizer step resumes exactly: the loader skips the batches already trained, and the RNG of every
rank is restored, so dropout draws the same masks as in the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained
    batch_in_epoch: int = 0  # micro-batches of this epoch done (this rank's)
    best: list[float] | None = None  # the ranking key of best/ (see loop.ranking_key)
    best_step: int | None = None
    bad_validations: int = 0  # validations since the monitored metric last improved (early stopping)
    validated_step: int = -1  # the step whose weights were last validated
    data: str | None = None  # the training documents (records.data_fingerprint): a resume needs the same ones

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Progress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def rng_state() -> dict[str, Any]:
    """Plain tuples and tensors only, so the file loads with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ranks(obj: Any, world: int) -> list[Any]:
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def save_state(fabric: Any, path: Path, module: Any, optimizer: Any, scheduler: Any, progress: Progress,
               sharded: bool) -> None:
    """Write the trainer state (collective: every rank calls it; each rank's RNG is kept).

    Only trainable weights are written (the frozen base is in the model's own checkpoint), except
    under sharded FSDP, whose per-rank files hold every shard.
    """
    rngs = _all_ranks(rng_state(), fabric.world_size)
    state = {"model": module, "optimizer": optimizer, "scheduler": scheduler.state_dict(),
             "progress": dataclasses.asdict(progress), "rng": rngs, "world_size": fabric.world_size}
    # names as the (unwrapped) module's state dict spells them; the Fabric wrapper's own add a prefix
    trainable = {n for n, p in getattr(module, "module", module).named_parameters() if p.requires_grad}
    fabric.save(path, state, filter=None if sharded else {"model": lambda k, v: k in trainable})


def load_state(fabric: Any, path: Path, module: Any, optimizer: Any, scheduler: Any
               ) -> tuple[Progress, dict[str, Any] | None]:
    """Read a trainer state into the set-up objects.

    Returns:
        (progress, this rank's RNG state): the caller restores the RNG last, right before training.
    """
    rest = fabric.load(path, {"model": module, "optimizer": optimizer}, strict=False)
    scheduler.load_state_dict(rest["scheduler"])
    rngs = rest.get("rng") or []
    rank = fabric.global_rank
    rng = rngs[rank] if rank < len(rngs) else (rngs[0] if rngs else None)
    return Progress.from_dict(rest["progress"]), rng
