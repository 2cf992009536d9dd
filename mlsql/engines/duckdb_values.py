"""DuckDB's own Python values for a result that travelled as Arrow.

Arrow is the path between DuckDB, the trainers and ONNX Runtime, and ``to_arrow()`` stays
zero-copy. But ``fetchall()`` must give what DuckDB's ``fetchall()`` gives, and Arrow's own
conversion differs for a few types: MAP (a list of pairs, not a dict), INTERVAL
(MonthDayNano, not timedelta), UUID (text), ARRAY (a list, not a tuple), HUGEINT (Decimal,
not int), and ±infinity dates and timestamps (an OverflowError). Those are fixed here from
the DuckDB type of each column. A few types lose information in DuckDB's Arrow export
itself (UHUGEINT, TIME WITH TIME ZONE, BIT, BIGNUM): ``needs_duckdb_values`` says so, and
the engine then takes the Python values from DuckDB directly.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa

# DuckDB type ids whose Arrow export loses information
_LOSSY = {"uhugeint", "time_tz", "bit", "bignum", "varint", "time with time zone"}
_DATE_INF, _TS_INF = 2**31 - 1, 2**63 - 1


def _children(t) -> list:
    try:
        return [c[1] if isinstance(c, tuple) else c for c in t.children]
    except Exception:  # types without children raise in the binding
        return []


def _id(t) -> str:
    return str(getattr(t, "id", t)).lower()


def needs_duckdb_values(types: list) -> bool:
    """Does any column (or a type nested in it) lose information in DuckDB's Arrow export?"""
    stack = list(types)
    while stack:
        t = stack.pop()
        if _id(t) in _LOSSY:
            return True
        stack.extend(_children(t))
    return False


def _converter(t) -> Callable[[Any], Any] | None:
    """value (as Arrow's to_pylist gives it) → value as DuckDB's fetchall gives it; None: same."""
    tid = _id(t)
    kids = _children(t)
    if tid == "hugeint":
        return lambda v: None if v is None else int(v)
    if tid == "interval":
        return lambda v: None if v is None else dt.timedelta(days=v.months * 30 + v.days,
                                                             microseconds=v.nanoseconds // 1000)
    if tid == "uuid":
        return lambda v: None if v is None else uuid.UUID(v)
    if tid == "map":
        kc, vc = (_converter(kids[0]), _converter(kids[1])) if len(kids) == 2 else (None, None)
        return lambda v: None if v is None else {(kc(a) if kc else a): (vc(b) if vc else b) for a, b in v}
    if tid in ("list", "array"):
        inner = _converter(kids[0]) if kids else None
        if tid == "array":
            return lambda v: None if v is None else tuple(inner(x) if inner else x for x in v)
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(x) for x in v]
    if tid == "struct":
        names = [c[0] for c in t.children]
        convs = {n: _converter(k) for n, k in zip(names, kids)}
        if not any(convs.values()):
            return None
        return lambda v: None if v is None else {k: (convs[k](x) if convs.get(k) else x) for k, x in v.items()}
    return None


def _column(col: pa.ChunkedArray, t) -> list:
    try:
        values = col.to_pylist()
    except (OverflowError, ValueError):  # ±infinity dates and timestamps
        values = _with_infinities(col)
    conv = _converter(t)
    return [conv(v) for v in values] if conv else values


def _with_infinities(col: pa.ChunkedArray) -> list:
    typ = col.type
    if pa.types.is_date32(typ):
        ints = col.cast(pa.int32()).to_pylist()
        lo, hi, inf = dt.date.min, dt.date.max, _DATE_INF
        return [None if i is None else hi if i == inf else lo if i == -inf
                else dt.date(1970, 1, 1) + dt.timedelta(days=i) for i in ints]
    if pa.types.is_timestamp(typ):
        ints = col.cast(pa.int64()).to_pylist()
        tz = dt.timezone.utc if typ.tz else None
        lo, hi = dt.datetime.min, dt.datetime.max  # DuckDB gives infinities without a time zone
        per_us = {"s": 1e-6, "ms": 1e-3, "us": 1, "ns": 1e3}[typ.unit]
        epoch = dt.datetime(1970, 1, 1, tzinfo=tz)
        return [None if i is None else hi if i == _TS_INF else lo if i == -_TS_INF
                else epoch + dt.timedelta(microseconds=i / per_us) for i in ints]
    return col.to_pylist()


def python_rows(table: pa.Table, types: list) -> list[tuple]:
    """The rows as DuckDB's fetchall() returns them, for columns of DuckDB ``types``."""
    cols = [_column(c, t) for c, t in zip(table.columns, types)]
    return list(zip(*cols)) if cols else []


def pandas_frame(table: pa.Table, types: list):
    """pandas as DuckDB's ``df()`` makes it: DuckDB's own type mapping, UUIDs as objects."""
    import duckdb
    import pandas as pd

    from mlsql.errors import EngineError

    try:
        frame = duckdb.from_arrow(table).df()
    except duckdb.Error as exc:  # what DuckDB's df() refuses too (e.g. an infinite DATE)
        raise EngineError(str(exc).split("\n")[0], engine_error=type(exc).__name__) from None
    for name, t in zip(table.column_names, types):
        if _id(t) == "uuid":
            frame[name] = frame[name].map(lambda v: None if v is None or v != v else uuid.UUID(v)).astype(object)
        elif _id(t) == "enum":
            values = dict(t.children).get("values", [])
            frame[name] = pd.Categorical(frame[name], categories=values, ordered=True)
    return frame
