"""One agent process per store.

Two agents serving one store would each report the other's models as their own and race on
``state.json``. ``claim`` takes an exclusive ``flock`` on ``DIR/agent.lock`` for the life of the
process (the kernel drops it when the process dies, kill -9 included, so a crash never leaves a
stale claim) and writes who holds it, so that a second agent is refused with the holder's name
and pid.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LOCK_FILE = "agent.lock"


class StoreInUse(Exception):
    """Another live agent process holds this store."""


class StoreClaim:
    """The held claim; ``release()`` (or the process's end) gives it up."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another agent"
    name, pid, port = who.get("name"), who.get("pid"), who.get("port")
    parts = [f"agent '{name}'" if name else "another agent"]
    if pid:
        parts.append(f"(pid {pid}{f', port {port}' if port else ''})")
    return " ".join(parts)


def claim(store: Path, name: str, port: int | None = None) -> StoreClaim:
    """Claim ``store`` for this process, or raise ``StoreInUse`` naming the agent that holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one agent per store is then the user's to keep
        return StoreClaim(-1, Path(store) / LOCK_FILE)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = store / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreInUse(
            f"the store {store} is in use by {_holder(path)}; two agents cannot share a store: "
            f"stop that agent or give this one its own --store") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"name": name, "pid": os.getpid(), "port": port,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
    return StoreClaim(fd, path)
