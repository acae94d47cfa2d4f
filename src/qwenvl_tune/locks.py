"""A lock one process holds while it works on something: a run folder it trains, an output file it writes.

    with held(run.path / ".training.lock", busy=lambda holder: RunBusy(f"... trained now by {holder}")):
        ...

An advisory ``flock`` on a lock file that names its holder (host and pid): a second process gets the
``busy`` error at once, naming who holds it; the kernel drops the lock when its process dies, so a killed
command never leaves it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def held(path: Path, busy: Callable[[str], Exception], remove: bool = False) -> Iterator[None]:
    """Hold ``path`` (made if needed) for this process. Raises ``busy(holder)`` when another process holds it.

    ``remove``: delete the file when done (tidier beside a user's file; a third process that opened it just before
    could then lock the removed file, so keep it where two holders at once would do harm).
    """
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise busy(holder) from None
    except OSError as e:  # a file system without locks (Lustre mounted without -o flock, some FUSE mounts)
        fh.close()
        print(f"warning: cannot lock {path} ({e.strerror}): this file system has no file locks, so a second copy of "
              f"this command would not be stopped")
        yield
        return
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        else:
            fh.seek(0)
            fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
