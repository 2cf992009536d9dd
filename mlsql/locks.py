"""A cross-process lock on a workspace file, with a bounded wait that says whom it waits for.

The lock is an advisory ``flock`` on ``<name>.lock``: the operating system drops it when its
process dies, however it dies, so a killed kernel never leaves the workspace locked. Beside
it, ``<name>.holder.json`` describes the current holder (pid, what it is, since when) for the
messages of processes that wait; it is only read while the lock is held by someone, so a
stale file from a dead process is never believed. A process that waits touches
``<name>.waiting``; a holder that keeps the lock between statements (see
``mlsql.engines.duckdb``) gives it up as soon as it sees a newer waiting mark.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlsql.errors import WorkspaceError

DEFAULT_TIMEOUT_S = 60.0
POLL_S = 0.005


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s ``.lock`` file for the block (waits as long as it
    takes): the small JSON stores (devices, experiments) rewrite their file under it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def describe_process() -> str:
    """What this process is, for other processes' waiting messages."""
    notebook = os.environ.get("JPY_SESSION_NAME")  # set by jupyter_server for a notebook's kernel
    if notebook:
        return f"the kernel of notebook {Path(notebook).name}"
    if os.environ.get("MLSQL_PROCESS"):
        return os.environ["MLSQL_PROCESS"]
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if "ipykernel" in " ".join(sys.argv) or argv0 == "ipykernel_launcher.py":
        return "a Jupyter kernel"
    return " ".join([argv0, *sys.argv[1:3]]).strip()


@dataclass
class Holder:
    pid: int
    who: str
    host: str
    since: float

    def describe(self, now: float | None = None) -> str:
        held = (now or time.time()) - self.since
        return f"{self.who} (pid {self.pid}), holding it for {held:.1f} s"


class FileLock:
    """An exclusive, re-entrant (per object) inter-process lock with a bounded, reported wait."""

    def __init__(self, path: Path, *, who: str | None = None, what: str = "the workspace catalog"):
        self.path = Path(path)
        self.holder_path = self.path.with_name(self.path.name + ".holder.json")
        self.waiting_path = self.path.with_name(self.path.name + ".waiting")
        self.who = who or describe_process()
        self.what = what
        self._fd: int | None = None
        self._mutex = threading.RLock()
        self.acquired_at = 0.0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> Holder | None:
        """Who holds the lock now, as they described themselves (None when unknown)."""
        try:
            d = json.loads(self.holder_path.read_text())
            return Holder(int(d["pid"]), str(d["who"]), str(d.get("host", "")), float(d["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self, timeout: float = DEFAULT_TIMEOUT_S,
                on_wait: Callable[[str, float], None] | None = None) -> None:
        """Take the lock, waiting at most ``timeout`` seconds. ``on_wait(message, waited_s)`` is
        called about every half second while waiting; running out raises a WorkspaceError that
        names the holder."""
        with self._mutex:
            if self._fd is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            t0 = time.monotonic()
            next_report = t0 + 0.5
            marked = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                now = time.monotonic()
                if not marked:  # ask a holder that keeps the lock between statements to let go
                    self._mark_waiting()
                    marked = True
                if now - t0 >= timeout:
                    os.close(fd)
                    h = self.holder()
                    who = h.describe() if h else "another process"
                    raise WorkspaceError(
                        f"Waited {now - t0:.0f} s for {self.what} ({self.path.parent}), which {who} did not release",
                        hint="That process is running a long statement. Wait for it, stop it, or raise the wait: "
                             "SET mlsql_lock_timeout = <seconds> (or MLSQL_LOCK_TIMEOUT).")
                if on_wait is not None and now >= next_report:
                    h = self.holder()
                    on_wait(f"Waiting for {self.what}: {h.describe() if h else 'another process holds it'}",
                            now - t0)
                    next_report = now + 0.5
                time.sleep(POLL_S)
            self._fd = fd
            self.acquired_at = time.time()
            self._write_holder()

    def release(self) -> None:
        with self._mutex:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def someone_waiting(self) -> bool:
        """Has another process asked for the lock since we took it?"""
        try:
            return self.waiting_path.stat().st_mtime >= self.acquired_at - 0.001
        except OSError:
            return False

    def _mark_waiting(self) -> None:
        try:
            with open(self.waiting_path, "a"):
                pass
            os.utime(self.waiting_path)
        except OSError:
            pass

    def _write_holder(self) -> None:
        tmp = self.holder_path.with_name(f"{self.holder_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "who": self.who, "host": socket.gethostname(),
                                       "since": self.acquired_at}))
            tmp.replace(self.holder_path)
        except OSError:
            pass
