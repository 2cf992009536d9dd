"""The hub's state: agents, groups, desired state, reports and events in the hub's database (db.py),
and packages as content-addressed blobs named by their sha256."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_bridge import package as pkg
from device_bridge import waves
from device_bridge.agent import deploy as deploy_settings
from device_bridge.agent.core import atomic_write
from device_bridge.hub.cache import bump_key
from device_bridge.hub.db import MAX_EVENTS, Database
from device_bridge.hub.errors import NAME_RE, SHA_RE, HubError, name_or_none, names_of

log = logging.getLogger("device_bridge.hub")
OPERATOR = "~operator"  # the name operator events are kept under (NAME_RE allows no agent this name)
FLUSH_S = 0.2  # reports and events reach the database at most this long after they arrive


@dataclass
class _Report:
    body: dict  # status, errors, url, telemetry (the last snapshot)
    last_seen: float  # the hub's clock
    keeps_telemetry: bool = False  # it brought none: the database's last snapshot stays


class HubState:
    """Agents, groups, desired and previous desired state, the blob index, last reports and events,
    in the hub's database (db.py); packages as files under ``STORE/blobs``. Only reports and events
    wait in this process, at most ``flush_s`` (write-behind: ``start_flusher``, ``close``); everything
    else is written before the call answers, so any number of hubs on one database answer alike."""

    def __init__(self, store: str | Path, max_package_bytes: int, db: Database | None = None,
                 flush_s: float = FLUSH_S):
        self.store = Path(store)
        (self.store / "blobs").mkdir(parents=True, exist_ok=True)
        self.max_package_bytes = max_package_bytes
        self.db = db or Database(self.store)
        self._registered: set[str] = set()  # agents known to be registered (no call removes one)
        # reports are written behind (report(), flush()): a report is in this process's view at once
        # and in the database within flush_s, all of an interval's in one transaction
        self.flush_s = flush_s
        self._mu = threading.Lock()
        self._flush_mu = threading.Lock()  # one flush at a time, so an older batch never lands last
        self._pending: dict[str, _Report] = {}
        self._writing: dict[str, _Report] = {}
        self._events: list[tuple[str, int, dict]] = []
        self._writing_events: list[tuple[str, int, dict]] = []
        self._marks: dict[str, int] = {}  # newest event seq seen per agent (this process and the database)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def put_blob(self, data: bytes) -> dict:
        if len(data) > self.max_package_bytes:
            raise HubError(413, f"package is {len(data)} bytes, over the limit of {self.max_package_bytes}")
        try:
            manifest = pkg.read_manifest(data)
        except pkg.PackageError as exc:
            raise HubError(422, f"not a package: {exc}", "package") from None
        sha = hashlib.sha256(data).hexdigest()
        path = self.store / "blobs" / sha
        if not path.exists():
            atomic_write(path, data)
        meta = {"sha256": sha, "name": manifest.name, "version": manifest.version, "size": len(data)}
        with self.db.tx(lock=True) as t:
            t.run("INSERT INTO blobs (sha256, meta, seq) SELECT ?, ?, COALESCE(MAX(seq), 0) + 1 FROM blobs WHERE true "
                  "ON CONFLICT (sha256) DO UPDATE SET meta = excluded.meta", (sha, json.dumps(meta)))
        return meta

    def blob(self, sha: str) -> dict | None:
        with self.db.read() as t:
            row = t.one("SELECT meta FROM blobs WHERE sha256 = ?", (sha,))
        return json.loads(row[0]) if row else None

    def blobs(self) -> list[dict]:
        with self.db.read() as t:
            return [json.loads(m) for (m,) in t.all("SELECT meta FROM blobs ORDER BY seq, sha256")]

    def desired_of(self, name: str) -> dict:
        """The agent's own entries, and for a model it has none of, its group's rollout rule
        (``set_desired`` with a group): the new entry when the agent's wave point (waves.py) is under
        the rule's percent, else what the group had before. So a device that joins mid-rollout gets
        the wave its hash falls into, and one that slept through the rollout the final state."""
        with self.db.read() as t:  # one round trip: the agent's entries and every group's rules
            rows = t.all("SELECT 0, model, entry FROM desired WHERE agent = ? UNION ALL "
                         # substr, not LIKE: SQLite prepares a LIKE with a bound pattern again at each
                         # call (4x the read's time); a key range would depend on PostgreSQL's collation
                         "SELECT 1, key, value FROM meta WHERE substr(key, 1, 5) = ? ORDER BY 1, 2", (name, "rule:"))
        own = {m: json.loads(e) for kind, m, e in rows if kind == 0}
        rules = [(k, v) for kind, k, v in rows if kind == 1]
        if not rules:
            return own
        group = self.group_of(name, "")
        for key, value in rules:
            _, g, model = key.split(":", 2)
            if g != group or model in own:
                continue
            rule = json.loads(value)
            entry = rule["entry"] if waves.bucket(name, model) < rule["percent"] else rule.get("base")
            if entry is not None:
                own[model] = entry
        return own

    def published_deltas(self, sha: str) -> list[dict]:
        """The deltas to package ``sha`` that ``hub publish`` wrote to the static origins (rows
        ``delta:TO:FROM`` of the meta table): ``[{from, sha256, size}]``, the newest base first."""
        prefix = f"delta:{sha}:"  # 71 characters: sha is 64 hex digits
        with self.db.read() as t:
            rows = t.all("SELECT key, value FROM meta WHERE substr(key, 1, 71) = ?", (prefix,))
        found = [(json.loads(v), k[len(prefix):]) for k, v in rows]
        found = [(v, k) for v, k in found if v.get("sha256")]  # {"none": ...}: a pair not worth a delta
        found.sort(key=lambda vk: -int(vk[0].get("from_version", 0)))
        return [{"from": k, "sha256": v["sha256"], "size": v["size"]} for v, k in found]

    def agent_list(self) -> list[str]:
        """Every agent that registered or reported."""
        mine = set(self._local_reports())
        with self.db.read() as t:
            names = {n for (n,) in t.all("SELECT name FROM agents UNION SELECT agent FROM reports")}
        return sorted(names | mine)

    def set_group(self, group: str, devices: list[str]) -> None:
        with self.db.tx() as t:
            t.run("INSERT INTO groups (name, devices) VALUES (?, ?) "
                  "ON CONFLICT (name) DO UPDATE SET devices = excluded.devices", (group, json.dumps(devices)))

    def group_of(self, name: str, no_group: str) -> str:
        """The agent's group now: a group the operator lists it in, else the one it registered with."""
        with self.db.read() as t:
            for g, members in t.all("SELECT name, devices FROM groups ORDER BY name"):
                if name in _members(members):
                    return g
            row = t.one("SELECT grp FROM agents WHERE name = ?", (name,))
        return (row[0] if row else None) or no_group

    def events(self) -> list[dict]:
        with self._mu:  # this process's, not yet written (the newest): read first, as in agent_view
            mine = self._writing_events + self._events
        with self.db.read() as t:
            rows = t.all("SELECT agent, seq, body FROM events ORDER BY id DESC LIMIT ?", (MAX_EVENTS,))
        written = {(a, q) for a, q, _ in rows}  # a flush may have landed between the two reads
        return ([json.loads(b) for _, _, b in reversed(rows)]
                + [body for a, q, body in mine if (a, q) not in written])[-MAX_EVENTS:]

    def operator_event(self, body: dict) -> dict:
        """An event the operator's side records (a rollout that stopped, and why): kept with the agents'
        events, under a name no agent can have, newest last in GET /v1/events."""
        kind = body.get("event") if isinstance(body, dict) else None
        if not isinstance(kind, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", kind):
            raise HubError(400, "event must be a lower-case name of at most 64 letters, digits and '_'")
        ev = {**body, "agent": None, "source": "operator", "time": time.time()}
        with self._mu:
            seq = max(time.time_ns(), self._marks.get(OPERATOR, 0) + 1)
            self._marks[OPERATOR] = seq
            self._events.append((OPERATOR, seq, ev))
            del self._events[:-MAX_EVENTS]
        if self.flush_s <= 0:
            self.flush()
        return {"recorded": kind}

    def agent_names(self, devices=None, group=None) -> list[str]:
        names: list[str] = []
        group = name_or_none(group, "group")
        if group is not None:
            with self.db.read() as t:
                row = t.one("SELECT devices FROM groups WHERE name = ?", (group,))
                known = [n for (n,) in t.all("SELECT name FROM agents WHERE grp = ? ORDER BY name", (group,))]
            if row is None:
                if not known:
                    raise HubError(404, f"unknown group {group!r}")
                names += known
            else:
                names += json.loads(row[0])
        if devices is not None:
            names += names_of(devices, "devices")
        if not names:
            raise HubError(400, "name devices or a group")
        return list(dict.fromkeys(names))

    def set_desired(self, body: dict, then=None) -> dict:
        """``devices`` and/or ``group``. With a group (and no devices) the entry is also the group's
        rollout rule, kept for devices that join it later (desired_of); ``percent`` (default 100)
        limits it to the group's devices whose wave point (waves.py) is under it: call again with a
        larger percent for the next wave. ``then(t)``: run first in the same transaction (a scheduled
        rollout's lease and step check, hub/schedule.py); what it raises undoes the whole change."""
        model = body.get("model")
        if not isinstance(model, str) or not NAME_RE.match(model):
            raise HubError(400, "model must be a model name")
        percent = body.get("percent")
        group_rule = body.get("group") is not None and body.get("devices") is None
        if percent is not None:
            if not group_rule:
                raise HubError(400, "percent needs a group (and no devices): it picks the group's devices "
                                    "by their wave point")
            if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100:
                raise HubError(400, f"percent must be a number in (0, 100], got {percent!r}")
            if body.get("restore_previous"):
                raise HubError(400, "restore_previous takes no percent: it restores the whole group")
        percent = 100.0 if percent is None else float(percent)
        targets = self.agent_names(body.get("devices"), body.get("group"))
        if body.get("absent"):
            entry = {"absent": True}
        elif body.get("restore_previous"):
            entry = None
        else:
            sha = body.get("sha256")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise HubError(400, "sha256 must be the 64 hex digits of an uploaded package")
            meta = self.blob(sha)
            if meta is None:
                raise HubError(404, f"no package with sha256 {sha} on the hub; upload it first")
            if meta["name"] != model:
                raise HubError(400, f"package {sha[:12]} holds model {meta['name']!r}, not {model!r}")
            providers = body.get("providers")
            if providers is not None and (not isinstance(providers, list) or len(providers) > 16
                                          or not all(isinstance(p, str) and len(p) < 64 for p in providers)):
                raise HubError(400, "providers must be a list of names")
            entry = {"sha256": sha, "version": meta["version"], "providers": providers,
                     "strict_providers": bool(body.get("strict_providers", False))}
            deploy = deploy_settings.parse(body.get("deploy"), "desired state")  # checked here, applied by agents
            if deploy:
                entry["deploy"] = deploy
            if body.get("experiment") is not None:
                entry["experiment"] = self._experiment(model, body["experiment"])
        if group_rule and entry is not None and percent < 100:
            targets = [a for a in targets if waves.bucket(a, model) < percent]
        with self.db.tx(lock=True) as t:  # every target or none
            if then is not None:
                then(t)
            if group_rule:
                _set_rule(t, body["group"], model, entry, percent)
            for a in targets:
                row = t.one("SELECT entry FROM desired WHERE agent = ? AND model = ?", (a, model))
                cur = json.loads(row[0]) if row else None
                if entry is None:  # restore what was desired before the last change
                    old = t.one("SELECT entry FROM previous WHERE agent = ? AND model = ?", (a, model))
                    t.run("DELETE FROM previous WHERE agent = ? AND model = ?", (a, model))
                    if old is None and group_rule:  # it had no entry of its own before: the group's rule again
                        t.run("DELETE FROM desired WHERE agent = ? AND model = ?", (a, model))
                        continue
                    _put(t, "desired", a, model, json.loads(old[0]) if old else {"absent": True})
                    continue
                if cur is not None and cur != entry:
                    _put(t, "previous", a, model, cur)
                _put(t, "desired", a, model, entry)
        return {"model": model, "devices": targets, "desired": entry}

    def _experiment(self, model: str, raw) -> dict:
        """A desired state's experiment: device_bridge.experiments' settings, each arm with the sha256 of
        an uploaded package of this model and version (the agents install every arm)."""
        from device_bridge.experiments import check

        arms = raw.get("arms") if isinstance(raw, dict) else None
        if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
            raise HubError(400, "experiment.arms must be a list of {version, share, sha256}")
        try:
            e = check({**raw, "arms": [{k: v for k, v in a.items() if k != "sha256"} for a in arms]})
        except ValueError as exc:
            raise HubError(400, str(exc)) from None
        for i, (a, raw_arm) in enumerate(zip(e["arms"], arms)):
            sha = raw_arm.get("sha256")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise HubError(400, f"experiment.arms[{i}].sha256 must be the 64 hex digits of an uploaded package")
            meta = self.blob(sha)
            if meta is None or meta["name"] != model or meta["version"] != a["version"]:
                raise HubError(400, f"experiment.arms[{i}].sha256 is no uploaded package of {model} "
                                    f"version {a['version']}")
            a["sha256"] = sha
        return e

    def register(self, name: str, body: dict) -> dict:
        self.register_moved(name, body)
        return {"ok": True}

    def register_moved(self, name: str, body: dict) -> bool:
        """Register (or register again) an agent; True when it came with another group than it had."""
        url = body.get("url")
        if not isinstance(url, str) or len(url) > 2048:
            raise HubError(400, "register needs the agent's url")
        group = name_or_none(body.get("group"), "group")
        providers = body.get("providers")
        if providers is not None and not (isinstance(providers, list) and len(providers) <= 64
                                          and all(isinstance(p, str) for p in providers)):
            raise HubError(400, "providers must be a list of names")
        # the agent's declared group counts where the operator has not listed the group's
        # members (POST /v1/groups/{g}); an agent never edits such a list
        with self.db.tx() as t:
            row = t.one("SELECT grp FROM agents WHERE name = ?", (name,))
            moved = (row[0] if row else None) != group
            if moved:  # its desired state may change: every hub process drops the answers it keeps
                bump_key(t, "agents_gen")
            t.run("INSERT INTO agents (name, url, grp, providers, registered_at) VALUES (?, ?, ?, ?, ?) "
                  "ON CONFLICT (name) DO UPDATE SET url = excluded.url, grp = excluded.grp, "
                  "providers = excluded.providers, registered_at = excluded.registered_at",
                  (name, url, group, json.dumps(providers), time.time()))
        return moved

    def report(self, name: str, body: dict) -> dict:
        """An agent's report: in this process's view at once, in the database at the next flush
        (``flush_s``), with every other report and event of that interval in one transaction."""
        tel = body.get("telemetry") or []
        if not isinstance(tel, list):
            raise HubError(400, "telemetry must be a list")
        for field in ("status", "errors"):
            if body.get(field) is not None and not isinstance(body[field], dict):
                raise HubError(400, f"{field} must be an object")
        snaps = [snap for snap in tel[-20:] if isinstance(snap, dict)]
        evs = [ev for snap in snaps for ev in (snap.get("events") or []) if isinstance(ev, dict)
               and isinstance(ev.get("seq"), int)]
        mark = self._mark_of(name)  # read once per agent and process, then kept here
        last = snaps[-1] if snaps else None
        rep = _Report({"status": body.get("status"), "errors": body.get("errors"), "url": body.get("url"),
                       "telemetry": last}, time.time(), keeps_telemetry=last is None)
        with self._mu:
            for ev in evs:
                if ev["seq"] > mark:
                    mark = ev["seq"]
                    self._events.append((name, mark, {**ev, "agent": name}))  # the credential's name wins
            if evs:
                self._marks[name] = max(mark, self._marks.get(name, 0))
                del self._events[:-MAX_EVENTS]
            self._pending[name] = _newer(self._pending.get(name) or self._writing.get(name), rep)
        if self.flush_s <= 0:
            self.flush()
        if name not in self._registered:
            with self.db.read() as t:
                registered = t.one("SELECT 1 FROM agents WHERE name = ?", (name,)) is not None
            if registered:
                self._registered.add(name)
            elif isinstance(body.get("url"), str):
                self.register(name, {"url": body["url"]})
        return {"ok": True, "received": len(tel)}

    def report_is_local(self, name: str) -> bool:
        """Whether a report of this agent touches no database now (its registration and event mark
        are known here): the hub then takes it on its event loop, with no thread."""
        return self.flush_s > 0 and name in self._registered and name in self._marks

    def _mark_of(self, name: str) -> int:
        """The newest event seq the hub has from this agent (events at or below it are repeats)."""
        with self._mu:
            if name in self._marks:
                return self._marks[name]
        with self.db.read() as t:
            row = t.one("SELECT seq FROM event_marks WHERE agent = ?", (name,))
        with self._mu:
            self._marks[name] = max(row[0] if row else 0, self._marks.get(name, 0))
            return self._marks[name]

    def _local_reports(self) -> dict[str, _Report]:
        """Reports made here and not yet in the database (being written, or waiting)."""
        with self._mu:
            return {**self._writing, **self._pending}

    def flush(self) -> int:
        """Every pending report and event into the database, in one transaction; returns how many
        reports. On a failure they stay pending (a newer report of the same agent wins) for the
        next flush."""
        with self._flush_mu:
            with self._mu:
                reports, events = self._pending, self._events
                self._pending, self._events = {}, []
                self._writing = reports
                self._writing_events = events
            if not reports and not events:
                return 0
            try:
                with self.db.tx(durable=False) as t:
                    _write(t, reports, events)
            except BaseException:
                with self._mu:
                    self._pending = {a: _newer(r, self._pending.get(a)) for a, r in reports.items()} | \
                        {a: r for a, r in self._pending.items() if a not in reports}
                    self._events = (events + self._events)[-MAX_EVENTS:]
                raise
            finally:
                with self._mu:
                    self._writing, self._writing_events = {}, []
            return len(reports)

    def start_flusher(self) -> None:
        """Write pending reports every ``flush_s`` seconds in a thread of its own (its own connection)."""
        if self.flush_s <= 0 or self._flusher is not None:
            return
        self._flusher = threading.Thread(target=self._flush_loop, name="hub-report-flusher", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the database away: kept pending, tried again
                log.warning("hub: reports not written to %s (kept, tried again in %.1f s): %s",
                            self.db.describe, self.flush_s, getattr(exc, "message", exc))

    def close(self) -> None:
        """Stop the flusher and write what is pending (a clean shutdown loses no report)."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(30)
            self._flusher = None
        self.flush()

    def agent_view(self, name: str) -> dict:
        # this process's report before the database's: one flushed in between is then in the second
        mine = self._local_reports().get(name)
        with self.db.read() as t:
            a = t.one("SELECT url, grp, providers, registered_at FROM agents WHERE name = ?", (name,))
            r = t.one("SELECT body, last_seen FROM reports WHERE agent = ?", (name,))
        if a is None and r is None and mine is None:
            raise HubError(404, f"unknown agent {name!r}")
        info = {"url": a[0], "group": a[1], "providers": json.loads(a[2]), "registered_at": a[3]} if a else {}
        rep = {**json.loads(r[0]), "last_seen": r[1]} if r else {}
        if mine is not None and mine.last_seen >= (rep.get("last_seen") or 0):  # another replica's may be newer
            telemetry = rep.get("telemetry") if mine.keeps_telemetry else mine.body["telemetry"]
            rep = {**mine.body, "telemetry": telemetry, "last_seen": mine.last_seen}
        seen = rep.get("last_seen")
        return {"name": name, **info, "desired": self.desired_of(name),
                "status": rep.get("status"), "errors": rep.get("errors"), "last_seen": seen,
                # seconds since the last report, by the hub's clock: a rollout counts only reports
                # made after it set the desired state, whatever the two machines' clocks say
                "age_s": None if seen is None else max(0.0, time.time() - seen),
                "telemetry": rep.get("telemetry")}


@functools.lru_cache(maxsize=64)
def _members(devices: str) -> frozenset:
    """A group's device list (its JSON text as stored), parsed once: every poll looks its agent up in
    every listed group, and parsing a 10,000-name list each time cost about 1 ms of the hub's CPU."""
    return frozenset(json.loads(devices))


def _set_rule(t, group: str, model: str, entry: dict | None, percent: float) -> None:
    """The group's rollout rule for ``model`` (in the meta table: ``rule:GROUP:MODEL``, names hold no
    ':'): ``entry`` for the devices under ``percent``, ``base`` (what the group had before) for the
    others, ``previous`` (the rule before this rollout) for restore_previous (``entry`` None)."""
    key = f"rule:{group}:{model}"
    row = t.one("SELECT value FROM meta WHERE key = ?", (key,))
    old = json.loads(row[0]) if row else None
    if entry is None:  # restore_previous: the rule before this rollout; none before it: the model absent
        new = (old or {}).get("previous") or {"entry": {"absent": True}, "percent": 100.0, "base": None,
                                              "previous": None}
    elif old is not None and old["entry"] == entry:  # the same rollout's next wave
        new = {**old, "percent": percent}
    else:
        base = None if old is None else (old["entry"] if old["percent"] >= 100 else old.get("base"))
        prev = None if old is None else {k: v for k, v in old.items() if k != "previous"}
        new = {"entry": entry, "percent": percent, "base": base, "previous": prev}
    t.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
          (key, json.dumps(new, sort_keys=True)))


def _put(t, table: str, agent: str, model: str, entry: dict) -> None:
    t.run(f"INSERT INTO {table} (agent, model, entry) VALUES (?, ?, ?) "
          "ON CONFLICT (agent, model) DO UPDATE SET entry = excluded.entry", (agent, model, json.dumps(entry, sort_keys=True)))


def _newer(old: _Report | None, new: _Report | None) -> _Report | None:
    """An agent's newer report; one without telemetry keeps the older one's last snapshot."""
    if old is None or new is None:
        return new or old
    if new.keeps_telemetry:
        new.body["telemetry"], new.keeps_telemetry = old.body["telemetry"], old.keeps_telemetry
    return new


def _write(t, reports: dict[str, _Report], events: list[tuple[str, int, dict]]) -> None:
    """One flush's statements: events newer than the database's mark of their agent (another replica
    may have written some), then each agent's last report."""
    marks: dict[str, int] = {}
    for agent, seq, body in events:
        if agent not in marks:
            row = t.one("SELECT seq FROM event_marks WHERE agent = ?", (agent,))
            marks[agent] = row[0] if row else 0
        if seq > marks[agent]:
            marks[agent] = seq
            t.run("INSERT INTO events (agent, seq, body) VALUES (?, ?, ?)", (agent, seq, json.dumps(body)))
    for agent, seq in sorted(marks.items()):  # rows in one order in every replica: no deadlock between flushes
        t.run("INSERT INTO event_marks (agent, seq) VALUES (?, ?) "
              "ON CONFLICT (agent) DO UPDATE SET seq = excluded.seq", (agent, seq))
    if events:
        t.run("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (MAX_EVENTS,))
    # the database's last snapshot of the agents whose report brought none: read in chunks, not a
    # round trip per agent
    keep = sorted(a for a, rep in reports.items() if rep.keeps_telemetry)
    kept: dict[str, object] = {}
    for i in range(0, len(keep), 500):
        chunk = keep[i:i + 500]
        for agent, body in t.all(f"SELECT agent, body FROM reports WHERE agent IN ({', '.join('?' * len(chunk))})",
                                 tuple(chunk)):
            kept[agent] = json.loads(body).get("telemetry")
    rows = []
    for agent, rep in sorted(reports.items(), key=lambda kv: kv[0]):
        body = {**rep.body, "telemetry": kept.get(agent)} if rep.keeps_telemetry else rep.body
        rows.append((agent, json.dumps(body), rep.last_seen))
    t.many("INSERT INTO reports (agent, body, last_seen) VALUES (?, ?, ?) "
           "ON CONFLICT (agent) DO UPDATE SET body = excluded.body, last_seen = excluded.last_seen "
           "WHERE excluded.last_seen >= reports.last_seen",  # another replica's newer report stays
           rows)
