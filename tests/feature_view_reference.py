"""A reference evaluator of a feature view spec in numpy, and generated event logs with ties, NULLs and
zero divisors: what ML.FEATURES_AT is checked against (tests/test_feature_views.py), and what the
device agent's incremental feature state can be checked against too (the same spec, the same events,
the same probes). Slow by design (a mask per probe and feature): for a few thousand events only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

HOUR, DAY = 3_600_000_000, 86_400_000_000
T0 = 1_704_067_200_000_000  # 2024-01-01 00:00:00 UTC in microseconds


def event_log(n: int, keys: int, seed: int) -> pa.Table:
    """Events of ``keys`` users over 3 days, in arrival order (``seq``), with ties (a quarter of the
    events share their time with another event of the same user), NULLs in every value column and
    zero quantities (price / qty divides by zero)."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, keys, n)
    ts = T0 + rng.integers(0, 3 * DAY // 1_000_000, n) * 1_000_000
    tie = rng.random(n) < 0.25
    order = np.argsort(user, kind="stable")  # each tie copies the time of the previous event of its user
    same = np.r_[False, user[order][1:] == user[order][:-1]]
    copy_from = np.where(same & tie[order], np.r_[order[0], order[:-1]], order)
    ts[order] = ts[copy_from]
    kinds = np.array(["click", "view", "buy", None], dtype=object)[rng.integers(0, 4, n)]
    price = np.round(rng.gamma(2.0, 10.0, n), 2)
    qty = rng.integers(0, 5, n)
    cats = np.array(["shoes", "books", "games", None], dtype=object)[rng.integers(0, 4, n)]
    return pa.table(
        {
            "seq": pa.array(np.arange(n), pa.int64()),
            "user_id": pa.array([f"u{u}" for u in user]),
            "ts": pa.array(ts, pa.timestamp("us")),
            "kind": pa.array(kinds, pa.string()),
            "price": pa.array(price, mask=rng.random(n) < 0.1),
            "qty": pa.array(qty.astype(np.int32), mask=rng.random(n) < 0.1),
            "category": pa.array(cats, pa.string()),
        }
    )


def probes_for(events: pa.Table, n: int, seed: int) -> pa.Table:
    """Probe rows: at event times exactly, a microsecond after them, at random times, and for users
    without any event."""
    rng = np.random.default_rng(seed)
    ev_ts = events["ts"].cast(pa.int64()).to_numpy()
    ev_user = events["user_id"].to_numpy(zero_copy_only=False)
    pick = rng.integers(0, len(ev_ts), n)
    shift = rng.choice([0, 1, -1, 37 * 60_000_000, HOUR, DAY], n)
    users = ev_user[pick].astype(object)
    users[: n // 20] = "nobody"
    return pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "at": pa.array(ev_ts[pick] + shift, pa.timestamp("us")),
            "label": pa.array(rng.random(n)),
        }
    )


def _eval(e: dict, cols: dict[str, tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of a spec expression over columns of (values, valid), SQL's three-valued logic."""
    if "col" in e:
        return cols[e["col"]]
    if "lit" in e:
        v = e["lit"]
        return np.full(n, v, dtype=object), np.full(n, v is not None)
    op, args = e["op"], [_eval(a, cols, n) for a in e["args"]]
    if op in ("+", "-", "*", "/", "=", "<>", "<", "<=", ">", ">="):
        (a, va), (b, vb) = args
        ok = va & vb
        a, b = np.where(ok, a, 1), np.where(ok, b, 1)
        if op == "/":
            ok = ok & (b != 0)
            return np.where(ok, a.astype(float) / np.where(b == 0, 1, b).astype(float), np.nan), ok
        f = {
            "+": np.add,
            "-": np.subtract,
            "*": np.multiply,
            "=": np.equal,
            "<>": np.not_equal,
            "<": np.less,
            "<=": np.less_equal,
            ">": np.greater,
            ">=": np.greater_equal,
        }[op]
        return f(a, b), ok
    if op in ("and", "or"):
        (a, va), (b, vb) = args
        a, b = a.astype(bool) & va, b.astype(bool) & vb  # the value where valid
        if op == "and":
            return a & b, (va & vb) | (va & ~a) | (vb & ~b)
        return a | b, (va & vb) | a | b
    if op == "not":
        return ~args[0][0].astype(bool), args[0][1]
    if op == "neg":
        return -args[0][0], args[0][1]
    if op in ("is_null", "is_not_null"):
        return (~args[0][1] if op == "is_null" else args[0][1].copy()), np.ones(n, bool)
    if op == "in":
        (a, va), rest = args[0], args[1:]
        return np.isin(a, [r[0][0] for r in rest]), va
    if op == "coalesce":
        out, ok = args[-1][0].copy(), args[-1][1].copy()
        for v, valid in reversed(args[:-1]):
            out, ok = np.where(valid, v, out), valid | ok
        return out, ok
    if op == "case":
        out, ok = args[-1][0].astype(object).copy(), args[-1][1].copy()
        for (c, vc), (v, vv) in reversed(list(zip(args[:-1:2], args[1:-1:2]))):
            hit = c.astype(bool) & vc
            out, ok = np.where(hit, v, out), np.where(hit, vv, ok)
        return out, ok
    raise AssertionError(op)


def reference(spec: dict, events: pa.Table, probes: pa.Table) -> dict[str, list]:
    """The spec's features per probe: per key and probe, the events in [at - w, at] that pass the
    filter, aggregated in numpy. The order of arrival (``last``'s ties) is the table's row order."""
    n = events.num_rows
    cols = {}
    for c in spec["schema"]:
        arr = events[c["name"]]
        valid = ~np.asarray(arr.is_null())
        vals = (arr.cast(pa.int64()) if c["type"] == "timestamp" else arr).to_numpy(zero_copy_only=False)
        cols[c["name"]] = (np.asarray(vals, dtype=object) if c["type"] == "string" else vals, valid)
    keys = cols[spec["key"]][0]
    ts = cols[spec["time_col"]][0].astype(np.int64)
    p_keys = probes[spec["key"]].to_numpy(zero_copy_only=False)
    p_at = probes["at"].cast(pa.int64()).to_numpy()
    out: dict[str, list] = {}
    for f in spec["features"]:
        if f["arg"] is None:
            val, ok = np.ones(n), np.ones(n, bool)
        else:
            val, ok = _eval(f["arg"], cols, n)
        if f["filter"] is not None:
            c, vc = _eval(f["filter"], cols, n)
            ok = ok & vc & c.astype(bool)
        res = []
        for k, at in zip(p_keys, p_at):
            m = ok & (keys == k) & (ts >= at - f["window_us"]) & (ts <= at)
            v = val[m]
            if f["agg"] == "count":
                res.append(int(m.sum()))
            elif f["agg"] == "count_distinct":
                res.append(min(len(set(v.tolist())), f["max_distinct"]))
            elif not m.any():
                res.append(None)
            elif f["agg"] == "sum":
                res.append(
                    int(v.astype(np.int64).sum()) if f["type"] == "int64" else float(v.astype(float).sum())
                )
            elif f["agg"] == "avg":
                res.append(float(v.astype(float).mean()))
            elif f["agg"] in ("min", "max"):
                res.append(v.min() if f["agg"] == "min" else v.max())
            else:  # last: the latest time, then the latest arrival
                idx = np.flatnonzero(m)
                res.append(val[idx[np.lexsort((idx, ts[idx]))[-1]]])
        out[f["name"]] = res
    return out
