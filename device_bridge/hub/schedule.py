"""Scheduled rollouts that the hub itself advances, and the lease that makes one replica their driver.

``POST /v1/rollouts`` names a model, a group, a package and its waves (``[5, 25, 100]`` percent of the
group, by each device's wave point: waves.py) with ``every_s`` between them. The first wave is set at
once; the later ones are set by the hub when they fall due, with no notebook attached. Every hub
process on the database runs a driver thread, but only the holder of the lease ``waves`` (a row in
the ``meta`` table: holder, expiry on the database's own clock) advances anything, and each advance
checks, in the same transaction as the desired-state change it makes, that this process still holds
the lease and that the rollout is still at the step it read. So a wave advances exactly once however
many replicas run; a replica killed while holding the lease stops renewing it, and another takes
over once it expires (``lease_s``). Stopping a rollout (and putting the group back) is one
transaction that checks the rollout is still running: of two operators' stops, one does it.

The lease is a row, not PostgreSQL's ``pg_try_advisory_lock``: a session lock is held as long as the
connection lives, so a replica that hangs with its connection open would hold it forever, and SQLite
has none; a row with an expiry behaves the same on both, on one clock (the database's)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid

from device_bridge.hub.db import Database, Tx
from device_bridge.hub.errors import NAME_RE, SHA_RE, HubError, name_or_none
from device_bridge.hub.longpoll import bump

log = logging.getLogger("device_bridge.hub")
LEASE_S = 10.0  # a killed driver's waves wait at most this long for another replica
MAX_WAVES = 20
MIN_EVERY_S = 0.2


class Lease:
    """A named lease in the database: ``hold()`` takes it when free or expired, renews it when held
    by this holder; ``held_in(t)`` checks it inside another transaction (the fencing check)."""

    def __init__(self, db: Database, name: str, holder: str, ttl_s: float):
        self.db, self.key, self.holder, self.ttl_s = db, f"lease:{name}", holder, ttl_s

    def now(self, t: Tx) -> float:
        """The database's clock (one clock for every replica), in Unix seconds."""
        if self.db.kind == "sqlite":
            return float(t.one("SELECT (julianday('now') - 2440587.5) * 86400.0")[0])
        return float(t.one("SELECT extract(epoch from clock_timestamp())::float8")[0])

    def hold(self) -> bool:
        with self.db.tx(lock=True) as t:  # one writer at a time on this database (db.py)
            now = self.now(t)
            cur = self._read(t)
            if cur is not None and cur["holder"] != self.holder and cur["expires"] > now:
                return False
            value = json.dumps({"holder": self.holder, "expires": now + self.ttl_s,
                                "since": cur["since"] if cur and cur["holder"] == self.holder else now})
            t.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (self.key, value))
            return True

    def held_in(self, t: Tx) -> bool:
        cur = self._read(t)
        return cur is not None and cur["holder"] == self.holder and cur["expires"] > self.now(t)

    def state(self) -> dict | None:
        with self.db.tx() as t:
            cur = self._read(t)
            if cur is None:
                return None
            return {"holder": cur["holder"], "expires_in_s": round(cur["expires"] - self.now(t), 3)}

    def _read(self, t: Tx) -> dict | None:
        row = t.one("SELECT value FROM meta WHERE key = ?", (self.key,))
        return json.loads(row[0]) if row else None


class Lost(Exception):
    """The lease or the rollout's step changed under this advance: nothing was written."""


def _key(group: str, model: str) -> str:
    return f"plan:{group}:{model}"


class Scheduler:
    """The scheduled rollouts of one hub process; ``start()`` runs its driver thread."""

    def __init__(self, hub, lease_s: float = LEASE_S, holder: str | None = None, on_change=None):
        self.hub, self.db = hub, hub.db
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease = Lease(self.db, "waves", self.holder, lease_s)
        self.tick_s = lease_s / 4  # renewed three times before it could expire
        self.on_change = on_change or (lambda devices: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the operator's calls ------------------------------------------------------------------

    def create(self, body: dict) -> dict:
        model, group = body.get("model"), name_or_none(body.get("group"), "group")
        if not isinstance(model, str) or not NAME_RE.match(model):
            raise HubError(400, "model must be a model name")
        if group is None:
            raise HubError(400, "group must name the group to roll out to")
        if not isinstance(body.get("sha256"), str) or not SHA_RE.match(body["sha256"]):
            raise HubError(400, "sha256 must be the 64 hex digits of an uploaded package")
        waves = body.get("waves")
        if (not isinstance(waves, list) or not 1 <= len(waves) <= MAX_WAVES
                or not all(isinstance(w, int | float) and not isinstance(w, bool) and 0 < w <= 100 for w in waves)
                or waves != sorted(set(waves)) or waves[-1] != 100):
            raise HubError(400, f"waves must be 1 to {MAX_WAVES} increasing percents in (0, 100], the last 100")
        every = body.get("every_s")
        if isinstance(every, bool) or not isinstance(every, int | float) or not MIN_EVERY_S <= every <= 7 * 86400:
            raise HubError(400, f"every_s must be seconds between waves, {MIN_EVERY_S} to 604800")
        extra = sorted(set(body) - {"model", "group", "sha256", "waves", "every_s", "providers",
                                    "strict_providers", "deploy"})
        if extra:
            raise HubError(400, f"unknown field {extra[0]!r}: a rollout takes model, group, sha256, waves, "
                                "every_s, providers, strict_providers, deploy")
        desired = {k: body[k] for k in ("model", "group", "sha256", "providers", "strict_providers", "deploy")
                   if k in body}
        key = _key(group, model)

        def start(t: Tx) -> None:
            row = t.one("SELECT value FROM meta WHERE key = ?", (key,))
            if row and json.loads(row[0])["status"] == "running":
                raise HubError(409, f"a rollout of {model} to {group} is running: stop it first", "conflict")
            now = self.lease.now(t)
            plan = {"model": model, "group": group, "desired": desired, "waves": waves, "every_s": float(every),
                    "step": 0, "next_at": now + every, "status": "running" if len(waves) > 1 else "completed",
                    "advanced": [{"step": 0, "percent": waves[0], "by": self.holder, "at": now}]}
            t.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (key, json.dumps(plan)))
            bump(t)

        out = self.hub.set_desired({**desired, "percent": waves[0]}, then=start)
        self.on_change(out["devices"])
        return self.get(group, model)

    def get(self, group: str, model: str) -> dict:
        with self.db.read() as t:
            row = t.one("SELECT value FROM meta WHERE key = ?", (_key(group, model),))
        if row is None:
            raise HubError(404, f"no scheduled rollout of {model} to {group}")
        return json.loads(row[0])

    def list(self) -> dict:
        with self.db.read() as t:
            rows = t.all("SELECT value FROM meta WHERE substr(key, 1, 5) = ? ORDER BY key", ("plan:",))
        return {"rollouts": [json.loads(v) for (v,) in rows], "lease": self.lease.state(), "replica": self.holder}

    def stop(self, group: str, model: str, rollback: bool) -> dict:
        key = _key(group, model)
        plan = self.get(group, model)

        def stopping(t: Tx) -> None:
            row = t.one("SELECT value FROM meta WHERE key = ?", (key,))
            cur = json.loads(row[0])
            if cur["status"] != "running":
                raise HubError(409, f"the rollout of {model} to {group} is {cur['status']}, not running", "conflict")
            cur["status"] = "rolled_back" if rollback else "stopped"
            cur["stopped"] = {"by": self.holder, "at": self.lease.now(t)}
            t.run("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(cur), key))
            bump(t)

        if rollback:
            out = self.hub.set_desired({"model": plan["model"], "group": group, "restore_previous": True},
                                       then=stopping)
            self.on_change(out["devices"])
        else:
            with self.db.tx(lock=True) as t:
                stopping(t)
        return self.get(group, model)

    # -- the driver ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hub-waves", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database blip: the next tick tries again
                log.exception("scheduled rollouts: tick failed")

    def tick(self) -> int:
        """One round: take or renew the lease; as its holder, advance every rollout that is due.
        Returns how many waves this call advanced."""
        if not self.lease.hold():
            return 0
        with self.db.read() as t:
            rows = t.all("SELECT key, value FROM meta WHERE substr(key, 1, 5) = ?", ("plan:",))
            now = self.lease.now(t)
        done = 0
        for key, value in rows:
            plan = json.loads(value)
            if plan["status"] == "running" and plan["next_at"] <= now:
                try:
                    done += self._advance(key, plan)
                except Lost as exc:
                    log.info("scheduled rollouts: %s", exc)
        return done

    def _advance(self, key: str, plan: dict) -> int:
        step = plan["step"] + 1
        percent = plan["waves"][step]

        def check(t: Tx) -> None:  # in the desired-state change's own transaction: all of it, or none
            if not self.lease.held_in(t):
                raise Lost("the lease passed to another replica")
            row = t.one("SELECT value FROM meta WHERE key = ?", (key,))
            cur = json.loads(row[0]) if row else None
            if cur is None or cur["status"] != "running" or cur["step"] != plan["step"]:
                raise Lost(f"{key} changed meanwhile")
            now = self.lease.now(t)
            cur["step"] = step
            cur["next_at"] = now + cur["every_s"]
            cur["advanced"].append({"step": step, "percent": percent, "by": self.holder, "at": now})
            if step == len(cur["waves"]) - 1:
                cur["status"] = "completed"
            t.run("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(cur), key))
            bump(t)

        out = self.hub.set_desired({**plan["desired"], "percent": percent}, then=check)
        self.on_change(out["devices"])
        return 1
