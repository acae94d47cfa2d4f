"""Stopping on request: what Ctrl-C, ``kill``, ``timeout``, ``docker stop``, Kubernetes and SLURM send.

The first SIGINT, SIGTERM or SIGUSR1 (SLURM's pre-emption warning, with ``--signal=USR1@...``) asks the
loop to finish the current optimizer step, save a resumable checkpoint and ``last/``, and stop (the CLI
then exits 130 with the resume command). A second Ctrl-C aborts at once; the newest checkpoint already
on disk is what a resume uses.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGUSR1"):
    NAMES[signal.SIGUSR1] = "SIGUSR1"


class StopRequest:
    """Context manager that turns stop signals into a flag the training loop reads once per optimizer step."""

    def __init__(self, announce: bool = True) -> None:
        self.reason: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.reason is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.reason is None:
            self.reason = NAMES.get(signum, f"signal {signum}")
            if self.announce:
                print(f"\n{self.reason}: finishing this step and saving a checkpoint"
                      + (" (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""), flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders' worker processes: they ignore the stop signals, which the training process
    handles by finishing its step and saving.

    A scheduler may signal a job's whole process group (SLURM at a time limit, ``kill -TERM -- -PGID``, a terminal's
    Ctrl-C). A worker killed by that SIGTERM made the training process raise "DataLoader worker ... is killed by
    signal" in the middle of its checkpoint save, and a forked worker ran the training process's inherited handler.
    Workers still end with the training process: PyTorch's workers exit when their parent is gone or closes the
    loader.
    """
    for sig in NAMES:
        signal.signal(sig, signal.SIG_IGN)
