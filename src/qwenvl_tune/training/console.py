"""What a run shows and records as it trains: one live progress bar (or, in logs, a line every few steps)
with the run's ETA, throughput and loss; one line per validation; the metrics files (CSV, TensorBoard).

Only global rank 0 prints or writes. Numbers are rounded for the eye and exact in the files.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch


class Console:
    def __init__(self, fabric: Any, loggers: list[Any], total_steps: int, start_step: int, log_every: int):
        self.fabric, self.loggers = fabric, loggers
        self.main = fabric.is_global_zero
        self.total, self.start_step, self.log_every = total_steps, start_step, max(1, log_every)
        self.samples = 0  # over all ranks, since this process started training
        self.t0: float | None = None
        self.bar = None
        if self.main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.main:
            for logger in self.loggers:
                logger.log_metrics(metrics, step)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """After an optimizer step (``step`` counts from 0): log it, move the bar."""
        now = time.perf_counter()
        if self.t0 is None:
            # the rate counts from the end of the first step (start-up, compilation and warm-up excluded)
            self.t0, self.samples = now, 0
        elapsed = now - self.t0
        metrics = {"train/loss": loss, "lr": lr, "epoch": float(epoch), "train/elapsed_s": elapsed}
        if elapsed > 0:
            metrics["samples_per_s"] = self.samples / elapsed
        if torch.cuda.is_available() and self.fabric.device.type == "cuda":
            metrics["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.fabric.device) / 2**30
        self._log(metrics, step)
        if not self.main:
            return
        done = step + 1
        rate = (done - self.start_step - 1) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"epoch {epoch} loss {loss:.4f} lr {lr:.2e}"
                                     + (f" {metrics['samples_per_s']:.2f} samples/s" if "samples_per_s" in metrics else ""),
                                     refresh=False)
        elif done % self.log_every == 0 or done == self.total:
            print(f"step {done}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e}"
                  + (f" {metrics['samples_per_s']:.2f} samples/s" if "samples_per_s" in metrics else "")
                  + (f" eta {_duration(eta)}" if eta is not None else ""), flush=True)

    def validation(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._log({f"val/{k}": v for k, v in metrics.items()}, step)
        shown = ("field_f1", "json_valid", "ted_accuracy", "edit_distance")
        self.note(f"validation after step {step} (epoch {epoch}): "
                  + " ".join(f"{k}={metrics[k]:.3f}" for k in shown if k in metrics))

    def note(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.main:
            for logger in self.loggers:
                logger.save()

    def close(self) -> None:
        self.flush()
        if self.main:
            for logger in self.loggers:
                logger.finalize("success")
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
