"""The agent's HTTP API (Starlette). See docs/DEVICE.md for every endpoint."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from device_bridge.agent import inputs as inp
from device_bridge.agent.core import AgentCore, AgentError

NPZ_TYPES = ("application/x-npz", "application/npz")
COLUMNS_TYPE = "application/x-mlsql-columns"
SMALL_BODY = 8 * 1024


def error(status: int, message: str, kind: str = "request") -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status_code=status)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON (send null for a missing value)")


def parse_json(body: bytes) -> Any:
    if not body:
        raise AgentError(400, "request body is empty; expected JSON")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise AgentError(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentError(400, f"malformed JSON: {exc}") from None


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


def create_app(core: AgentCore, token: str, auth_reads: bool = False):
    token_b = token.encode()
    max_body = core.config.max_body_bytes

    def authorized(request: Request) -> bool:
        h = request.headers.get("authorization", "")
        if not h.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(h[7:].strip().encode("utf-8", "replace"), token_b)

    def endpoint(mutating: bool):
        def deco(fn):
            @functools.wraps(fn)
            async def wrapper(request: Request):
                if (mutating or auth_reads) and not authorized(request):
                    return error(401, "missing or wrong device token (Authorization: Bearer <token>)", "auth")
                try:
                    return await fn(request)
                except AgentError as exc:
                    return error(exc.status, exc.message, exc.kind)
                except ClientDisconnect:
                    return error(400, "client disconnected")
                except Exception as exc:  # a bug: still a JSON answer, and the agent lives on
                    core.telemetry.event("internal_error", error=f"{type(exc).__name__}: {exc}"[:300])
                    return error(500, f"internal error: {type(exc).__name__}: {exc}", "internal")
            return wrapper
        return deco

    async def read_body(request: Request, limit: int) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            if not cl.isdigit():
                raise AgentError(400, "bad Content-Length")
            if int(cl) > limit:
                raise AgentError(413, f"request body of {cl} bytes is over the limit of {limit}", "too_large")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise AgentError(413, f"request body is over the limit of {limit} bytes", "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def name_of(request: Request) -> str:
        return request.path_params["name"]

    @endpoint(False)
    async def health(request):
        return JSONResponse({"ok": True, "name": core.config.name})

    @endpoint(False)
    async def info(request):
        return JSONResponse(await run_in_threadpool(core.info))

    @endpoint(False)
    async def model_info(request):
        name = name_of(request)
        data = core.info()["models"].get(name)
        if data is None:
            core._model(name)
        return JSONResponse({"name": name, **data})

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
            return JSONResponse(res)
        data = await read_body(request, core.config.max_package_bytes)
        if not data:
            raise AgentError(400, "request body is empty; send the package bytes", "package")
        res = await run_in_threadpool(
            core.install, name, data, _providers(q.get("providers")),
            _bool(q.get("strict_providers", "false"), "strict_providers"),
            _bool(q.get("activate", "true"), "activate"))
        return JSONResponse(res)

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
        return JSONResponse(res)

    @endpoint(True)
    async def rollback(request):
        await _json_body(request)
        return JSONResponse(await run_in_threadpool(core.rollback, name_of(request)))

    @endpoint(True)
    async def delete(request):
        v = request.query_params.get("version")
        version = _version(v) if v is not None else None
        return JSONResponse(await run_in_threadpool(core.delete, name_of(request), version))

    @endpoint(False)
    async def predict(request):
        name = name_of(request)
        v = request.query_params.get("version")
        version = _version(v) if v is not None else None
        lv = core.resolve(name, version)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, max_body)
        accept = request.headers.get("accept", "")
        answer = ("columns" if COLUMNS_TYPE in accept else
                  "npz" if any(t in accept for t in NPZ_TYPES) else None)

        def work():
            try:
                if ctype == COLUMNS_TYPE:
                    feed, n = inp.feed_from_columns(body, lv.specs, max_body)
                elif ctype in NPZ_TYPES:
                    feed, n = inp.feed_from_npz(body, lv.specs, max_body * 4)
                elif ctype in ("application/json", ""):
                    feed, n = inp.feed_from_json(parse_json(body), lv.specs)
                else:
                    raise AgentError(415, f"unsupported content type {ctype!r}: send application/json, "
                                          f"{COLUMNS_TYPE} or application/x-npz")
            except inp.InputError as exc:
                core.record_invalid(lv)
                raise AgentError(400, str(exc), "invalid_input") from None
            except AgentError:
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
        # batches go to the thread pool, where ORT runs them in parallel (it releases the GIL)
        out = work() if len(body) <= SMALL_BODY else await run_in_threadpool(work)
        if isinstance(out, tuple):
            return Response(out[1], media_type=COLUMNS_TYPE if out[0] == "columns" else "application/x-npz")
        return JSONResponse(out)

    @endpoint(False)
    async def metrics(request):
        cols = request.query_params.get("columns", "1") not in ("0", "false")
        return JSONResponse(await run_in_threadpool(core.metrics, cols))

    @endpoint(False)
    async def events(request):
        return JSONResponse({"events": list(core.telemetry.events)})

    @endpoint(False)
    async def stream(request):
        q = request.query_params
        try:
            interval = min(60.0, max(0.05, float(q.get("interval", "1"))))
            count = int(q["count"]) if "count" in q else None
        except ValueError:
            raise AgentError(400, "interval must be a number and count an integer") from None
        cols = q.get("columns", "1") not in ("0", "false")

        async def gen():
            sent = 0
            while count is None or sent < count:
                snap = await run_in_threadpool(core.metrics, cols)
                yield f"event: metrics\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n"
                sent += 1
                if count is not None and sent >= count:
                    break
                await asyncio.sleep(interval)
                if await request.is_disconnected():
                    break

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                     "not_found" if exc.status_code == 404 else "request")

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
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})

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
