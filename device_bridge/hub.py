"""The fleet hub: content-addressed packages, desired state per agent, status and telemetry.

Agents (``mlsql-device serve --hub URL``) register, poll ``GET /v1/agents/{name}/desired``,
pull ``GET /v1/blobs/{sha256}``, and push ``POST /v1/agents/{name}/report`` (status +
buffered telemetry). Operators (HubClient, rollout) upload packages and set desired state.

Two kinds of credential. The operator token (``--token``) may do everything. Each agent has
its own credential, enrolled once (``POST /v1/agents/{name}/enroll`` by the operator, or
``mlsql-device hub enroll NAME --store DIR``), kept at the hub only as a sha256 in
``STORE/credentials.json``, and revocable: it opens only that agent's own paths
(``/v1/agents/{name}/register|desired|report``) and the packages its desired state names;
anything else is 403 ``forbidden``. What an agent reports is attributed to the credential's
name, never to a name from the body. State (agents, groups, desired) is one JSON file
replaced atomically; blobs are files named by their sha256.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
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
from device_bridge.agent import deploy as deploy_settings
from device_bridge.agent.core import atomic_write
from device_bridge.errors import ApiError
from device_bridge.web import JSONAnswer

_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class HubError(ApiError):
    """An error the hub answers with (status, message, kind)."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        if kind is None:
            kind = {401: "auth", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "too_large"}.get(status, "request")
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


def _digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class Credentials:
    """The agents' hub credentials: ``STORE/credentials.json`` maps a name to the sha256 of its
    token (random, 256 bits, so an unsalted hash is enough) or to a revocation. The file is read
    again whenever it changes, so ``mlsql-device hub enroll/revoke`` works on a running hub;
    writers (hub and CLI) hold ``credentials.lock``."""

    def __init__(self, store: str | Path):
        self.path = Path(store) / "credentials.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sig: tuple | None = None
        self._entries: dict[str, dict] = {}
        self._by_hash: dict[str, str] = {}
        self._mu = threading.Lock()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # never start open because the file is damaged
            raise HubError(500, f"cannot read {self.path}: {exc}", "store") from None
        return data if isinstance(data, dict) else {}

    def _fresh(self) -> dict[str, dict]:
        try:
            st = os.stat(self.path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = None
        with self._mu:
            if sig != self._sig or (sig is None and self._entries):
                entries = self._read()
                self._entries = entries
                self._by_hash = {e["sha256"]: n for n, e in entries.items()
                                 if isinstance(e, dict) and isinstance(e.get("sha256"), str)}
                self._sig = sig
            return self._entries

    def who(self, token: bytes) -> str | None:
        """The agent this token belongs to (None: no enrolled agent holds it)."""
        self._fresh()
        name = self._by_hash.get(_digest(token))
        entry = self._entries.get(name) if name else None
        if entry and hmac.compare_digest(entry.get("sha256", ""), _digest(token)):
            return name
        return None

    def state(self, name: str) -> str | None:
        """``enrolled``, ``revoked`` or None (never enrolled)."""
        e = self._fresh().get(name)
        if not isinstance(e, dict):
            return None
        return "enrolled" if e.get("sha256") else "revoked"

    def _update(self, fn):
        lock = self.path.with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            out = fn(entries)
            data = json.dumps(entries, sort_keys=True, indent=1).encode()
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(wfd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            os.close(fd)  # closing releases the lock
        self._fresh()
        return out

    def enroll(self, name: str, *, only_new: bool = False) -> str:
        """A fresh token for ``name`` (replacing any earlier one). ``only_new``: refuse a name that
        holds or held a credential (open enrollment must not take over, or undo a revocation)."""
        if not _NAME.match(name or ""):
            raise HubError(400, f"bad agent name {name!r}")
        token = "mlsqlhub_" + secrets.token_urlsafe(32)

        def put(entries):
            if only_new and name in entries:
                raise HubError(409, f"agent {name!r} is already enrolled (or was revoked); open enrollment "
                                    "takes only new names: the operator enrolls it again", "conflict")
            entries[name] = {"sha256": _digest(token.encode()), "enrolled_at": time.time()}
        self._update(put)
        return token

    def revoke(self, name: str) -> bool:
        """Refuse ``name``'s credential from now on; False when it had none."""
        def drop(entries):
            had = isinstance(entries.get(name), dict) and bool(entries[name].get("sha256"))
            entries[name] = {"revoked_at": time.time()}
            return had
        return self._update(drop)


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
        group = _opt_name(body.get("group"), "group")
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


def create_hub_app(store: str | Path, token: str, max_package_bytes: int = 256 * 1024 * 1024,
                   body_timeout: float = 120.0, enroll_open: bool = False) -> Starlette:
    """``token``: the operator credential. ``enroll_open`` (tests, dev): an agent may enroll itself,
    without a credential, under a name that never had one."""
    if not token:
        raise ValueError("the hub needs an operator token")
    hub = HubState(store, max_package_bytes)
    creds = Credentials(store)
    operator_b = token.encode()
    budget = web.BodyBudget(max(3 * max_package_bytes, 64 << 20))
    endpoint = web.endpoint_factory(operator_b, budget=budget)

    def caller(request) -> str | None:
        """None for the operator, else the name of the agent whose credential this is (401 otherwise)."""
        tok = web.bearer(request)
        if tok:
            if hmac.compare_digest(tok, operator_b):
                request.scope["mlsql.caller"] = None
                return None
            name = creds.who(tok)
            if name is not None:
                request.scope["mlsql.caller"] = name
                return name
        raise HubError(401, "missing or wrong token (Authorization: Bearer <token>: the operator token, "
                            "or the agent's own credential from enrollment)", "auth")

    def operator(request) -> None:
        name = caller(request)
        if name is not None:
            raise HubError(403, f"agent {name!r}'s credential opens only /v1/agents/{name}/...; "
                                f"{request.method} {request.url.path} needs the operator token", "forbidden")

    def own(operator_too: bool):
        def check(request) -> None:
            name = caller(request)
            target = request.path_params.get("name")
            if name is None:
                if not operator_too:
                    raise HubError(403, f"{request.method} {request.url.path} is the agent's own call: "
                                        "it needs that agent's credential, not the operator token", "forbidden")
                return
            if name != target:
                raise HubError(403, f"agent {name!r}'s credential opens only /v1/agents/{name}/..., "
                                    f"not {request.url.path}", "forbidden")
        return check

    def blob_reader(request) -> None:
        name = caller(request)
        if name is None:
            return
        sha = request.path_params["sha"]
        wanted = {e.get("sha256") for e in hub.state["desired"].get(name, {}).values() if isinstance(e, dict)}
        if sha not in wanted:
            raise HubError(403, f"agent {name!r} may download only the packages of its desired state", "forbidden")

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

    def view(name: str) -> dict:
        return {**hub.agent_view(name), "credential": creds.state(name)}

    @endpoint(operator)
    async def put_blob(request):
        data = await web.read_body(request, hub.max_package_bytes, body_timeout, budget)
        return JSONAnswer(await run_in_threadpool(hub.put_blob, data))

    @endpoint(blob_reader)
    async def get_blob(request):
        sha = request.path_params["sha"]
        if not _SHA.match(sha) or not (hub.store / "blobs" / sha).exists():
            raise HubError(404, f"no blob {sha}")
        return FileResponse(hub.store / "blobs" / sha, media_type="application/octet-stream")

    @endpoint(own(operator_too=False))
    async def register(request):
        return JSONAnswer(hub.register(agent_name(request), await body_json(request)))

    @endpoint(own(operator_too=True))
    async def desired(request):
        name = agent_name(request)
        return JSONAnswer({"agent": name, "models": hub.state["desired"].get(name, {})})

    @endpoint(own(operator_too=False))
    async def report(request):
        return JSONAnswer(hub.report(agent_name(request), await body_json(request)))

    @endpoint(False)
    async def enroll(request):
        name = agent_name(request)
        try:
            who, known = caller(request), True
        except HubError:
            who, known = None, False
        if known and who is None:  # the operator: a fresh credential, replacing any earlier one
            tok = await run_in_threadpool(creds.enroll, name)
        elif enroll_open:  # dev/tests: first come, first served, never over a name that has (had) one
            tok = await run_in_threadpool(functools.partial(creds.enroll, name, only_new=True))
        elif known:
            raise HubError(403, f"agent {who!r} cannot enroll agents: the operator does", "forbidden")
        else:
            raise HubError(401, "enrolling an agent needs the operator token (or a hub started with "
                                "--enroll-open, for tests and development)", "auth")
        return JSONAnswer({"agent": name, "token": tok})

    @endpoint(operator)
    async def revoke(request):
        name = agent_name(request)
        return JSONAnswer({"agent": name, "revoked": await run_in_threadpool(creds.revoke, name)})

    @endpoint(operator)
    async def agents(request):
        names = sorted(set(hub.state["agents"]) | set(hub.reports))
        return JSONAnswer({"agents": [view(n) for n in names]})

    @endpoint(operator)
    async def agent(request):
        return JSONAnswer(view(agent_name(request)))

    @endpoint(operator)
    async def set_desired(request):
        body = await body_json(request)
        return JSONAnswer(await run_in_threadpool(hub.set_desired, body))

    @endpoint(operator)
    async def set_group(request):
        body = await body_json(request)
        group = _opt_name(request.path_params["group"], "group")
        devices = _names(body.get("devices"), "devices")
        with hub.lock:
            hub.state["groups"][group] = devices
            hub.save()
        return JSONAnswer({"group": group, "devices": devices})

    @endpoint(operator)
    async def events(request):
        return JSONAnswer({"events": list(hub.events)})

    @endpoint(operator)
    async def blobs(request):
        return JSONAnswer({"blobs": list(hub.state["blobs"].values())})

    routes = [
        Route("/v1/blobs", put_blob, methods=["POST"]),
        Route("/v1/blobs", blobs, methods=["GET"]),
        Route("/v1/blobs/{sha}", get_blob, methods=["GET"]),
        Route("/v1/agents", agents, methods=["GET"]),
        Route("/v1/agents/{name}", agent, methods=["GET"]),
        Route("/v1/agents/{name}/enroll", enroll, methods=["POST"]),
        Route("/v1/agents/{name}/credential", revoke, methods=["DELETE"]),
        Route("/v1/agents/{name}/register", register, methods=["POST"]),
        Route("/v1/agents/{name}/desired", desired, methods=["GET"]),
        Route("/v1/agents/{name}/report", report, methods=["POST"]),
        Route("/v1/desired", set_desired, methods=["POST"]),
        Route("/v1/groups/{group}", set_group, methods=["POST"]),
        Route("/v1/events", events, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: web.not_found_or_method})
    app.state.hub = hub
    app.state.credentials = creds
    return app
