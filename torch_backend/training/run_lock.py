"""One run per output directory: an advisory `flock` on `<out>/.mugv.lock` held by rank 0.

Two `mugv train` runs on one `--out` interleaved their metrics and one crashed inside tensorstore;
now the second fails at start naming the holder. The kernel releases a `flock` when its process
dies (SIGKILL included), so a stale lock cannot exist on the same host: a restarted run simply
takes it. The file's content (pid, host, start time) is only for the message. Advisory locks are
not reliable on every network filesystem; the message says which host held it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunLockError(RuntimeError):
    """The output directory is in use by another live run."""


class RunLock:
    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".mugv.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise RunLockError(
                f"{self.path.parent} is in use by another mugv run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {since}); use another --out, or wait for it to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing drops the flock; the file stays (harmless, reused)
            self._fd = None
