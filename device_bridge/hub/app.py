"""The hub's HTTP routes: who may call what (the operator token, each agent's own credential),
and the state and credential stores behind them."""

from __future__ import annotations

import functools
import hmac
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from device_bridge import web
from device_bridge.hub.credentials import Credentials
from device_bridge.hub.data import MAX_READ_ROWS, MAX_UPLOAD_BYTES, NO_GROUP, DataStore, parse_since
from device_bridge.hub.db import Database
from device_bridge.hub.errors import NAME_RE, SHA_RE, HubError, name_or_none, names_of
from device_bridge.hub.state import FLUSH_S, HubState
from device_bridge.web import JSONAnswer


def create_hub_app(store: str | Path, token: str, max_package_bytes: int = 256 * 1024 * 1024,
                   body_timeout: float = 120.0, enroll_open: bool = False, data_max_mb: int = 1024,
                   db: str | None = None, report_flush_s: float = FLUSH_S) -> Starlette:
    """``token``: the operator credential. ``enroll_open`` (tests, dev): an agent may enroll itself,
    without a credential, under a name that never had one. ``data_max_mb``: device data kept per
    group (data.py). ``db``: the state's database (db.py; default SQLite in ``STORE/hub.db``).
    ``report_flush_s``: agents' reports reach the database this often, in one transaction (state.py;
    0: each at once). Call ``app.state.hub.close()`` at shutdown to write the last ones."""
    if not token:
        raise ValueError("the hub needs an operator token")
    database = Database(store, db)
    hub = HubState(store, max_package_bytes, database, report_flush_s)
    hub.start_flusher()
    creds = Credentials(store, database)
    data = DataStore(store, data_max_mb)
    operator_b = token.encode()
    budget = web.BodyBudget(max(3 * max_package_bytes, 64 << 20))
    base_endpoint = web.endpoint_factory(operator_b, budget=budget)
    limiter: list = []

    async def on_db(fn, *args):
        """SQLite answers in microseconds: on the event loop. PostgreSQL is a round trip away: in a
        worker thread (at most 8 at once, each with its own connection), so that one slow answer
        does not hold every other request."""
        if database.kind == "sqlite":
            return fn(*args)
        if not limiter:
            limiter.append(anyio.CapacityLimiter(8))
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter[0])

    def endpoint(check):
        """web's endpoint, with the caller's check (a credential look-up) run through on_db."""
        if not callable(check):
            return base_endpoint(check)

        def deco(fn):
            @functools.wraps(fn)
            async def checked(request):
                await on_db(check, request)
                return await fn(request)
            return base_endpoint(False)(checked)
        return deco

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
        wanted = {e.get("sha256") for e in hub.desired_of(name).values() if isinstance(e, dict)}
        wanted |= {a.get("sha256") for e in hub.desired_of(name).values() if isinstance(e, dict)
                   for a in (e.get("experiment") or {}).get("arms", [])}  # an experiment's arms too
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
        if not NAME_RE.match(name):
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
        if not SHA_RE.match(sha) or not (hub.store / "blobs" / sha).exists():
            raise HubError(404, f"no blob {sha}")
        return FileResponse(hub.store / "blobs" / sha, media_type="application/octet-stream")

    @endpoint(own(operator_too=False))
    async def register(request):
        name, body = agent_name(request), await body_json(request)
        return JSONAnswer(await on_db(hub.register, name, body))

    @endpoint(own(operator_too=True))
    async def desired(request):
        name = agent_name(request)
        return JSONAnswer({"agent": name, "models": await on_db(hub.desired_of, name)})

    @endpoint(own(operator_too=False))
    async def report(request):
        name, body = agent_name(request), await body_json(request)
        if hub.report_is_local(name):  # written behind (state.py): no database call on this path
            return JSONAnswer(hub.report(name, body))
        return JSONAnswer(await on_db(hub.report, name, body))

    @endpoint(False)
    async def enroll(request):
        name = agent_name(request)
        try:
            who, known = await on_db(caller, request), True
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
        return JSONAnswer({"agents": await on_db(lambda: [view(n) for n in hub.agent_list()])})

    @endpoint(operator)
    async def agent(request):
        return JSONAnswer(await on_db(view, agent_name(request)))

    @endpoint(operator)
    async def set_desired(request):
        body = await body_json(request)
        return JSONAnswer(await run_in_threadpool(hub.set_desired, body))

    @endpoint(operator)
    async def post_event(request):
        body = await body_json(request, 64 * 1024)
        return JSONAnswer(await run_in_threadpool(hub.operator_event, body))

    @endpoint(operator)
    async def set_group(request):
        body = await body_json(request)
        group = name_or_none(request.path_params["group"], "group")
        devices = names_of(body.get("devices"), "devices")
        await on_db(hub.set_group, group, devices)
        return JSONAnswer({"group": group, "devices": devices})

    def group_of(name: str) -> str:
        return hub.group_of(name, NO_GROUP)

    @endpoint(own(operator_too=False))
    async def upload_data(request):
        name = agent_name(request)
        q = request.query_params
        extra = sorted(set(q) - {"kind", "model", "first", "last"})
        if extra:
            raise HubError(400, f"unknown parameter {extra[0]!r}: an upload takes kind, model, first, last")
        try:
            first, last = int(q.get("first", "")), int(q.get("last", ""))
        except ValueError:
            raise HubError(400, "first and last must be integers (the rows' seq range)") from None
        body = await web.read_body(request, MAX_UPLOAD_BYTES, body_timeout, budget)
        group = await on_db(group_of, name)
        return JSONAnswer(await run_in_threadpool(data.upload, name, group, q.get("kind", ""),
                                                  q.get("model", ""), first, last, body))

    @endpoint(operator)
    async def read_data(request):
        from device_bridge.agent.sampling import ipc_bytes

        kind = request.path_params["kind"]
        if kind == "usage":
            return JSONAnswer(await run_in_threadpool(data.usage))
        q = request.query_params
        extra = sorted(set(q) - {"group", "model", "since", "max_rows"})
        if extra:
            raise HubError(400, f"unknown parameter {extra[0]!r}: takes group, model, since, max_rows")
        group = q.get("group") or None
        if group is not None and group != NO_GROUP:
            name_or_none(group, "group")
        model = name_or_none(q.get("model") or None, "model")
        try:
            max_rows = int(q.get("max_rows", "100000"))
        except ValueError:
            raise HubError(400, "max_rows must be an integer") from None
        if not 1 <= max_rows <= MAX_READ_ROWS:
            raise HubError(400, f"max_rows must be from 1 to {MAX_READ_ROWS}")
        since = parse_since(q.get("since"))

        def read() -> bytes:
            table = data.read(kind, group, model, since, max_rows)
            return ipc_bytes(table if table is not None else data.empty(kind))

        body = await run_in_threadpool(read)
        return Response(body, media_type="application/vnd.apache.arrow.stream")

    @endpoint(operator)
    async def events(request):
        return JSONAnswer({"events": await on_db(hub.events)})

    @endpoint(operator)
    async def blobs(request):
        return JSONAnswer({"blobs": await on_db(hub.blobs)})

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
        Route("/v1/agents/{name}/data", upload_data, methods=["POST"]),
        Route("/v1/data/{kind}", read_data, methods=["GET"]),
        Route("/v1/desired", set_desired, methods=["POST"]),
        Route("/v1/groups/{group}", set_group, methods=["POST"]),
        Route("/v1/events", events, methods=["GET"]),
        Route("/v1/events", post_event, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: web.not_found_or_method})
    app.state.hub = hub
    app.state.credentials = creds
    app.state.data = data
    return app
