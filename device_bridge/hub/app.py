"""The hub's HTTP routes: who may call what (the operator token, each agent's own credential),
and the state and credential stores behind them."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from device_bridge import web
from device_bridge.errors import ApiError
from device_bridge.hub.cache import MAX_ENTRIES, PollCache, read_gens
from device_bridge.hub.credentials import Credentials
from device_bridge.hub.data import MAX_READ_ROWS, MAX_UPLOAD_BYTES, NO_GROUP, DataStore, parse_since
from device_bridge.hub.db import Database
from device_bridge.hub.deltas import MAX_RATIO, DeltaCache
from device_bridge.hub.errors import NAME_RE, SHA_RE, HubError, name_or_none, names_of
from device_bridge.hub.longpoll import MAX_HELD, MAX_WAIT_S, RECHECK_S, Waiters, bump
from device_bridge.hub.schedule import LEASE_S, Scheduler
from device_bridge.hub.state import FLUSH_S, HubState
from device_bridge.web import JSONAnswer


def create_hub_app(store: str | Path, token: str, max_package_bytes: int = 256 * 1024 * 1024,
                   body_timeout: float = 120.0, enroll_open: bool = False, data_max_mb: int = 1024,
                   db: str | None = None, report_flush_s: float = FLUSH_S, origins: list[str] | None = None,
                   hub_blobs: str = "first", deltas: bool = True, delta_max_ratio: float = MAX_RATIO,
                   lease_s: float = LEASE_S, max_held: int = MAX_HELD, recheck_s: float = RECHECK_S,
                   max_wait_s: float = MAX_WAIT_S, drive_rollouts: bool = True,
                   replica: str | None = None, cache_agents: int = MAX_ENTRIES):
    """``token``: the operator credential. ``enroll_open`` (tests, dev): an agent may enroll itself,
    without a credential, under a name that never had one. ``data_max_mb``: device data kept per
    group (data.py). ``db``: the state's database (db.py; default SQLite in ``STORE/hub.db``).
    ``report_flush_s``: agents' reports reach the database this often, in one transaction (state.py;
    0: each at once). Call ``app.state.hub.close()`` at shutdown to write the last ones.
    ``origins``: base URLs of static origins holding the blobs as ``BASE/SHA`` (``mlsql-device hub
    publish``), advertised in each desired entry's ``urls`` after (``hub_blobs="first"``) or before
    (``"last"``) the hub's own ``/v1/blobs/SHA``, or instead of it (``"off"``). ``deltas``: offer
    ``/v1/blobs/SHA/delta?from=OLD`` (hub/deltas.py), at most ``delta_max_ratio`` of the package.
    ``lease_s``: the scheduled rollouts' lease (hub/schedule.py; ``replica`` names this process in it);
    ``drive_rollouts=False``: this process never takes it (it still creates, shows and stops them).
    ``max_held``, ``recheck_s``, ``max_wait_s``: long-polls of the desired state (hub/longpoll.py);
    ``recheck_s`` also bounds how late a change made elsewhere reaches the answers this process keeps
    in memory (hub/cache.py: at most ``cache_agents`` agents' answers and credentials).

    The returned ASGI app answers an agent's own desired-state GET and report from memory, before
    Starlette's routing, when its credential and (for the GET) its answer are kept (hub/cache.py);
    every other request, and those when anything is missing, go through the routes below."""
    if not 1 <= max_wait_s <= 3600:
        raise ValueError("max_wait_s must be 1 to 3600 seconds")
    if not token:
        raise ValueError("the hub needs an operator token")
    origins = check_origins(origins or [])
    if hub_blobs not in ("first", "last", "off"):
        raise ValueError("hub_blobs must be first, last or off")
    if hub_blobs == "off" and not origins:
        raise ValueError("with the hub's own blob URL off, name at least one origin")
    database = Database(store, db)
    hub = HubState(store, max_package_bytes, database, report_flush_s)
    hub.start_flusher()
    creds = Credentials(store, database)
    data = DataStore(store, data_max_mb)
    delta_cache = DeltaCache(Path(store), delta_max_ratio) if deltas else None
    operator_b = token.encode()
    budget = web.BodyBudget(max(3 * max_package_bytes, 64 << 20))
    base_endpoint = web.endpoint_factory(operator_b, budget=budget)
    limiter: list = []
    waiters = Waiters(max_held)
    cache = PollCache(lambda: on_db(read_gens, database), lambda: waiters.wake(None), recheck_s, cache_agents)

    def changed_here(names=None) -> None:
        """A desired-state change this process made (committed): its answers dropped, its agents woken."""
        cache.drop_docs()
        waiters.wake(names)

    def changed_threadsafe(names=None) -> None:  # the rollout driver's thread, a threadpool's
        loop = cache.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(changed_here, None if names is None else list(names))

    scheduler = Scheduler(hub, lease_s, replica, on_change=changed_threadsafe)
    if drive_rollouts:
        scheduler.start()

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
            name = cache.who(tok, creds.who)
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

    async def body_json(request: Request, limit: int = REPORT_LIMIT) -> dict:
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
        if await on_db(hub.register_moved, name, body):  # another group: its desired state may differ
            changed_here([name])
        return JSONAnswer({"ok": True})

    def with_urls(models: dict) -> dict:
        """Each package's URLs, in the order agents try them (docs/DEVICE.md "Package origins"); the
        hub's own as a path, which the agent resolves against the hub URL it polls."""
        for entry in models.values():
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            if not sha:
                continue
            own_url = [] if hub_blobs == "off" else [f"/v1/blobs/{sha}"]
            others = [f"{o}/{sha}" for o in origins]
            entry["urls"] = own_url + others if hub_blobs == "first" else others + own_url
            if delta_cache is not None:
                entry["delta"] = f"/v1/blobs/{sha}/delta"
            published = hub.published_deltas(sha) if origins else []
            if published:  # `hub publish` wrote them to the origins: tried before the hub's own delta
                entry["deltas"] = [{**d, "urls": [f"{o}/{d['sha256']}" for o in origins]} for d in published]
        return models

    def desired_doc(name: str) -> tuple[bytes, bytes]:
        """(ETag, body) of the agent's desired state, both encoded once (hub/cache.py keeps them)."""
        doc = {"agent": name, "models": with_urls(hub.desired_of(name))}
        etag = '"' + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32] + '"'
        return etag.encode(), web.dumps(doc)

    async def doc_for(name: str) -> tuple[bytes, bytes]:
        hit = cache.docs.get(name)
        if hit is not None:
            return hit
        ticket = cache.ticket()
        entry = await on_db(desired_doc, name)
        cache.keep_doc(name, ticket, entry)
        return entry

    @endpoint(own(operator_too=True))
    async def desired(request):
        """``?wait=S`` with ``If-None-Match: ETAG`` (the state the agent has): held until it changes
        or S seconds pass, then 304 (hub/longpoll.py)."""
        name = agent_name(request)
        extra = sorted(set(request.query_params) - {"wait"})
        if extra:
            raise HubError(400, f"unknown parameter {extra[0]!r}: the desired state takes wait")
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            raise HubError(400, "wait must be a number of seconds") from None
        if not 0 <= wait <= max_wait_s:  # also refuses nan
            raise HubError(400, f"wait must be from 0 to {max_wait_s:g} seconds, got {wait:g}")
        have = request.headers.get("if-none-match")
        have_b = None if have is None else have.encode("latin-1")
        found: list = []

        async def changed() -> bool:
            found[:] = await doc_for(name)
            return found[0] != have_b

        if have is None or await changed() or (wait > 0 and await waiters.hold(name, wait, changed)):
            if not found:
                await changed()
            etag, body = found
            return Response(body, media_type="application/json",
                            headers={"ETag": etag.decode("latin-1"), "X-MLSQL-Max-Wait": f"{max_wait_s:g}"})
        return Response(status_code=304, headers={"ETag": found[0].decode("latin-1"),
                                                  "X-MLSQL-Max-Wait": f"{max_wait_s:g}"})

    @endpoint(blob_reader)
    async def get_delta(request):
        """The package SHA as a zstd delta from package ``from`` (an older version of the same model,
        which the agent has installed); 404 ``no_delta`` when the hub has none worth sending: the
        agent then downloads the full package."""
        sha = request.path_params["sha"]
        extra = sorted(set(request.query_params) - {"from"})
        if extra:
            raise HubError(400, f"unknown parameter {extra[0]!r}: a delta takes from")
        old = request.query_params.get("from", "")
        if not SHA_RE.match(sha):
            raise HubError(404, f"no blob {sha}")
        if not SHA_RE.match(old):
            raise HubError(400, "from must be the sha256 (64 hex digits) of the package the agent has")
        if delta_cache is None:
            raise HubError(404, "this hub serves no deltas (started with --deltas off)", "no_delta")
        new_meta, old_meta = await on_db(hub.blob, sha), await on_db(hub.blob, old)
        if new_meta is None:
            raise HubError(404, f"no blob {sha}")
        if old_meta is None or old_meta.get("name") != new_meta.get("name") \
                or not old_meta.get("version", 0) < new_meta.get("version", 0):
            raise HubError(404, f"no delta to {sha[:12]} from {old[:12]}: not an older version of "
                                f"{new_meta.get('name')} on this hub", "no_delta")
        path = await run_in_threadpool(delta_cache.path, old, sha)
        if path is None:
            raise HubError(404, f"the delta from {old[:12]} to {sha[:12]} is over {delta_cache.max_ratio:.0%} "
                                "of the package: download the package", "no_delta")
        return FileResponse(path, media_type="application/zstd", headers={"X-MLSQL-Delta-From": old})

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
            cache.drop_creds()
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
        revoked = await run_in_threadpool(creds.revoke, name)
        cache.drop_creds()
        return JSONAnswer({"agent": name, "revoked": revoked})

    @endpoint(operator)
    async def agents(request):
        return JSONAnswer({"agents": await on_db(lambda: [view(n) for n in hub.agent_list()])})

    @endpoint(operator)
    async def agent(request):
        return JSONAnswer(await on_db(view, agent_name(request)))

    @endpoint(operator)
    async def set_desired(request):
        body = await body_json(request)
        out = await run_in_threadpool(hub.set_desired, body, bump)
        cache.drop_docs()  # before the answer: the next poll reads the new state
        # the held requests are woken once the answer is out: woken first, thousands of them would each
        # read their new state before the operator's answer left (4 s for 10,000 on SQLite here)
        return JSONAnswer(out, background=BackgroundTask(waiters.wake, out["devices"]))

    @endpoint(operator)
    async def create_rollout(request):
        body = await body_json(request)
        return JSONAnswer(await run_in_threadpool(scheduler.create, body))

    @endpoint(operator)
    async def rollouts(request):
        return JSONAnswer(await run_in_threadpool(scheduler.list))

    def plan_path(request) -> tuple[str, str]:
        group = name_or_none(request.path_params["group"], "group")
        model = request.path_params["model"]
        if not NAME_RE.match(model):
            raise HubError(400, f"bad model name {model!r}")
        return group, model

    @endpoint(operator)
    async def rollout(request):
        return JSONAnswer(await run_in_threadpool(scheduler.get, *plan_path(request)))

    @endpoint(operator)
    async def stop_rollout(request):
        group, model = plan_path(request)
        body = await body_json(request, 4096)
        extra = sorted(set(body) - {"rollback"})
        if extra:
            raise HubError(400, f"unknown field {extra[0]!r}: stopping a rollout takes rollback")
        if not isinstance(body.get("rollback", False), bool):
            raise HubError(400, "rollback must be true or false")
        return JSONAnswer(await run_in_threadpool(scheduler.stop, group, model, body.get("rollback", False)))

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
        await on_db(lambda: _bump_alone(database))
        changed_here(None)
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
        Route("/v1/blobs/{sha}/delta", get_delta, methods=["GET"]),
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
        Route("/v1/rollouts", create_rollout, methods=["POST"]),
        Route("/v1/rollouts", rollouts, methods=["GET"]),
        Route("/v1/rollouts/{group}/{model}", rollout, methods=["GET"]),
        Route("/v1/rollouts/{group}/{model}/stop", stop_rollout, methods=["POST"]),
        Route("/v1/events", events, methods=["GET"]),
        Route("/v1/events", post_event, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: web.not_found_or_method})
    app.state.hub = hub
    app.state.credentials = creds
    app.state.data = data
    app.state.deltas = delta_cache
    app.state.scheduler = scheduler
    app.state.waiters = waiters
    app.state.cache = cache

    max_wait_b = f"{max_wait_s:g}".encode()

    async def fast_desired(scope, send, name: str) -> bool:
        """An agent's own desired-state GET whose answer is in memory: sent as kept (200, or 304 when
        its If-None-Match is the ETag and it asks for no wait). False: the route answers it."""
        auth, inm = _headers(scope, b"authorization", b"if-none-match")
        if cache.known(auth) != name:
            return False
        q = scope["query_string"]
        if q:  # wait=S alone; anything else (and every error) is the route's
            if not q.startswith(b"wait="):
                return False
            try:
                wait = float(q[5:].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return False
            if not 0 <= wait <= max_wait_s:
                return False
        else:
            wait = 0.0
        hit = cache.docs.get(name)
        if hit is None:
            return False
        etag, body = hit
        if inm == etag:
            if wait > 0:  # unchanged, and it may be held: hub/longpoll.py
                return False
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", etag), (b"x-mlsql-max-wait", max_wait_b)]})
            await send({"type": "http.response.body", "body": b""})
            return True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json"),
                                (b"etag", etag), (b"x-mlsql-max-wait", max_wait_b)]})
        await send({"type": "http.response.body", "body": body})
        return True

    async def fast_report(scope, receive, send, name: str) -> bool:
        """An agent's own report when its credential is in memory and the report is written behind
        (HubState.report_is_local): no database call, no routing. False: the route takes it."""
        auth, length = _headers(scope, b"authorization", b"content-length")
        if cache.known(auth) != name or not hub.report_is_local(name):
            return False
        status = 200
        try:
            raw = await web.read_body_asgi(scope, receive, length, REPORT_LIMIT, body_timeout, budget)
            body = web.parse_json(raw, nonfinite_as_null=True) if raw.strip() else {}
            if not isinstance(body, dict):
                raise HubError(400, "body must be a JSON object")
            ack = hub.report(name, body)
            out = b'{"ok":true,"received":%d}' % ack["received"]  # what web.dumps(ack) writes
        except ApiError as exc:
            status, out = exc.status, web.dumps({"error": exc.message, "kind": exc.kind})
        except ClientDisconnect:
            status, out = 400, web.dumps({"error": "client disconnected", "kind": "request"})
        except Exception as exc:  # a bug: logged, still a JSON answer
            log.exception("internal error in POST %s", scope.get("path"))
            status, out = 500, web.dumps({"error": f"internal error: {type(exc).__name__}", "kind": "internal"})
        finally:
            budget.release_scope(scope)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"%d" % len(out)), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})
        return True

    async def hub_app(scope, receive, send):
        if scope["type"] == "http":
            cache.ensure_watching()
            path = scope["path"]
            if path.startswith("/v1/agents/"):
                name, _, tail = path[11:].partition("/")
                if tail == "desired":
                    if scope["method"] == "GET" and await fast_desired(scope, send, name):
                        return
                elif tail == "report" and scope["method"] == "POST":
                    if await fast_report(scope, receive, send, name):
                        return
        await app(scope, receive, send)

    hub_app.state = app.state  # type: ignore[attr-defined]
    hub_app.routes = app  # type: ignore[attr-defined]
    return hub_app


REPORT_LIMIT = 16 * 1024 * 1024  # a JSON body (a report, a desired state, a register)
log = logging.getLogger("device_bridge.hub")


def _headers(scope: dict, a: bytes, b: bytes) -> tuple[bytes | None, bytes | None]:
    """The values of two (lower-case) headers of an ASGI scope, None where absent: one pass."""
    va = vb = None
    for k, v in scope["headers"]:
        if k == a:
            va = v
        elif k == b:
            vb = v
    return va, vb


def _bump_alone(database: Database) -> None:
    with database.tx() as t:
        bump(t)


def check_origins(origins: list[str]) -> list[str]:
    """Static origins' base URLs: http(s), no query or fragment, no trailing slash."""
    from device_bridge import urls

    out = []
    for o in origins:
        o = o.strip().rstrip("/")
        if urls.origin(o) is None or "?" in o or "#" in o:
            raise ValueError(f"origin {o!r} must be an http(s) base URL (the blobs are BASE/SHA256)")
        out.append(o)
    return out
