"""``train.batch_size=auto``: the largest micro-batch that fits the card, found by a short probe at start.

The probe trains (forward and backward, no update) on the longest samples of the training split at growing
batch sizes, under the same fast path and precision as training, and measures each one's peak memory. It keeps
the largest size whose peak, plus the optimizer's state still to be allocated, stays under
``train.auto_batch_memory`` of the card's memory; an out-of-memory error ends the search. Batches are
length-grouped, so the longest samples together are the worst batch an epoch can hold. The random-number state
is put back afterwards, so a run with ``auto`` is the same run as one given the chosen size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SAMPLES_PER_STEP = 8  # the defaults' 2 x 4: what an optimizer step sees when accumulation is not set


@dataclass
class Probe:
    chosen: int
    budget_gib: float
    measured: list[tuple[int, float | None]] = field(default_factory=list)  # (batch, peak GiB or None: OOM)
    stopped_by: str = ""

    def describe(self) -> str:
        sizes = ", ".join(f"{b}: {'out of memory' if g is None else f'{g:.1f} GiB'}" for b, g in self.measured)
        return (f"train.batch_size=auto: {self.chosen} (peak memory by batch size, longest samples: {sizes}; "
                f"budget {self.budget_gib:.1f} GiB; {self.stopped_by})")


def choose(try_batch: Callable[[int], float], budget: float, limit: int, candidates=CANDIDATES) -> Probe:
    """The largest candidate batch size whose measured peak (bytes, from ``try_batch``) is within ``budget``.

    ``try_batch(b)`` trains on the b longest samples and returns the peak bytes; it raises
    ``torch.OutOfMemoryError`` when they do not fit. Sizes above ``limit`` (the split's size) are not tried.
    """
    gib = 2.0 ** 30
    probe = Probe(0, budget / gib)
    for b in (c for c in candidates if c <= max(1, limit)):
        try:
            peak = try_batch(b)
        except torch.OutOfMemoryError:
            probe.measured.append((b, None))
            probe.stopped_by = f"batch {b} ran out of memory"
            break
        probe.measured.append((b, peak / gib))
        if peak > budget:
            probe.stopped_by = f"batch {b} needs more than the budget"
            break
        probe.chosen = b
    else:
        probe.stopped_by = "every size tried fits" if probe.measured else "nothing to try"
    if probe.chosen == 0:
        raise RuntimeError(f"train.batch_size=auto: not even one sample fits the card ({probe.describe()}); try "
                           f"--model.method qlora, --model.gradient_checkpointing true or a lower data.max_pixels")
    return probe


def probe_batch_size(fabric: Any, module: Any, optimizer: Any, batches: Callable[[int], dict[str, Any]],
                     limit: int, fraction: float, fast: Any = None) -> Probe:
    """Measure the real training step (the Fabric-wrapped ``TrainStep``) on this card."""
    device = fabric.device
    total = torch.cuda.get_device_properties(device).total_memory
    params = [p for p in module.parameters() if p.requires_grad]
    # AdamW's two moments, allocated at the first update, which the probe does not make
    optimizer_state = 2 * sum(p.numel() * 4 for p in params)

    def try_batch(b: int) -> float:
        # without the row indices: the probe's batches must run the vision tower, not fill the feature cache
        batch = fabric.to_device({k: v for k, v in batches(b).items() if k != "index"})
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with fabric.no_backward_sync(module, enabled=True):  # ranks must not wait on one another here
                loss = module(batch)
                fabric.backward(loss)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) + optimizer_state
        finally:
            optimizer.zero_grad(set_to_none=True)
            del batch
            torch.cuda.empty_cache()

    contexts = fast.training(module.module.model) if fast is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device]), contexts:
        probe = choose(try_batch, total * fraction, limit)
    if fabric.world_size > 1:  # every rank trains with the same size: the smallest any of them chose
        chosen = fabric.all_gather(torch.tensor(probe.chosen, device=device))
        probe.chosen = int(chosen.min())
    # the run's logged peak (gpu_peak_gib) is training's own, not the probe's largest try: a rejected size's peak
    # is above the budget by definition (a 2026-12-03 run logged batch 16's 76.4 GiB while training at 12)
    torch.cuda.reset_peak_memory_stats(device)
    return probe


def accumulation_for(batch_size: int, samples_per_step: int = SAMPLES_PER_STEP) -> int:
    """Micro-batches per optimizer step that keep a step at the defaults' samples (at least one)."""
    return max(1, -(-samples_per_step // batch_size))
