"""Checkpoints in Hugging Face format: the weights (adapter or full) and the processor, plus the
trainer state for resumable ones, written atomically into the run folder (``rundir`` owns the layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..rundir import write_checkpoint
from .distributed import save_weights


def save_checkpoint(model: Any, processor: Any, dest: str | Path, meta: dict[str, Any],
                    extra: Callable[[Path], None] | None = None, *, is_main: bool = True,
                    tmp_name: str | None = None, state_dict: dict[str, Any] | None = None) -> Path:
    """Save adapter-or-weights + processor (+ ``extra(tmp_dir)``, e.g. the trainer state) to ``dest``.

    Written under a temporary name in the same folder, flushed, marked complete last, then
    renamed into place: an interrupted save never replaces ``dest``.

    In a data-parallel run every rank calls this with the same ``tmp_name``: ``extra`` may be
    collective (Lightning's ``save_checkpoint`` is), everything else is done by the main rank.
    ``state_dict`` overrides the model's own tensors (under FSDP: the weights gathered from all ranks).

    Raises:
        CheckpointError: the disk (or quota) is full, or the folder is not writable.
    """
    dest = Path(dest)
    if not is_main:
        if extra is not None:
            extra(dest.with_name(tmp_name or f".{dest.name}.tmp"))
        return dest

    def write(tmp: Path) -> None:
        save_weights(model, tmp, state_dict)
        processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_checkpoint(dest, meta, write, tmp_name=tmp_name)
