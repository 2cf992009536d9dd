"""``POST /v1/models/{name}/predict``: read, check, queue, run, answer — with as little Python per
request as the job allows.

The request is a bare ASGI call (no Starlette Request or Response: a fifth of a single-row
request's CPU went there); its headers are read once from the scope, the body in one ``receive``
when it has arrived, and the answer is written once (web.py's transport joins head and body).

Path of a request, after the token, the model and the body are checked:

1. the scheduler (scheduler.py) starts it at once or queues it: 429 when the lane's queue is full,
   504 when its deadline (``timeout_ms`` after arrival) passes while it waits;
2. it runs where its deployment runs:
   - ``isolation = 'thread'``: a small request to a model whose runs take under 0.5 ms runs on the
     event loop (the hop to a thread would cost more than the run); anything else goes to its
     class's thread pool (runners.py) as one piece of work (parse, run, encode), with ONNX
     Runtime's ``RunOptions.terminate`` set at the deadline;
   - ``isolation = 'process'``: the checked arrays go to the model's worker process (workers.py),
     which stops the run at the deadline itself; the agent answers 504 on time whatever the
     worker does, and kills a worker whose run is still going long after (``max(1 s, 4 x
     timeout_ms)``);
3. the slot is given back when the run really ends (not when a 504 was answered), so a model that
   overruns keeps its share of the device, not more.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import random
import threading
import time
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from starlette.requests import ClientDisconnect

from device_bridge import web
from device_bridge.agent import features as feat_mod
from device_bridge.agent import inputs as inp
from device_bridge.agent.core import AgentCore, AgentError, LoadedVersion
from device_bridge.agent.runners import Pools, inbox
from device_bridge.agent.scheduler import DeadlineMissed, Overloaded
from device_bridge.errors import ApiError

log = logging.getLogger("device_bridge")

NPZ_TYPES = ("application/x-npz", "application/npz")
COLUMNS_TYPE = "application/x-mlsql-columns"
SMALL_BODY = 8 * 1024
# a columns body up to this size is checked (one frombuffer per column and a finiteness check) and
# sent to a worker on the event loop: about 0.1 ms for 320 kB, where a pool thread holding the
# interpreter lock, preempted by the kernel, made the loop (and realtime requests) wait milliseconds
LIGHT_COLUMNS_BODY = 1024 * 1024
INLINE_RUN_MS = 0.5        # in-process runs shorter than this (moving average) run on the event loop
BIG_ANSWER_ROWS = 4096     # answers with more rows are encoded in a thread (binary) ...
BIG_JSON_ANSWER_ROWS = 256  # ... (JSON, which costs a Python object per value)
DEADLINE_SLACK_S = 0.002   # a worker stops its own run at the deadline: its answer goes first
OVERRUN_MIN_S = 1.0        # a worker whose run is still going max(this, 4 x timeout) late is killed
_JSON = b"application/json"
MAX_REQUEST_ID = 128       # characters of one request id (a caller's)
MAX_REQUEST_PREFIX = 120   # characters of a caller's X-Request-Ids prefix (ids are <prefix>-<row>)
# generated request id prefixes: 16 random hex digits drawn once per process, then a count (16 hex
# digits): unique, and no getrandom() per request (a system call that lets the interpreter lock go,
# and so a pool thread in, on the event loop)
_ID_BASE = os.urandom(8).hex()
_ID_SEQ = itertools.count()


class Answer(NamedTuple):
    status: int
    ctype: bytes
    body: bytes
    headers: list[tuple[bytes, bytes]]


def error_answer(status: int, message: str, kind: str, headers: list | None = None, **extra) -> Answer:
    return Answer(status, _JSON, web.dumps({"error": message, "kind": kind, **extra}), headers or [])


class _Remote:
    """One run in a worker process, as the event loop follows it."""

    __slots__ = ("lv", "lane", "answer", "feed", "rows", "finished", "timed_out", "timer", "prefix", "ids")

    def __init__(self, lv: LoadedVersion, answer: asyncio.Future):
        self.lv = lv
        self.lane = lv.lane
        self.answer = answer
        self.feed: dict | None = None
        self.rows = 0
        self.finished = False
        self.timed_out = False
        self.timer: list | None = None
        self.prefix: str | None = None
        self.ids: list | None = None


class Predictor:
    def __init__(self, core: AgentCore, token_b: bytes, read_auth: bool, budget: web.BodyBudget, big_parses,
                 body_timeout: float, on_internal):
        import onnxruntime as ort

        self.core = core
        self.sched = core.scheduler
        self.reserve = core.reserve
        self.token_b = token_b
        self.read_auth = read_auth
        self.max_body = core.config.max_body_bytes
        # JSON costs about 20 bytes of Python objects per byte of body: its own, lower limit
        self.max_json = min(self.max_body, core.config.max_json_bytes)
        self.budget = budget
        self.big_parses = big_parses
        self.body_timeout = body_timeout
        self.on_internal = on_internal
        self.pools = Pools(max(4, 2 * core.cores))
        self.RunOptions = ort.RunOptions
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ ASGI

    async def asgi(self, scope: dict, receive, send, name: str) -> None:
        if self.loop is None:  # from now on worker answers are read by this loop
            self.loop = asyncio.get_running_loop()
            self.core.attach_loop(self.loop)
        ans = await self.handle(scope, receive, name)
        headers = [(b"content-type", ans.ctype), (b"content-length", b"%d" % len(ans.body)), *ans.headers]
        await send({"type": "http.response.start", "status": ans.status, "headers": headers})
        await send({"type": "http.response.body", "body": ans.body})

    async def handle(self, scope: dict, receive, name: str) -> Answer:
        try:
            return await self._predict(scope, receive, name)
        except Overloaded as exc:
            return error_answer(429, exc.message, exc.kind, [(b"retry-after", b"%d" % exc.retry_after)],
                                retry_after_s=exc.retry_after)
        except ApiError as exc:
            return error_answer(exc.status, exc.message, exc.kind)
        except ClientDisconnect:
            return error_answer(400, "client disconnected", "request")
        except Exception as exc:  # a bug: logged, still a JSON answer
            log.exception("internal error in POST %s", scope.get("path"))
            self.on_internal(exc)
            return error_answer(500, f"internal error: {type(exc).__name__}", "internal")
        finally:
            self.budget.release_scope(scope)

    # ------------------------------------------------------------------ the request

    async def _predict(self, scope: dict, receive, name: str) -> Answer:
        arrived = time.monotonic()
        auth = ctype = length = accept = rid = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
            elif k == b"accept":
                accept = v
            elif k == b"x-request-ids":
                rid = v
        if self.read_auth and not hmac.compare_digest(_bearer(auth), self.token_b):
            return error_answer(401, "missing or wrong token (Authorization: Bearer <token>)", "auth")
        version = None
        if scope.get("query_string"):
            q = parse_qs(scope["query_string"].decode("latin-1"))
            if "version" in q:
                version = _version(q["version"][-1])
            if "at" in q:  # a model with feature views: the time its features are read as of
                rid = (rid, q["at"][-1])
        core = self.core
        if version is None and core.experiments:  # an experiment's arm (device_bridge/experiments.py)
            version = core.experiment_version(name, rid)
        lv = core.resolve(name, version)
        ctype_s = ctype.decode("latin-1").split(";")[0].strip().lower() if ctype else ""
        is_json = ctype_s in ("application/json", "")
        if not is_json and ctype_s != COLUMNS_TYPE and ctype_s not in NPZ_TYPES:
            core.record_invalid(lv)
            raise AgentError(415, f"unsupported content type {ctype_s!r}: send application/json, "
                                  f"{COLUMNS_TYPE} or application/x-npz", "content_type")
        body = await web.read_body_asgi(scope, receive, length, self.max_json if is_json else self.max_body,
                                        self.body_timeout, self.budget)
        if version is None and core.experiments:
            e = core.column_unit(name)
            if e is not None:  # by an input column: the rows' arm, from the body read with the control's inputs
                feed, _n, _p, _ids = self._parse(lv, body, ctype_s, rid)
                lv = core.resolve(name, core.column_version(e, feed))
        accept_s = accept.decode("latin-1") if accept else ""
        answer = ("columns" if COLUMNS_TYPE in accept_s else
                  "npz" if any(t in accept_s for t in NPZ_TYPES) else None)
        small = len(body) <= SMALL_BODY and ctype_s not in NPZ_TYPES
        # a columns body is read with one frombuffer per column: cheaper than a hop to a thread
        light = small or (ctype_s == COLUMNS_TYPE and len(body) <= LIGHT_COLUMNS_BODY)
        lane = lv.lane
        if lane.cls == "realtime" and self.reserve.enabled:
            self.reserve.note(arrived, self.sched.timers)
        deadline = arrived + lv.deploy.timeout_ms / 1000.0
        if not self.sched.try_start(lane):
            try:
                await self.sched.start(lane, deadline, arrived)
            except DeadlineMissed:
                core.note_deadline(lv)
                raise
        elif time.monotonic() > deadline:  # its body took the whole deadline to arrive
            self.sched.done(lane)
            lane.stats.deadline_queue += 1
            core.note_deadline(lv)
            raise DeadlineMissed(lane, "queue", lv.deploy.timeout_ms)
        if lv.worker is not None:
            return await self._remote(lv, body, ctype_s, answer, deadline, light, rid)
        if small and lane.run_ms < INLINE_RUN_MS and lane.cls != "batch":
            try:
                return self._work(lv, body, ctype_s, answer, None, rid)
            finally:
                self.sched.done(lane)
        return await self._threaded(lv, body, ctype_s, answer, deadline, light, rid)

    # ------------------------------------------------------------------ in this process

    def _parse(self, lv: LoadedVersion, body: bytes, ctype: str, rid: bytes | None
               ) -> tuple[dict, int, str | None, list | None]:
        """The feed, its rows, and the caller's request ids: a prefix (X-Request-Ids) or one id per row
        (the JSON body's ``request_ids``, or a comma-separated X-Request-Ids); None, None when none."""
        body_ids = None
        at_q = at_body = None
        if isinstance(rid, tuple):
            rid, at_q = rid
        specs = lv.request_specs or lv.specs
        try:
            if ctype == COLUMNS_TYPE:
                feed, n = inp.feed_from_columns(body, specs, self.max_body)
            elif ctype in NPZ_TYPES:
                feed, n = inp.feed_from_npz(body, specs, self.max_body, self.big_parses)
            else:
                # each row is at least one object (rows) or each vector value one list (columns)
                max_containers = inp.MAX_ROWS * (len(lv.specs) + 1) + 16
                if len(body) > inp.BIG_PARSE:
                    with self.big_parses:
                        payload = web.parse_json(body, max_containers, check_floats=False)
                else:
                    payload = web.parse_json(body, max_containers, check_floats=False)
                if isinstance(payload, dict) and "request_ids" in payload:
                    body_ids = payload.pop("request_ids")
                    if body_ids is None:
                        raise inp.InputError("request_ids must be a list of strings, one per row")
                if lv.binding is not None and isinstance(payload, dict):
                    _refuse_features(lv, payload)
                    at_body = payload.pop("at", None)
                feed, n = inp.feed_from_json(payload, specs)
            if lv.binding is not None:
                if at_body is not None and at_q is not None:
                    raise inp.InputError("at: give it in the body or in the query, not both")
                at = (feat_mod.parse_at(at_body, n) if at_body is not None else
                      feat_mod.parse_at_text(at_q, n) if at_q is not None else feat_mod.parse_at(None, n))
                feed = lv.binding.fill(self.core.features, feed, n, at, lv.input_names)
            prefix, ids = _request_ids(rid, body_ids, n)
            return feed, n, prefix, ids
        except inp.LimitError as exc:
            self.core.record_invalid(lv)
            raise AgentError(413, str(exc), "too_large") from None
        except inp.InputError as exc:
            self.core.record_invalid(lv)
            raise AgentError(400, str(exc), "invalid_input") from None
        except ApiError:
            self.core.record_invalid(lv)
            raise

    def _encode(self, lv: LoadedVersion, feed: dict, values, n: int, ms: float, answer: str | None,
                jsoned: dict | None, prefix: str | None, ids: list | None) -> Answer:
        """The answer, with its request ids; a sampled request's rows go to the sample store here
        (an append of references: the store's writer thread builds and writes the rows)."""
        if ids is None and prefix is None:
            prefix = f"{_ID_BASE}{next(_ID_SEQ):016x}"
        spec = lv.sampling
        if spec is not None and (spec.rate >= 1.0 or random.random() < spec.rate):
            self.core.samples.offer(spec, time.time(), ms, n, feed, values, jsoned, prefix, ids)
        result = self.core.result(lv, values, n, ms, raw=answer is not None, jsoned=jsoned)
        if answer is not None:
            data = inp.outputs_to_columns(result) if answer == "columns" else inp.outputs_to_npz(result)
            if data is not None:
                hdr = prefix if ids is None else ",".join(ids)
                return Answer(200, COLUMNS_TYPE.encode() if answer == "columns" else b"application/x-npz", data,
                              [(b"x-request-ids", hdr.encode("utf-8"))])
            result["outputs"] = inp.outputs_to_json(list(result["outputs"]), list(result["outputs"].values()))
        result["request_ids"] = ids if ids is not None else [f"{prefix}-{i}" for i in range(n)]
        return Answer(200, _JSON, web.dumps(result), [])

    def _work(self, lv: LoadedVersion, body: bytes, ctype: str, answer: str | None, ro, rid) -> Answer:
        feed, n, prefix, ids = self._parse(lv, body, ctype, rid)
        values, ms = self.core.run_local(lv, feed, n, ro)
        return self._encode(lv, feed, values, n, ms, answer, None, prefix, ids)

    async def _threaded(self, lv: LoadedVersion, body: bytes, ctype: str, answer: str | None,
                        deadline: float, light: bool, rid: bytes | None) -> Answer:
        """A run in the class's pool. A light body is parsed, and its answer encoded, here on the event
        loop: the Python work of a request stays on one thread, whose caches hold it (in a pool thread
        that just woke on the other core, parsing and encoding a 256-row batch took 4 to 5 times as
        long); only the run itself goes to the pool."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        lane = lv.lane
        ro = self.RunOptions()
        if light:
            try:
                feed, n, prefix, ids = self._parse(lv, body, ctype, rid)
            except BaseException:
                self.sched.done(lane)
                raise

            run_only = self.core.run_only

            def work():
                return run_only(lv, feed, ro)
        else:
            def work():
                return self._work(lv, body, ctype, answer, ro, rid)

        def finished(ok: bool, value: Any) -> None:
            self.sched.done(lane)
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        def late() -> None:  # the run did not stop at the flag (one long kernel): answer on time anyway
            if not fut.done():
                fut.set_exception(DeadlineMissed(lane, "run", lv.deploy.timeout_ms))

        def at_deadline() -> None:
            ro.terminate = True
            loop.call_later(DEADLINE_SLACK_S, late)

        timer = self.sched.timers.add(deadline, at_deadline)
        self.pools[lane.cls].submit(work, finished)
        try:
            out = await fut
        finally:
            self.sched.timers.cancel(timer)
        if not light:
            return out
        values, ms, cpu_ms = out
        self.core.after_run(lv, feed, n, ms, cpu_ms)
        if n > (BIG_ANSWER_ROWS if answer else BIG_JSON_ANSWER_ROWS):
            return await self.pools["io"].run(lambda: self._encode(lv, feed, values, n, ms, answer, None, prefix, ids))
        return self._encode(lv, feed, values, n, ms, answer, None, prefix, ids)

    # ------------------------------------------------------------------ in a worker process

    async def _remote(self, lv: LoadedVersion, body: bytes, ctype: str, answer: str | None, deadline: float,
                      light: bool, rid: bytes | None) -> Answer:
        loop = asyncio.get_running_loop()
        call = _Remote(lv, loop.create_future())
        timeout_s = lv.deploy.timeout_ms / 1000.0

        box = inbox(loop)
        loop_thread = threading.get_ident()

        def reply(header: dict, arrays: dict) -> None:  # on the event loop, or a worker's reading thread
            if threading.get_ident() == loop_thread:
                self._on_reply(call, header, arrays)
            else:
                box.post(self._on_reply, call, header, arrays)

        def send() -> None:
            call.feed, call.rows, call.prefix, call.ids = self._parse(lv, body, ctype, rid)
            remaining = max(0.001, min(timeout_s, deadline - time.monotonic()))
            lv.worker.submit({"op": "run", "rows": call.rows, "timeout_s": remaining}, call.feed, reply)

        try:
            if light:
                send()
            else:  # a big body is parsed and written to the socket in a thread
                await self.pools["io"].run(send)
        except BaseException as exc:
            self.sched.done(lv.lane)
            if isinstance(exc, ApiError) and exc.kind in ("worker", "memory"):
                self.core.note_error(lv, exc.kind)  # refused while its worker restarts
            raise
        call.timer = self.sched.timers.add(deadline + DEADLINE_SLACK_S, lambda: self._on_deadline(call))
        feed = call.feed  # _on_reply lets go of it
        values, ms, jsoned = await call.answer
        if call.rows > (BIG_ANSWER_ROWS if answer else BIG_JSON_ANSWER_ROWS):
            return await self.pools["io"].run(lambda: self._encode(lv, feed, values, call.rows, ms, answer, jsoned,
                                                                   call.prefix, call.ids))
        return self._encode(lv, feed, values, call.rows, ms, answer, jsoned, call.prefix, call.ids)

    def _on_reply(self, call: _Remote, header: dict, arrays: dict) -> None:
        if call.finished:
            return
        call.finished = True
        self.sched.done(call.lane)
        self.sched.timers.cancel(call.timer)
        lv = call.lv
        if call.timed_out:  # answered 504 already: only what the breaker must know
            if header.get("error") == "deadline" and header.get("counts"):
                self.core._count_failure(lv, background=True)
            return
        out = self.core.remote_outcome(lv, header, arrays, call.rows, call.feed, background=True)
        call.feed = None
        if call.answer.done():
            return
        if isinstance(out, Exception):
            call.answer.set_exception(out)
        else:
            call.answer.set_result(out)

    def _on_deadline(self, call: _Remote) -> None:
        if call.finished or call.answer.done():
            return
        lv = call.lv
        call.timed_out = True
        lv.lane.stats.deadline_run += 1
        self.core.note_deadline(lv)
        call.answer.set_exception(DeadlineMissed(lv.lane, "run", lv.deploy.timeout_ms))
        grace = max(OVERRUN_MIN_S, 4 * lv.deploy.timeout_ms / 1000.0)

        def overran() -> None:
            if not call.finished and lv.worker is not None:
                lv.worker.kill(f"was killed: a run was still going {grace:g} s after its deadline of "
                               f"{lv.deploy.timeout_ms} ms (timeout_ms)")

        self.sched.timers.add(time.monotonic() + grace, overran)


def _bearer(h: bytes | None) -> bytes:
    if h is None or h[:7].lower() != b"bearer ":
        return b"\0"  # never equal to a token (tokens are text)
    return h[7:].strip()


def _refuse_features(lv: LoadedVersion, payload: dict) -> None:
    """A request that sends a column the agent fills in from a feature view is refused: two sources
    for one input would hide skew (docs/DEVICE.md)."""
    sent = set()
    if isinstance(payload.get("columns"), dict):
        sent = set(payload["columns"])
    elif isinstance(payload.get("rows"), list) and payload["rows"] and isinstance(payload["rows"][0], dict):
        sent = set(payload["rows"][0])
    both = sorted(sent & lv.binding.names)
    if both:
        view = next(v for s, v, _ in lv.binding.fills if s.name == both[0])
        raise inp.InputError(f"{both[0]}: this input is filled in from feature view {view} on the device; "
                             "do not send it (send the key column and, optionally, at)")


def _request_ids(header: bytes | None, body_ids: Any, n: int) -> tuple[str | None, list | None]:
    """The caller's request ids, checked: (prefix, None), (None, one id per row) or (None, None)."""
    if body_ids is not None:
        if header is not None:
            raise inp.InputError("request_ids: give them in the body or in the X-Request-Ids header, not both")
        if not isinstance(body_ids, list) or len(body_ids) != n:
            raise inp.InputError(f"request_ids must be a list of {n} strings, one per row")
        for i, r in enumerate(body_ids):
            if not isinstance(r, str) or not 0 < len(r) <= MAX_REQUEST_ID:
                raise inp.InputError(f"request_ids[{i}] must be a string of 1 to {MAX_REQUEST_ID} characters")
        return None, body_ids
    if header is None:
        return None, None
    try:
        h = header.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise inp.InputError("X-Request-Ids must be UTF-8 text") from None
    if "," in h:
        ids = [r.strip() for r in h.split(",")]
        if len(ids) != n or not all(0 < len(r) <= MAX_REQUEST_ID for r in ids):
            raise inp.InputError(f"X-Request-Ids holds {len(ids)} comma-separated ids; the request has {n} rows "
                                 f"(or give one prefix: ids are <prefix>-<row>), each 1 to {MAX_REQUEST_ID} characters")
        return None, ids
    if not 0 < len(h) <= MAX_REQUEST_PREFIX:
        raise inp.InputError(f"X-Request-Ids must be a prefix of 1 to {MAX_REQUEST_PREFIX} characters")
    return h, None


def _version(v: Any) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
        raise AgentError(400, f"version must be a positive integer, got {v!r}")
    return v

