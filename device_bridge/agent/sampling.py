"""The device's sample store: the rows of sampled predictions and the outcomes recorded later,
kept durably on the device until a hub acknowledges them (or the byte bound drops the oldest).

Off the predict path: a sampled request costs the answer one ``offer`` (a deque append of
references to arrays the request no longer needs). A writer thread takes everything offered since
its last commit, builds one Arrow record batch per model version with vectorized numpy/pyarrow
(no Python loop over rows; a hashed column hashes each *distinct* value once), and commits it to
SQLite in WAL mode with ``synchronous=NORMAL`` in one transaction: **group commit**, at most one
every ``COMMIT_INTERVAL_S``. Durability window: a sample is committed at most
``COMMIT_INTERVAL_S`` (25 ms) plus one write (a few ms) after its answer was sent; from then on
it survives the agent's crash, a kill -9 or a restart (a committed transaction is in the WAL
file). A power cut may also lose the commits since the WAL's last checkpoint (SQLite fsyncs the
WAL there), never tear one. A kill -9 inside the window loses what was not committed, never
half of a request, never a row twice. A prediction never waits for the store and never fails
because of it: when more than ``MAX_PENDING_BYTES`` wait for the writer, or the writer fails,
the rows are dropped and counted (``dropped_rows``).

Compact chunks: the chunk's constants (device, model, provider) are one-entry dictionaries, and
generated request ids are stored as their request's prefix (a dictionary entry per request) and
the row's number in the request (``__row``); ``read_ipc`` gives the plain columns back. About 80
bytes a row for a model of 8 float inputs and a class with probabilities (145 before).

Store: ``STORE/samples.db`` (SQLite)::

    chunks(seq_first PK, seq_last, kind, model, rows, bytes, schema, data)
        one Arrow IPC stream per commit and model version (kind 'samples' or 'outcomes'); the rows
        of a chunk have the sequence numbers seq_first..seq_last (one sequence for the whole
        store, never reused: ``meta.next_seq``), which are the ``seq`` of uploads and cursors
    rids(model, rid, n)  the request ids of sampled requests: a generated or header prefix with
        its row count n (ids rid-0 .. rid-(n-1)), or one caller-given id (n = 0); the newest
        ``MAX_RIDS`` requests per model are kept, to tell known outcomes from unknown ones
    counts(model, dropped_rows, unknown_outcomes)   cumulative, shown in /v1/info

Bounded per model by its deploy's ``sample_max_mb`` (samples and outcomes together): the oldest
chunks go first, their rows counted in ``dropped_rows``. A chunk acknowledged by the hub is
deleted (hubsync.py); a direct device (no hub) keeps chunks until the bound drops them and serves
them through ``GET /v1/samples``.

pyarrow is imported by the writer thread and the readers, never on the predict path or at the
agent's start.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("device_bridge.sampling")

DB_FILE = "samples.db"
COMMIT_INTERVAL_S = 0.025      # group commit: at most one transaction per 25 ms
MAX_PENDING_BYTES = 64 << 20   # offered but not yet written; beyond: dropped and counted
MAX_RIDS = 200_000             # sampled requests per model whose ids are remembered for outcomes
MAX_CHUNK_ROWS = 65_536        # rows per stored chunk (a bigger commit is split) ...
CHUNK_BYTES = 256 << 10        # ... and about this many bytes of Arrow buffers: the bound's granularity
ARROW_STREAM = "application/vnd.apache.arrow.stream"
KINDS = ("samples", "outcomes")


@dataclass(frozen=True)
class SampleSpec:
    """What a loaded version samples, fixed when it loads (a new deploy loads a new version object)."""
    device: str
    model: str
    version: int
    provider: str
    rate: float
    max_bytes: int
    exclude: frozenset
    hashed: frozenset
    salt: bytes
    output_names: tuple


def spec_for(device: str, lv) -> SampleSpec | None:
    d = lv.deploy
    if not d.sample_rate:
        return None
    return SampleSpec(device=device, model=lv.manifest.name, version=lv.manifest.version,
                      provider=(lv.providers or ["unknown"])[0], rate=float(d.sample_rate),
                      max_bytes=int(d.sample_max_mb) << 20, exclude=frozenset(d.sample_exclude),
                      hashed=frozenset(d.sample_hash), salt=(d.sample_salt or "").encode(),
                      output_names=tuple(lv.output_names))


def hash_value(salt: bytes, value: Any) -> str:
    """A hashed column's stored value: hex HMAC-SHA256(salt, str(value))[:32]."""
    return hmac.new(salt, str(value).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


class SampleStore:
    def __init__(self, store: Path, device: str, on_error=None):
        self.path = Path(store) / DB_FILE
        self.device = device
        self.on_error = on_error  # (name, exc) -> None: the background loop's outcome for /v1/info
        self.lock = threading.RLock()  # the connection
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the agent's crash or kill -9 (it is in the WAL file
        # the moment it commits); the WAL is fsynced at checkpoints, so a power cut may lose the
        # last commits, never tear one. FULL (an fsync per commit) cost a tenth of the agent's
        # throughput at sample_rate 1 on a saturated 2-core device
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS chunks(seq_first INTEGER PRIMARY KEY, seq_last INTEGER NOT NULL,
                kind TEXT NOT NULL, model TEXT NOT NULL, rows INTEGER NOT NULL, bytes INTEGER NOT NULL,
                schema TEXT NOT NULL, data BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS chunks_by_model ON chunks(model, kind, seq_first);
            CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS counts(model TEXT PRIMARY KEY, dropped_rows INTEGER NOT NULL DEFAULT 0,
                unknown_outcomes INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS rids(id INTEGER PRIMARY KEY, model TEXT NOT NULL, rid TEXT NOT NULL,
                n INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS rids_by_id ON rids(model, rid);
        """)
        os.chmod(self.path, 0o600)
        self.bytes: dict[str, int] = {m: int(b) for m, b in self.conn.execute(
            "SELECT model, SUM(bytes) FROM chunks GROUP BY model")}
        self.rid_count: dict[str, int] = {m: int(c) for m, c in self.conn.execute(
            "SELECT model, COUNT(*) FROM rids GROUP BY model")}
        self.queue: collections.deque = collections.deque()
        self.qlock = threading.Lock()
        self.pending_bytes = 0
        self.pending_rows = 0
        self.queue_dropped: dict[str, int] = {}
        self.writing: list = []  # drained from the queue, not yet committed
        self.wake = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.stopping = False
        self.last_commit = 0.0
        self.thread = threading.Thread(target=self._writer, name="sample-writer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the predict path

    def offer(self, spec: SampleSpec, t: float, ms: float, n: int, feed: dict, values, jsoned: dict | None,
              prefix: str | None, ids: list | None) -> None:
        """Keep this request's rows (references only; the writer builds the rows). Never blocks on
        the store: over MAX_PENDING_BYTES the rows are dropped and counted."""
        nb = 64 * n
        for a in feed.values():
            nb += a.nbytes
        with self.qlock:
            if self.pending_bytes + nb > MAX_PENDING_BYTES:
                self.queue_dropped[spec.model] = self.queue_dropped.get(spec.model, 0) + n
                return
            self.pending_bytes += nb
            self.pending_rows += n
            self.queue.append((spec, t, ms, n, feed, values, jsoned, prefix, ids, nb))
            self.idle.clear()
        self.wake.set()

    # ------------------------------------------------------------------ the writer

    def _writer(self) -> None:
        try:  # the first sample should not wait for these imports (about a second on a small device)
            import pyarrow  # noqa: F401
            import pyarrow.compute  # noqa: F401
        except Exception:  # noqa: BLE001 - _write says so
            pass
        while True:
            self.wake.wait(1.0)
            if self.stopping and not self.queue:
                self.idle.set()
                return
            delay = self.last_commit + COMMIT_INTERVAL_S - time.monotonic()
            if delay > 0 and not self.stopping:
                time.sleep(delay)
            self.wake.clear()
            with self.qlock:
                items = list(self.queue)
                self.queue.clear()
                self.writing = items
                dropped = self.queue_dropped
                self.queue_dropped = {}
            if items or dropped:
                try:
                    self._write(items, dropped)
                    if self.on_error:
                        self.on_error("sample_writer", None)
                except Exception as exc:  # noqa: BLE001 - the rows are dropped and counted, never the agent
                    log.exception("sample writer failed")
                    lost: dict[str, int] = {}
                    for it in items:
                        lost[it[0].model] = lost.get(it[0].model, 0) + it[3]
                    try:
                        self._count_dropped({m: lost.get(m, 0) + dropped.get(m, 0) for m in {*lost, *dropped}})
                    except Exception:  # noqa: BLE001
                        pass
                    if self.on_error:
                        self.on_error("sample_writer", exc)
                self.last_commit = time.monotonic()
            with self.qlock:
                self.pending_bytes -= sum(it[9] for it in items)
                self.pending_rows -= sum(it[3] for it in items)
                self.writing = []
                if not self.queue:
                    self.idle.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything offered so far is committed (tests, shutdown)."""
        self.wake.set()
        return self.idle.wait(timeout)

    def close(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(10)
        with self.lock:
            self.conn.close()

    def _count_dropped(self, dropped: dict[str, int]) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for m, k in dropped.items():
                    self._add_count(m, "dropped_rows", k)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def _add_count(self, model: str, field: str, k: int) -> None:
        if k:
            self.conn.execute(f"INSERT INTO counts(model, {field}) VALUES (?, ?) ON CONFLICT(model) "
                              f"DO UPDATE SET {field} = {field} + excluded.{field}", (model, k))

    def _write(self, items: list, dropped: dict[str, int]) -> None:
        # requests of one version with the same columns nearly always have the same shapes: group by
        # the cheap key, and only when a group's arrays do not stack split it by their exact shapes
        groups: dict[tuple, list] = {}
        for it in items:
            groups.setdefault((it[0], tuple(it[4]), it[6] is None, len(it[5])), []).append(it)
        built = []
        for group in groups.values():
            try:
                built.append((group[0][0], build_sample_batch(self.device, group), group))
            except (ValueError, TypeError, ArithmeticError) + _arrow_errors():
                exact: dict[tuple, list] = {}
                for it in group:
                    exact.setdefault(_group_key(it), []).append(it)
                for part in exact.values():
                    built.append((part[0][0], build_sample_batch(self.device, part), part))
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for spec, batch, group in built:
                    seq = self._insert(spec.model, "samples", batch)
                    rid_rows = []
                    for it in group:
                        if it[8] is not None:
                            rid_rows.extend((spec.model, r, 0) for r in it[8])
                        else:
                            rid_rows.append((spec.model, it[7], it[3]))
                    self.conn.executemany("INSERT INTO rids(model, rid, n) VALUES (?, ?, ?)", rid_rows)
                    self.rid_count[spec.model] = self.rid_count.get(spec.model, 0) + len(rid_rows)
                    self._bound(spec.model, spec.max_bytes, seq)
                for m, k in dropped.items():
                    self._add_count(m, "dropped_rows", k)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                self._reload_sizes()
                raise

    def _reload_sizes(self) -> None:
        self.bytes = {m: int(b) for m, b in self.conn.execute("SELECT model, SUM(bytes) FROM chunks GROUP BY model")}
        self.rid_count = {m: int(c) for m, c in self.conn.execute("SELECT model, COUNT(*) FROM rids GROUP BY model")}

    def _insert(self, model: str, kind: str, batch) -> int:
        """Store ``batch`` (in chunks of at most MAX_CHUNK_ROWS rows and about CHUNK_BYTES) under fresh
        sequence numbers, inside the caller's transaction; returns the last chunk's seq_first."""
        row = self.conn.execute("SELECT v FROM meta WHERE k = 'next_seq'").fetchone()
        seq = int(row[0]) if row else 1
        last_first = seq
        schema_id = hashlib.sha256(batch.schema.serialize().to_pybytes()).hexdigest()[:16]
        step = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES * batch.num_rows // max(1, batch.nbytes)))
        for off in range(0, batch.num_rows, step):
            piece = batch.slice(off, step)
            if step < batch.num_rows:
                piece = _compact(piece)
            last_first = seq
            data = ipc_bytes(piece)
            self.conn.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (seq, seq + piece.num_rows - 1, kind, model, piece.num_rows, len(data), schema_id, data))
            self.bytes[model] = self.bytes.get(model, 0) + len(data)
            seq += piece.num_rows
        self.conn.execute("INSERT INTO meta(k, v) VALUES ('next_seq', ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                          (seq,))
        return last_first

    def _bound(self, model: str, max_bytes: int, keep_from: int) -> None:
        """Drop this model's oldest chunks over its budget (never the newest, from ``keep_from``: the
        store holds at most the budget plus one chunk, about CHUNK_BYTES) and its oldest request ids
        over MAX_RIDS; inside the caller's transaction."""
        while self.bytes.get(model, 0) > max_bytes:
            row = self.conn.execute("SELECT seq_first, rows, bytes FROM chunks WHERE model = ? AND seq_first < ? "
                                    "ORDER BY seq_first LIMIT 1", (model, keep_from)).fetchone()
            if row is None:
                break
            self.conn.execute("DELETE FROM chunks WHERE seq_first = ?", (row[0],))
            self.bytes[model] -= row[2]
            self._add_count(model, "dropped_rows", row[1])
        over = self.rid_count.get(model, 0) - MAX_RIDS
        if over > 0:
            self.conn.execute("DELETE FROM rids WHERE id IN (SELECT id FROM rids WHERE model = ? ORDER BY id LIMIT ?)",
                              (model, over))
            self.rid_count[model] -= over

    # ------------------------------------------------------------------ outcomes

    def _known(self, model: str, rid: str) -> bool:
        if self.conn.execute("SELECT 1 FROM rids WHERE model = ? AND rid = ? AND n = 0 LIMIT 1",
                             (model, rid)).fetchone():
            return True
        prefix, dash, idx = rid.rpartition("-")
        if not dash or not idx.isdigit() or len(idx) > 9 or idx != str(int(idx)):  # rows are <prefix>-<i>, i as written
            return False
        return self.conn.execute("SELECT 1 FROM rids WHERE model = ? AND rid = ? AND n > ? LIMIT 1",
                                 (model, prefix, int(idx))).fetchone() is not None

    def record_outcomes(self, model: str, outcomes: list[tuple[str, str]], max_bytes: int) -> dict:
        """``outcomes``: (request id, label as JSON text), all checked already. One transaction: all the
        known ones are recorded, or (an error) none."""
        import pyarrow as pa

        now = time.time()
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                known = [(r, lab) for r, lab in outcomes if self._known(model, r)]
                unknown = len(outcomes) - len(known)
                if known:
                    n = len(known)
                    batch = pa.record_batch({
                        "request_id": pa.array([r for r, _ in known], pa.string()),
                        "label": pa.array([lab for _, lab in known], pa.string()),
                        "label_at": pa.array(np.full(n, int(now * 1e6), np.int64), pa.timestamp("us", tz="UTC")),
                        "device": pa.array([self.device] * n, pa.string()),
                        "model": pa.array([model] * n, pa.string()),
                    })
                    seq = self._insert(model, "outcomes", batch)
                    self._bound(model, max_bytes, seq)
                self._add_count(model, "unknown_outcomes", unknown)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                self._reload_sizes()
                raise
        return {"recorded": len(known), "unknown": unknown}

    # ------------------------------------------------------------------ reading

    def read(self, model: str, kind: str, since: int, max_rows: int):
        """Rows of ``model``'s ``kind`` with seq > since, oldest first, at most max_rows, with a ``seq``
        column: (pa.Table or None, the last seq returned or ``since``)."""
        import pyarrow as pa

        tables, got, last = [], 0, since
        with self.lock:
            cur = self.conn.execute("SELECT seq_first, data FROM chunks WHERE model = ? AND kind = ? "
                                    "AND seq_last > ? ORDER BY seq_first", (model, kind, since))
            for seq_first, data in cur:
                t = with_seq(read_ipc(data), seq_first)
                if seq_first <= since:
                    t = t.slice(since - seq_first + 1)
                t = t.slice(0, max_rows - got)
                if t.num_rows:
                    tables.append(t)
                    got += t.num_rows
                    last = int(t.column("seq")[-1].as_py())
                if got >= max_rows:
                    break
        if not tables:
            return None, last
        return pa.concat_tables(tables, promote_options="permissive"), last

    def pending(self, limit_bytes: int) -> list[tuple[str, str, list]]:
        """For the upload: per (model, kind), the chunks in seq order as (seq_first, seq_last, schema,
        bytes), at most about limit_bytes per (model, kind)."""
        out: dict[tuple[str, str], list] = {}
        sizes: dict[tuple[str, str], int] = {}
        with self.lock:
            for seq_first, seq_last, kind, model, schema, nbytes in self.conn.execute(
                    "SELECT seq_first, seq_last, kind, model, schema, bytes FROM chunks ORDER BY seq_first"):
                key = (model, kind)
                if sizes.get(key, 0) >= limit_bytes:
                    continue
                out.setdefault(key, []).append((seq_first, seq_last, schema, nbytes))
                sizes[key] = sizes.get(key, 0) + nbytes
        return [(m, k, chunks) for (m, k), chunks in out.items()]

    def chunk_table(self, seq_first: int):
        with self.lock:
            row = self.conn.execute("SELECT data FROM chunks WHERE seq_first = ?", (seq_first,)).fetchone()
        return None if row is None else with_seq(read_ipc(row[0]), seq_first)

    def acked(self, model: str, kind: str, last: int) -> int:
        """The hub holds this (model, kind)'s rows up to seq ``last``: delete the chunks it covers."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self.conn.execute("SELECT seq_first, bytes FROM chunks WHERE model = ? AND kind = ? "
                                         "AND seq_last <= ?", (model, kind, last)).fetchall()
                self.conn.execute("DELETE FROM chunks WHERE model = ? AND kind = ? AND seq_last <= ?",
                                  (model, kind, last))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.bytes[model] = self.bytes.get(model, 0) - sum(b for _, b in rows)
        return len(rows)

    def stats(self) -> dict[str, dict]:
        """Per model: rows, bytes, dropped_rows, pending_upload_rows, outcomes, unknown_outcomes."""
        out: dict[str, dict] = {}

        def entry(m):
            return out.setdefault(m, {"rows": 0, "bytes": 0, "dropped_rows": 0, "pending_upload_rows": 0,
                                      "outcomes": 0, "unknown_outcomes": 0, "queued_rows": 0})
        with self.lock:
            for model, kind, rows, nbytes in self.conn.execute(
                    "SELECT model, kind, SUM(rows), SUM(bytes) FROM chunks GROUP BY model, kind"):
                e = entry(model)
                e["rows" if kind == "samples" else "outcomes"] += int(rows)
                e["bytes"] += int(nbytes)
                e["pending_upload_rows"] += int(rows)
            for model, dropped, unknown in self.conn.execute("SELECT model, dropped_rows, unknown_outcomes FROM counts"):
                e = entry(model)
                e["dropped_rows"] += int(dropped)
                e["unknown_outcomes"] += int(unknown)
        with self.qlock:
            for it in [*self.writing, *self.queue]:
                entry(it[0].model)["queued_rows"] += it[3]
            for m, k in self.queue_dropped.items():
                entry(m)["dropped_rows"] += k
        return out


# ---------------------------------------------------------------------- Arrow


def ipc_bytes(batch_or_table, compression: str | None = None) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    with pa.ipc.new_stream(sink, batch_or_table.schema, options=opts) as w:
        w.write(batch_or_table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes):
    """A stored chunk as a table, the chunk's constants (dictionary columns) as plain columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    for i, f in enumerate(t.schema):
        if pa.types.is_dictionary(f.type):
            t = t.set_column(i, f.name, t.column(i).cast(f.type.value_type))
    if "__row" in t.column_names:  # generated ids: <prefix>-<row>
        i = t.column_names.index("request_id")
        rid = pc.binary_join_element_wise(t.column(i), pc.cast(t.column("__row"), pa.string()), "-",
                                          null_handling="skip")
        t = t.set_column(i, "request_id", rid).drop_columns(["__row"])
    return t


def with_seq(table, seq_first: int):
    import pyarrow as pa

    return table.append_column("seq", pa.array(np.arange(seq_first, seq_first + table.num_rows, dtype=np.int64)))


def _compact(piece):
    """A slice of a batch keeps its dictionaries whole (every request's id prefix): a chunk keeps
    only the entries its rows use."""
    import pyarrow as pa
    import pyarrow.compute as pc

    i = piece.schema.get_field_index("request_id")
    if i < 0 or not pa.types.is_dictionary(piece.schema.field(i).type):
        return piece
    col = piece.column(i)
    return piece.set_column(i, "request_id", pc.dictionary_encode(col.dictionary_decode()))


def _arrow_errors() -> tuple:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowTypeError)


def _shape_key(a) -> tuple:
    if isinstance(a, np.ndarray):
        return (a.dtype.kind if a.dtype.kind in "OUS" else a.dtype.str, a.shape[1:])
    return ("json",)


def _group_key(it) -> tuple:
    spec, feed, values, jsoned = it[0], it[4], it[5], it[6]
    outs = ("jsoned",) if jsoned is not None else tuple(_shape_key(v) for v in values)
    return (spec, tuple((k, _shape_key(a)) for k, a in feed.items()), outs)


def _column(arrays: list, input_side: bool):
    """One column of a group: numpy arrays (rows first) -> one Arrow array. Inputs whose rows are
    scalars or one value are plain columns; wider rows (and every 2-D output, as ORT gives it) are
    fixed-size lists."""
    import pyarrow as pa

    a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    n = a.shape[0]
    flat = a.reshape(-1)
    if a.dtype.kind in "OU":
        try:
            arr = pa.array(flat, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array(flat.astype(str), pa.string())
    else:
        arr = pa.array(flat)
    width = flat.shape[0] // n if n else 1
    if a.ndim == 1 or (input_side and width == 1):
        return arr
    return pa.FixedSizeListArray.from_arrays(arr, width)


def _hashed(arrays: list, salt: bytes):
    """HMAC of each distinct value once (np.unique), taken back to the rows."""
    import pyarrow as pa

    a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    flat = a.reshape(a.shape[0], -1)[:, 0] if a.ndim > 1 and a.shape[1:] == (1,) else a.reshape(a.shape[0], -1)
    if flat.ndim > 1:  # a wide column: the row's values joined, as one string
        flat = np.array([" ".join(map(str, r)) for r in flat.tolist()], dtype=object)
    try:
        uniq, inverse = np.unique(flat, return_inverse=True)
    except TypeError:  # mixed objects
        uniq, inverse = np.unique(flat.astype(str), return_inverse=True)
    hashed = pa.array([hash_value(salt, v) for v in uniq.tolist()], pa.string())
    return hashed.take(pa.array(inverse.reshape(-1).astype(np.int64)))


def build_sample_batch(device: str, group: list):
    """The sample rows of a group of requests of one model version and one input/output shape."""
    import pyarrow as pa

    spec = group[0][0]
    counts = np.fromiter((it[3] for it in group), np.int64, len(group))
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    row_in_req = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
    # request ids, stored compactly: a dictionary of the requests' generated prefixes (one entry per
    # request) and of the callers' own ids (one per row), and ``__row``, the row's number in its
    # request where the id is generated (<prefix>-<row>); read_ipc puts the ids back together
    explicit_req = np.fromiter((it[8] is not None for it in group), bool, len(group))
    entries = np.where(explicit_req, counts, 1)
    first_entry = np.cumsum(entries) - entries
    values: list = []
    for it in group:
        if it[8] is not None:
            values.extend(it[8])
        else:
            values.append(it[7])
    explicit = np.repeat(explicit_req, counts)
    index = np.repeat(first_entry, counts) + np.where(explicit, row_in_req, 0)
    request_id = pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), pa.array(values, pa.string()))
    id_row = pa.array(row_in_req.astype(np.int32), mask=explicit)
    t_us = np.fromiter((int(it[1] * 1e6) for it in group), np.int64, len(group))
    ms = np.fromiter((it[2] for it in group), np.float64, len(group))
    zeros = pa.array(np.zeros(total, dtype=np.int8))  # the chunk's constants: one value, stored once

    def constant(value, typ):
        return pa.DictionaryArray.from_arrays(zeros, pa.array([value], typ))

    cols: dict[str, Any] = {
        "request_id": request_id,
        "predicted_at": pa.array(np.repeat(t_us, counts), pa.timestamp("us", tz="UTC")),
        "device": constant(device, pa.string()),
        "model": constant(spec.model, pa.string()),
        "version": pa.array(np.full(total, spec.version, dtype=np.int32)),
        "provider": constant(spec.provider, pa.string()),
        "latency_ms": pa.array(np.repeat(ms, counts)),
        "__row": id_row,
    }
    for name in group[0][4]:
        if name in spec.exclude:
            continue
        arrays = [it[4][name] for it in group]
        cols[f"in.{name}"] = _hashed(arrays, spec.salt) if name in spec.hashed else _column(arrays, True)
    if group[0][6] is not None or any(not isinstance(v, np.ndarray) for v in group[0][5]):
        # outputs that are not tensors (a ZipMap's list of maps): one JSON text per row
        for i, name in enumerate(spec.output_names):
            rows: list = []
            for it in group:
                vals = it[6][name] if it[6] is not None else it[5][i]
                vals = vals.tolist() if isinstance(vals, np.ndarray) else vals
                rows.extend(json.dumps(v, default=str) for v in vals)
            cols[f"out.{name}"] = pa.array(rows, pa.string())
    else:
        for i, name in enumerate(spec.output_names):
            cols[f"out.{name}"] = _column([it[5][i] for it in group], False)
    return pa.record_batch(cols)
