"""Bounded-memory telemetry per (model, version) and the circuit breaker."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

# Latency buckets: 4 per doubling from 10 us to ~84 s (fixed, 93 buckets).
_BUCKET_BOUNDS_MS = [0.01 * 2 ** (i / 4) for i in range(93)]
_BOUNDS = np.array(_BUCKET_BOUNDS_MS)
MAX_TRACKED_ELEMENTS = 64   # per-element stats for vector columns, up to this width
TOP_K = 16                  # string values remembered per column
# Rows per second and version that feed the per-column statistics. Counters and latency cover
# every request; the column statistics are a sample whose cost stays bounded under load (at
# batch 256 and 800 requests/s, profiling every batch took 40% of the agent's throughput).
STATS_ROWS_PER_S = 10_000
SMALL_BATCH = 8      # requests of at most this many rows are profiled together ...
PENDING_ROWS = 64    # ... once this many rows are waiting (and on every snapshot)
PENDING_BYTES = 4096  # a small request bigger than this (wide vector columns) is profiled at once
# A request's part of the telemetry is an append to a queue; the counters, the latency histogram
# and the column statistics are computed from those queues off the request path, by one thread
# every FOLD_INTERVAL_S (and by every snapshot, so that a reading is exact). A batch to profile is
# queued only up to DEFER_BYTES (and DEFER_TOTAL_BYTES queued per version); beyond, it is
# profiled at once, so the queue never holds much memory.
FOLD_INTERVAL_S = 0.5
FOLD_CHUNK_ROWS = 512
DEFER_BYTES = 1 << 20
DEFER_TOTAL_BYTES = 16 << 20
# Moments are computed on values clipped to +-CLIP: squares and sums of squares of up to 10**12
# such values stay finite, so no input (1e308 then -1e308) can turn a mean or std into inf/NaN.
# min and max keep the real values.
CLIP = 1e100


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKET_BOUNDS_MS) + 1)
        self.total = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        lo, hi = 0, len(_BUCKET_BOUNDS_MS)
        while lo < hi:  # first bound >= ms
            mid = (lo + hi) // 2
            if _BUCKET_BOUNDS_MS[mid] < ms:
                lo = mid + 1
            else:
                hi = mid
        self.counts[lo] += 1
        self.total += 1
        self.sum_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def add_many(self, ms: np.ndarray) -> None:
        """The same as add() for each value, in one vectorized pass."""
        if not ms.size:
            return
        idx = np.searchsorted(_BOUNDS, ms, side="left")  # first bound >= ms, as add() finds it
        for i, c in zip(*np.unique(idx, return_counts=True)):
            self.counts[int(i)] += int(c)
        self.total += int(ms.size)
        self.sum_ms += float(ms.sum())
        self.max_ms = max(self.max_ms, float(ms.max()))

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                upper = _BUCKET_BOUNDS_MS[i] if i < len(_BUCKET_BOUNDS_MS) else self.max_ms
                lower = _BUCKET_BOUNDS_MS[i - 1] if i > 0 else 0.0
                return round(min(math.sqrt(max(lower, 1e-6) * upper), self.max_ms), 4)
        return round(self.max_ms, 4)

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.total,
            "mean_ms": round(self.sum_ms / self.total, 4) if self.total else None,
            "p50_ms": self.quantile(0.50), "p95_ms": self.quantile(0.95), "p99_ms": self.quantile(0.99),
            "max_ms": round(self.max_ms, 4) if self.total else None,
            "buckets": {f"{_BUCKET_BOUNDS_MS[i]:.4g}" if i < len(_BUCKET_BOUNDS_MS) else "inf": c
                        for i, c in enumerate(self.counts) if c},
        }


class NumericStats:
    """Streaming mean/std (Welford, merged per batch with Chan's formula) and null rate."""

    __slots__ = ("n", "mean", "m2", "nulls", "min", "max")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.nulls = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size <= 8:  # single rows: plain float arithmetic beats numpy's per-call overhead
            for x in v.tolist():
                if not math.isfinite(x):
                    self.nulls += 1
                    continue
                self.n += 1
                xc = CLIP if x > CLIP else (-CLIP if x < -CLIP else x)
                d = xc - self.mean
                self.mean += d / self.n
                self.m2 += d * (xc - self.mean)
                if x < self.min:
                    self.min = x
                if x > self.max:
                    self.max = x
            return
        finite = np.isfinite(v)
        self.nulls += int(v.size - finite.sum())
        v = v[finite]
        if not v.size:
            return
        vc = np.clip(v, -CLIP, CLIP)
        mb = float(vc.mean())
        m2b = float(((vc - mb) ** 2).sum())
        self.merge(v.size, mb, m2b, 0, float(v.min()), float(v.max()))

    def merge(self, nb: int, mb: float, m2b: float, nulls: int, mn: float, mx: float) -> None:
        """Merge precomputed batch moments (Chan et al.)."""
        self.nulls += nulls
        if not nb:
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n
        self.min = min(self.min, mn)
        self.max = max(self.max, mx)

    def snapshot(self) -> dict[str, Any]:
        total = self.n + self.nulls
        var = self.m2 / (self.n - 1) if self.n > 1 else None
        return {
            "kind": "numeric", "count": self.n,
            "mean": _num(self.mean) if self.n else None,
            "std": _num(math.sqrt(var)) if var is not None and var >= 0 and math.isfinite(var) else None,
            "min": _num(self.min) if self.n else None, "max": _num(self.max) if self.n else None,
            "null_rate": self.nulls / total if total else None,
        }


class StringStats:
    """Top values with a bounded Space-Saving counter, null rate, mean length.

    Values are kept in memory only. A snapshot shows a value as written only when the model's
    signed manifest lists it among the column's training values (``training_stats[col]["values"]``,
    so the workspace knew it already); any other value appears as a keyed hash (HMAC with this
    agent's secret: stable, comparable between snapshots, not reversible by guessing names) and
    counts towards ``unseen_rate``. Request data never leaves the device as text."""

    def __init__(self, capacity: int = TOP_K * 4, vocab: frozenset | None = None, secret: bytes = b"") -> None:
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.n = 0
        self.nulls = 0
        self.vocab = vocab
        self.secret = secret
        self.unseen = 0
        self.chars = 0

    def update(self, values) -> None:
        arr = np.asarray(values).ravel()
        if arr.dtype.kind == "O":
            missing = np.array([v is None for v in arr], dtype=bool)
            self.nulls += int(missing.sum())
            arr = arr[~missing]
        if arr.size <= 8:  # single rows: no sort needed
            pairs = [(str(v), 1) for v in arr.tolist()]
        else:  # one pass over the distinct values of the batch, not over its rows
            uniq, counts = np.unique(arr.astype(str), return_counts=True)
            pairs = zip(uniq.tolist(), counts.tolist())
        for v, c in pairs:
            s = v[:64]
            self.n += c
            self.chars += len(v) * c
            if self.vocab is not None and v not in self.vocab:
                self.unseen += c
            if s in self.counts:
                self.counts[s] += c
            elif len(self.counts) < self.capacity:
                self.counts[s] = c
            else:  # replace the smallest, inheriting its count (Space-Saving: over-estimates, bounded)
                smallest = min(self.counts, key=self.counts.__getitem__)
                self.counts[s] = self.counts.pop(smallest) + c

    def shown(self, value: str) -> dict[str, str]:
        if self.vocab is not None and value in self.vocab:
            return {"value": value}
        return {"hash": hmac.new(self.secret, value.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]}

    def snapshot(self) -> dict[str, Any]:
        total = self.n + self.nulls
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:TOP_K]
        return {"kind": "string", "count": self.n, "null_rate": self.nulls / total if total else None,
                "mean_length": self.chars / self.n if self.n else None,
                "unseen_rate": (self.unseen / self.n if self.n else None) if self.vocab is not None else None,
                "top": [{**self.shown(k), "count": c} for k, c in top]}


class VersionTelemetry:
    def __init__(self, model: str, version: int, secret: bytes = b"") -> None:
        self.model = model
        self.version = version
        self.secret = secret
        self.vocab: dict[str, frozenset] = {}  # string column -> training values (from the manifest)
        self.lock = threading.Lock()         # counters, latency, throughput
        self.stats_lock = threading.Lock()   # the column statistics
        self.requests = 0
        self.rows = 0
        self.profiled_rows = 0               # rows that fed the column statistics
        self._budget_second = 0              # the second whose budget _budget_used counts
        self._budget_used = 0
        self._pending: list[dict[str, np.ndarray]] = []  # small requests not yet profiled
        self._pending_rows = 0
        self._done: deque = deque()          # (time, latency_ms, rows, cpu_ms) of runs not yet folded in
        self.cpu_ms = 0.0                    # CPU time of the successful runs (ONNX Runtime's, by its thread)
        self._todo: deque = deque()          # (columns, rows, bytes) not yet profiled
        self._todo_bytes = 0
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.columns: dict[str, NumericStats | StringStats] = {}
        self.started = time.time()
        self.last_request: float | None = None
        self.per_second: deque = deque(maxlen=60)  # [second, requests, rows]
        self.providers: list[str] = []
        self.node_providers: dict[str, int] | None = None

    def _tick(self, rows: int, second: int | None = None, requests: int = 1) -> None:
        now = int(time.time()) if second is None else second
        ps = self.per_second
        for entry in reversed(ps):
            if entry[0] == now:
                entry[1] += requests
                entry[2] += rows
                return
            if entry[0] < now:
                break
        if not ps or ps[-1][0] < now:
            ps.append([now, requests, rows])
            return
        for i, entry in enumerate(ps):  # an older second than the newest (folded late): in order
            if entry[0] > now:
                if len(ps) < (ps.maxlen or 0):
                    ps.insert(i, [now, requests, rows])
                return

    def record_success(self, latency_ms: float, rows: int, columns: dict[str, np.ndarray] | None,
                       cpu_ms: float = 0.0) -> None:
        """One successful run: an append (counters and latency are folded in later, see fold()),
        and its rows queued for the column statistics while the budget allows. ``cpu_ms``: the CPU
        time the run took (its thread's), summed into ``model_cpu_ms``."""
        now = time.time()
        self._done.append((now, latency_ms, rows, cpu_ms))
        self.last_request = now
        if not columns:
            return
        take = self._take_budget(rows, now)
        if not take:
            return
        if take < rows:  # the budget's remainder: the batch's first rows
            columns, rows = {k: a[:take] for k, a in columns.items()}, take
        nbytes = sum(a.nbytes for a in columns.values())
        if nbytes > DEFER_BYTES or self._todo_bytes + nbytes > DEFER_TOTAL_BYTES:
            with self.stats_lock:
                self._take(columns, rows)
            return
        # views are copied, so that the queue never holds a request body alive
        self._todo.append(({k: a if a.base is None else a.copy() for k, a in columns.items()}, rows, nbytes))
        self._todo_bytes += nbytes

    def fold(self) -> None:
        """Fold the queued requests into the counters, the latency histogram and the column statistics."""
        # fold runs on the fold thread and on a /v1/metrics snapshot at once: another fold may have
        # taken some of what len() counted, so each side takes what is still there (deque.popleft is
        # atomic), never more
        done = self._done
        items = []
        pop = done.popleft
        for _ in range(len(done)):
            try:
                items.append(pop())
            except IndexError:
                break
        n = len(items)
        if n:
            arr = np.asarray(items, dtype=np.float64)
            secs = arr[:, 0].astype(np.int64)
            uniq, inv = np.unique(secs, return_inverse=True)
            per_req = np.bincount(inv)
            per_rows = np.bincount(inv, weights=arr[:, 2])
            with self.lock:
                self.requests += n
                self.rows += int(arr[:, 2].sum())
                self.cpu_ms += float(arr[:, 3].sum())
                self.latency.add_many(arr[:, 1])
                for sec, q, r in zip(uniq.tolist(), per_req.tolist(), per_rows.tolist()):
                    self._tick(int(r), int(sec), int(q))
        todo = self._todo
        if todo:
            with self.stats_lock:  # counted under the lock that every taker holds
                for _ in range(len(todo)):
                    columns, rows, nbytes = todo.popleft()
                    self._todo_bytes -= nbytes
                    if rows <= FOLD_CHUNK_ROWS:
                        self._take(columns, rows)
                        continue
                    # a big batch in pieces, letting the interpreter lock go between them: the event
                    # loop (and a realtime request) never waits for a whole batch's statistics
                    for lo in range(0, rows, FOLD_CHUNK_ROWS):
                        hi = min(rows, lo + FOLD_CHUNK_ROWS)
                        self._take({c: a[lo:hi] for c, a in columns.items()}, hi - lo)
                        time.sleep(0)

    def _take(self, columns: dict[str, np.ndarray], rows: int) -> None:
        """Profile a request's rows (small ones PENDING_ROWS at a time); the caller holds stats_lock."""
        self.profiled_rows += rows
        if rows <= SMALL_BATCH and sum(a.nbytes for a in columns.values()) <= PENDING_BYTES:
            # small requests are profiled PENDING_ROWS rows at a time, in one vectorized pass; views
            # are copied, so that the buffer never holds a request body alive
            self._pending.append({k: a if a.base is None else a.copy() for k, a in columns.items()})
            self._pending_rows += rows
            if self._pending_rows >= PENDING_ROWS:
                self._flush_pending()
        else:
            self._profile(columns)

    def _flush_pending(self) -> None:
        """Profile the buffered small requests as one batch (one by one if they do not stack)."""
        feeds, self._pending, self._pending_rows = self._pending, [], 0
        if not feeds:
            return
        try:
            stacked = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        except (ValueError, KeyError):  # other columns or widths
            for f in feeds:
                self._profile(f)
            return
        self._profile(stacked)

    def _profile(self, columns: dict[str, np.ndarray]) -> None:
        # 1-D numeric columns of a batch: moments of all of them in one vectorized pass
        batch = [(k, a) for k, a in columns.items() if a.ndim == 1 and a.dtype.kind in "fiub" and a.size > 8]
        if len(batch) > 1:
            self._update_numeric_block(batch)
            done = {k for k, _ in batch}
        else:
            done = set()
        for name, arr in columns.items():
            if name not in done:
                self._update_column(name, arr)

    def _take_budget(self, rows: int, now: float) -> int:
        """How many of this request's rows go into the column statistics (STATS_ROWS_PER_S a second).
        Not locked: two requests racing at a second's turn may take a few rows more than the budget."""
        second = int(now)
        if second != self._budget_second:
            self._budget_second, self._budget_used = second, 0
        take = max(0, min(rows, STATS_ROWS_PER_S - self._budget_used))
        self._budget_used += take
        return take

    def _update_numeric_block(self, batch: list[tuple[str, np.ndarray]]) -> None:
        block = np.column_stack([a.astype(np.float64, copy=False) for _, a in batch])
        finite = np.isfinite(block)
        nb = finite.sum(axis=0)
        nulls = block.shape[0] - nb
        x = np.where(finite, np.clip(block, -CLIP, CLIP), 0.0)
        safe = np.maximum(nb, 1)
        mb = x.sum(axis=0) / safe
        m2b = (np.where(finite, x - mb, 0.0) ** 2).sum(axis=0)
        mn = np.where(finite, block, np.inf).min(axis=0)
        mx = np.where(finite, block, -np.inf).max(axis=0)
        for j, (name, _) in enumerate(batch):
            st = self._stats(name)
            if st is not None:
                st.merge(int(nb[j]), float(mb[j]), float(m2b[j]), int(nulls[j]), float(mn[j]), float(mx[j]))

    def _update_column(self, name: str, arr: np.ndarray) -> None:
        if arr.dtype.kind in "OUS":
            st = self.columns.get(name)
            if st is None and len(self.columns) < 4 * MAX_TRACKED_ELEMENTS:
                st = self.columns[name] = StringStats(vocab=self.vocab.get(name), secret=self.secret)
            if st is not None:
                st.update(arr)
            return
        if arr.ndim >= 2 and arr.shape[-1] > 1:
            flat = arr.reshape(arr.shape[0], -1)[:, :MAX_TRACKED_ELEMENTS].astype(np.float64)
            finite = np.isfinite(flat)
            nb = finite.sum(axis=0)
            if finite.all():  # one vectorized pass for all elements
                clipped = np.clip(flat, -CLIP, CLIP)
                mb = clipped.mean(axis=0)
                m2b = ((clipped - mb) ** 2).sum(axis=0)
                mn, mx = flat.min(axis=0), flat.max(axis=0)
                for j in range(flat.shape[1]):
                    st = self._stats(f"{name}[{j}]")
                    if st is not None:
                        st.merge(int(nb[j]), float(mb[j]), float(m2b[j]), 0, float(mn[j]), float(mx[j]))
            else:
                for j in range(flat.shape[1]):
                    st = self._stats(f"{name}[{j}]")
                    if st is not None:
                        st.update(flat[:, j])
        else:
            st = self._stats(name)
            if st is not None:
                st.update(arr)

    def _stats(self, key: str) -> NumericStats | None:
        st = self.columns.get(key)
        if st is None:
            if len(self.columns) >= 4 * MAX_TRACKED_ELEMENTS:
                return None
            st = self.columns[key] = NumericStats()
        return st if isinstance(st, NumericStats) else None

    def record_error(self, kind: str) -> None:
        with self.lock:
            self.requests += 1
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.last_request = time.time()
            self._tick(0)

    def snapshot(self, columns: bool = True) -> dict[str, Any]:
        self.fold()
        with self.lock:
            now = time.time()
            recent = [s for s in self.per_second if s[0] >= int(now) - 10]
            span = max(1.0, min(10.0, now - self.started))
            n_err = sum(self.errors.values())
            out = {
                "model": self.model, "version": self.version,
                "requests": self.requests, "rows": self.rows,
                "errors": dict(self.errors), "error_count": n_err,
                "error_rate": n_err / self.requests if self.requests else 0.0,
                "latency": self.latency.snapshot(),
                "throughput_rps": round(sum(s[1] for s in recent) / span, 3),
                "throughput_rows_per_s": round(sum(s[2] for s in recent) / span, 3),
                "providers": list(self.providers),
                "node_providers": self.node_providers,
                "since": self.started, "last_request": self.last_request,
                "model_cpu_ms": round(self.cpu_ms, 3),
            }
        if columns:
            with self.stats_lock:
                self._flush_pending()
                out["profiled_rows"] = self.profiled_rows
                out["columns"] = {k: v.snapshot() for k, v in self.columns.items()}
        return out


class CircuitBreaker:
    """Error rate over the last `window` requests; trips when >= min_requests and rate > threshold."""

    def __init__(self, window: int = 100, min_requests: int = 20, threshold: float = 0.5) -> None:
        self.window = window
        self.min_requests = min_requests
        self.threshold = threshold
        self.outcomes: deque = deque(maxlen=window)
        self.failures = 0  # errors among the outcomes (kept, not summed per request)
        self.lock = threading.Lock()
        self.tripped = False

    def record(self, error: bool) -> bool:
        """Record one outcome; True exactly once, when this outcome trips the breaker."""
        with self.lock:
            if self.tripped:
                return False
            out = self.outcomes
            if len(out) == out.maxlen and out[0]:
                self.failures -= 1
            out.append(bool(error))
            self.failures += bool(error)
            n = len(out)
            if n >= self.min_requests and self.failures / n > self.threshold:
                self.tripped = True
                return True
            return False

    def rate(self) -> float:
        with self.lock:
            return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0


class Telemetry:
    """All versions' telemetry on one agent, plus an event log (bounded)."""

    def __init__(self, max_versions: int = 64, max_events: int = 200, secret: bytes = b"") -> None:
        self.secret = secret
        self.lock = threading.Lock()
        self.versions: dict[tuple[str, int], VersionTelemetry] = {}
        self.max_versions = max_versions
        self.events: deque = deque(maxlen=max_events)
        self.event_seq = 0
        self.folder = threading.Thread(target=self._fold_loop, name="telemetry-fold", daemon=True)
        self.folder.start()

    def _fold_loop(self) -> None:
        """Fold every version's queued requests in, off the request path (see VersionTelemetry.fold)."""
        while True:
            time.sleep(FOLD_INTERVAL_S)
            with self.lock:
                items = list(self.versions.values())
            for vt in items:
                try:
                    vt.fold()
                except Exception:  # noqa: BLE001 - the next snapshot folds again and shows the error there
                    pass

    def get(self, model: str, version: int) -> VersionTelemetry:
        key = (model, version)
        with self.lock:
            vt = self.versions.get(key)
            if vt is None:
                if len(self.versions) >= self.max_versions:  # drop the least recently used
                    oldest = min(self.versions, key=lambda k: self.versions[k].last_request or 0)
                    del self.versions[oldest]
                vt = self.versions[key] = VersionTelemetry(model, version, self.secret)
            return vt

    def drop_model(self, model: str) -> None:
        with self.lock:
            for k in [k for k in self.versions if k[0] == model]:
                del self.versions[k]

    def event(self, kind: str, **fields: Any) -> dict:
        with self.lock:
            self.event_seq += 1
            ev = {"seq": self.event_seq, "time": time.time(), "kind": kind, **fields}
            self.events.append(ev)
            return ev

    def snapshot(self, columns: bool = True) -> dict[str, Any]:
        with self.lock:
            items = list(self.versions.values())
            events = list(self.events)
        return {"time": time.time(), "models": [v.snapshot(columns) for v in items], "events": events}
