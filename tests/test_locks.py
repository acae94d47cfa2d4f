"""The lock a command holds on what it writes (rundir.held): one holder at a time, named to the next."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys

import pytest

from conftest import ENV
from qwenvl_tune.rundir import held


class Busy(Exception):
    pass


def test_a_second_holder_gets_the_first_ones_host_and_pid_and_a_dead_one_holds_nothing(tmp_path):
    lock = tmp_path / "x.lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, pathlib; from qwenvl_tune.rundir import held\n"
        f"with held(pathlib.Path({str(lock)!r}), Exception):\n"
        "    print('held', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=ENV)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(Busy) as e:
            with held(lock, Busy):
                pass
        assert str(e.value) == f"{socket.gethostname()} pid {child.pid}"
    finally:
        child.kill()  # killed, not released: the kernel drops its lock
        child.wait()
    with held(lock, Busy):
        assert lock.read_text().endswith(f"pid {os.getpid()}\n")
    assert lock.exists() and lock.read_text() == ""  # kept, emptied
    with held(lock, Busy, remove=True):
        pass
    assert not lock.exists()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with held(tmp_path / "x.lock", Busy):
        ran.append(True)
    assert ran and "warning: cannot lock" in capsys.readouterr().out
