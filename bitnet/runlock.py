"""One writer per run folder: an exclusive `fcntl.flock` on `<folder>/.bitnet.lock`.

The lock is held for the whole run by the process that writes the folder (rank 0 under torchrun).
The kernel drops it when that process exits, a crash or a kill included, so a stale lock file
never blocks a later run. The file records the holder's pid, host, start time and command; a
second writer gets a `RunLockError` that names the folder and the holder. Readers take no lock:
every file is written atomically (bitnet.atomic), so they never see a half-written one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

LOCK_NAME = ".bitnet.lock"


class RunLockError(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """Context manager (or acquire()/release()): the exclusive lock on one folder, created if needed."""

    def __init__(self, folder: str, what: str | None = None):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.what = what or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        self.fd: int | None = None

    def holder(self) -> dict:
        """What the lock file says of its holder ({} when unreadable)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        if self.fd is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            # The holder writes who it is just after taking the lock: a loser that read in between
            # sees an empty file (seen as "in use by another process" in a race of two trains).
            deadline = time.monotonic() + 1.0
            while not h and time.monotonic() < deadline:
                time.sleep(0.02)
                h = self.holder()
            who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
                   + (f" ({h['command']})" if h.get("command") else "")) if h else "another process"
            raise RunLockError(f"{self.folder} is in use by {who}; one writer per run folder: wait for it to "
                               f"finish, or choose another output folder (lock file {self.path})") from None
        except OSError as e:
            os.close(fd)
            raise RunLockError(f"cannot lock {self.folder} ({self.path}): {e.strerror or e}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "command": self.what}
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
