"""The hub's delta cache, and the deltas ``hub publish`` writes for static origins (``publish``).

The cache: one zstd delta (device_bridge/delta.py) per (from, to) pair of packages of
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


def publish(state, out: Path, bases: int, max_ratio: float = MAX_RATIO) -> dict:
    """``hub publish``'s deltas: for each package, a delta from each of the ``bases`` newest older
    versions of its model, written into ``out`` as ``out/SHA256`` (the delta's own hash, like every
    blob there) and recorded in the database (meta rows ``delta:TO:FROM``), so that the hubs list it
    in desired state as URLs on their origins (hub/app.py). A pair already recorded, with its file in
    ``out``, is left alone; a pair over ``max_ratio`` of the package is recorded as not worth it
    (never computed again). One transaction records the run's new pairs and rewrites ``desired_gen``
    (hub/longpoll.py): every hub process drops its kept answers and wakes its held long-polls."""
    import hashlib
    import json
    import os

    from device_bridge.hub.longpoll import bump

    store = state.store
    by_model: dict[str, list[dict]] = {}
    for meta in state.blobs():
        by_model.setdefault(meta["name"], []).append(meta)
    with state.db.read() as t:
        known = dict(t.all("SELECT key, value FROM meta WHERE substr(key, 1, 6) = ?", ("delta:",)))
    rows: dict[str, dict] = {}
    counts = {"deltas_written": 0, "deltas_already_there": 0, "deltas_not_worth_it": 0}
    for metas in by_model.values():
        metas.sort(key=lambda m: m["version"])
        for i, new in enumerate(metas):
            older = [m for m in metas[:i] if m["version"] < new["version"]][-bases:] if bases > 0 else []
            for old in older:
                key = f"delta:{new['sha256']}:{old['sha256']}"
                rec = json.loads(known[key]) if key in known else None
                if rec is not None and rec.get("none"):
                    counts["deltas_not_worth_it"] += 1
                    continue
                if rec is not None and (out / rec["sha256"]).exists() \
                        and hashlib.sha256((out / rec["sha256"]).read_bytes()).hexdigest() == rec["sha256"]:
                    counts["deltas_already_there"] += 1
                    continue
                try:
                    old_b = (store / "blobs" / old["sha256"]).read_bytes()
                    new_b = (store / "blobs" / new["sha256"]).read_bytes()
                except FileNotFoundError:  # publish reports the missing blob itself
                    continue
                cached = store / "deltas" / f"{old['sha256']}-{new['sha256']}.zst"  # the hub's, if made
                d = cached.read_bytes() if cached.exists() else delta.make(old_b, new_b)
                info = {"from_version": old["version"], "to_version": new["version"], "package_size": len(new_b)}
                if len(d) > max_ratio * len(new_b):
                    rows[key] = {**info, "none": True, "size": len(d)}
                    counts["deltas_not_worth_it"] += 1
                    continue
                dsha = hashlib.sha256(d).hexdigest()
                tmp = out / f".{dsha}.tmp"
                tmp.write_bytes(d)
                os.replace(tmp, out / dsha)
                rows[key] = {**info, "sha256": dsha, "size": len(d)}
                counts["deltas_written"] += 1
    if rows:
        with state.db.tx(lock=True) as t:
            for key, value in rows.items():
                t.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                      (key, json.dumps(value, sort_keys=True)))
            bump(t)
    return counts
