"""Feature views on the device: the app's events in, window features out, equal to what
``ML.FEATURES_AT`` computes offline from the same events (docs/DEVICE.md, "Feature views on the
device"). The agent never parses SQL: it installs the *view spec* (JSON, the contract in
docs/DEVICE.md) that a model package carries in its manifest's ``feature_views``.

Window semantics (identical to the SQL side): the value of a feature with window ``w`` for key
``k`` as of time ``at`` aggregates exactly the events with ``key = k`` and
``at - w <= time_col <= at``, both ends inclusive. ``last`` is the value at the latest time in the
window, ties at the same time broken by the latest *arrival* (the agent's order of acceptance,
which offline is the event table's row order); rows whose argument is NULL (or whose FILTER is
not TRUE) are not in any aggregate. ``count_distinct`` is capped at the feature's ``max_distinct``
(``least(count(DISTINCT x), max_distinct)``, as ``ML.FEATURES_AT`` computes it). The one text of
these semantics is in docs/DEVICE.md and docs/LANGUAGE.md (kept equal by a test).

State (per view, in memory): **the events still inside the horizon, columnar**, where the horizon
is the view's longest window plus ``HORIZON_SLACK_US`` (one day) behind the newest event time
seen. Not the raw events: per event only the key (an integer id), the time, the arrival sequence
number and, per feature, the evaluated argument and whether the row counts for it (FILTER TRUE and
argument not NULL). Keeping events (not time buckets) makes every aggregate exact at any ``at``,
including ``last``, ``min``/``max`` and ``count_distinct`` at arbitrary times between two events.
The columns are kept in two parts:

- the *base*, sorted by (key id, arrival), with an offsets array per key id: a key's rows are one
  slice;
- the *tail*, the newest ``TAIL_ROWS`` events in arrival order (preallocated columns). A lookup
  scans it with one vectorized comparison.

When the tail is full it is merged into the base (a stable sort of the tail, concatenated after
the sorted base: numpy's timsort merges the two runs), and then the view's bounds are applied:

- rows older than the horizon are dropped (``expired_rows``);
- keys with no row left inside the horizon are dropped (``evicted_keys_ttl``: the view's ttl is at
  least every window, and the horizon keeps what any exact lookup needs);
- over ``max_keys`` or ``max_state_mb`` (deploy settings; defaults ``DEFAULT_MAX_KEYS`` and
  ``DEFAULT_MAX_STATE_MB``), the keys with the oldest newest event go first
  (``evicted_keys_max_keys``, ``evicted_keys_max_state``). An evicted key starts again empty.

The bounds hold after each merge: between two merges the state can pass them by at most one tail.
A lookup whose longest window reaches back to a dropped row's time is refused (400), never answered
from a truncated window. A merge's new columns are built without the readers' lock (there is one
writer at a time) and swapped in under it: a lookup never waits for the sort.

Durability (``STORE/features.db``, SQLite in WAL mode, ``synchronous=NORMAL``): a POST /v1/events
is answered 200 only after its transaction committed (one transaction per request, all views of
the table together: all or nothing). A committed transaction is in the WAL file, so an
acknowledged event survives the agent's crash, a kill -9 or a restart; a power cut may also lose
the commits since the WAL's last checkpoint, never tear one. The log holds, per request and view,
the evaluated columns (device_bridge.columns' binary form, numpy only: pyarrow is imported only to
read JSON events); the in-memory state is a deterministic fold of the log (merges happen at the
same event counts, with the bounds recorded in the log), so a restart rebuilds exactly the state
that answered before it, and no event is applied twice. A caller's ``batch_id`` is stored in the
same transaction, so a retried batch (its answer lost) is applied once. When the log grows past
twice the state, it is replaced, in one transaction, by a snapshot of the state just after a merge.

Ingest is vectorized: JSON rows become Arrow columns in one ``pyarrow.array`` call (C++), binary
batches are numpy arrays already, and the view's expressions are evaluated over the whole batch
with numpy; the only Python loop is over the batch's *distinct* keys (a dict lookup each).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_bridge.errors import ApiError

log = logging.getLogger("device_bridge.features")

DB_FILE = "features.db"
FORMAT = 1
TYPES = ("bool", "int64", "float64", "string", "timestamp")
AGGS = ("count", "sum", "avg", "min", "max", "last", "count_distinct")
FUTURE_US = 86_400_000_000          # an event more than a day ahead of the agent's clock is refused
HORIZON_SLACK_US = 86_400_000_000   # rows are kept this long past the longest window
TAIL_ROWS = 32_768                  # events between two merges of the tail into the base
MAX_EVENT_ROWS = 100_000            # events in one POST /v1/events
MAX_BATCH_IDS = 100_000             # the callers' batch ids remembered (all tables), to apply a retry once
DEFAULT_MAX_KEYS = 1_000_000
DEFAULT_MAX_STATE_MB = 256
MAX_DISTINCT_DEFAULT = 64
MAX_FEATURES = 256
MAX_EXPR_DEPTH = 32
MAX_EXPR_NODES = 256
SNAPSHOT_MIN_BYTES = 4 << 20        # the log is not replaced by a snapshot below this size
SNAPSHOT_ENV = "MLSQL_DEVICE_TEST_SNAPSHOT_BYTES"  # test hook: another SNAPSHOT_MIN_BYTES
INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ARITH = ("+", "-", "*", "/")
_CMP = ("=", "<>", "<", "<=", ">", ">=")


class FeatureError(ApiError):
    """A bad event batch, lookup or view spec: answered with its status and a message naming the field."""


def _bad(msg: str, status: int = 400, kind: str = "invalid_input") -> FeatureError:
    return FeatureError(status, msg, kind)


# ---------------------------------------------------------------------- the view spec


@dataclass(frozen=True)
class Feature:
    name: str
    agg: str
    arg: Any
    filter: Any
    window_us: int
    type: str
    arg_type: str | None
    max_distinct: int


@dataclass(frozen=True)
class View:
    name: str
    table: str
    key: str
    time_col: str
    ttl_us: int
    schema: dict
    features: tuple
    raw: dict = field(compare=False, hash=False)

    @property
    def max_window(self) -> int:
        return max(f.window_us for f in self.features)

    @property
    def horizon(self) -> int:
        return self.max_window + HORIZON_SLACK_US

    def identity(self) -> bytes:
        """What makes two specs the same view: everything but the SQL text."""
        return json.dumps({k: v for k, v in self.raw.items() if k != "sql"}, sort_keys=True).encode()


def _int(v: Any, what: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < 2**62:
        raise _bad(f"{what} must be an integer of {lo} or more, got {v!r}", 422, "package")
    return v


def check_spec(raw: Any, where: str = "feature_views") -> View:
    """A view spec from a package manifest, checked; a bad one is a 422 naming the field."""
    def bad(msg):
        return _bad(f"{where}: {msg}", 422, "package")

    if not isinstance(raw, dict):
        raise bad("a view spec must be a JSON object")
    if raw.get("format") != FORMAT:
        raise bad(f"format must be {FORMAT}, got {raw.get('format')!r}")
    for k in ("name", "table", "key", "time_col"):
        v = raw.get(k)
        if not isinstance(v, str) or not 0 < len(v) <= 128 or not set(v) <= _NAME_OK:
            raise bad(f"{k} must be a name of 1 to 128 letters, digits, '_', '.' or '-', got {v!r}")
    where = f"{where} {raw['name']}"
    ttl = raw.get("ttl_us")
    if ttl is None:  # no ttl given: the longest window (the device keeps a day more anyway: the horizon)
        windows = [f.get("window_us") for f in raw.get("features") or [] if isinstance(f, dict)]
        ttl = max([w for w in windows if isinstance(w, int) and not isinstance(w, bool)] or [1])
    ttl = _int(ttl, f"{where}: ttl_us")
    schema_raw = raw.get("schema")
    if not isinstance(schema_raw, list) or not schema_raw or len(schema_raw) > 1024:
        raise bad("schema must be a non-empty list of {name, type}")
    schema: dict[str, str] = {}
    for i, c in enumerate(schema_raw):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c.get("type") not in TYPES:
            raise bad(f"schema[{i}] must be {{name, type}} with type one of {', '.join(TYPES)}")
        if c["name"] in schema:
            raise bad(f"schema names column {c['name']!r} twice")
        schema[c["name"]] = c["type"]
    if schema.get(raw["key"]) not in ("string", "int64"):
        raise bad(f"key {raw['key']!r} must be a string or int64 column of the schema")
    if schema.get(raw["time_col"]) != "timestamp":
        raise bad(f"time_col {raw['time_col']!r} must be a timestamp column of the schema")
    feats_raw = raw.get("features")
    if not isinstance(feats_raw, list) or not 0 < len(feats_raw) <= MAX_FEATURES:
        raise bad(f"features must be a list of 1 to {MAX_FEATURES} features")
    feats = []
    names = set()
    for i, f in enumerate(feats_raw):
        w = f"features[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"{w} must be an object with a name")
        w = f"feature {f['name']}"
        if f["name"] in names:
            raise bad(f"{w} appears twice")
        names.add(f["name"])
        agg = f.get("agg")
        if agg not in AGGS:
            raise bad(f"{w}: agg must be one of {', '.join(AGGS)}, got {agg!r}")
        window = _int(f.get("window_us"), f"{where}: {w}: window_us")
        if window > ttl:
            raise bad(f"{w}: window_us {window} is over the view's ttl_us {ttl}")
        arg, flt = f.get("arg"), f.get("filter")
        arg_type = None
        if arg is not None:
            arg_type = expr_type(arg, schema, f"{w}: arg")
            if isinstance(arg, dict) and schema.get(arg.get("col")) == "timestamp":
                arg_type = "timestamp"  # min, max, last of the time itself: a timestamp (microseconds)
        elif agg != "count":
            raise bad(f"{w}: {agg} needs an arg")
        if flt is not None and expr_type(flt, schema, f"{w}: filter") not in ("bool", "null"):
            raise bad(f"{w}: filter must be a boolean expression")
        want = _result_type(agg, arg_type)
        if want is None:
            raise bad(f"{w}: {agg} cannot take an argument of type {arg_type}")
        if f.get("type") != want and not (want == "null" and f.get("type") in TYPES):
            raise bad(f"{w}: type must be {want} for {agg} of {arg_type or '*'}, got {f.get('type')!r}")
        md = f.get("max_distinct", MAX_DISTINCT_DEFAULT)
        md = _int(md if md is not None else MAX_DISTINCT_DEFAULT, f"{where}: {w}: max_distinct")
        feats.append(Feature(f["name"], agg, arg, flt, window, f["type"], arg_type, md))
    return View(raw["name"], raw["table"], raw["key"], raw["time_col"], ttl, schema, tuple(feats), raw)


def _result_type(agg: str, arg_type: str | None) -> str | None:
    if agg in ("count", "count_distinct"):
        return "int64"
    if agg == "sum":
        return {"int64": "int64", "float64": "float64", "bool": None}.get(arg_type or "", None) \
            if arg_type != "timestamp" else None
    if agg == "avg":
        return "float64" if arg_type in ("int64", "float64") else None
    return arg_type  # min, max, last: the argument's type


def expr_type(e: Any, schema: dict, where: str, depth: int = 0, count: list | None = None) -> str:
    """The type of an expression tree ('null' for a NULL literal), checked against the schema."""
    count = count if count is not None else [0]
    count[0] += 1
    if depth > MAX_EXPR_DEPTH or count[0] > MAX_EXPR_NODES:
        raise _bad(f"{where}: expression too deep or too large", 422, "package")
    if not isinstance(e, dict) or len(e) not in (1, 2):
        raise _bad(f"{where}: an expression is {{col}}, {{lit}} or {{op, args}}, got {str(e)[:60]}", 422, "package")
    if "col" in e:
        if e["col"] not in schema:
            raise _bad(f"{where}: column {e['col']!r} is not in the view's schema", 422, "package")
        t = schema[e["col"]]
        return "int64" if t == "timestamp" else t
    if "lit" in e:
        v = e["lit"]
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int):
            return "int64"
        if isinstance(v, float):
            return "float64"
        if isinstance(v, str):
            return "string"
        raise _bad(f"{where}: a literal is a number, string, bool or null", 422, "package")
    op, args = e.get("op"), e.get("args")
    if not isinstance(args, list) or not args:
        raise _bad(f"{where}: op {op!r} needs a non-empty args list", 422, "package")
    ts = [expr_type(a, schema, where, depth + 1, count) for a in args]

    def need(n):
        if len(args) != n:
            raise _bad(f"{where}: {op} takes {n} argument(s), got {len(args)}", 422, "package")

    def numeric(t):
        return t in ("int64", "float64", "null")

    if op in _ARITH:
        need(2)
        if not all(numeric(t) for t in ts):
            raise _bad(f"{where}: {op} needs numbers, got {ts}", 422, "package")
        return "float64" if op == "/" or "float64" in ts else "int64"
    if op == "neg":
        need(1)
        if not numeric(ts[0]):
            raise _bad(f"{where}: neg needs a number", 422, "package")
        return ts[0] if ts[0] != "null" else "int64"
    if op in _CMP:
        need(2)
        a, b = ts
        if not (a == b or "null" in ts or (numeric(a) and numeric(b))):
            raise _bad(f"{where}: {op} compares {a} with {b}", 422, "package")
        return "bool"
    if op in ("and", "or"):
        need(2)
        if any(t not in ("bool", "null") for t in ts):
            raise _bad(f"{where}: {op} needs booleans", 422, "package")
        return "bool"
    if op == "not":
        need(1)
        if ts[0] not in ("bool", "null"):
            raise _bad(f"{where}: not needs a boolean", 422, "package")
        return "bool"
    if op in ("is_null", "is_not_null"):
        need(1)
        return "bool"
    if op == "in":
        if len(args) < 2 or not all("lit" in a for a in args[1:]):
            raise _bad(f"{where}: in takes a value and literals", 422, "package")
        for t in ts[1:]:
            if not (t == ts[0] or t == "null" or ts[0] == "null" or (numeric(t) and numeric(ts[0]))):
                raise _bad(f"{where}: in compares {ts[0]} with {t}", 422, "package")
        return "bool"
    if op == "coalesce":
        return _unify_types(ts, where)
    if op == "case":
        if len(args) < 2:
            raise _bad(f"{where}: case needs a condition and a value", 422, "package")
        conds = ts[0:len(ts) - (len(ts) % 2 == 1):2]
        vals = ts[1::2] + ([ts[-1]] if len(ts) % 2 == 1 else [])
        if any(t not in ("bool", "null") for t in conds):
            raise _bad(f"{where}: case conditions must be booleans", 422, "package")
        return _unify_types(vals, where)
    raise _bad(f"{where}: unknown op {op!r}", 422, "package")


def _unify_types(ts: list, where: str) -> str:
    real = {t for t in ts if t != "null"}
    if not real:
        return "null"
    if real <= {"int64", "float64"}:
        return "float64" if "float64" in real else "int64"
    if len(real) == 1:
        return real.pop()
    raise _bad(f"{where}: values of types {sorted(real)} cannot be combined", 422, "package")


# ---------------------------------------------------------------------- expressions, vectorized

_EMPTY = {"bool": False, "int64": 0, "float64": 0.0, "string": "", "null": 0}


def _np_type(t: str):
    return {"bool": np.bool_, "int64": np.int64, "float64": np.float64, "timestamp": np.int64,
            "null": np.int64}.get(t, np.str_)


def _as(v: np.ndarray, t: str) -> np.ndarray:
    if t == "string":
        return v.astype(np.str_) if v.dtype.kind != "U" else v
    return v.astype(_np_type(t), copy=False)


def evaluate(e: Any, cols: dict, n: int, schema: dict) -> tuple[np.ndarray, np.ndarray]:
    """(values, null mask) of expression ``e`` over a batch of ``n`` events (SQL's NULLs: they
    propagate through arithmetic and comparisons; and/or are three-valued)."""
    if "col" in e:
        return cols[e["col"]]
    if "lit" in e:
        v = e["lit"]
        if v is None:
            return np.zeros(n, np.int64), np.ones(n, bool)
        return np.full(n, v), np.zeros(n, bool)
    op, args = e["op"], e["args"]
    ev = [evaluate(a, cols, n, schema) for a in args]
    if op in _ARITH:
        (a, na), (b, nb) = ev
        null = na | nb
        with np.errstate(all="ignore"):
            if op == "/":
                a, b = a.astype(np.float64), b.astype(np.float64)
                zero = b == 0
                out = np.divide(a, np.where(zero, 1.0, b))
                null = null | zero
            else:
                if a.dtype.kind == "f" or b.dtype.kind == "f":
                    a, b = a.astype(np.float64), b.astype(np.float64)
                out = a + b if op == "+" else a - b if op == "-" else a * b
        return out, null
    if op == "neg":
        (a, na), = ev
        return -a, na
    if op in _CMP:
        (a, na), (b, nb) = ev
        if a.dtype.kind == "U" or b.dtype.kind == "U":
            a, b = a.astype(np.str_), b.astype(np.str_)
        out = {"=": np.equal, "<>": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
               ">=": np.greater_equal}[op](a, b)
        return out, na | nb
    if op == "and":
        (a, na), (b, nb) = ev
        a, b = a.astype(bool), b.astype(bool)
        false = (~na & ~a) | (~nb & ~b)
        return a & b & ~na & ~nb, ~false & (na | nb)
    if op == "or":
        (a, na), (b, nb) = ev
        a, b = a.astype(bool), b.astype(bool)
        true = (~na & a) | (~nb & b)
        return true, ~true & (na | nb)
    if op == "not":
        (a, na), = ev
        return ~a.astype(bool), na
    if op == "is_null":
        return ev[0][1].copy(), np.zeros(n, bool)
    if op == "is_not_null":
        return ~ev[0][1], np.zeros(n, bool)
    if op == "in":
        v, nv = ev[0]
        match = np.zeros(n, bool)
        null_lit = False
        for a in args[1:]:
            lit = a["lit"]
            if lit is None:
                null_lit = True
                continue
            match |= (v.astype(np.str_) == lit) if isinstance(lit, str) else (v == lit)
        return match & ~nv, nv | (~match & null_lit)
    if op == "coalesce":
        t = _unify_types([expr_type(a, schema, "") for a in args], "")
        out, null = _as(ev[0][0], t), ev[0][1].copy()
        for v, nv in ev[1:]:
            take = null & ~nv
            out = np.where(take, _as(v, t), out)
            null &= nv
        return out, null
    if op == "case":
        ts = [expr_type(a, schema, "") for a in args]
        has_else = len(args) % 2 == 1
        vals_t = _unify_types(ts[1::2] + ([ts[-1]] if has_else else []), "")
        if has_else:
            out, null = _as(ev[-1][0], vals_t), ev[-1][1].copy()
        else:
            out, null = _as(np.full(n, _EMPTY[vals_t]), vals_t), np.ones(n, bool)
        pairs = list(range(0, len(args) - has_else, 2))
        for i in reversed(pairs):
            c, nc = ev[i]
            take = c.astype(bool) & ~nc
            out = np.where(take, _as(ev[i + 1][0], vals_t), out)
            null = np.where(take, ev[i + 1][1], null)
        return out, null
    raise _bad(f"unknown op {op!r}")


# ---------------------------------------------------------------------- reading event batches


def _now_us() -> int:
    return time.time_ns() // 1000


def parse_times(values: np.ndarray, where: str, index: np.ndarray | None = None) -> np.ndarray:
    """ISO-8601 strings -> microseconds since the epoch, UTC (no offset: read as UTC). ``index``: the
    values' row numbers in the request, to name a bad one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(values, pa.string())
    has_tz = pc.match_substring_regex(arr, r"(Z|[+-]\d\d:?\d\d)$").to_numpy(zero_copy_only=False)
    out = np.empty(len(values), np.int64)
    for mask, typ in ((has_tz, pa.timestamp("us", tz="UTC")), (~has_tz, pa.timestamp("us"))):
        if mask.any():
            part = pc.filter(arr, pa.array(mask))
            try:
                out[mask] = pc.cast(part, typ).cast(pa.int64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                strs = part.to_pylist()
                for s in strs:  # the error path only: find the value to name
                    try:
                        pc.cast(pa.array([s]), typ)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        i = int(np.flatnonzero(values == s)[0])
                        i = int(index[i]) if index is not None else i
                        raise _bad(f"{where.replace('[]', f'[{i}]')}: {s[:40]!r} is not an ISO-8601 timestamp") from None
                raise
    return out


def columns_from_rows(rows: list, schema: dict, key: str, time_col: str) -> tuple[dict, int]:
    """JSON event rows -> {column: (values, null mask)} in one pyarrow conversion (C++)."""
    import pyarrow as pa

    n = len(rows)
    try:
        arr = pa.array(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
        _rows_error(rows, schema, str(exc))
        return _mixed_rows(rows, schema, key, time_col, str(exc))
    if not pa.types.is_struct(arr.type):
        raise _bad("rows must be a list of JSON objects (one per event)")
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise _bad(f"rows[{i}] must be a JSON object")
    cols = {}
    for f in arr.type:
        if f.name not in schema:
            i = next(i for i, r in enumerate(rows) if f.name in r)
            raise _bad(f"rows[{i}].{f.name}: unknown column (the event table's columns: {', '.join(schema)})")
    for name, t in schema.items():
        if arr.type.get_field_index(name) < 0:
            if name in (key, time_col):
                raise _bad(f"rows: the {'key' if name == key else 'time'} column {name!r} is missing")
            cols[name] = (np.full(n, _EMPTY.get(t, 0)).astype(_np_type(t)), np.ones(n, bool))
            continue
        a = arr.field(name)
        cols[name] = _arrow_column(a, t, f"rows[].{name}", rows, name)
    return cols, n


def _mixed_rows(rows: list, schema: dict, key: str, time_col: str, why: str) -> tuple[dict, int]:
    """Rows whose timestamps mix integers and ISO strings (each value fits its column): read column by
    column, the timestamps in two parts."""
    import pyarrow as pa

    n = len(rows)
    cols = {}
    for name, t in schema.items():
        vals = [r.get(name) for r in rows]
        if t == "timestamp":
            obj = np.array(vals, dtype=object)
            null = obj == None  # noqa: E711 - elementwise
            is_str = np.array([isinstance(v, str) for v in vals], bool)
            out = np.zeros(n, np.int64)
            ints = ~null & ~is_str
            out[ints] = obj[ints].astype(np.int64)
            if is_str.any():
                out[is_str] = parse_times(obj[is_str], f"rows[].{name}", np.flatnonzero(is_str))
            cols[name] = (out, null)
        else:
            try:
                cols[name] = _arrow_column(pa.array(vals), t, f"rows[].{name}", rows, name)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                raise _bad(f"rows cannot be read as events: {why[:200]}") from None
        if name in (key, time_col) and all(name not in r for r in rows):
            raise _bad(f"rows: the {'key' if name == key else 'time'} column {name!r} is missing")
    return cols, n


def _arrow_column(a, t: str, where: str, rows: list, name: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    null = a.is_null().to_numpy(zero_copy_only=False)
    at = a.type
    ok = ((t == "string" and (pa.types.is_string(at) or pa.types.is_large_string(at)))
          or (t == "bool" and pa.types.is_boolean(at))
          or (t == "int64" and pa.types.is_integer(at))
          or (t == "float64" and (pa.types.is_integer(at) or pa.types.is_floating(at)))
          or (t == "timestamp" and (pa.types.is_integer(at) or pa.types.is_string(at))))
    if pa.types.is_null(at):
        return np.full(len(a), _EMPTY.get(t, 0)).astype(_np_type(t)), null
    if not ok:
        for i, r in enumerate(rows):  # the error path: find the first value to name
            if not _fits(r.get(name), t):
                raise _bad(f"rows[{i}].{name}: expected {_what(t)}, got {json.dumps(r[name])[:40]}")
        raise _bad(f"rows[].{name}: expected {_what(t)}")
    if t == "string":
        vals = a.fill_null("").to_numpy(zero_copy_only=False).astype(np.str_)
    elif t == "timestamp" and pa.types.is_string(at):
        vals = np.zeros(len(a), np.int64)
        if (~null).any():
            strs = a.fill_null("1970-01-01T00:00:00Z").to_numpy(zero_copy_only=False)
            vals = parse_times(strs, f"rows[].{name}")
    else:
        fill = False if t == "bool" else 0
        vals = a.fill_null(fill).to_numpy(zero_copy_only=False).astype(_np_type(t))
    if t == "float64" and not np.isfinite(vals).all():
        i = int(np.flatnonzero(~np.isfinite(vals))[0])
        raise _bad(f"rows[{i}].{name}: not a finite number")
    return vals, null


def _what(t: str) -> str:
    return {"string": "a string", "bool": "true or false", "int64": "an integer", "float64": "a number",
            "timestamp": "microseconds since the epoch (an integer) or an ISO-8601 string"}[t]


_KINDS = {"string": (str,), "bool": (bool,), "int64": (int,), "float64": (int, float), "timestamp": (int, str)}


def _fits(v: Any, t: str) -> bool:
    if v is None:
        return True
    if not isinstance(v, _KINDS[t]) or (t != "bool" and isinstance(v, bool)):
        return False
    return not (isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX)


def _rows_error(rows: list, schema: dict, why: str):
    """pyarrow could not read the rows as one struct array: find the first row and column that do
    not fit the schema, to name them (the error path: a loop is fine here)."""
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise _bad(f"rows[{i}] must be a JSON object")
        for k, v in r.items():
            if k not in schema:
                raise _bad(f"rows[{i}].{k}: unknown column (the event table's columns: {', '.join(schema)})")
            if not _fits(v, schema[k]):
                raise _bad(f"rows[{i}].{k}: expected {_what(schema[k])}, got {json.dumps(v)[:40]}")
    return None  # every value fits: timestamps mixing integers and strings (the caller's slower path)


def columns_from_arrays(arrays: dict, schema: dict, key: str, time_col: str) -> tuple[dict, int]:
    """A binary columns batch (device_bridge.columns) -> {column: (values, null mask)}. NaN in a
    float64 column is NULL; other types have no NULL in this form."""
    unknown = [k for k in arrays if k not in schema]
    if unknown:
        raise _bad(f"columns.{unknown[0]}: unknown column (the event table's columns: {', '.join(schema)})")
    for c in (key, time_col):
        if c not in arrays:
            raise _bad(f"columns: the {'key' if c == key else 'time'} column {c!r} is missing")
    n = None
    cols = {}
    for name, t in schema.items():
        if name not in arrays:
            continue
        a = arrays[name]
        if a.ndim == 2 and a.shape[1] == 1:
            a = a.reshape(-1)
        if a.ndim != 1:
            raise _bad(f"columns.{name}: one value per event, got shape {list(a.shape)}")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise _bad(f"columns.{name}: {len(a)} values, other columns have {n}")
        k = a.dtype.kind
        ok = {"string": "U", "bool": "b", "int64": "iu", "float64": "fiu", "timestamp": "iu"}[t]
        if k not in ok:
            raise _bad(f"columns.{name}: expected {_what(t)}, got dtype {a.dtype.str}")
        if k == "u" and a.size and a.max() > INT64_MAX:
            raise _bad(f"columns.{name}: values out of range for int64")
        null = np.zeros(len(a), bool)
        if t == "float64":
            a = a.astype(np.float64)
            null = np.isnan(a)
            if np.isinf(a).any():
                raise _bad(f"columns.{name}[{int(np.flatnonzero(np.isinf(a))[0])}]: infinite")
            a = np.where(null, 0.0, a)
        elif t == "string":
            a = a.astype(np.str_)
        else:
            a = a.astype(_np_type(t))
        cols[name] = (a, null)
    if not n:
        raise _bad("columns: the batch has no events")
    if n > MAX_EVENT_ROWS:
        raise FeatureError(413, f"columns: {n} events, over the limit of {MAX_EVENT_ROWS} per request", "too_large")
    for name, t in schema.items():
        if name not in cols:
            cols[name] = (np.full(n, _EMPTY.get(t, 0)).astype(_np_type(t)), np.ones(n, bool))
    return cols, n


# ---------------------------------------------------------------------- one view's state


def _col_names(view: View) -> list[str]:
    out = ["k", "t", "s"]
    for i, f in enumerate(view.features):
        out.append(f"ok{i}")
        if f.agg != "count":
            out.append(f"v{i}")
    return out


def evaluate_view(view: View, cols: dict, n: int) -> dict[str, np.ndarray]:
    """The state columns of a batch for one view (without k and s): t, ok<i>, v<i>."""
    out = {"t": cols[view.time_col][0].astype(np.int64)}
    cache: dict[str, tuple] = {}

    def ev(e):
        k = json.dumps(e, sort_keys=True)
        if k not in cache:
            cache[k] = evaluate(e, cols, n, view.schema)
        return cache[k]

    for i, f in enumerate(view.features):
        ok = np.ones(n, bool)
        if f.filter is not None:
            c, nc = ev(f.filter)
            ok = c.astype(bool) & ~nc
        if f.arg is not None:
            v, nv = ev(f.arg)
            ok = ok & ~nv
            if f.agg != "count":
                out[f"v{i}"] = _as(np.asarray(v), f.arg_type if f.arg_type != "null" else "int64")
        out[f"ok{i}"] = ok
    return out


class ViewState:
    """The columns of one view (see the module docstring): base sorted by (key id, arrival) with
    offsets, plus the tail in arrival order."""

    def __init__(self, view: View):
        self.view = view
        self.names = _col_names(view)
        # per feature: (feature, its flag column, its value column or None for a count)
        self.plan = tuple((f, f"ok{j}", None if f.agg == "count" else f"v{j}") for j, f in enumerate(view.features))
        self.ids: dict = {}               # key value -> id
        self.key_of: list = []            # id -> key value (None once evicted)
        self.newest = np.zeros(0, np.int64)  # per id: its newest event time
        self.base = {c: np.zeros(0, self._dtype(c)) for c in self.names}
        self.offsets = np.zeros(1, np.int64)
        self.tail = {c: np.zeros(TAIL_ROWS + 1024, self._dtype(c)) for c in self.names}
        self.tail_n = 0
        self.newest_seen = INT64_MIN
        self.dropped_before = INT64_MIN
        self.next_seq = 1
        self.max_keys = DEFAULT_MAX_KEYS
        self.max_state_mb = DEFAULT_MAX_STATE_MB
        self.counts = {"events": 0, "batches": 0, "expired_rows": 0, "late_events": 0, "evicted_keys_ttl": 0,
                       "evicted_keys_max_keys": 0, "evicted_keys_max_state": 0, "merges": 0}

    def _dtype(self, c: str):
        if c in ("k", "t", "s"):
            return np.int64
        if c.startswith("ok"):
            return np.bool_
        f = self.view.features[int(c[1:])]
        return _np_type(f.arg_type or "int64")

    # -------------------------------------------------------------- writing

    def key_ids(self, keys: np.ndarray, create: bool) -> np.ndarray:
        """Ids of ``keys`` (-1 for an unknown one unless ``create``): one dict lookup per distinct key."""
        uniq, inv = np.unique(keys, return_inverse=True)
        got = self.ids.get
        ids = [got(u, -1) for u in uniq.tolist()]
        if create:
            for j, i in enumerate(ids):
                if i < 0:
                    u = uniq[j].item()
                    ids[j] = len(self.key_of)
                    self.ids[u] = ids[j]
                    self.key_of.append(u)
            if len(self.key_of) > len(self.newest):
                grown = np.full(max(len(self.key_of), 2 * len(self.newest)), INT64_MIN, np.int64)
                grown[:len(self.newest)] = self.newest
                self.newest = grown
        return np.asarray(ids, np.int64)[inv.reshape(-1)]

    def apply(self, keys: np.ndarray, batch: dict[str, np.ndarray], lock=None) -> None:
        """Add one batch (keys and evaluated columns, in arrival order); a full tail is merged. ``lock``:
        the readers' lock, held while the state changes: for the append, and for the swap of a merge,
        whose new columns are built without it (the caller is the only writer), so that a lookup
        waits for a merge's swap only, never for its sort."""
        lock = lock if lock is not None else contextlib.nullcontext()
        with lock:
            self._append(keys, batch)
        if self.tail_n >= TAIL_ROWS:
            new = self._build_merge()
            with lock:
                self.__dict__.update(new)

    def merge(self) -> None:
        """Merge the tail into the base now (no concurrent reader)."""
        self.__dict__.update(self._build_merge())

    def _append(self, keys: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        n = len(keys)
        ids = self.key_ids(keys, create=True)
        t = batch["t"]
        seq = np.arange(self.next_seq, self.next_seq + n, dtype=np.int64)
        self.next_seq += n
        self.counts["events"] += n
        self.counts["batches"] += 1
        late = t < self.dropped_before
        if late.any():  # older than the rows already dropped: never in an exact window again
            self.counts["late_events"] += int(late.sum())
        np.maximum.at(self.newest, ids, t)
        self.newest_seen = max(self.newest_seen, int(t.max()))
        cols = {"k": ids, "s": seq, **batch}
        need = self.tail_n + n
        if need > len(self.tail["k"]):  # a batch is never split by a merge: the tail grows for it
            cap = max(need, 2 * len(self.tail["k"]))
            for c in self.names:
                grown = np.zeros(cap, self.tail[c].dtype)
                grown[:self.tail_n] = self.tail[c][:self.tail_n]
                self.tail[c] = grown
        for c in self.names:
            src = cols[c]
            dst = self.tail[c]
            if dst.dtype.kind == "U" and src.dtype.itemsize > dst.dtype.itemsize:
                dst = self.tail[c] = dst.astype(src.dtype)
            dst[self.tail_n:need] = src
        self.tail_n = need

    def _build_merge(self) -> dict:
        """The state after merging the tail into the base and dropping what is past the horizon and over
        the bounds, as new attribute values: nothing of the current state is changed (readers go on)."""
        v = self.view
        m = self.tail_n
        tk = self.tail["k"][:m]
        order_t = np.argsort(tk, kind="stable")
        allk = np.concatenate([self.base["k"], tk[order_t]])
        order = np.argsort(allk, kind="stable")  # two sorted runs: a merge
        cols = {}
        for c in self.names:
            both = np.concatenate([self.base[c], self.tail[c][:m][order_t]])
            cols[c] = both[order]
        counts = dict(self.counts)
        counts["merges"] += 1
        # the horizon
        cutoff = self.newest_seen - v.horizon
        keep = cols["t"] >= cutoff
        dropped_before = self.dropped_before
        if not keep.all():  # a lookup whose window reaches a dropped row's time is refused from now on
            dropped_before = max(dropped_before, int(cols["t"][~keep].max()) + 1)
        counts["expired_rows"] += int((~keep).sum())
        # keys with no event left inside the horizon are dropped (the view's ttl_us is at least its longest
        # window: the horizon, one day longer, keeps everything an exact lookup needs); then max_keys and
        # max_state_mb, oldest newest-event first
        live = np.array([i for i, k in enumerate(self.key_of) if k is not None], np.int64) \
            if len(self.ids) != len(self.key_of) else np.arange(len(self.key_of), dtype=np.int64)
        rows_per_key = np.bincount(cols["k"][keep], minlength=len(self.key_of))
        evict_ttl = rows_per_key[live] == 0
        counts["evicted_keys_ttl"] += int(evict_ttl.sum())
        rest = live[~evict_ttl]
        order_old = rest[np.argsort(self.newest[rest], kind="stable")]
        n_over_keys = max(0, len(order_old) - self.max_keys)
        counts["evicted_keys_max_keys"] += n_over_keys
        survivors = order_old[n_over_keys:]
        row_bytes = sum(np.dtype(cols[c].dtype).itemsize for c in self.names)
        budget_rows = (self.max_state_mb << 20) // max(1, row_bytes)
        rows_left = np.cumsum(rows_per_key[survivors][::-1])[::-1]  # rows kept if evicting before i
        n_over_state = int(np.searchsorted(-rows_left, -budget_rows, side="left")) if len(rows_left) else 0
        counts["evicted_keys_max_state"] += n_over_state
        evicted = np.concatenate([live[evict_ttl], order_old[:n_over_keys], survivors[:n_over_state]])
        ids, key_of, newest = self.ids, self.key_of, self.newest
        if len(evicted):
            ids, key_of, newest = dict(ids), list(key_of), newest.copy()
            gone = np.zeros(len(key_of), bool)
            gone[evicted] = True
            keep &= ~gone[cols["k"]]
            for i in evicted.tolist():
                del ids[key_of[i]]
                key_of[i] = None
            newest[evicted] = INT64_MIN
        for c in self.names:
            cols[c] = cols[c][keep]
        # ids are renumbered densely when evictions left more than half of them unused
        if len(key_of) > 2 * len(ids) + 1024:
            old_live = np.array([i for i, k in enumerate(key_of) if k is not None], np.int64)
            remap = np.full(len(key_of), -1, np.int64)
            remap[old_live] = np.arange(len(old_live))
            cols["k"] = remap[cols["k"]]
            key_of = [key_of[i] for i in old_live.tolist()]
            ids = {k: i for i, k in enumerate(key_of)}
            newest = newest[old_live].copy()
        offsets = np.searchsorted(cols["k"], np.arange(len(key_of) + 1, dtype=np.int64)).astype(np.int64)
        return {"base": cols, "offsets": offsets, "tail_n": 0, "counts": counts, "dropped_before": dropped_before,
                "ids": ids, "key_of": key_of, "newest": newest}

    # -------------------------------------------------------------- reading

    def rows_bytes(self) -> int:
        b = sum(a.nbytes for a in self.base.values())
        b += sum(a.itemsize * self.tail_n for a in self.tail.values())
        return b

    def state_bytes(self) -> int:
        """The state's bytes: the columns, the per-key arrays and about 100 bytes per key's entry."""
        return self.rows_bytes() + self.newest.nbytes + self.offsets.nbytes + 100 * len(self.ids)

    def _lookup_one(self, key, at: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One probe: the key's base slice and its tail rows, which together are in arrival order (every
        tail row arrived after every base row)."""
        i = self.ids.get(key)
        parts = []
        if i is not None:
            if i < len(self.offsets) - 1:
                parts.append(slice(int(self.offsets[i]), int(self.offsets[i + 1])))
            if self.tail_n:
                parts.append(np.flatnonzero(self.tail["k"][:self.tail_n] == i))

        def col(c):
            if not parts:
                return self.base[c][:0]
            if len(parts) == 1:
                return self.base[c][parts[0]] if isinstance(parts[0], slice) else self.tail[c][parts[0]]
            return np.concatenate([self.base[c][parts[0]], self.tail[c][parts[1]]])

        t = col("t")
        in_time = {}
        out = {}
        for f, ok, val in self.plan:
            w = f.window_us
            if w not in in_time:
                in_time[w] = (t >= at - w) & (t <= at)
            mask = in_time[w] & col(ok)
            if val is None:  # count
                out[f.name] = (int(np.count_nonzero(mask)), False)
                continue
            out[f.name] = _one(f, col(val)[mask], t[mask])
        return out

    def lookup(self, keys: np.ndarray, at: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every feature of the view for each (key, at) probe: {name: (values, null mask)}."""
        v = self.view
        p_n = len(keys)
        low = at - v.max_window
        if self.dropped_before > INT64_MIN and (low < self.dropped_before).any():
            i = int(np.flatnonzero(low < self.dropped_before)[0])
            raise _bad(f"at: {int(at[i])} reaches back before the state the view keeps (events before "
                       f"{self.dropped_before} were dropped: the view keeps its longest window plus one day behind "
                       "the newest event); ask for a later time")
        if p_n == 1:
            one = self._lookup_one(keys[0].item() if hasattr(keys[0], "item") else keys[0], int(at[0]))
            return {f.name: (np.array([one[f.name][0]], dtype=_np_type(f.type) if f.type != "string" else None),
                             np.array([one[f.name][1]])) for f in v.features}
        ids = self.key_ids(keys, create=False)
        # rows of the base: one slice per probe
        known = ids >= 0
        in_base = known & (ids < len(self.offsets) - 1)  # a key first seen since the last merge: tail only
        offsets = self.offsets if len(self.offsets) > 1 else np.zeros(2, np.int64)
        safe = np.where(in_base, ids, 0)
        starts = np.where(in_base, offsets[safe], 0)
        ends = np.where(in_base, offsets[safe + 1], 0)
        lens = ends - starts
        total = int(lens.sum())
        probe_b = np.repeat(np.arange(p_n, dtype=np.int64), lens)
        rows_b = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total, dtype=np.int64)
        # rows of the tail: a comparison with its key column
        m = self.tail_n
        tk = self.tail["k"][:m]
        if p_n <= 8:
            parts = [np.flatnonzero(tk == i) if i >= 0 else np.zeros(0, np.int64) for i in ids.tolist()]
            rows_t = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            probe_t = np.repeat(np.arange(p_n, dtype=np.int64), [len(x) for x in parts])
        else:
            o = np.argsort(tk, kind="stable")
            sk = tk[o]
            lo = np.searchsorted(sk, ids, "left")
            hi = np.where(known, np.searchsorted(sk, ids, "right"), lo)
            ln = hi - lo
            probe_t = np.repeat(np.arange(p_n, dtype=np.int64), ln)
            rows_t = o[np.repeat(lo - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()), dtype=np.int64)]
        probe = np.concatenate([probe_b, probe_t])
        order = np.argsort(probe, kind="stable") if len(probe_t) and p_n > 1 else None

        def col(c):
            x = np.concatenate([self.base[c][rows_b], self.tail[c][:m][rows_t]])
            return x if order is None else x[order]

        if order is not None:
            probe = probe[order]
        t = col("t")
        s = col("s")
        at_p = at[probe]
        in_time = {}
        out = {}
        for i, f in enumerate(v.features):
            w = f.window_us
            if w not in in_time:
                in_time[w] = (t >= at_p - w) & (t <= at_p)
            mask = in_time[w] & col(f"ok{i}")
            out[f.name] = _aggregate(f, probe[mask], None if f.agg == "count" else col(f"v{i}")[mask],
                                     t[mask], s[mask], p_n)
        return out


def _one(f: Feature, v, t: np.ndarray):
    """One feature's value (value, is NULL) from its rows in the window, in arrival order."""
    n = len(t)
    if f.agg == "count":
        return n, False
    if f.agg == "count_distinct":  # capped at max_distinct, like ML.FEATURES_AT (docs/DEVICE.md)
        return min(len(np.unique(v)), f.max_distinct), False
    if n == 0:
        return _EMPTY.get(f.type, 0), True
    if f.agg == "sum":
        return v.sum(dtype=np.int64 if v.dtype.kind in "iu" else np.float64), False
    if f.agg == "avg":
        total = v.sum(dtype=np.int64) if v.dtype.kind in "iu" else v.sum(dtype=np.float64)
        return total / n, False
    if f.agg == "min":
        return v.min(), False
    if f.agg == "max":
        return v.max(), False
    # last: the latest time; at a tie the latest arrival, the last of the rows (they are in arrival order)
    return v[np.flatnonzero(t == t.max())[-1]], False


def _aggregate(f: Feature, p: np.ndarray, v, t: np.ndarray, s: np.ndarray, n: int):
    """One feature's value per probe from its rows in the window (``p``: each row's probe)."""
    cnt = np.bincount(p, minlength=n)
    empty = cnt == 0
    if f.agg == "count":
        return cnt.astype(np.int64), np.zeros(n, bool)
    if f.agg == "count_distinct":
        if not len(p):
            return np.zeros(n, np.int64), np.zeros(n, bool)
        o = np.lexsort((v, p))
        ps, vs = p[o], v[o]
        new = np.ones(len(ps), bool)
        new[1:] = (ps[1:] != ps[:-1]) | (vs[1:] != vs[:-1])
        distinct = np.bincount(ps[new], minlength=n).astype(np.int64)
        # capped at max_distinct, like ML.FEATURES_AT's least(count(DISTINCT x), max_distinct)
        return np.minimum(distinct, f.max_distinct), np.zeros(n, bool)
    if f.agg in ("sum", "avg"):
        if v.dtype.kind == "f":
            total = np.bincount(p, weights=v, minlength=n)
        else:
            total = np.zeros(n, np.int64)
            np.add.at(total, p, v.astype(np.int64))
        if f.agg == "sum":
            return total, empty
        with np.errstate(all="ignore"):
            return total / np.where(empty, 1, cnt), empty
    if f.agg in ("min", "max") and v.dtype.kind in "fi":
        if v.dtype.kind == "f":
            init = np.inf if f.agg == "min" else -np.inf
        else:
            init = INT64_MAX if f.agg == "min" else INT64_MIN
        out = np.full(n, init, v.dtype)
        (np.minimum if f.agg == "min" else np.maximum).at(out, p, v)
        return np.where(empty, 0, out).astype(v.dtype), empty
    # min / max of strings or bools, and last: sort within each probe, take an end
    keys = (v, p) if f.agg in ("min", "max") else (s, t, p)
    o = np.lexsort(keys)
    ps = p[o]
    if f.agg == "min":
        pick = np.ones(len(ps), bool)
        pick[1:] = ps[1:] != ps[:-1]
    else:
        pick = np.ones(len(ps), bool)
        pick[:-1] = ps[1:] != ps[:-1]
    out = np.zeros(n, v.dtype) if v.dtype.kind != "U" else np.full(n, "", v.dtype)
    out[ps[pick]] = v[o][pick]
    return out, empty


def to_json(values: np.ndarray, null: np.ndarray) -> list:
    out = values.tolist()
    if null.any():
        for i in np.flatnonzero(null).tolist():
            out[i] = None
    return out


# ---------------------------------------------------------------------- the store


class FeatureStore:
    """The device's feature views: installed specs, their state, and the durable log."""

    def __init__(self, store: Path):
        self.path = Path(store) / DB_FILE
        self.lock = threading.RLock()        # the state: readers (lookups, metrics) and its changes
        self.write_lock = threading.RLock()  # one writer at a time: the log's order is the state's
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the agent's crash or kill -9 (it is in the WAL file when
        # COMMIT returns, and the answer is sent after); see the module docstring for a power cut
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS views(name TEXT PRIMARY KEY, spec TEXT NOT NULL, models TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS log(id INTEGER PRIMARY KEY AUTOINCREMENT, view TEXT NOT NULL,
                kind TEXT NOT NULL, rows INTEGER NOT NULL, bytes INTEGER NOT NULL, data BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS log_by_view ON log(view, id);
            CREATE TABLE IF NOT EXISTS batches(n INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL,
                id TEXT NOT NULL, rows INTEGER NOT NULL, UNIQUE(tbl, id));
        """)
        os.chmod(self.path, 0o600)
        self.snapshot_min = int(os.environ.get(SNAPSHOT_ENV, SNAPSHOT_MIN_BYTES))
        self.views: dict[str, ViewState] = {}
        self.by_table: dict[str, list[str]] = {}
        self.log_bytes: dict[str, int] = {}
        self.listener = None  # (table, cols, n, commit time) after a POST applied: the triggers
        for (spec,) in self.conn.execute("SELECT spec FROM views").fetchall():
            self._open(check_spec(json.loads(spec)))

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -------------------------------------------------------------- views

    def check_install(self, specs: list) -> list[View]:
        """Check a package's views before anything is written: a bad spec is a 422, a spec that
        differs from the installed view of the same name a 409 (a changed view needs a new name)."""
        views = [check_spec(s, f"feature_views[{i}]") for i, s in enumerate(specs)]
        seen: dict[str, View] = {}
        for v in views:
            if v.name in seen and seen[v.name].identity() != v.identity():
                raise _bad(f"feature_views: view {v.name!r} appears twice with different definitions", 422, "package")
            seen[v.name] = v
            have = self.views.get(v.name)
            if have is not None and have.view.identity() != v.identity():
                raise _bad(f"feature view {v.name!r} is installed on this device with a different definition: "
                           "a changed view needs a new name (its state was built from the old one)", 409, "conflict")
            for other in self._table_views(v.table):
                if other.name == v.name:
                    continue
                for c, t in v.schema.items():
                    if other.schema.get(c, t) != t:
                        raise _bad(f"feature view {v.name!r}: column {c!r} of table {v.table!r} is {t} here and "
                                   f"{other.schema[c]} in view {other.name!r}", 409, "conflict")
        return views

    def _table_views(self, table: str) -> list[View]:
        return [self.views[n].view for n in self.by_table.get(table, [])]

    def install(self, views: list[View], model: str, max_keys: int | None, max_state_mb: int | None) -> None:
        """Install (idempotently) the views of ``model``; bounds given are recorded in the log."""
        with self.write_lock, self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for v in views:
                    row = self.conn.execute("SELECT models FROM views WHERE name = ?", (v.name,)).fetchone()
                    models = set(json.loads(row[0])) if row else set()
                    models.add(model)
                    self.conn.execute("INSERT INTO views(name, spec, models) VALUES (?, ?, ?) ON CONFLICT(name) "
                                      "DO UPDATE SET models = excluded.models",
                                      (v.name, json.dumps(v.raw, sort_keys=True), json.dumps(sorted(models))))
                    st = self.views.get(v.name)
                    bounds = {"max_keys": max_keys if max_keys is not None else (st.max_keys if st else DEFAULT_MAX_KEYS),
                              "max_state_mb": max_state_mb if max_state_mb is not None
                              else (st.max_state_mb if st else DEFAULT_MAX_STATE_MB)}
                    if st is None or (st.max_keys, st.max_state_mb) != (bounds["max_keys"], bounds["max_state_mb"]):
                        data = json.dumps(bounds).encode()
                        self.conn.execute("INSERT INTO log(view, kind, rows, bytes, data) VALUES (?, 'bounds', 0, ?, ?)",
                                          (v.name, len(data), data))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            for v in views:
                if v.name not in self.views:
                    self._open(v)
                else:
                    self._replay_bounds(self.views[v.name])

    def _replay_bounds(self, st: ViewState) -> None:
        row = self.conn.execute("SELECT data FROM log WHERE view = ? AND kind = 'bounds' ORDER BY id DESC LIMIT 1",
                                (st.view.name,)).fetchone()
        if row:
            b = json.loads(row[0])
            st.max_keys, st.max_state_mb = int(b["max_keys"]), int(b["max_state_mb"])

    def _open(self, v: View) -> None:
        """A view's state: the fold of its log (snapshot, bounds and event records, in order)."""
        from device_bridge.columns import decode

        st = ViewState(v)
        nbytes = 0
        snap: list = []
        for kind, data, size in self.conn.execute("SELECT kind, data, bytes FROM log WHERE view = ? ORDER BY id",
                                                  (v.name,)):
            nbytes += size
            if kind == "snapshot":
                arrays, meta = decode(data)
                snap.append((arrays, meta))
                continue
            if snap:
                self._load_snapshot(st, snap)
                snap = []
            if kind == "bounds":
                b = json.loads(data)
                st.max_keys, st.max_state_mb = int(b["max_keys"]), int(b["max_state_mb"])
            elif kind == "events":
                arrays, _ = decode(data)
                keys = arrays.pop("key")
                st.apply(keys, {c: arrays[c] for c in st.names if c not in ("k", "s")})
        if snap:
            self._load_snapshot(st, snap)
        self.views[v.name] = st
        self.by_table.setdefault(v.table, []).append(v.name)
        self.log_bytes[v.name] = nbytes

    @staticmethod
    def _load_snapshot(st: ViewState, parts: list) -> None:
        meta = parts[0][1]
        keys = np.concatenate([a["key"] for a, _ in parts])
        cols = {c: np.concatenate([a[c] for a, _ in parts]) for c in st.names if c != "k"}
        st.ids, st.key_of = {}, []
        st.newest = np.zeros(0, np.int64)
        ids = st.key_ids(keys, create=True) if len(keys) else np.zeros(0, np.int64)
        # ids are given in sorted key order by key_ids; the base must be sorted by id, then arrival
        o = np.lexsort((cols["s"], ids))
        st.base = {"k": ids[o], **{c: cols[c][o] for c in cols}}
        st.offsets = np.searchsorted(st.base["k"], np.arange(len(st.key_of) + 1, dtype=np.int64))
        st.newest = np.full(len(st.key_of), INT64_MIN, np.int64)
        if len(ids):
            np.maximum.at(st.newest, st.base["k"], st.base["t"])
        st.tail_n = 0
        st.newest_seen = int(meta["newest_seen"])
        st.dropped_before = int(meta["dropped_before"])
        st.next_seq = int(meta["next_seq"])
        st.max_keys, st.max_state_mb = int(meta["max_keys"]), int(meta["max_state_mb"])
        st.counts = dict(meta["counts"])

    def _snapshot(self, st: ViewState) -> None:
        """Replace the view's log by its state (just merged: the tail is empty), in one transaction."""
        from device_bridge.columns import encode

        v = st.view
        meta = {"newest_seen": st.newest_seen, "dropped_before": st.dropped_before, "next_seq": st.next_seq,
                "max_keys": st.max_keys, "max_state_mb": st.max_state_mb, "counts": st.counts}
        key_of = np.array([k if k is not None else _EMPTY[v.schema[v.key]] for k in st.key_of]) \
            if st.key_of else np.zeros(0, np.int64)
        n = len(st.base["k"])
        step = 65_536
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM log WHERE view = ?", (v.name,))
            total = 0
            for off in range(0, max(n, 1), step):
                arrays = {"key": key_of[st.base["k"][off:off + step]] if n else np.zeros(0, np.int64)}
                for c in st.names:
                    if c != "k":
                        arrays[c] = st.base[c][off:off + step]
                data = encode(arrays, meta)
                total += len(data)
                self.conn.execute("INSERT INTO log(view, kind, rows, bytes, data) VALUES (?, 'snapshot', ?, ?, ?)",
                                  (v.name, len(arrays["t"]), len(data), data))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.log_bytes[v.name] = total

    # -------------------------------------------------------------- events

    def ingest(self, table: str, cols_fn, batch_id: str | None = None) -> dict:
        """``cols_fn(schema, key, time_col) -> (cols, n)`` reads the request's events; checked and
        evaluated for every view of ``table`` before anything is written; then one transaction.
        ``batch_id``: the caller's id for the batch; a batch whose id the table has seen among its last
        ``MAX_BATCH_IDS`` is not applied again (a retry after a lost answer), and answered as before."""
        from device_bridge.columns import encode

        names = self.by_table.get(table)
        if not names:
            known = ", ".join(sorted(self.by_table)) or "none"
            raise _bad(f"table: unknown event table {table!r} (the device's feature views read: {known})",
                       404, "not_found")
        views = [self.views[n].view for n in names]
        schema: dict = {}
        for v in views:
            schema.update(v.schema)
        first = views[0]
        keys_needed = {v.key for v in views} | {v.time_col for v in views}
        cols, n = cols_fn(schema, first.key, first.time_col)
        for c in keys_needed:
            if cols[c][1].any():
                i = int(np.flatnonzero(cols[c][1])[0])
                raise _bad(f"rows[{i}].{c}: the {'key' if any(v.key == c for v in views) else 'time'} column "
                           "cannot be null")
        now = _now_us()
        for v in views:
            t = cols[v.time_col][0]
            ahead = t > now + FUTURE_US
            if ahead.any():
                i = int(np.flatnonzero(ahead)[0])
                raise _bad(f"rows[{i}].{v.time_col}: {int(t[i])} is more than a day ahead of the device's clock "
                           f"({now} µs since the epoch)")
        evaluated = [(v, cols[v.key][0], evaluate_view(v, cols, n)) for v in views]
        blobs = [(v.name, encode({"key": keys, **batch})) for v, keys, batch in evaluated]
        with self.write_lock:  # lookups go on meanwhile: they wait only for the state's changes (apply)
            if batch_id is not None:
                row = self.conn.execute("SELECT rows FROM batches WHERE tbl = ? AND id = ?", (table, batch_id)).fetchone()
                if row is not None:
                    return {"table": table, "rows": int(row[0]), "views": names, "duplicate": True}
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if batch_id is not None:
                    self.conn.execute("INSERT INTO batches(tbl, id, rows) VALUES (?, ?, ?)", (table, batch_id, n))
                    self.conn.execute("DELETE FROM batches WHERE n <= (SELECT MAX(n) FROM batches) - ?",
                                      (MAX_BATCH_IDS,))
                for name, data in blobs:
                    self.conn.execute("INSERT INTO log(view, kind, rows, bytes, data) VALUES (?, 'events', ?, ?, ?)",
                                      (name, n, len(data), data))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            for (name, data), (_v, keys, batch) in zip(blobs, evaluated):
                st = self.views[name]
                merges = st.counts["merges"]
                st.apply(keys, batch, self.lock)
                self.log_bytes[name] = self.log_bytes.get(name, 0) + len(data)
                if st.counts["merges"] != merges and st.tail_n == 0 \
                        and self.log_bytes[name] > max(self.snapshot_min, 2 * st.rows_bytes()):
                    try:
                        self._snapshot(st)
                    except sqlite3.Error:  # the log stays as it was: still the whole state
                        log.exception("snapshot of feature view %s failed", name)
        if self.listener is not None:
            try:
                self.listener(table, cols, n, time.time())
            except Exception:  # noqa: BLE001 - the events are in; a trigger's failure is its own
                log.exception("triggers failed on table %s", table)
        return {"table": table, "rows": n, "views": names, "duplicate": False}

    # -------------------------------------------------------------- reading

    def view(self, name: str) -> ViewState:
        st = self.views.get(name)
        if st is None:
            known = ", ".join(sorted(self.views)) or "none"
            raise _bad(f"unknown feature view {name!r} (installed: {known})", 404, "not_found")
        return st

    def lookup(self, name: str, keys: np.ndarray, at: np.ndarray) -> dict:
        with self.lock:
            return self.view(name).lookup(keys, at)

    def lookup_one(self, name: str, key: Any, at: int) -> dict:
        """One key as of one time: {feature: (Python or numpy scalar, is NULL)} (the predict of one row)."""
        with self.lock:
            st = self.view(name)
            if st.dropped_before > INT64_MIN and at - st.view.max_window < st.dropped_before:
                return st.lookup(np.array([key]), np.array([at], np.int64))  # its 400, worded once
            return st._lookup_one(key, at)

    def metrics(self) -> dict:
        with self.lock:
            return {name: {"table": st.view.table, "keys": len(st.ids), "rows": len(st.base["k"]) + st.tail_n,
                           "state_bytes": st.state_bytes(), "log_bytes": self.log_bytes.get(name, 0),
                           "max_keys": st.max_keys, "max_state_mb": st.max_state_mb,
                           "newest_event_us": None if st.newest_seen == INT64_MIN else st.newest_seen,
                           **st.counts}
                    for name, st in self.views.items()}


# ---------------------------------------------------------------------- times in requests


def parse_at(v: Any, n: int, where: str = "at") -> np.ndarray:
    """A request's ``at``: microseconds since the epoch or an ISO-8601 string, one for all rows or a
    list of one per row; None: the agent's clock."""
    if v is None:
        return np.full(n, _now_us(), np.int64)
    if type(v) is int and INT64_MIN < v < INT64_MAX:  # the common case: one time in microseconds
        return np.full(n, v, np.int64)
    if isinstance(v, list):
        if len(v) != n:
            raise _bad(f"{where}: {len(v)} times for {n} rows")
        vals = v
    else:
        vals = [v] * n
    types = set(map(type, vals))
    if types <= {int}:
        a = np.array(vals, dtype=object)
        if not all(INT64_MIN < x < INT64_MAX for x in (min(vals), max(vals))):
            raise _bad(f"{where}: out of range")
        return a.astype(np.int64)
    if types <= {str}:
        return parse_times(np.array(vals, dtype=object), where)
    raise _bad(f"{where}: microseconds since the epoch (an integer) or an ISO-8601 string")


def parse_at_text(s: str, n: int) -> np.ndarray:
    """``at`` from a query parameter: digits (microseconds) or ISO-8601."""
    s = s.strip()
    if s.lstrip("-").isdigit():
        return parse_at(int(s), n)
    return parse_at(s, n)


# ---------------------------------------------------------------------- predict: the model's view inputs


@dataclass
class Binding:
    """Which inputs of a model come from which view's features, and which key columns a request of
    it must carry."""
    fills: list            # (input spec, view name, feature name)
    keys: dict             # key column -> (view names, the key's type)
    names: frozenset       # the filled inputs' names

    def request_specs(self, specs: list) -> list:
        """The columns a request sends: the model's other inputs, and each view's key column."""
        from device_bridge.agent.inputs import InputSpec

        out = [s for s in specs if s.name not in self.names]
        have = {s.name for s in out}
        for k, (_, t) in self.keys.items():
            if k not in have:
                out.append(InputSpec(k, "string" if t == "string" else "int64", (), False))
        return out

    def _fill_one(self, store: FeatureStore, feed: dict, at: int, model_inputs: set) -> dict:
        """One row: the key's features as scalars, no batch machinery."""
        values = {}
        for k, (views, _) in self.keys.items():
            key = np.asarray(feed[k]).reshape(1)[0]
            key = key.item() if hasattr(key, "item") else key
            for vname in views:
                values[vname] = store.lookup_one(vname, key, at)
            if k not in model_inputs:
                feed.pop(k, None)
        for spec, vname, fname in self.fills:
            v, null = values[vname][fname]
            feed[spec.name] = _fill_one_value(spec, vname, fname, v, null)
        return feed

    def fill(self, store: FeatureStore, feed: dict, n: int, at: np.ndarray, model_inputs: set) -> dict:
        """The feed with the view features filled in, from the state as of ``at`` for each row's key;
        key columns that are not model inputs are taken out."""
        if n == 1:
            return self._fill_one(store, feed, int(at[0]), model_inputs)
        values: dict[str, dict] = {}
        for k, (views, _) in self.keys.items():
            keys = np.asarray(feed[k]).reshape(n)
            for vname in views:
                values[vname] = store.lookup(vname, keys, at)
        for k in self.keys:
            if k not in model_inputs:
                feed.pop(k, None)
        for spec, vname, fname in self.fills:
            vals, null = values[vname][fname]
            t = spec.type
            if t.startswith("float"):
                arr = vals.astype(t)
                if null.any():
                    arr[null] = np.nan
            elif t == "string":
                arr = vals.astype(object)
                if null.any():
                    arr[null] = ""
            else:
                if null.any():
                    i = int(np.flatnonzero(null)[0])
                    raise _bad(f"feature {fname} of view {vname} is NULL for row {i} (no event in its window), and "
                               f"the model's input {spec.name} is {t}, which cannot hold a NULL", 422, "model_input")
                arr = vals.astype(t)
            if spec.row_shape == (1,):
                arr = arr.reshape(n, 1)
            feed[spec.name] = arr
        return feed


def _fill_one_value(spec, vname: str, fname: str, v, null: bool) -> np.ndarray:
    t = spec.type
    if null:
        if t.startswith("float"):
            v = np.nan
        elif t == "string":
            v = ""
        else:
            raise _bad(f"feature {fname} of view {vname} is NULL for row 0 (no event in its window), and the "
                       f"model's input {spec.name} is {t}, which cannot hold a NULL", 422, "model_input")
    arr = np.array([v], dtype=object if t == "string" else t)
    return arr.reshape(1, 1) if spec.row_shape == (1,) else arr


def bind(inputs: list, views: list[View]) -> Binding | None:
    """The binding of a model's inputs (manifest columns) to its views' features; None when no input is
    a view feature. A feature name in two views is refused (422: which would fill it?)."""
    by_name: dict[str, tuple] = {}
    for v in views:
        for f in v.features:
            if f.name in by_name and by_name[f.name][0].name != v.name:
                raise _bad(f"feature_views: feature {f.name!r} is in views {by_name[f.name][0].name!r} and "
                           f"{v.name!r}: a model input can come from one only", 422, "package")
            by_name[f.name] = (v, f)
    fills, keys = [], {}
    for c in inputs:  # InputSpecs (inputs.make_spec)
        spec = c
        name = c.name
        if name not in by_name:
            continue
        v, f = by_name[name]
        if c.type not in ("float32", "float64", "int64", "int32", "string", "bool"):
            raise _bad(f"model input {name} ({c.type}) cannot take feature {f.name} of view {v.name}", 422, "package")
        if (c.type == "string") != (f.type == "string"):
            raise _bad(f"model input {name} is {c.type}, feature {f.name} of view {v.name} is {f.type}", 422, "package")
        fills.append((spec, v.name, f.name))
        views_of, _ = keys.setdefault(v.key, ([], v.schema[v.key]))
        if v.name not in views_of:
            views_of.append(v.name)
    if not fills:
        return None
    return Binding(fills, keys, frozenset(s.name for s, _, _ in fills))
