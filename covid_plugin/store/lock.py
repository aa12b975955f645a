"""The data dir belongs to one node at a time: an exclusive lock held for the node's life.

Two nodes on one data dir re-queue each other's running jobs, send the same outbox rows twice
and delete each other's results. The lock is taken before anything in the data dir is opened,
so a second node exits having touched nothing. `flock` locks are released by the kernel when
the process dies (kill -9 included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "node.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data dir; the message says which and where."""


class DataDirLock:
    """`with DataDirLock(path):` or acquire()/release() around a node's life.

    `shared=True` is for processes that coordinate through PostgreSQL and share the data dir
    (listeners and workers): they hold the lock together, and an embedded (SQLite) node, which
    needs it alone, cannot start beside them on this machine.
    """

    def __init__(self, data_dir: Path, shared: bool = False) -> None:
        self.path = data_dir / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by another node (pid {holder}, "
                f"lock {self.path}); an embedded (SQLite) node needs its data dir alone, "
                "nodes sharing a PostgreSQL database_url share it") from None
        if not self.shared:  # shared holders would overwrite each other's pid
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
