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
from device_bridge.agent import deploy as deploy_mod
from device_bridge.agent import inputs as inp
from device_bridge.agent.core import READ_YOUR_WRITES_S, AgentCore, AgentError
from device_bridge.agent.predict import COLUMNS_TYPE, Predictor
from device_bridge.web import JSONAnswer, parse_json

BIG_PARSE = inp.BIG_PARSE    # bodies (or .npz contents) over this are parsed under a semaphore ...
BIG_PARSES_AT_ONCE = 2       # ... so that a few large requests cannot multiply their memory
MAX_STREAMS = 8              # concurrent /v1/metrics/stream answers
MIN_STREAM_INTERVAL = 0.25   # seconds: a snapshot costs a pass over every version's statistics
MAX_OUTCOMES = 10_000        # outcomes in one POST /v1/models/{name}/outcomes ...
MAX_OUTCOMES_BODY = 1 << 20  # ... and its bytes
MAX_SAMPLE_ROWS = 1_000_000  # rows one GET /v1/samples answers at most


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


def _batch_id(v: Any) -> str | None:
    """POST /v1/events' optional batch id (a retry with the same id is applied once)."""
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= 128:
        raise AgentError(400, "batch_id must be a string of 1 to 128 characters", "invalid_input")
    return v


def check_outcomes(body: Any) -> list[tuple[str, str]]:
    """POST /v1/models/{name}/outcomes's body -> [(request_id, label as JSON text)]; a bad one is a 400
    naming the field (and nothing is recorded: the route checks everything before it writes)."""
    if not isinstance(body, dict) or set(body) != {"outcomes"}:
        raise AgentError(400, 'outcomes: the body must be {"outcomes": [{"request_id": ..., "label": ...}]}',
                         "request")
    items = body["outcomes"]
    if not isinstance(items, list):
        raise AgentError(400, "outcomes must be a list of {request_id, label} objects", "request")
    if len(items) > MAX_OUTCOMES:
        raise AgentError(413, f"outcomes: {len(items)} outcomes, over the limit of {MAX_OUTCOMES} per request",
                         "too_large")
    out = []
    for i, o in enumerate(items):
        if not isinstance(o, dict):
            raise AgentError(400, f"outcomes[{i}] must be an object with request_id and label", "request")
        extra = sorted(set(map(str, o)) - {"request_id", "label"})
        if extra:
            raise AgentError(400, f"outcomes[{i}].{extra[0]}: unknown field (an outcome has request_id and label)",
                             "request")
        rid = o.get("request_id")
        if not isinstance(rid, str) or not 0 < len(rid) <= 128:
            raise AgentError(400, f"outcomes[{i}].request_id must be a string of 1 to 128 characters", "request")
        if "label" not in o:
            raise AgentError(400, f"outcomes[{i}].label is missing", "request")
        label = o["label"]
        if label is None or not isinstance(label, str | int | float | bool):
            raise AgentError(400, f"outcomes[{i}].label must be a JSON scalar (string, number or boolean)", "request")
        if isinstance(label, str) and len(label) > 4096:
            raise AgentError(400, f"outcomes[{i}].label: a string label has at most 4096 characters", "request")
        out.append((rid, json.dumps(label, ensure_ascii=False, allow_nan=False)))
    return out


def create_app(core: AgentCore, token: str, open_reads: bool = False, request_timeout: float = 15.0,
               body_timeout: float = 60.0):
    """``open_reads``: info, metrics, events and predict without the token (health is always open;
    installs, activation, rollback and deletion always need it)."""
    token_b = token.encode()
    max_body = core.config.max_body_bytes
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
            extra = set(body) - {"url", "sha256", "providers", "strict_providers", "activate", "token",
                                 *deploy_mod.FIELDS}
            if extra or "url" not in body:
                raise AgentError(400, 'install JSON takes "url" (and optional "sha256", "providers", '
                                      f'"strict_providers", "activate", {", ".join(map(repr, deploy_mod.FIELDS))}); '
                                      f'got {sorted(body)}')
            sha = body.get("sha256")
            if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
                raise AgentError(400, "sha256 must be 64 hex digits")
            tok = body.get("token")
            if tok is not None and not isinstance(tok, str):
                raise AgentError(400, "token must be a string")
            res = await run_in_threadpool(
                core.install_from_url, name, body["url"], sha, _providers(body.get("providers")),
                _bool(body.get("strict_providers", False), "strict_providers"),
                _bool(body.get("activate", True), "activate"), tok,
                deploy_mod.parse({k: body[k] for k in deploy_mod.FIELDS if k in body}))
            return JSONAnswer(res)
        data = await read_body(request, core.config.max_package_bytes)
        if not data:
            raise AgentError(400, "request body is empty; send the package bytes", "package")
        res = await run_in_threadpool(
            core.install, name, data, _providers(q.get("providers")),
            _bool(q.get("strict_providers", "false"), "strict_providers"),
            _bool(q.get("activate", "true"), "activate"), None, deploy_mod.from_query(q))
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
        extra = set(body) - {"version", "providers", "strict_providers", *deploy_mod.FIELDS}
        if extra:
            raise AgentError(400, f"unknown field {sorted(extra)[0]!r} in activate: it takes version, providers, "
                                  f"strict_providers and the deploy settings {', '.join(deploy_mod.FIELDS)}")
        res = await run_in_threadpool(core.activate, name_of(request), _version(body["version"]),
                                      _providers(body.get("providers")),
                                      _bool(body.get("strict_providers", False), "strict_providers"),
                                      "activate", deploy_mod.parse({k: body[k] for k in deploy_mod.FIELDS if k in body}))
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

    predictor = Predictor(core, token_b, read_auth, budget, big_parses, body_timeout, internal)

    async def predict(request):
        """The Starlette route (a path the fast path below does not take); the same handler."""
        ans = await predictor.handle(request.scope, request.receive, name_of(request))
        return Response(ans.body, status_code=ans.status, headers={k.decode(): v.decode() for k, v in ans.headers},
                        media_type=ans.ctype.decode())

    @endpoint(True)
    async def experiment(request):
        """PUT: start an experiment on the model ({id, unit, arms: [{version, share}]}); DELETE: stop it."""
        name = name_of(request)
        if request.method == "DELETE":
            return JSONAnswer(await run_in_threadpool(core.clear_experiment, name))
        body = await _json_body(request, 16 * 1024)
        return JSONAnswer(await run_in_threadpool(core.set_experiment, name, body))

    @endpoint(True)
    async def outcomes(request):
        name = name_of(request)
        core._model(name)
        raw = await read_body(request, MAX_OUTCOMES_BODY)
        checked = check_outcomes(parse_json(raw))
        return JSONAnswer(await run_in_threadpool(core.record_outcomes, name, checked))

    @endpoint(True)  # the token always: a profile takes the device's cores for a while
    async def profile(request):
        from device_bridge.agent.profile import check_body, run_profile

        name = name_of(request)
        settings = check_body(await _json_body(request))
        core._model(name)
        return JSONAnswer(await run_in_threadpool(run_profile, core, name, settings))

    @endpoint(True)  # the token always, even with --open-reads: samples are the callers' data
    async def samples(request):
        q = request.query_params
        extra = sorted(set(q) - {"model", "kind", "since", "max_rows"})
        if extra:
            raise AgentError(400, f"unknown parameter {extra[0]!r}: /v1/samples takes model, kind, since, max_rows")
        model = q.get("model")
        if not model:
            raise AgentError(400, "model: name the model (/v1/samples?model=NAME)")
        kind = q.get("kind", "samples")
        if kind not in ("samples", "outcomes"):
            raise AgentError(400, f"kind must be samples or outcomes, got {kind!r}")
        try:
            since = int(q.get("since", "0"))
            max_rows = int(q.get("max_rows", "100000"))
        except ValueError:
            raise AgentError(400, "since (a cursor) and max_rows must be integers") from None
        if not 0 <= since < 2**62 or not 1 <= max_rows <= MAX_SAMPLE_ROWS:
            raise AgentError(400, f"since must be 0 or more and max_rows from 1 to {MAX_SAMPLE_ROWS}")
        core._model(model)

        def read():
            from device_bridge.agent.sampling import ipc_bytes

            if core.samples is None:
                return None, since
            core.samples.flush(READ_YOUR_WRITES_S)  # rows answered before this call are in the answer
            table, last = core.samples.read(model, kind, since, max_rows)
            return (ipc_bytes(table) if table is not None else None), last

        data, last = await run_in_threadpool(read)
        if data is None:
            data = await run_in_threadpool(_empty_stream, kind)
        return Response(data, media_type="application/vnd.apache.arrow.stream",
                        headers={"X-Next-Cursor": str(last)})

    @endpoint(read_auth)
    async def post_events(request):
        """The app's events for the device's feature views (features.py): all applied, or none."""
        from device_bridge.agent import features as feat

        fs = core.features
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = ctype in ("application/json", "")
        if not is_json and ctype != COLUMNS_TYPE:
            raise AgentError(415, f"unsupported content type {ctype!r}: send application/json or {COLUMNS_TYPE}",
                             "content_type")
        raw = await read_body(request, min(max_body, core.config.max_json_bytes) if is_json else max_body)
        table_q = request.query_params.get("table")
        if fs is None:
            raise AgentError(404, f"table: unknown event table {table_q or ''!r}: no feature view is installed "
                                  "on this device", "not_found")

        def work():
            if is_json:
                # floats are checked per column (a non-finite value is refused naming it), not per number here
                body = parse_json(raw, 2 * feat.MAX_EVENT_ROWS + 16, check_floats=False)
                if not isinstance(body, dict) or not {"table", "rows"} <= set(body) <= {"table", "rows", "batch_id"}:
                    raise AgentError(400, 'events: the body must be {"table": NAME, "rows": [{column: value}, ...], '
                                          '"batch_id"?: ID}', "invalid_input")
                table, rows = body["table"], body["rows"]
                batch_id = _batch_id(body.get("batch_id"))
                if not isinstance(table, str):
                    raise AgentError(400, "table must be the event table's name", "invalid_input")
                if not isinstance(rows, list) or not rows:
                    raise AgentError(400, "rows must be a non-empty list of events", "invalid_input")
                if len(rows) > feat.MAX_EVENT_ROWS:
                    raise AgentError(413, f"rows: {len(rows)} events, over the limit of {feat.MAX_EVENT_ROWS} per "
                                          "request", "too_large")
                return fs.ingest(table, lambda schema, key, tcol: feat.columns_from_rows(rows, schema, key, tcol),
                                 batch_id)
            from device_bridge.columns import ColumnsError, decode

            try:
                arrays, meta = decode(raw, max_body)
            except ColumnsError as exc:
                raise AgentError(400, str(exc), "invalid_input") from None
            table = table_q or meta.get("table")
            if not isinstance(table, str):
                raise AgentError(400, "table: name the event table (?table=NAME, or the batch's meta.table)",
                                 "invalid_input")
            batch_id = _batch_id(request.query_params.get("batch_id", meta.get("batch_id")))
            return fs.ingest(table, lambda schema, key, tcol: feat.columns_from_arrays(arrays, schema, key, tcol),
                             batch_id)

        return JSONAnswer(await run_in_threadpool(work))

    @endpoint(read_auth)
    async def features(request):
        """A key's current feature values, for debugging (GET /v1/features/{view}?key=...&at=...)."""
        import numpy as np

        from device_bridge.agent import features as feat

        q = request.query_params
        extra = sorted(set(q) - {"key", "at"})
        if extra:
            raise AgentError(400, f"unknown parameter {extra[0]!r}: /v1/features/VIEW takes key and at")
        fs = core.features
        name = request.path_params["view"]
        if fs is None:
            raise AgentError(404, f"unknown feature view {name!r} (installed: none)", "not_found")
        st = fs.view(name)
        if "key" not in q:
            raise AgentError(400, f"key: give the view's key (/v1/features/{name}?key=...; its key column is "
                                  f"{st.view.key})")
        key = q["key"]
        if st.view.schema[st.view.key] == "int64":
            try:
                key = int(key)
            except ValueError:
                raise AgentError(400, f"key: view {name}'s key {st.view.key} is an integer, got {key[:40]!r}") from None
        at = feat.parse_at_text(q["at"], 1) if "at" in q else feat.parse_at(None, 1)
        vals = await run_in_threadpool(fs.lookup, name, np.array([key]), at)
        return JSONAnswer({"view": name, "key": key, "at": int(at[0]),
                           "features": {k: feat.to_json(v, nl)[0] for k, (v, nl) in vals.items()}})

    @endpoint(read_auth)
    async def latest(request):
        """A triggered model's latest answer for a key (GET /v1/models/{name}/latest?key=...)."""
        name = name_of(request)
        q = request.query_params
        lv = core.resolve(name)
        trig = lv.deploy.trigger
        if not trig or core.triggers is None:
            raise AgentError(404, f"model {name} has no trigger (deploy setting trigger)", "not_found")
        if "key" not in q:
            raise AgentError(400, "key: give the key (/v1/models/NAME/latest?key=...)")
        key = q["key"]
        key_col = next(iter(lv.binding.keys))
        if lv.binding.keys[key_col][1] == "int64":
            try:
                key = int(key)
            except ValueError:
                raise AgentError(400, f"key: {key_col} is an integer, got {key[:40]!r}") from None
        got = core.triggers.get(name, key)
        if got is None:
            raise AgentError(404, f"model {name} has no answer for key {key!r} yet (no matching event since the "
                                  "agent started)", "not_found")
        return JSONAnswer({"model": name, "key": key, **got})

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
        Route("/v1/events", post_events, methods=["POST"]),
        Route("/v1/features/{view}", features, methods=["GET"]),
        Route("/v1/models/install", install, methods=["POST"]),
        Route("/v1/models/{name}", model_info, methods=["GET"]),
        Route("/v1/models/{name}", delete, methods=["DELETE"]),
        Route("/v1/models/{name}/install", install, methods=["POST"]),
        Route("/v1/models/{name}/activate", activate, methods=["POST"]),
        Route("/v1/models/{name}/rollback", rollback, methods=["POST"]),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/outcomes", outcomes, methods=["POST"]),
        Route("/v1/models/{name}/latest", latest, methods=["GET"]),
        Route("/v1/models/{name}/experiment", experiment, methods=["PUT", "DELETE"]),
        Route("/v1/models/{name}/profile", profile, methods=["POST"]),
        Route("/v1/samples", samples, methods=["GET"]),
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
                    await predictor.asgi(scope, receive, send, name)
                    return
        await app(scope, receive, send)

    return agent_app


def _empty_stream(kind: str) -> bytes:
    """An Arrow stream with no rows: the envelope columns only (a model's inputs and outputs are not
    known without a row)."""
    import pyarrow as pa

    from device_bridge.agent.sampling import ipc_bytes

    ts = pa.timestamp("us", tz="UTC")
    if kind == "outcomes":
        fields = [("request_id", pa.string()), ("label", pa.string()), ("label_at", ts), ("device", pa.string()),
                  ("model", pa.string())]
    else:
        fields = [("request_id", pa.string()), ("predicted_at", ts), ("device", pa.string()), ("model", pa.string()),
                  ("version", pa.int32()), ("provider", pa.string()), ("latency_ms", pa.float64())]
    fields.append(("seq", pa.int64()))
    return ipc_bytes(pa.schema(fields).empty_table())
