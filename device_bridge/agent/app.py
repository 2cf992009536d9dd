"""The agent's HTTP API (Starlette). See docs/DEVICE.md for every endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from device_bridge import web
from device_bridge.agent import inputs as inp
from device_bridge.agent.core import AgentCore, AgentError
from device_bridge.errors import ApiError
from device_bridge.web import JSONAnswer, parse_json

NPZ_TYPES = ("application/x-npz", "application/npz")
COLUMNS_TYPE = "application/x-mlsql-columns"
SMALL_BODY = 8 * 1024
BIG_PARSE = inp.BIG_PARSE    # bodies (or .npz contents) over this are parsed under a semaphore ...
BIG_PARSES_AT_ONCE = 2       # ... so that a few large requests cannot multiply their memory
MAX_STREAMS = 8              # concurrent /v1/metrics/stream answers
MIN_STREAM_INTERVAL = 0.25   # seconds: a snapshot costs a pass over every version's statistics


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no", ""):
        return v.lower() in ("1", "true", "yes")
    raise AgentError(400, f"{what} must be true or false, got {v!r}")


def _providers(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not v or not all(isinstance(p, str) for p in v) or len(v) > 16:
        raise AgentError(400, "providers must be a non-empty list of provider names (e.g. ['nnapi', 'cpu'])")
    return v


def _version(v: Any) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
        raise AgentError(400, f"version must be a positive integer, got {v!r}")
    return v


def create_app(core: AgentCore, token: str, open_reads: bool = False, request_timeout: float = 15.0,
               body_timeout: float = 60.0):
    """``open_reads``: info, metrics, events and predict without the token (health is always open;
    installs, activation, rollback and deletion always need it)."""
    token_b = token.encode()
    max_body = core.config.max_body_bytes
    max_json = min(max_body, core.config.max_json_bytes)
    # bodies buffered at once, all requests together: a few maximal binary batches
    budget = web.BodyBudget(max(3 * max_body, 8 << 20))
    big_parses = threading.BoundedSemaphore(BIG_PARSES_AT_ONCE)  # held in worker threads
    streams = {"open": 0}

    def internal(exc: BaseException) -> None:
        core.telemetry.event("internal_error", error=type(exc).__name__)

    endpoint = web.endpoint_factory(token_b, internal, budget)
    read_auth = not open_reads

    async def read_body(request: Request, limit: int) -> bytes:
        return await web.read_body(request, limit, body_timeout, budget)

    def name_of(request: Request) -> str:
        return request.path_params["name"]

    @endpoint(False)
    async def health(request):
        return JSONAnswer({"ok": True, "name": core.config.name})

    @endpoint(read_auth)
    async def info(request):
        return JSONAnswer(await run_in_threadpool(core.info))

    @endpoint(read_auth)
    async def model_info(request):
        name = name_of(request)
        data = core.info()["models"].get(name)
        if data is None:
            core._model(name)
        return JSONAnswer({"name": name, **data})

    @endpoint(True)
    async def install(request):
        name = request.path_params.get("name")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        q = request.query_params
        if ctype == "application/json":
            body = parse_json(await read_body(request, 64 * 1024))
            if not isinstance(body, dict):
                raise AgentError(400, 'install body must be a JSON object with "url"')
            extra = set(body) - {"url", "sha256", "providers", "strict_providers", "activate", "token"}
            if extra or "url" not in body:
                raise AgentError(400, 'install JSON takes "url" (and optional "sha256", "providers", '
                                      f'"strict_providers", "activate"); got {sorted(body)}')
            sha = body.get("sha256")
            if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
                raise AgentError(400, "sha256 must be 64 hex digits")
            tok = body.get("token")
            if tok is not None and not isinstance(tok, str):
                raise AgentError(400, "token must be a string")
            res = await run_in_threadpool(
                core.install_from_url, name, body["url"], sha, _providers(body.get("providers")),
                _bool(body.get("strict_providers", False), "strict_providers"),
                _bool(body.get("activate", True), "activate"), tok)
            return JSONAnswer(res)
        data = await read_body(request, core.config.max_package_bytes)
        if not data:
            raise AgentError(400, "request body is empty; send the package bytes", "package")
        res = await run_in_threadpool(
            core.install, name, data, _providers(q.get("providers")),
            _bool(q.get("strict_providers", "false"), "strict_providers"),
            _bool(q.get("activate", "true"), "activate"))
        return JSONAnswer(res)

    async def _json_body(request, limit=64 * 1024) -> dict:
        raw = await read_body(request, limit)
        if not raw.strip():
            return {}
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise AgentError(400, "body must be a JSON object")
        return body

    @endpoint(True)
    async def activate(request):
        body = await _json_body(request)
        if "version" not in body:
            raise AgentError(400, 'activate needs {"version": N}')
        res = await run_in_threadpool(core.activate, name_of(request), _version(body["version"]),
                                      _providers(body.get("providers")),
                                      _bool(body.get("strict_providers", False), "strict_providers"))
        return JSONAnswer(res)

    @endpoint(True)
    async def rollback(request):
        await _json_body(request)
        return JSONAnswer(await run_in_threadpool(core.rollback, name_of(request)))

    @endpoint(True)
    async def delete(request):
        v = request.query_params.get("version")
        version = _version(v) if v is not None else None
        return JSONAnswer(await run_in_threadpool(core.delete, name_of(request), version))

    @endpoint(read_auth)
    async def predict(request):
        name = name_of(request)
        v = request.query_params.get("version")
        version = _version(v) if v is not None else None
        lv = core.resolve(name, version)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = ctype in ("application/json", "")
        if not is_json and ctype != COLUMNS_TYPE and ctype not in NPZ_TYPES:
            core.record_invalid(lv)
            raise AgentError(415, f"unsupported content type {ctype!r}: send application/json, "
                                  f"{COLUMNS_TYPE} or application/x-npz", "content_type")
        # JSON costs about 20 bytes of Python objects per byte of body: its own, lower limit
        body = await read_body(request, max_json if is_json else max_body)
        # each row is at least one object (rows) or each vector value one list (columns)
        max_containers = inp.MAX_ROWS * (len(lv.specs) + 1) + 16
        accept = request.headers.get("accept", "")
        answer = ("columns" if COLUMNS_TYPE in accept else
                  "npz" if any(t in accept for t in NPZ_TYPES) else None)

        def parse():
            if ctype == COLUMNS_TYPE:
                return inp.feed_from_columns(body, lv.specs, max_body)
            if ctype in NPZ_TYPES:
                return inp.feed_from_npz(body, lv.specs, max_body, big_parses)
            if len(body) > BIG_PARSE:
                with big_parses:
                    return inp.feed_from_json(parse_json(body, max_containers, check_floats=False), lv.specs)
            return inp.feed_from_json(parse_json(body, max_containers, check_floats=False), lv.specs)

        def work():
            try:
                feed, n = parse()
            except inp.LimitError as exc:
                core.record_invalid(lv)
                raise AgentError(413, str(exc), "too_large") from None
            except inp.InputError as exc:
                core.record_invalid(lv)
                raise AgentError(400, str(exc), "invalid_input") from None
            except ApiError:
                core.record_invalid(lv)
                raise
            result = core.predict(lv, feed, n, raw=answer is not None)
            if answer is not None:
                data = inp.outputs_to_columns(result) if answer == "columns" else inp.outputs_to_npz(result)
                if data is not None:
                    return answer, data
                result["outputs"] = inp.outputs_to_json(list(result["outputs"]), list(result["outputs"].values()))
            return result

        # a small request costs less than the hop to a worker thread: run it on the event loop;
        # batches go to the thread pool, where ORT runs them in parallel (it releases the GIL). An
        # .npz always goes there (a small deflated member can expand); big parses take turns there.
        if len(body) <= SMALL_BODY and ctype not in NPZ_TYPES:
            out = work()
        else:
            out = await run_in_threadpool(work)
        if isinstance(out, tuple):
            return Response(out[1], media_type=COLUMNS_TYPE if out[0] == "columns" else "application/x-npz")
        return JSONAnswer(out)

    @endpoint(read_auth)
    async def metrics(request):
        cols = request.query_params.get("columns", "1") not in ("0", "false")
        return JSONAnswer(await run_in_threadpool(core.metrics, cols))

    @endpoint(read_auth)
    async def events(request):
        return JSONAnswer({"events": list(core.telemetry.events)})

    @endpoint(read_auth)
    async def stream(request):
        q = request.query_params
        try:
            interval = float(q.get("interval", "1"))
            count = int(q["count"]) if "count" in q else None
        except ValueError:
            raise AgentError(400, "interval must be a number and count an integer") from None
        if interval != interval:  # NaN
            raise AgentError(400, "interval must be a number")
        interval = min(60.0, max(MIN_STREAM_INTERVAL, interval))
        cols = q.get("columns", "1") not in ("0", "false")
        if streams["open"] >= MAX_STREAMS:
            raise AgentError(503, f"{MAX_STREAMS} metric streams are open already; close one or poll "
                                  "/v1/metrics", "busy")
        streams["open"] += 1

        async def gen():
            sent = 0
            try:
                while count is None or sent < count:
                    try:
                        snap = await run_in_threadpool(core.metrics, cols)
                        core.note_background("metrics_stream")
                    except Exception as exc:  # noqa: BLE001 - the stream says so and ends
                        core.note_background("metrics_stream", exc)
                        yield f"event: error\ndata: {json.dumps({'error': type(exc).__name__})}\n\n"
                        break
                    yield f"event: metrics\ndata: {web.dumps(snap).decode()}\n\n"
                    sent += 1
                    if count is not None and sent >= count:
                        break
                    await asyncio.sleep(interval)
                    if await request.is_disconnected():
                        break
            finally:
                streams["open"] -= 1

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/info", info, methods=["GET"]),
        Route("/v1/metrics", metrics, methods=["GET"]),
        Route("/v1/metrics/stream", stream, methods=["GET"]),
        Route("/v1/events", events, methods=["GET"]),
        Route("/v1/models/install", install, methods=["POST"]),
        Route("/v1/models/{name}", model_info, methods=["GET"]),
        Route("/v1/models/{name}", delete, methods=["DELETE"]),
        Route("/v1/models/{name}/install", install, methods=["POST"]),
        Route("/v1/models/{name}/activate", activate, methods=["POST"]),
        Route("/v1/models/{name}/rollback", rollback, methods=["POST"]),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: web.not_found_or_method})

    async def agent_app(scope, receive, send):
        """Predict calls skip Starlette's router and middleware stack (a fifth of a single-row
        request's CPU); ``predict`` answers every error itself, so nothing is lost. Everything else,
        and any path that does not look exactly like /v1/models/<name>/predict, goes to Starlette."""
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith("/v1/models/") and path.endswith("/predict"):
                name = path[11:-8]
                if name and "/" not in name:
                    scope["path_params"] = {"name": name}
                    response = await predict(Request(scope, receive))
                    await response(scope, receive, send)
                    return
        await app(scope, receive, send)

    return agent_app
