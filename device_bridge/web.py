"""HTTP plumbing shared by the agent and the hub: auth, bounded body reading, JSON answers,
error answers with a ``kind``, and a uvicorn server that drops stalled connections.

Written once so that both servers refuse the same way: every error is
``{"error": message, "kind": kind}`` (see device_bridge.errors), every body is read
under a size limit, a deadline and a shared in-flight byte budget, and every JSON
answer is valid JSON even if a number went non-finite somewhere.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import re
import time
import weakref
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from device_bridge.errors import ApiError

log = logging.getLogger("device_bridge")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    """Strict JSON; a non-finite float becomes null instead of making the answer invalid (or a 500)."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False).encode()


class JSONAnswer(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error(status: int, message: str, kind: str = "request") -> JSONAnswer:
    return JSONAnswer({"error": message, "kind": kind}, status_code=status)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON (send null for a missing value)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range for a 64-bit float")
    return v


def _null(_text: str) -> None:
    return None


def _finite_or_null(text: str) -> float | None:
    v = float(text)
    return v if math.isfinite(v) else None


_MAY_OVERFLOW = re.compile(rb"[eE]\+?\d{3}|\d{300}")


def parse_json(body: bytes, max_containers: int | None = None, nonfinite_as_null: bool = False,
               check_floats: bool = True) -> Any:
    """JSON without NaN/Infinity literals or out-of-range numbers; ``max_containers`` bounds the
    objects and arrays the body may build, counted on the bytes before any Python object exists
    (a string holding '{' only makes the count an over-estimate)."""
    if not body:
        raise ApiError(400, "request body is empty; expected JSON")
    if max_containers is not None:
        n = body.count(b"{") + body.count(b"[")
        if n > max_containers:
            raise ApiError(413, f"JSON body holds about {n} objects/arrays, over the limit of {max_containers} "
                                "for this request (send fewer rows, or a binary batch)", "too_large")
    # a float can only overflow to inf with a 3-digit exponent or 300 digits in a row: only then
    # is every float checked by a callback (which costs a Python call per number)
    may_overflow = check_floats and _MAY_OVERFLOW.search(body) is not None
    try:
        if nonfinite_as_null:  # reports from older agents: keep the data, drop what JSON cannot hold
            if may_overflow:
                return json.loads(body, parse_constant=_null, parse_float=_finite_or_null)
            return json.loads(body, parse_constant=_null)
        if may_overflow:
            return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {str(exc)[:200]}") from None


def bearer(request: Request) -> bytes | None:
    """The bearer token of the request, or None."""
    h = request.headers.get("authorization", "")
    if not h.lower().startswith("bearer "):
        return None
    return h[7:].strip().encode("utf-8", "replace")


def bearer_ok(request: Request, token_b: bytes) -> bool:
    tok = bearer(request)
    return tok is not None and hmac.compare_digest(tok, token_b)


class BodyBudget:
    """Bytes of request bodies buffered at once, across all requests of one server. Over the
    budget a request gets 503 ``busy`` instead of memory: the event loop is single-threaded, so
    plain integers need no lock."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    def take(self, request: Request, n: int) -> None:
        self.take_scope(request.scope, n)

    def release(self, request: Request) -> None:
        self.release_scope(request.scope)

    def take_scope(self, scope: dict, n: int) -> None:
        if self.used + n > self.total:
            raise ApiError(503, "too many large requests in flight; retry shortly", "busy")
        self.used += n
        scope["mlsql.held"] = scope.get("mlsql.held", 0) + n

    def release_scope(self, scope: dict) -> None:
        self.used -= scope.pop("mlsql.held", 0)


class _BodyWatch:
    """The deadlines of the body reads in progress on one event loop, checked by one recurring
    sweep (every quarter of the shortest deadline, at most a second) that cancels the reads that
    are late. Adding and removing a read is a dict operation; no timer per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.reads: dict[asyncio.Task, float] = {}
        self.late: set[asyncio.Task] = set()
        self.tick = 1.0
        self.handle: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task, deadline_s: float) -> None:
        self.reads[task] = time.monotonic() + deadline_s
        if deadline_s / 4 < self.tick:
            self.tick = max(deadline_s / 4, 0.01)
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
        if self.handle is None:
            self.handle = self.loop.call_later(self.tick, self._sweep)

    def discard(self, task: asyncio.Task) -> None:
        self.reads.pop(task, None)
        self.late.discard(task)

    def expired(self, task: asyncio.Task) -> bool:
        """Was ``task`` cancelled by this watch? Then its cancellation is consumed (a 408, not a
        cancelled request)."""
        if task not in self.late:
            return False
        if hasattr(task, "uncancel"):  # Python 3.11+
            task.uncancel()
        return True

    def _sweep(self) -> None:
        self.handle = None
        now = time.monotonic()
        for task, deadline in list(self.reads.items()):
            if deadline <= now and task not in self.late:
                self.late.add(task)
                task.cancel()
        if self.reads:
            self.handle = self.loop.call_later(self.tick, self._sweep)


_watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _body_watch() -> _BodyWatch:
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _BodyWatch(loop)
    return watch


async def read_body(request: Request, limit: int, deadline_s: float, budget: BodyBudget | None = None) -> bytes:
    """The whole body: at most ``limit`` bytes, within ``deadline_s`` seconds from now (a client
    that sends half a body and stalls gets 408, not a connection held forever)."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit() or len(cl) > 18:
            raise ApiError(400, "bad Content-Length")
        if int(cl) > limit:
            raise ApiError(413, f"request body of {cl} bytes is over the limit of {limit}", "too_large")
    chunks: list[bytes] = []

    async def receive_all() -> None:
        size = 0
        async for chunk in request.stream():
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", "too_large")
            if budget is not None:
                budget.take(request, len(chunk))
            chunks.append(chunk)

    # one deadline for the whole body, enforced by a sweep shared by all requests of this event
    # loop: a timer per request (asyncio.timeout) cost a tenth of a single-row prediction
    watch = _body_watch()
    task = asyncio.current_task()
    watch.add(task, deadline_s)
    try:
        await receive_all()
    except asyncio.CancelledError:
        if not watch.expired(task):
            raise
        raise ApiError(408, f"request body not received within {deadline_s:g} s", "timeout") from None
    finally:
        watch.discard(task)
    return b"".join(chunks)


async def read_body_asgi(scope: dict, receive, content_length: bytes | None, limit: int, deadline_s: float,
                         budget: BodyBudget | None = None) -> bytes:
    """read_body() for a bare ASGI handler (the predict path, which skips Starlette's Request)."""
    if content_length is not None:
        if not content_length.isdigit() or len(content_length) > 18:
            raise ApiError(400, "bad Content-Length")
        if int(content_length) > limit:
            raise ApiError(413, f"request body of {int(content_length)} bytes is over the limit of {limit}",
                           "too_large")
    watch = _body_watch()
    task = asyncio.current_task()
    watch.add(task, deadline_s)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise ClientDisconnect()
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is over the limit of {limit} bytes", "too_large")
                if budget is not None:
                    budget.take_scope(scope, len(chunk))
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
    except asyncio.CancelledError:
        if not watch.expired(task):
            raise
        raise ApiError(408, f"request body not received within {deadline_s:g} s", "timeout") from None
    finally:
        watch.discard(task)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def endpoint_factory(token_b: bytes, on_internal=None, budget: BodyBudget | None = None):
    """``endpoint(auth)``: a decorator that checks the bearer token when ``auth`` is True (or calls
    ``auth(request)``, which raises ApiError to refuse, when it is a function), answers ApiError as
    ``{"error", "kind"}``, any other exception as a logged 500 (the server lives on), and gives back
    the request's share of the body budget."""

    def endpoint(auth):
        def deco(fn):
            @functools.wraps(fn)
            async def wrapper(request: Request):
                if auth is True and not bearer_ok(request, token_b):
                    return error(401, "missing or wrong token (Authorization: Bearer <token>)", "auth")
                try:
                    if callable(auth):
                        auth(request)
                    return await fn(request)
                except ApiError as exc:
                    return error(exc.status, exc.message, exc.kind)
                except ClientDisconnect:
                    return error(400, "client disconnected")
                except Exception as exc:  # a bug: logged, still a JSON answer
                    log.exception("internal error in %s %s", request.method, request.url.path)
                    if on_internal is not None:
                        on_internal(exc)
                    return error(500, f"internal error: {type(exc).__name__}", "internal")
                finally:
                    if budget is not None:
                        budget.release(request)
            return wrapper
        return deco

    return endpoint


async def not_found_or_method(request: Request, exc) -> JSONAnswer:
    status = exc.status_code
    kind = {404: "not_found", 405: "method"}.get(status, "request")
    return error(status, f"{exc.detail}: {request.method} {request.url.path}", kind)


class _Coalescing:
    """A transport whose writes of one event-loop turn go out together: uvicorn writes a response's
    status line and headers, then its body, as two writes (two sends, two TCP segments with
    TCP_NODELAY); here they leave as one."""

    __slots__ = ("_t", "_loop", "_buf")
    _JOIN_MAX = 256 * 1024  # above: no copy into one buffer, the writes go as they are

    def __init__(self, transport, loop):
        self._t = transport
        self._loop = loop
        self._buf: list | None = None

    def write(self, data) -> None:
        if self._buf is None:
            self._buf = [data]
            self._loop.call_soon(self._flush)
        else:
            self._buf.append(data)

    def _flush(self) -> None:
        buf, self._buf = self._buf, None
        if not buf or self._t.is_closing():
            return
        if len(buf) == 1:
            self._t.write(buf[0])
        elif sum(len(b) for b in buf) <= self._JOIN_MAX:
            self._t.write(b"".join(buf))
        else:
            for b in buf:
                self._t.write(b)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def __getattr__(self, name):
        return getattr(self._t, name)


def _guarded(base: type, idle_s: float) -> type:
    """A uvicorn protocol class that closes a connection which, for ``idle_s`` seconds and more,
    neither runs a request nor completes the headers of a new one. uvicorn arms its keep-alive
    timer only after a response and cancels it on any byte received, so a client that sends half
    a request line (or half the headers) would otherwise hold the connection forever."""

    class Guarded(base):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _Coalescing(self.transport, self.loop)  # what the request cycles write to
            self._seen_cycle = None
            self._guard = self.loop.call_later(idle_s, self._guard_check)

        def _guard_check(self) -> None:
            cycle = getattr(self, "cycle", None)
            busy = cycle is not None and not cycle.response_complete
            if not busy and cycle is self._seen_cycle:
                if not self.transport.is_closing():
                    self.transport.close()
                return
            self._seen_cycle = cycle
            self._guard = self.loop.call_later(idle_s, self._guard_check)

        def connection_lost(self, exc) -> None:
            guard = getattr(self, "_guard", None)
            if guard is not None:
                guard.cancel()
            super().connection_lost(exc)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def server_config(app, *, tls_cert=None, tls_key=None, request_timeout: float = 15.0):
    import uvicorn

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    # proxy_headers off: nothing here reads the client's address, and uvicorn's middleware for
    # X-Forwarded-For is one more layer on every request (a hub's poll cycle, an agent's predict)
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                          ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                          http=_guarded(base, request_timeout),
                          timeout_keep_alive=max(1, int(request_timeout)),
                          h11_max_incomplete_event_size=64 * 1024)
