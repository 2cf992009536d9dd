"""Triggers: a model runs for an event's key when a matching event arrives (deploy setting
``trigger = {"on_table": TABLE, "when": <expression tree> | null}``, compiled from DEPLOY's
``STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS when_sql)`` by the notebook).

After a POST /v1/events committed, the condition is evaluated over the batch (numpy, features.py's
evaluator; a NULL condition does not match); for each key with a matching event, the latest such
event (by arrival) is queued: the model runs, off the request's path, in this module's thread, with
the view features as of that event's time and the model's other inputs taken from the event's
columns of the same names. The answer is kept per key (the newest run wins), in memory, at most
``MAX_LATEST`` keys per model (the oldest answers go first): ``GET /v1/models/{name}/latest?key=K``.
Latency, from the events' commit to the answer kept, is in /v1/metrics (``triggers``). A queue of
more than ``MAX_QUEUED`` keys drops what comes beyond, counted (``dropped``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import numpy as np

from device_bridge.agent import features as feat

log = logging.getLogger("device_bridge.triggers")

MAX_LATEST = 100_000
MAX_QUEUED = 100_000
LATENCY_WINDOW = 2_000


def check(trigger: dict, store: feat.FeatureStore, lv) -> None:
    """A version's trigger against the device's views: its table must be one a view of the model reads,
    its condition a boolean expression over that table's columns, and the model's inputs either view
    features, the view's key, or columns of the event."""
    table = trigger["on_table"]
    views = [store.views[n].view for n in store.by_table.get(table, [])]
    mine = {v for _, v, _ in lv.binding.fills} if lv.binding is not None else set()
    views = [v for v in views if v.name in mine]
    if not views:
        raise feat.FeatureError(400, f"deploy setting trigger: on_table {table!r} is not the event table of one of "
                                     f"the model's feature views", "request")
    schema = {}
    for v in views:
        schema.update(v.schema)
    when = trigger.get("when")
    if when is not None and feat.expr_type(when, schema, "deploy setting trigger: when") not in ("bool", "null"):
        raise feat.FeatureError(400, "deploy setting trigger: when must be a condition (true or false)", "request")
    for s in lv.request_specs or lv.specs:
        if s.name not in schema:
            raise feat.FeatureError(400, f"deploy setting trigger: the model's input {s.name} is neither a view "
                                         f"feature nor a column of {table}: a trigger has nothing to fill it with",
                                    "request")


class Triggers:
    def __init__(self, core):
        self.core = core
        self.queue: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.latest: dict[str, collections.OrderedDict] = {}
        self.stats: dict[str, dict] = {}
        self.thread = threading.Thread(target=self._loop, name="triggers", daemon=True)
        self.thread.start()

    def _stat(self, model: str) -> dict:
        return self.stats.setdefault(model, {"runs": 0, "keys": 0, "errors": 0, "dropped": 0,
                                             "last_error": None, "latency_ms": collections.deque(maxlen=LATENCY_WINDOW)})

    def on_events(self, table: str, cols: dict, n: int, committed: float) -> None:
        """After a POST /v1/events committed: queue the matching keys of every model triggered by ``table``."""
        for lv in self.core.active_versions():
            trig = lv.deploy.trigger
            if not trig or trig["on_table"] != table or lv.binding is None:
                continue
            when = trig.get("when")
            if when is None:
                match = np.ones(n, bool)
            else:
                schema = {}
                for name in self.core.features.by_table.get(table, []):
                    schema.update(self.core.features.views[name].view.schema)
                v, null = feat.evaluate(when, cols, n, schema)
                match = v.astype(bool) & ~null
            rows = np.flatnonzero(match)
            if not len(rows):
                continue
            key_col = next(iter(lv.binding.keys))
            keys = cols[key_col][0][rows]
            # the latest matching event of each key (by arrival: the last row)
            _, last = np.unique(keys[::-1], return_index=True)
            pick = rows[len(rows) - 1 - last]
            with self.lock:
                st = self._stat(lv.manifest.name)
                room = MAX_QUEUED - sum(len(q[1]) for q in self.queue)
                if room < len(pick):
                    st["dropped"] += len(pick) - max(0, room)
                    pick = pick[:max(0, room)]
                if len(pick):
                    sub = {c: (vals[pick], nl[pick]) for c, (vals, nl) in cols.items()}
                    self.queue.append((lv.manifest.name, pick, sub, committed))
            self.wake.set()

    def _loop(self) -> None:
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            while True:
                with self.lock:
                    if not self.queue:
                        break
                    item = self.queue.popleft()
                try:
                    self._run(*item)
                except Exception as exc:  # noqa: BLE001 - counted, shown in /v1/metrics; the loop goes on
                    log.exception("trigger run failed")
                    with self.lock:
                        st = self._stat(item[0])
                        st["errors"] += 1
                        st["last_error"] = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"[:300]

    def _run(self, model: str, rows: np.ndarray, cols: dict, committed: float) -> None:
        lv = self.core.resolve(model)
        trig = lv.deploy.trigger
        if not trig or lv.binding is None:
            return
        n = len(rows)
        key_col = next(iter(lv.binding.keys))
        feed = {}
        for s in lv.request_specs or lv.specs:
            vals, null = cols[s.name]
            if s.type.startswith("float"):
                arr = vals.astype(s.type)
                arr[null] = np.nan
            elif s.type == "string":
                arr = vals.astype(object)
            else:
                arr = vals.astype(s.type)
            feed[s.name] = arr.reshape(n, 1) if s.row_shape == (1,) else arr
        view = lv.binding.keys[key_col][0][0]
        at = cols[self.core.features.views[view].view.time_col][0].astype(np.int64)
        feed = lv.binding.fill(self.core.features, feed, n, at, lv.input_names)
        res = self.core.predict(lv, feed, n)
        done = time.time()
        outs = res["outputs"]
        keys = cols[key_col][0].tolist()
        with self.lock:
            latest = self.latest.setdefault(model, collections.OrderedDict())
            for i, k in enumerate(keys):
                latest[k] = {"at": int(at[i]), "version": res["version"], "computed_at": done,
                             "outputs": {name: v[i] for name, v in outs.items()}}
                latest.move_to_end(k)
            while len(latest) > MAX_LATEST:
                latest.popitem(last=False)
            st = self._stat(model)
            st["runs"] += 1
            st["keys"] += n
            st["latency_ms"].append((done - committed) * 1000.0)

    def get(self, model: str, key: Any) -> dict | None:
        with self.lock:
            return (self.latest.get(model) or {}).get(key)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty (tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if not self.queue:
                    break
            time.sleep(0.005)

    def metrics(self) -> dict:
        with self.lock:
            out = {}
            for m, st in self.stats.items():
                lat = np.array(st["latency_ms"]) if st["latency_ms"] else None
                out[m] = {k: v for k, v in st.items() if k != "latency_ms"}
                out[m]["latency_ms"] = None if lat is None else {
                    "p50": round(float(np.percentile(lat, 50)), 3), "p95": round(float(np.percentile(lat, 95)), 3),
                    "max": round(float(lat.max()), 3), "n": int(len(lat))}
                out[m]["latest_keys"] = len(self.latest.get(m) or {})
            return out
