"""The hub's delta cache: one zstd delta (device_bridge/delta.py) per (from, to) pair of packages of
one model, made at the first agent's request and kept as ``STORE/deltas/FROM-TO.zst``.

A delta over ``max_ratio`` of the full package is not worth it: the pair is marked
(``FROM-TO.none``) and every agent asking for it is told to take the full package (404). Requests
for one pair while it is being made wait for that one run (a lock per pair in this process; hubs on
one store write the same bytes, atomically)."""

from __future__ import annotations

import threading
from pathlib import Path

from device_bridge import delta
from device_bridge.agent.core import atomic_write
from device_bridge.hub.errors import HubError

MAX_RATIO = 0.5  # a delta over half the full package is not sent: the full package is


class DeltaCache:
    def __init__(self, store: Path, max_ratio: float = MAX_RATIO):
        self.blobs = Path(store) / "blobs"
        self.folder = Path(store) / "deltas"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_ratio = max_ratio
        self._mu = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self.made = 0  # deltas this process computed (the tests count them: once per pair)

    def path(self, old: str, new: str) -> Path | None:
        """The delta's file, made now if needed; None when it is not worth sending. ``old`` and
        ``new`` are checked blob names (hex sha256) of one model, ``old`` the older version."""
        done, none = self.folder / f"{old}-{new}.zst", self.folder / f"{old}-{new}.none"
        if done.exists():
            return done
        if none.exists():
            return None
        with self._mu:
            lock = self._locks.setdefault((old, new), threading.Lock())
        with lock:
            if done.exists():
                return done
            if none.exists():
                return None
            try:
                old_b, new_b = (self.blobs / old).read_bytes(), (self.blobs / new).read_bytes()
            except FileNotFoundError:
                raise HubError(404, f"no blob {old if not (self.blobs / old).exists() else new}") from None
            d = delta.make(old_b, new_b)
            self.made += 1
            if len(d) > self.max_ratio * len(new_b):
                atomic_write(none, b"")
                return None
            atomic_write(done, d)
            return done
