"""Live device telemetry in the notebook: ``mlsql.monitor('device')`` (or ``mlsql.notebook.monitor.monitor``).

``DeviceMonitor`` is an anywidget whose state lives in synced traits. A background thread polls
the agent (``GET /v1/metrics`` every ``interval`` seconds, ``GET /v1/info`` every few seconds and
whenever the active version changes) with the device's token, turns each answer into one new
point and sets the traits in one batch (one comm message per interval), so the kernel keeps
running other cells while the charts move. The front end (``static/monitor.js``) draws the
charts itself as inline SVG: no CDN, no network.

What a point holds (over the last interval, for the monitored model, all its versions together):
requests/s, rows/s, error rate, and p50/p95/p99 latency computed from the difference of the
agent's latency histograms between two polls (the agent's own quantiles cover the version's whole
life). The first point, with no earlier poll, carries the agent's own figures (its 10-second
throughput and lifetime quantiles). The last ``history`` points (default 300) are kept. An
interval without requests has no latency: the latency tiles, the chart's legend and the text
summary all show the newest interval that had requests (``last_latency``), marked "N s ago"
when that is not the newest one.

Drift flags, per input column of the active version: for a numeric column, the shift of the mean
of the inputs the agent profiled since activation from the training mean stored in the signed
package, in training standard deviations (|mean - mean_train| / std_train, the rollout gate's
``max_drift`` measure), flagged above ``drift_threshold`` (default 3); for a string column, the
share of values outside the training values the package lists (the agent's ``unseen_rate``) less
the share of training rows outside that list (``other_share``, 0 unless the column had more than
1,000 distinct values), flagged above ``unseen_threshold`` (default 0.1). Agents that do not report training statistics get a note
instead of flags.

States: ``connecting`` until the first answer, ``live``, ``disconnected`` (the error and the time
of the last good update; polling goes on and the monitor recovers when the agent answers again)
and ``stopped`` after ``.stop()``. Where widgets cannot render (nbconvert, a notebook reopened
without its kernel) the output carries a text/HTML summary of the last values; ``.stop()``
replaces the live view with that summary, so a saved notebook shows the final figures.
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import anywidget
import traitlets

STATIC = Path(__file__).parent.parent / "static"
HISTORY_FIELDS = ("t", "p50_ms", "p95_ms", "p99_ms", "requests_per_s", "rows_per_s", "error_rate", "requests")
INFO_EVERY_S = 5.0
MAX_EVENTS = 12
MAX_DRIFT_COLUMNS = 64


def _bounds() -> list[float]:
    from device_bridge.telemetry import _BUCKET_BOUNDS_MS

    return list(_BUCKET_BOUNDS_MS)


def _window_quantiles(now: dict[str, int], before: dict[str, int], bounds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 of the requests between two snapshots of an agent's latency histogram
    (``buckets``: upper bound formatted %.4g, or "inf" -> count), the agent's own estimate per
    bucket (geometric middle of the bucket)."""
    index = {f"{b:.4g}": i for i, b in enumerate(bounds)}
    index["inf"] = len(bounds)
    counts = [0] * (len(bounds) + 1)
    for key, c in now.items():
        i = index.get(key)
        if i is not None:
            counts[i] += c - before.get(key, 0)
    if any(c < 0 for c in counts):  # counters went back (an agent restart): the whole of `now`
        counts = [0] * (len(bounds) + 1)
        for key, c in now.items():
            if key in index:
                counts[index[key]] += c
    total = sum(counts)
    out: dict[str, float | None] = {}
    for q, name in ((0.50, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        if not total:
            out[name] = None
            continue
        rank, seen = q * total, 0
        for i, c in enumerate(counts):
            seen += c
            if c and seen >= rank:
                upper = bounds[i] if i < len(bounds) else bounds[-1] * 2 ** 0.25
                lower = bounds[i - 1] if i > 0 else 0.0
                out[name] = round(math.sqrt(max(lower, 1e-6) * upper), 4)
                break
    return out


def last_latency(history: list, fields: list | tuple = HISTORY_FIELDS) -> dict[str, Any]:
    """p50/p95/p99 of the newest interval that had requests, and its time ``t`` (None when none
    had): an interval without requests has no latency, and the panel's tiles, its chart legends
    and the text summary all show this same window."""
    i = {f: fields.index(f) for f in ("t", "p50_ms", "p95_ms", "p99_ms")}
    for point in reversed(history):
        if point[i["p50_ms"]] is not None:
            return {k: point[j] for k, j in i.items()}
    return {"t": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}


def _event_text(ev: dict) -> str:
    kind = str(ev.get("kind", "event"))
    parts = [kind.replace("_", " ")]
    if ev.get("model") is not None:
        parts.append(f"{ev['model']}" + (f"@{ev['version']}" if ev.get("version") is not None else ""))
    if ev.get("previous") is not None:
        parts.append(f"(was @{ev['previous']})")
    if ev.get("rolled_back_to") is not None:
        parts.append(f"-> rolled back to @{ev['rolled_back_to']}")
    for key in ("reason", "error", "note"):
        if ev.get(key) and kind != ev.get(key):
            parts.append(f"- {ev[key]}")
    return " ".join(str(p) for p in parts)[:300]


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if unit == "%":
            return f"{v * 100:.2f}%"
        return f"{v:,.3g}{unit}" if abs(v) < 1000 else f"{v:,.0f}{unit}"
    return f"{v:,}{unit}"

# /v1/metrics' figures of how a version shares the device (docs/DEVICE.md, Sharing one device)
SHARING_FIELDS = ("priority", "isolation", "queue_length", "rejected", "deadline_misses", "worker_restarts",
                  "memory_mb")


class DeviceMonitor(anywidget.AnyWidget):
    """A live panel for one device: see the module's docstring. ``.stop()`` ends it."""

    _esm = STATIC / "monitor.js"
    _css = STATIC / "monitor.css"

    device_name = traitlets.Unicode("").tag(sync=True)
    url = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("connecting").tag(sync=True)   # connecting | live | disconnected | stopped
    error = traitlets.Unicode("").tag(sync=True)
    last_ok = traitlets.Float(0.0).tag(sync=True)             # epoch seconds of the last good update
    updates = traitlets.Int(0).tag(sync=True)                 # good updates so far
    interval = traitlets.Float(1.0).tag(sync=True)
    model = traitlets.Unicode("").tag(sync=True)              # the model the charts follow
    version = traitlets.Int(0).tag(sync=True)                 # its active version (0: none)
    providers = traitlets.List().tag(sync=True)               # providers its session really uses
    node_providers = traitlets.Dict().tag(sync=True)          # graph nodes per provider
    models = traitlets.List().tag(sync=True)                  # every model on the device: name, active, requests
    latest = traitlets.Dict().tag(sync=True)                  # the newest point plus totals
    history = traitlets.List().tag(sync=True)                 # [[t, p50, p95, p99, req/s, rows/s, err, requests]]
    history_fields = traitlets.List(list(HISTORY_FIELDS)).tag(sync=True)
    drift = traitlets.List().tag(sync=True)                   # per input column, see the module docstring
    drift_note = traitlets.Unicode("").tag(sync=True)
    drift_threshold = traitlets.Float(3.0).tag(sync=True)
    events = traitlets.List().tag(sync=True)                  # newest first

    def __init__(self, device, interval: float = 1.0, model: str | None = None, history: int = 300,
                 drift_threshold: float = 3.0, unseen_threshold: float = 0.1):
        from mlsql.errors import MLSQLError

        if not (isinstance(interval, int | float) and 0.25 <= interval <= 60):
            raise MLSQLError(f"monitor interval must be between 0.25 and 60 seconds, got {interval!r}")
        if not (isinstance(history, int) and 2 <= history <= 100_000):
            raise MLSQLError(f"monitor history must be a whole number of points from 2 to 100000, got {history!r}")
        super().__init__(device_name=device.name, url=device.url, interval=float(interval),
                         drift_threshold=float(drift_threshold))
        self.device = device
        self._model_arg = model
        self._unseen_threshold = float(unseen_threshold)
        self._ring: deque = deque(maxlen=history)
        self._prev: dict[tuple[str, int], dict] = {}
        self._prev_time: float | None = None
        self._info: dict | None = None
        self._info_time = 0.0
        self._handles: list = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one update at a time (the thread's or stop()'s)
        self._thread = threading.Thread(target=self._run, name=f"mlsql-monitor-{device.name}", daemon=True)
        self._thread.start()

    # -- compatibility: the monitor used to wrap an ipywidgets.HTML ---------------------------------
    @property
    def widget(self) -> DeviceMonitor:
        return self

    # -- the polling thread ----------------------------------------------------------------------
    def _client(self):
        from mlsql.deploy.remote import client_for

        return client_for(self.device, timeout=max(5.0, self.interval * 5))

    def _run(self) -> None:
        client = self._client()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    snap = client.metrics(columns=True)
                    if self._needs_info(snap):
                        self._info, self._info_time = client.info(), time.monotonic()
                    with self._lock:
                        if self._stop.is_set():
                            break
                        self._apply(snap, self._info or {})
                except Exception as exc:  # noqa: BLE001 - the panel says what went wrong and keeps trying
                    client.close()
                    with self._lock:
                        if self._stop.is_set():
                            break
                        msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                        with self.hold_sync():
                            self.status = "disconnected"
                            self.error = msg[:500]
                    self._info = None  # ask again once it is back (it may have restarted)
                self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))
        finally:
            client.close()

    def _needs_info(self, snap: dict) -> bool:
        if self._info is None or time.monotonic() - self._info_time >= INFO_EVERY_S:
            return True
        known = {n: m.get("active") for n, m in (self._info.get("models") or {}).items()}
        return known != (snap.get("active") or {})

    def _apply(self, snap: dict, info: dict) -> None:
        entries = snap.get("models") or []
        active = snap.get("active") or {}
        model = self._model_arg
        if model is None:  # the model with the most traffic, else any installed one
            totals: dict[str, int] = {}
            for e in entries:
                totals[e["model"]] = totals.get(e["model"], 0) + int(e.get("requests") or 0)
            model = max(totals, key=totals.get) if totals else (sorted(active)[0] if active else "")
        mine = [e for e in entries if e.get("model") == model]
        t = float(snap.get("time") or time.time())
        point = self._point(mine, t)
        self._ring.append([point[f] for f in HISTORY_FIELDS])
        for e in entries:
            self._prev[(e["model"], e["version"])] = e
        self._prev_time = t

        minfo = (info.get("models") or {}).get(model) or {}
        act = active.get(model) if model else None
        act_entry = next((e for e in mine if e.get("version") == act), None)
        providers = (act_entry or {}).get("providers") or minfo.get("providers") or []
        nodes = (act_entry or {}).get("node_providers") or minfo.get("node_providers") or {}
        drift, note = self._drift(act_entry, minfo, info)
        requests = sum(int(e.get("requests") or 0) for e in mine)
        errors = sum(int(e.get("error_count") or 0) for e in mine)
        latest = {**point, "total_requests": requests, "total_rows": sum(int(e.get("rows") or 0) for e in mine),
                  "total_errors": errors, "total_error_rate": errors / requests if requests else 0.0,
                  "suspended": (act_entry or {}).get("suspended", False),
                  # how the active version shares the device (an agent from before has none of these)
                  "sharing": {k: (act_entry or {}).get(k) for k in SHARING_FIELDS}}
        per_model: dict[str, int] = {}
        for e in entries:
            per_model[e["model"]] = per_model.get(e["model"], 0) + int(e.get("requests") or 0)
        priority = {e["model"]: e.get("priority") for e in entries if e.get("version") == active.get(e["model"])}
        models = [{"model": n, "active": active.get(n), "requests": per_model.get(n, 0), "priority": priority.get(n)}
                  for n in sorted(set(active) | set(per_model))]
        events = [{"seq": ev.get("seq"), "time": ev.get("time"), "kind": ev.get("kind"), "model": ev.get("model"),
                   "version": ev.get("version"), "text": _event_text(ev)}
                  for ev in reversed((snap.get("events") or [])[-MAX_EVENTS:])]
        with self.hold_sync():  # one comm message for all of it
            self.status, self.error = "live", ""
            self.last_ok = time.time()
            self.model, self.version = model or "", int(act or 0)
            self.providers, self.node_providers = list(providers), dict(nodes)
            self.models, self.latest = models, latest
            self.history = list(self._ring)
            self.drift, self.drift_note = drift, note
            self.events = events
            self.updates = self.updates + 1

    def _point(self, mine: list[dict], t: float) -> dict:
        dt = (t - self._prev_time) if self._prev_time is not None else None
        requests = sum(int(e.get("requests") or 0) for e in mine)
        if not dt or dt <= 0:  # the first poll: the agent's own figures
            e = max(mine, key=lambda x: x.get("requests") or 0) if mine else {}
            lat = e.get("latency") or {}
            n = sum(int(x.get("requests") or 0) for x in mine)
            err = sum(int(x.get("error_count") or 0) for x in mine)
            return {"t": t, "p50_ms": lat.get("p50_ms"), "p95_ms": lat.get("p95_ms"), "p99_ms": lat.get("p99_ms"),
                    "requests_per_s": sum(float(x.get("throughput_rps") or 0) for x in mine),
                    "rows_per_s": sum(float(x.get("throughput_rows_per_s") or 0) for x in mine),
                    "error_rate": err / n if n else 0.0, "requests": requests}
        d_req = d_rows = d_err = 0
        now_b: dict[str, int] = {}
        before_b: dict[str, int] = {}
        for e in mine:
            p = self._prev.get((e["model"], e["version"])) or {}
            req, prev_req = int(e.get("requests") or 0), int(p.get("requests") or 0)
            if req < prev_req:  # the agent restarted: everything since then
                p = {}
            d_req += req - int(p.get("requests") or 0)
            d_rows += int(e.get("rows") or 0) - int(p.get("rows") or 0)
            d_err += int(e.get("error_count") or 0) - int(p.get("error_count") or 0)
            for k, c in ((e.get("latency") or {}).get("buckets") or {}).items():
                now_b[k] = now_b.get(k, 0) + c
            for k, c in ((p.get("latency") or {}).get("buckets") or {}).items():
                before_b[k] = before_b.get(k, 0) + c
        q = _window_quantiles(now_b, before_b, self._bucket_bounds())
        return {"t": t, **q, "requests_per_s": round(d_req / dt, 3), "rows_per_s": round(d_rows / dt, 3),
                "error_rate": d_err / d_req if d_req else 0.0, "requests": requests}

    def _bucket_bounds(self) -> list[float]:
        b = getattr(self, "_bounds_cache", None)
        if b is None:
            b = self._bounds_cache = _bounds()
        return b

    def _drift(self, entry: dict | None, minfo: dict, info: dict) -> tuple[list[dict], str]:
        if not info:
            return [], ""
        if "training_stats" not in minfo:
            return [], ("drift not available: this agent does not report the training statistics of its "
                        "packages (an agent from before /v1/info listed training_stats)")
        train = minfo.get("training_stats") or {}
        live = (entry or {}).get("columns") or {}
        if not train and not live:
            return [], "drift not available: the deployed package carries no training statistics"
        out = []
        for col in sorted(set(train) | set(live))[:MAX_DRIFT_COLUMNS]:
            st, tr = live.get(col) or {}, train.get(col) or {}
            row: dict[str, Any] = {"column": col, "kind": st.get("kind") or ("numeric" if "mean" in tr else "string"),
                                   "count": st.get("count"), "live_mean": st.get("mean"),
                                   "train_mean": tr.get("mean"), "train_std": tr.get("std"),
                                   "unseen_rate": st.get("unseen_rate"), "score": None, "flagged": False, "note": ""}
            if row["kind"] == "string":
                u = st.get("unseen_rate")
                # training rows outside the package's listed values: what "unseen" is compared with
                base = float(tr.get("other_share") or 0.0)
                if u is None:
                    row["note"] = "no live values yet" if not st else "no training values to compare"
                else:
                    row["score"] = round(u - base, 4)
                    row["flagged"] = u - base > self._unseen_threshold
                    row["note"] = (f"{u:.1%} unseen in training" if not base else
                                   f"{u:.1%} outside the training's listed values ({base:.1%} of training rows)")
            elif tr.get("mean") is None:
                row["note"] = "no training statistic"
            elif st.get("mean") is None:
                row["note"] = "no live values yet"
            else:
                std = float(tr.get("std") or 0.0)
                score = abs(float(st["mean"]) - float(tr["mean"])) / (std if std > 0 else 1.0)
                row["score"] = round(score, 4)
                row["flagged"] = score > self.drift_threshold
                row["note"] = f"{score:.2f} training std"
            out.append(row)
        return out, ""

    # -- control -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop polling; the panel says so and keeps the last values. Outputs shown by this monitor
        become the static summary (what a saved notebook then keeps)."""
        self._stop.set()
        with self._lock:
            self.status = "stopped"
        self._thread.join(timeout=max(5.0, self.interval * 6))
        bundle = self._summary_bundle()
        for h in self._handles:
            try:
                h.update(bundle, raw=True)
            except Exception:  # noqa: BLE001 - no front end to update (a plain Python session)
                pass

    def state_snapshot(self) -> dict:
        """The synced state as plain values (history as a list of dicts), e.g. for tests and logs."""
        names = ("device_name", "url", "status", "error", "last_ok", "updates", "interval", "model", "version",
                 "providers", "node_providers", "models", "latest", "drift", "drift_note", "events")
        out = {n: getattr(self, n) for n in names}
        out["history"] = [dict(zip(self.history_fields, p)) for p in self.history]
        return out

    # -- display -------------------------------------------------------------------------------------
    def _summary_text(self) -> str:
        lat = self.latest or {}
        head = f"device {self.device_name} ({self.url}): {self.status}"
        if self.status == "disconnected" and self.error:
            head += f" - {self.error}"
        if self.last_ok:
            head += f"; last update {time.strftime('%H:%M:%S', time.localtime(self.last_ok))}"
        lines = [head]
        if self.model:
            q = last_latency(self.history, self.history_fields)
            lines.append(f"{self.model}@{self.version or '-'} on {', '.join(self.providers) or '-'}: "
                         f"{_fmt(lat.get('total_requests'))} requests, {_fmt(lat.get('requests_per_s'))} req/s, "
                         f"{_fmt(lat.get('rows_per_s'))} rows/s, errors {_fmt(lat.get('error_rate'), '%')}, "
                         f"p50/p95/p99 {_fmt(q['p50_ms'])}/{_fmt(q['p95_ms'])}/{_fmt(q['p99_ms'])} ms"
                         + self._latency_age(q))
        flagged = [d["column"] for d in self.drift if d.get("flagged")]
        if self.drift:
            lines.append("drift: " + (", ".join(flagged) if flagged else "none flagged"))
        elif self.drift_note:
            lines.append(self.drift_note)
        for ev in self.events[:3]:
            lines.append(f"event {time.strftime('%H:%M:%S', time.localtime(ev.get('time') or 0))} {ev['text']}")
        return "\n".join(lines)

    def _summary_html(self) -> str:
        e = html.escape
        lat = self.latest or {}
        badge = {"live": "#1a7f37", "disconnected": "#cf222e", "stopped": "#6e7781"}.get(self.status, "#9a6700")
        when = time.strftime("%H:%M:%S", time.localtime(self.last_ok)) if self.last_ok else "never"
        parts = [f"<div class='mlsql-monitor-summary'><b>device {e(self.device_name)}</b> "
                 f"<span style='background:{badge};color:#fff;border-radius:3px;padding:0 5px'>{e(self.status)}</span> "
                 f"<small>last update {e(when)}</small>"]
        if self.status == "disconnected" and self.error:
            parts.append(f"<div style='color:#cf222e'>{e(self.error)}</div>")
        if self.model:
            q = last_latency(self.history, self.history_fields)
            age = self._latency_age(q)
            cells = [("model", f"{self.model}@{self.version or '–'}"), ("providers", ", ".join(self.providers) or "–"),
                     ("requests", _fmt(lat.get("total_requests"))), ("req/s", _fmt(lat.get("requests_per_s"))),
                     ("rows/s", _fmt(lat.get("rows_per_s"))), ("error rate", _fmt(lat.get("error_rate"), "%")),
                     ("p50 ms", _fmt(q["p50_ms"]) + age), ("p95 ms", _fmt(q["p95_ms"]) + age),
                     ("p99 ms", _fmt(q["p99_ms"]) + age)]
            parts.append("<table><tr>" + "".join(f"<th>{e(k)}</th>" for k, _ in cells) + "</tr><tr>"
                         + "".join(f"<td>{e(v)}</td>" for _, v in cells) + "</tr></table>")
        flagged = [d for d in self.drift if d.get("flagged")]
        if self.drift:
            parts.append("<div>drift: " + (", ".join(f"<b>{e(d['column'])}</b> ({e(d['note'])})" for d in flagged)
                         if flagged else "none flagged") + "</div>")
        elif self.drift_note:
            parts.append(f"<div><small>{e(self.drift_note)}</small></div>")
        if self.events:
            parts.append("<ul>" + "".join(
                f"<li>{e(time.strftime('%H:%M:%S', time.localtime(ev.get('time') or 0)))} {e(ev['text'])}</li>"
                for ev in self.events[:5]) + "</ul>")
        return "".join(parts) + "</div>"

    def _latency_age(self, q: dict) -> str:
        """" (12 s ago)" when the latency shown is not from the newest interval (no requests since)."""
        newest = self.history[-1][self.history_fields.index("t")] if self.history else None
        if q["t"] is None or newest is None or q["t"] >= newest:
            return ""
        return f" ({newest - q['t']:.0f} s ago)"

    def _summary_bundle(self) -> dict:
        return {"text/plain": self._summary_text(), "text/html": self._summary_html()}

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        return {**bundle, **self._summary_bundle()}

    def _ipython_display_(self):
        from IPython.display import display

        bundle = self._repr_mimebundle_() if self.status != "stopped" else self._summary_bundle()
        handle = display(bundle, raw=True, display_id=True)
        if handle is not None:
            self._handles.append(handle)


def monitor(device: str, workspace=None, interval: float = 1.0, model: str | None = None,
            history: int = 300, drift_threshold: float = 3.0) -> DeviceMonitor:
    """A live panel for ``device`` (a name from CREATE DEVICE in ``workspace``, default MLSQL_HOME).

    ``model``: the model the charts follow (default: the one with the most requests);
    ``history``: points kept; ``drift_threshold``: training std of mean shift that flags a column."""
    from mlsql.deploy.devices import DeviceStore
    from mlsql.workspace import Workspace

    dev = DeviceStore(Workspace.open(workspace).devices_path).get(device)
    return DeviceMonitor(dev, interval=interval, model=model, history=history, drift_threshold=drift_threshold)
