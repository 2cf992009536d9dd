"""The fleet hub: content-addressed packages, desired state per agent, status and telemetry.

Agents (``mlsql-device serve --hub URL``) register, poll ``GET /v1/agents/{name}/desired``,
pull ``GET /v1/blobs/{sha256}``, and push ``POST /v1/agents/{name}/report`` (status +
buffered telemetry). Operators (HubClient, rollout) upload packages and set desired state.
Every call needs the hub token. State (agents, groups, desired) is one JSON file
replaced atomically; blobs are files named by their sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

from device_bridge import package as pkg
from device_bridge import web
from device_bridge.agent.core import atomic_write
from device_bridge.errors import ApiError
from device_bridge.web import JSONAnswer

_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class HubError(ApiError):
    """An error the hub answers with (status, message, kind)."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        if kind is None:
            kind = {401: "auth", 404: "not_found", 409: "conflict", 413: "too_large"}.get(status, "request")
        super().__init__(status, message, kind)


def _names(v, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > 100_000 or not all(isinstance(d, str) and _NAME.match(d) for d in v):
        raise HubError(400, f"{what} must be a list of names (letters, digits, '_', '.', '-')")
    return v


def _opt_name(v, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not _NAME.match(v):
        raise HubError(400, f"{what} must be a name (letters, digits, '_', '.', '-'), got {type(v).__name__}")
    return v


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
        group = _opt_name(group, "group")
        if group is not None:
            if group not in self.state["groups"]:
                known = {a for a, info in self.state["agents"].items() if info.get("group") == group}
                if not known:
                    raise HubError(404, f"unknown group {group!r}")
                names += sorted(known)
            else:
                names += self.state["groups"][group]
        if devices is not None:
            names += _names(devices, "devices")
        if not names:
            raise HubError(400, "name devices or a group")
        return list(dict.fromkeys(names))

    def set_desired(self, body: dict) -> dict:
        model = body.get("model")
        if not isinstance(model, str) or not _NAME.match(model):
            raise HubError(400, "model must be a model name")
        targets = self.agent_names(body.get("devices"), body.get("group"))
        if body.get("absent"):
            entry = {"absent": True}
        elif body.get("restore_previous"):
            entry = None
        else:
            sha = body.get("sha256")
            if not isinstance(sha, str) or not _SHA.match(sha):
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
        group = _opt_name(body.get("group"), "group")
        providers = body.get("providers")
        if providers is not None and not (isinstance(providers, list) and len(providers) <= 64
                                          and all(isinstance(p, str) for p in providers)):
            raise HubError(400, "providers must be a list of names")
        with self.lock:
            self.state["agents"][name] = {"url": url, "group": group,
                                          "providers": providers, "registered_at": time.time()}
            g = group
            if isinstance(g, str) and g:
                members = self.state["groups"].setdefault(g, [])
                if name not in members:
                    members.append(name)
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
                        self.events.append({"agent": name, **ev})
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
        return {"name": name, **(info or {}), "desired": self.state["desired"].get(name, {}),
                "status": rep.get("status"), "errors": rep.get("errors"), "last_seen": rep.get("last_seen"),
                "telemetry": rep.get("telemetry")}


def create_hub_app(store: str | Path, token: str, max_package_bytes: int = 256 * 1024 * 1024,
                   body_timeout: float = 120.0) -> Starlette:
    hub = HubState(store, max_package_bytes)
    budget = web.BodyBudget(max(3 * max_package_bytes, 64 << 20))
    _endpoint = web.endpoint_factory(token.encode(), budget=budget)
    endpoint = _endpoint(True)  # every hub call needs the hub token

    async def body_json(request: Request, limit: int = 16 * 1024 * 1024) -> dict:
        raw = await web.read_body(request, limit, body_timeout, budget)
        body = web.parse_json(raw, nonfinite_as_null=True) if raw.strip() else {}
        if not isinstance(body, dict):
            raise HubError(400, "body must be a JSON object")
        return body

    def agent_name(request) -> str:
        name = request.path_params["name"]
        if not _NAME.match(name):
            raise HubError(400, f"bad agent name {name!r}")
        return name

    @endpoint
    async def put_blob(request):
        data = await web.read_body(request, hub.max_package_bytes, body_timeout, budget)
        return JSONAnswer(await run_in_threadpool(hub.put_blob, data))

    @endpoint
    async def get_blob(request):
        sha = request.path_params["sha"]
        if not _SHA.match(sha) or not (hub.store / "blobs" / sha).exists():
            raise HubError(404, f"no blob {sha}")
        return FileResponse(hub.store / "blobs" / sha, media_type="application/octet-stream")

    @endpoint
    async def register(request):
        return JSONAnswer(hub.register(agent_name(request), await body_json(request)))

    @endpoint
    async def desired(request):
        name = agent_name(request)
        return JSONAnswer({"agent": name, "models": hub.state["desired"].get(name, {})})

    @endpoint
    async def report(request):
        return JSONAnswer(hub.report(agent_name(request), await body_json(request)))

    @endpoint
    async def agents(request):
        names = sorted(set(hub.state["agents"]) | set(hub.reports))
        return JSONAnswer({"agents": [hub.agent_view(n) for n in names]})

    @endpoint
    async def agent(request):
        return JSONAnswer(hub.agent_view(agent_name(request)))

    @endpoint
    async def set_desired(request):
        body = await body_json(request)
        return JSONAnswer(await run_in_threadpool(hub.set_desired, body))

    @endpoint
    async def set_group(request):
        body = await body_json(request)
        group = _opt_name(request.path_params["group"], "group")
        devices = _names(body.get("devices"), "devices")
        with hub.lock:
            hub.state["groups"][group] = devices
            hub.save()
        return JSONAnswer({"group": group, "devices": devices})

    @endpoint
    async def events(request):
        return JSONAnswer({"events": list(hub.events)})

    @endpoint
    async def blobs(request):
        return JSONAnswer({"blobs": list(hub.state["blobs"].values())})

    routes = [
        Route("/v1/blobs", put_blob, methods=["POST"]),
        Route("/v1/blobs", blobs, methods=["GET"]),
        Route("/v1/blobs/{sha}", get_blob, methods=["GET"]),
        Route("/v1/agents", agents, methods=["GET"]),
        Route("/v1/agents/{name}", agent, methods=["GET"]),
        Route("/v1/agents/{name}/register", register, methods=["POST"]),
        Route("/v1/agents/{name}/desired", desired, methods=["GET"]),
        Route("/v1/agents/{name}/report", report, methods=["POST"]),
        Route("/v1/desired", set_desired, methods=["POST"]),
        Route("/v1/groups/{group}", set_group, methods=["POST"]),
        Route("/v1/events", events, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: web.not_found_or_method})
    app.state.hub = hub
    return app
