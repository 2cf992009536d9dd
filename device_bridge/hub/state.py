"""The hub's state: agents, groups and desired state in one JSON file replaced atomically, and
packages as content-addressed blobs named by their sha256."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from pathlib import Path

from device_bridge import package as pkg
from device_bridge.agent import deploy as deploy_settings
from device_bridge.agent.core import atomic_write
from device_bridge.hub.errors import NAME_RE, SHA_RE, HubError, name_or_none, names_of


class HubState:
    def __init__(self, store: str | Path, max_package_bytes: int):
        self.store = Path(store)
        (self.store / "blobs").mkdir(parents=True, exist_ok=True)
        self.max_package_bytes = max_package_bytes
        self.lock = threading.RLock()
        path = self.store / "hub_state.json"
        self.state = {"agents": {}, "groups": {}, "desired": {}, "previous": {}, "blobs": {}}
        if path.exists():
            try:
                self.state.update(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                pass
        self.reports: dict[str, dict] = {}          # agent -> last report (memory only)
        self.history: dict[str, deque] = {}          # agent -> recent telemetry snapshots
        self.events: deque = deque(maxlen=1000)
        self.event_seq: dict[str, int] = {}

    def save(self) -> None:
        atomic_write(self.store / "hub_state.json", json.dumps(self.state, sort_keys=True).encode())

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
        with self.lock:
            self.state["blobs"][sha] = meta
            self.save()
        return meta

    def agent_names(self, devices=None, group=None) -> list[str]:
        names: list[str] = []
        group = name_or_none(group, "group")
        if group is not None:
            if group not in self.state["groups"]:
                known = {a for a, info in self.state["agents"].items() if info.get("group") == group}
                if not known:
                    raise HubError(404, f"unknown group {group!r}")
                names += sorted(known)
            else:
                names += self.state["groups"][group]
        if devices is not None:
            names += names_of(devices, "devices")
        if not names:
            raise HubError(400, "name devices or a group")
        return list(dict.fromkeys(names))

    def set_desired(self, body: dict) -> dict:
        model = body.get("model")
        if not isinstance(model, str) or not NAME_RE.match(model):
            raise HubError(400, "model must be a model name")
        targets = self.agent_names(body.get("devices"), body.get("group"))
        if body.get("absent"):
            entry = {"absent": True}
        elif body.get("restore_previous"):
            entry = None
        else:
            sha = body.get("sha256")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise HubError(400, "sha256 must be the 64 hex digits of an uploaded package")
            meta = self.state["blobs"].get(sha)
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
        with self.lock:
            for a in targets:
                cur = self.state["desired"].setdefault(a, {})
                prev = self.state["previous"].setdefault(a, {})
                if entry is None:  # restore what was desired before the last change
                    old = prev.pop(model, None)
                    if old is None:
                        cur[model] = {"absent": True}
                    else:
                        cur[model] = old
                    continue
                if model in cur and cur[model] != entry:
                    prev[model] = cur[model]
                cur[model] = entry
            self.save()
        return {"model": model, "devices": targets, "desired": entry}

    def register(self, name: str, body: dict) -> dict:
        url = body.get("url")
        if not isinstance(url, str) or len(url) > 2048:
            raise HubError(400, "register needs the agent's url")
        group = name_or_none(body.get("group"), "group")
        providers = body.get("providers")
        if providers is not None and not (isinstance(providers, list) and len(providers) <= 64
                                          and all(isinstance(p, str) for p in providers)):
            raise HubError(400, "providers must be a list of names")
        with self.lock:
            # the agent's declared group counts where the operator has not listed the group's
            # members (POST /v1/groups/{g}); an agent never edits such a list
            self.state["agents"][name] = {"url": url, "group": group,
                                          "providers": providers, "registered_at": time.time()}
            self.save()
        return {"ok": True}

    def report(self, name: str, body: dict) -> dict:
        tel = body.get("telemetry") or []
        if not isinstance(tel, list):
            raise HubError(400, "telemetry must be a list")
        for field in ("status", "errors"):
            if body.get(field) is not None and not isinstance(body[field], dict):
                raise HubError(400, f"{field} must be an object")
        hist = self.history.setdefault(name, deque(maxlen=20))
        for snap in tel[-20:]:
            if isinstance(snap, dict):
                hist.append(snap)
                for ev in snap.get("events", []) or []:
                    if isinstance(ev, dict) and isinstance(ev.get("seq"), int) \
                            and ev["seq"] > self.event_seq.get(name, 0):
                        self.event_seq[name] = ev["seq"]
                        self.events.append({**ev, "agent": name})  # the credential's name wins
        self.reports[name] = {"status": body.get("status"), "errors": body.get("errors"),
                              "url": body.get("url"), "last_seen": time.time(),
                              "telemetry": hist[-1] if hist else None}
        if name not in self.state["agents"] and isinstance(body.get("url"), str):
            self.register(name, {"url": body["url"]})
        return {"ok": True, "received": len(tel)}

    def agent_view(self, name: str) -> dict:
        info = self.state["agents"].get(name)
        rep = self.reports.get(name, {})
        if info is None and not rep:
            raise HubError(404, f"unknown agent {name!r}")
        seen = rep.get("last_seen")
        return {"name": name, **(info or {}), "desired": self.state["desired"].get(name, {}),
                "status": rep.get("status"), "errors": rep.get("errors"), "last_seen": seen,
                # seconds since the last report, by the hub's clock: a rollout counts only reports
                # made after it set the desired state, whatever the two machines' clocks say
                "age_s": None if seen is None else max(0.0, time.time() - seen),
                "telemetry": rep.get("telemetry")}


