"""The one base class of every error a user can fix.

The CLI prints an error of this family as one line (``error: ...``) and exits 2; any other
exception is a bug and keeps its traceback. Subclasses also derive from the built-in type that
describes them (``ValueError``, ``FileNotFoundError``, ...), so library callers can catch either.
"""

from __future__ import annotations


class QwenVLTuneError(Exception):
    """Something the user can fix: a config value, a data row, a run folder, a missing extra."""


class RunFolderError(QwenVLTuneError, FileNotFoundError):
    """A run folder, or a checkpoint in it, is missing or incomplete."""


class MissingExtraError(QwenVLTuneError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package, self.extra = package, extra
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed: "
                         f"pip install 'qwenvl-tune[{extra}]'")


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a resumable checkpoint; the CLI exits 130."""

    def __init__(self, run_dir: object, checkpoint: object, why: str = "interrupted"):
        self.run_dir, self.checkpoint = run_dir, checkpoint
        super().__init__(f"{why}: saved {checkpoint} (and last/); continue with "
                         f"qwenvl-tune train --resume {run_dir}")
