"""Feature views on the device (features.py): a real agent process on loopback gets the app's events
and fills a model's view features in at predict; every value is compared with DuckDB SQL written
here from the contract's window semantics (``at - w <= ts <= at``, both ends inclusive), never with
the agent's own report.

The view specs are written by hand as JSON, following the contract in docs/DEVICE.md (the SQL side
compiles them from CREATE FEATURE VIEW); packages are built with the device tests' helpers.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import duckdb
import numpy as np
import pytest
from device_test_helpers import TOKEN, make_keys, start_agent, trust, wait_for
from onnx import TensorProto, helper

from device_bridge.client import DeviceClient
from device_bridge.errors import DeviceError
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(300)

US = 1_000_000
H = 3600 * US
D = 86400 * US
T0 = 1_790_000_000 * US  # 2026-09-21: inside the agent's clock bound (events at most a day ahead)

SCHEMA = [{"name": "user_id", "type": "string"}, {"name": "ts", "type": "timestamp"},
          {"name": "kind", "type": "string"}, {"name": "price", "type": "float64"},
          {"name": "qty", "type": "int64"}, {"name": "category", "type": "string"}]


def _eq(col, lit):
    return {"op": "=", "args": [{"col": col}, {"lit": lit}]}


def feature_list() -> list[dict]:
    """Every aggregate of the contract, with FILTERs, NULLs and per-row expressions."""
    return [
        {"name": "clicks_1h", "agg": "count", "arg": None, "filter": _eq("kind", "click"), "window_us": H,
         "type": "int64"},
        {"name": "n_1d", "agg": "count", "arg": None, "filter": None, "window_us": D, "type": "int64"},
        {"name": "n_price_1d", "agg": "count", "arg": {"col": "price"}, "filter": None, "window_us": D,
         "type": "int64"},
        {"name": "qty_1d", "agg": "sum", "arg": {"col": "qty"}, "filter": None, "window_us": D, "type": "int64"},
        {"name": "avg_price_2d", "agg": "avg", "arg": {"col": "price"}, "filter": None, "window_us": 2 * D,
         "type": "float64"},
        {"name": "max_price_2d", "agg": "max", "arg": {"col": "price"}, "filter": None, "window_us": 2 * D,
         "type": "float64"},
        {"name": "min_qty_1h", "agg": "min", "arg": {"col": "qty"}, "filter": None, "window_us": H, "type": "int64"},
        {"name": "last_category_1d", "agg": "last", "arg": {"col": "category"}, "filter": None, "window_us": D,
         "type": "string"},
        {"name": "n_kinds_1d", "agg": "count_distinct", "arg": {"col": "kind"}, "filter": None, "window_us": D,
         "type": "int64", "max_distinct": 64},
        {"name": "spend_7d", "agg": "sum", "arg": {"op": "*", "args": [{"col": "price"}, {"col": "qty"}]},
         "filter": _eq("kind", "purchase"), "window_us": 7 * D, "type": "float64"},
        {"name": "big_1d", "agg": "count", "arg": {"col": "price"},
         "filter": {"op": "or", "args": [{"op": ">", "args": [{"col": "price"}, {"lit": 50}]},
                                         {"op": "in", "args": [{"col": "kind"}, {"lit": "purchase"}]}]},
         "window_us": D, "type": "int64"},
    ]


# the same features in DuckDB SQL over a range join (e: events with their arrival order rn; p: probes)
OFFLINE = {
    "clicks_1h": "count(*) FILTER (WHERE e.kind = 'click' AND e.ts >= p.pat - INTERVAL 1 HOUR)",
    "n_1d": "count(e.ts) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 DAY)",
    "n_price_1d": "count(e.price) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 DAY)",
    "qty_1d": "CAST(sum(e.qty) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 DAY) AS BIGINT)",  # the contract: int64
    "avg_price_2d": "avg(e.price) FILTER (WHERE e.ts >= p.pat - INTERVAL 2 DAY)",
    "max_price_2d": "max(e.price) FILTER (WHERE e.ts >= p.pat - INTERVAL 2 DAY)",
    "min_qty_1h": "min(e.qty) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 HOUR)",
    "last_category_1d": "arg_max(e.category, [epoch_us(e.ts), e.rn]) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 DAY "
                        "AND e.category IS NOT NULL)",
    "n_kinds_1d": "count(DISTINCT e.kind) FILTER (WHERE e.ts >= p.pat - INTERVAL 1 DAY)",
    "spend_7d": "sum(e.price * e.qty) FILTER (WHERE e.kind = 'purchase' AND e.ts >= p.pat - INTERVAL 7 DAY)",
    "big_1d": "count(e.price) FILTER (WHERE (e.price > 50 OR e.kind IN ('purchase')) "
              "AND e.ts >= p.pat - INTERVAL 1 DAY)",
}
FLOATS = ("avg_price_2d", "spend_7d")  # compared within float64 rounding; everything else exactly


def view_spec(name="user_activity", table="app_events", features=None) -> dict:
    return {"format": 1, "name": name, "table": table, "key": "user_id", "time_col": "ts", "ttl_us": 30 * D,
            "schema": SCHEMA, "features": features or feature_list(), "sql": "CREATE FEATURE VIEW ... (by hand)"}


def linear_model(inputs: list[str], weights: list[float]) -> bytes:
    """y = sum(w_i * input_i) over float64 [N, 1] inputs."""
    nodes = [helper.make_node("Concat", inputs, ["all"], axis=1), helper.make_node("MatMul", ["all", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, [None, 1]) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 1])],
        [helper.make_tensor("w", TensorProto.DOUBLE, [len(inputs), 1], weights)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def offline(events, probes: dict) -> dict:
    """DuckDB's values of every feature at each probe (key, at), from the events (a pyarrow table in
    arrival order, whose row number rn is the arrival)."""
    import pyarrow as pa

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ev_raw = events.append_column("rn", pa.array(np.arange(events.num_rows)))  # noqa: F841 - read by DuckDB
    pr_raw = pa.table(probes)  # noqa: F841
    con.execute("CREATE TABLE e AS SELECT user_id, make_timestamp(ts) AS ts, kind, price, qty, category, rn "
                "FROM ev_raw")
    con.execute('CREATE TABLE p AS SELECT pid, user_id, make_timestamp("at") AS pat FROM pr_raw')
    aggs = ",\n  ".join(f"{sql} AS {name}" for name, sql in OFFLINE.items())
    # a range join: the events of the probe's key with p.pat - 7 days <= e.ts <= p.pat (the longest window)
    sql = f"""SELECT p.pid, {aggs}
              FROM p LEFT JOIN e ON e.user_id = p.user_id AND e.ts <= p.pat AND e.ts >= p.pat - INTERVAL 7 DAY
              GROUP BY p.pid ORDER BY p.pid"""
    t = con.sql(sql).to_arrow_table()
    return {name: t.column(name).to_pylist() for name in OFFLINE}


def mismatches(agent: dict, want: dict, n: int) -> list:
    """(probe, feature, agent, offline) for every difference. Exact for counts, integer sums, min, max and
    last; avg and float sums within float64 rounding: |a - b| <= 1e-12 * max(1, |b|), far above the
    error of summing at most a few hundred doubles in two orders (about n * 2**-52 relative, n <= 1,000)
    and far below any real difference (prices have cents)."""
    bad = []
    for name in OFFLINE:
        for i in range(n):
            a, b = agent[name][i], want[name][i]
            if name in FLOATS and a is not None and b is not None:
                ok = abs(a - b) <= 1e-12 * max(1.0, abs(b))
            else:
                ok = a == b and type(a) is type(b)
            if not ok:
                bad.append((i, name, a, b))
    return bad


def make_events(rng, n_events: int, n_keys: int, span_us: int) -> dict:
    """An app's event log in arrival (time) order, with NULLs and events at the same microsecond."""
    n_twins = n_events // 50
    base = n_events - n_twins
    users = rng.integers(0, n_keys, base)
    ts = T0 + rng.integers(0, span_us, base)
    whole = rng.random(base) < 0.3  # a third on whole seconds
    ts[whole] = ts[whole] // US * US
    src = rng.integers(0, base, n_twins)  # twins: same key, same microsecond, another category
    users = np.concatenate([users, users[src]])
    ts = np.concatenate([ts, ts[src]])
    order = np.argsort(ts, kind="stable")
    n = n_events
    kinds = np.array(["click", "view", "purchase", "share", "like"])[rng.choice(5, n, p=[.4, .3, .1, .1, .1])]
    price = np.round(rng.gamma(2.0, 20.0, n), 2)
    qty = rng.integers(1, 10, n)
    cats = np.array(["shoes", "books", "toys", "food", "games", "tools"])[rng.integers(0, 6, n)]
    ev = {"user_id": np.array([f"u{u:04d}" for u in users[order]]), "ts": ts[order], "kind": kinds,
          "price": price, "qty": qty, "category": cats.astype(object)}
    ev["price"] = np.where(rng.random(n) < 0.05, np.nan, price)
    ev["category"][rng.random(n) < 0.05] = None
    qty_null = rng.random(n) < 0.03
    ev["qty_null"] = qty_null
    return ev


def rows_of(ev: dict, lo: int, hi: int) -> list[dict]:
    out = []
    for i in range(lo, hi):
        p = ev["price"][i]
        out.append({"user_id": str(ev["user_id"][i]), "ts": int(ev["ts"][i]), "kind": str(ev["kind"][i]),
                    "price": None if np.isnan(p) else float(p),
                    "qty": None if ev["qty_null"][i] else int(ev["qty"][i]), "category": ev["category"][i]})
    return out


def duck_events(ev: dict):
    import pyarrow as pa

    return pa.table({"user_id": pa.array(ev["user_id"]), "ts": pa.array(ev["ts"]), "kind": pa.array(ev["kind"]),
                     "price": pa.array(ev["price"], mask=np.isnan(ev["price"])),
                     "qty": pa.array(ev["qty"], mask=ev["qty_null"]),
                     "category": pa.array(list(ev["category"]), pa.string())})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    keys = make_keys(tmp / "keys")
    store = tmp / "store-dev"
    trust(store, keys)
    agent = start_agent(tmp, store=store)
    c = DeviceClient(agent.url, TOKEN)
    feats = ["x", "clicks_1h", "avg_price_2d", "qty_1d"]
    pkg = build_package(linear_model(feats, [1.0, 10.0, 0.5, 2.0]),
                        {"name": "scorer", "version": 1, "providers": ["cpu"], "feature_views": [view_spec()]},
                        keys.private_key)
    c.install(pkg)
    direct = build_package(linear_model(feats, [1.0, 10.0, 0.5, 2.0]),
                           {"name": "direct", "version": 1, "providers": ["cpu"]}, keys.private_key)
    c.install(direct)
    yield {"tmp": tmp, "keys": keys, "agent": agent, "client": c, "store": store}
    agent.kill()


def test_replay_equals_duckdb_at_2000_probes(env):
    """The Must-show: 100,000 events over 1,000 keys and 3 days, replayed in time order in batches of
    1,000; 2,000 probes, each asked once every event up to its time was sent (events after it may be in
    already), equal DuckDB's range-join SQL over the same events."""
    c = env["client"]
    rng = np.random.default_rng(7)
    ev = make_events(rng, 100_000, 1_000, 3 * D)
    n_probe = 2_000
    at = T0 + rng.integers(0, 3 * D, n_probe)
    pick = rng.integers(0, len(ev["ts"]), n_probe)
    # probes on the boundaries: exactly at an event, and exactly one window after one (at - w == ts)
    at[:200] = ev["ts"][pick[:200]]
    at[200:300] = ev["ts"][pick[200:300]] + H
    at[300:400] = ev["ts"][pick[300:400]] + D
    users = np.where(np.arange(n_probe) < 400, ev["user_id"][pick], [f"u{u:04d}" for u in rng.integers(0, 1000, n_probe)])
    order = np.argsort(at, kind="stable")
    got: dict[str, list] = {name: [None] * n_probe for name in OFFLINE}
    nxt = 0
    batch = 1_000
    n = len(ev["ts"])

    def ask(upto_ts):  # every probe whose time is before the next unsent event
        nonlocal nxt
        while nxt < n_probe and at[order[nxt]] < upto_ts:
            i = int(order[nxt])
            vals = c.features("user_activity", str(users[i]), int(at[i]))["features"]
            for name in OFFLINE:
                got[name][i] = vals[name]
            nxt += 1

    t0 = time.time()
    for lo in range(0, n, batch):
        ask(ev["ts"][lo])
        assert c.post_events("app_events", rows_of(ev, lo, min(n, lo + batch)))["rows"] == min(batch, n - lo)
    ask(np.iinfo(np.int64).max)
    replay_s = time.time() - t0
    want = offline(duck_events(ev), {"pid": np.arange(n_probe), "user_id": users, "at": at})
    bad = mismatches(got, want, n_probe)
    print(f"replay of {n} events and {n_probe} probes in {replay_s:.1f} s; mismatches: {len(bad)}", bad[:10])
    assert len(bad) == 0, bad[:10]
    # the probes saw real windows
    assert sum(v for v in got["n_1d"]) > 50_000
    # all 2,000 probes in one predict (the batch lookup: every key's rows at once, each row its own at):
    # y = x + 10 clicks_1h + 0.5 avg_price_2d + 2 qty_1d from DuckDB's values, within float64 rounding
    # of a 4-term dot product (a few ulps; 1e-12 relative)
    ans = c.http.request("POST", "/v1/models/scorer/predict", json.dumps(
        {"columns": {"user_id": users.tolist(), "x": [[0.25]] * n_probe}, "at": at.tolist()}).encode(),
        "application/json")
    y = [r[0] for r in ans["outputs"]["y"]]
    for i in range(n_probe):
        parts = (want["clicks_1h"][i], want["avg_price_2d"][i], want["qty_1d"][i])
        if None in parts:
            assert y[i] is None, (i, y[i], parts)
        else:
            expect = 0.25 + 10.0 * parts[0] + 0.5 * parts[1] + 2.0 * parts[2]
            assert abs(y[i] - expect) <= 1e-12 * max(1.0, abs(expect)), (i, y[i], expect)
    m = c.metrics()["features"]["user_activity"]
    assert m["events"] >= n and m["keys"] >= 1000


def test_window_boundaries_leakage(env):
    """At exactly the probe time: counted; a microsecond after: not; exactly at - w: counted; a
    microsecond before at - w: not. The same in DuckDB."""
    c = env["client"]
    at = T0 + 10 * D
    ts = [at - H - 1, at - H, at - 5, at, at + 1]
    rows = [{"user_id": "leak", "ts": t, "kind": "click", "price": float(i), "qty": i + 1, "category": f"c{i}"}
            for i, t in enumerate(ts)]
    c.post_events("app_events", rows)
    vals = c.features("user_activity", "leak", at)["features"]
    assert vals["clicks_1h"] == 3  # at - w, at - 5, at
    assert vals["min_qty_1h"] == 2  # the event at exactly at - w is in, the one a microsecond before is not
    assert vals["last_category_1d"] == "c3"  # the event at `at`, not the one a microsecond after
    assert vals["n_1d"] == 4
    ev = {"user_id": np.array(["leak"] * 5), "ts": np.array(ts), "kind": np.array(["click"] * 5),
          "price": np.arange(5.0), "qty": np.arange(1, 6), "qty_null": np.zeros(5, bool),
          "category": np.array([f"c{i}" for i in range(5)], dtype=object)}
    want = offline(duck_events(ev), {"pid": np.array([0]), "user_id": np.array(["leak"]), "at": np.array([at])})
    assert mismatches({k: [vals[k]] for k in OFFLINE}, want, 1) == []
    # ISO-8601 in the request: the same instant
    iso = np.datetime_as_string(np.datetime64(at, "us"), unit="us") + "Z"
    assert c.features("user_activity", "leak", iso)["features"] == vals


def _status(fn) -> DeviceError:
    with pytest.raises(DeviceError) as ei:
        fn()
    return ei.value


def test_bad_events_name_the_field_and_apply_nothing(env):
    c = env["client"]
    at = T0 + 20 * D
    good = {"user_id": "bad", "ts": at, "kind": "click", "price": 1.0, "qty": 1, "category": "x"}
    c.post_events("app_events", [good])
    before = c.features("user_activity", "bad", at)["features"]
    events_before = c.metrics()["features"]["user_activity"]["events"]
    cases = [
        ([good, {**good, "qty": "three"}], 400, "rows[1].qty"),
        ([good, {**good, "price": "1.5"}], 400, "rows[1].price"),
        ([good, {**good, "qty": 1.5}], 400, "rows[1].qty"),
        ([good, {**good, "nope": 1}], 400, "rows[1].nope"),
        ([good, {k: v for k, v in good.items() if k != "ts"}], 400, "ts"),
        ([good, {k: v for k, v in good.items() if k != "user_id"}], 400, "user_id"),
        ([good, {**good, "ts": int(time.time() * US) + 2 * D}], 400, "rows[1].ts"),
        ([good, {**good, "ts": "next tuesday"}], 400, "rows[1].ts"),
    ]
    for rows, status, field in cases:
        err = _status(lambda rows=rows: c.post_events("app_events", rows))
        assert err.status == status and field in err.message, (rows[1], err.status, err.message)
    err = _status(lambda: c.post_events("nope_events", [good]))
    assert err.status == 404 and "nope_events" in err.message
    # a number out of float64's range (JSON 1e400): refused naming the field
    raw = b'{"table": "app_events", "rows": [{"user_id": "bad", "ts": %d, "price": 1e400}]}' % at
    err = _status(lambda: c.http.request("POST", "/v1/events", raw, "application/json"))
    assert err.status == 400 and "rows[0].price" in err.message
    # a body over the limit: 413, before anything is parsed
    big = json.dumps({"table": "app_events", "rows": [good] * 10}).encode() + b" " * (17 << 20)
    err = _status(lambda: c.http.request("POST", "/v1/events", big, "application/json"))
    assert err.status == 413
    # a binary batch with a wrong dtype
    err = _status(lambda: c.post_events("app_events", columns={
        "user_id": np.array(["bad"]), "ts": np.array([at], np.int64), "qty": np.array([1.5])}))
    assert err.status == 400 and "qty" in err.message
    # no token: 401
    err = _status(lambda: DeviceClient(env["agent"].url, "wrong").post_events("app_events", [good]))
    assert err.status == 401
    assert c.features("user_activity", "bad", at)["features"] == before
    assert c.metrics()["features"]["user_activity"]["events"] == events_before
    # the binary form applies like JSON
    c.post_events("app_events", columns={"user_id": np.array(["bad", "bad"]), "ts": np.array([at, at], np.int64),
                                         "kind": np.array(["click", "view"]), "price": np.array([np.nan, 3.0]),
                                         "qty": np.array([5, 6])})
    after = c.features("user_activity", "bad", at)["features"]
    assert after["clicks_1h"] == before["clicks_1h"] + 1 and after["qty_1d"] == before["qty_1d"] + 11
    assert after["n_price_1d"] == before["n_price_1d"] + 1  # NaN is NULL in the binary form


def test_predict_fills_view_features_like_the_values_sent(env):
    """The model with the view gets its features from the state; the same graph without the view, fed
    the values GET /v1/features answers, gives the same outputs, row for row."""
    c = env["client"]
    at = T0 + 30 * D
    rows = [{"user_id": u, "ts": at - k * 60 * US, "kind": ["click", "view"][k % 2], "price": 2.5 * k, "qty": k,
             "category": "x"} for u in ("p1", "p2") for k in range(1, 6 if u == "p1" else 3)]
    c.post_events("app_events", rows)
    users = ["p1", "p2", "p3"]
    res = c.http.request("POST", "/v1/models/scorer/predict", json.dumps(
        {"columns": {"user_id": users, "x": [[1.0], [2.0], [3.0]]}, "at": at}).encode(), "application/json")
    vals = [c.features("user_activity", u, at)["features"] for u in users]
    assert vals[2]["avg_price_2d"] is None and vals[2]["clicks_1h"] == 0  # p3: no event
    direct = c.predict("direct", columns={  # p1 and p2 (JSON has no NaN for p3's NULL average)
        "x": [[1.0], [2.0]], "clicks_1h": [[v["clicks_1h"]] for v in vals[:2]],
        "avg_price_2d": [[v["avg_price_2d"]] for v in vals[:2]], "qty_1d": [[v["qty_1d"]] for v in vals[:2]]})
    assert vals[0]["clicks_1h"] == 2 and vals[1]["qty_1d"] == 3  # the features are real ones (k = 2, 4 click)
    assert res["outputs"]["y"][:2] == direct["outputs"]["y"]
    assert res["outputs"]["y"][2] == [None]  # p3 has no events: avg is NULL -> NaN -> y is NaN (null)
    # at in the query, binary columns
    b = c.http.request("POST", "/v1/models/scorer/predict", __import__("device_bridge.columns").columns.encode(
        {"user_id": np.array(users[:2]), "x": np.array([[1.0], [2.0]])}), "application/x-mlsql-columns",
        {"at": at})
    assert b["outputs"]["y"] == direct["outputs"]["y"]
    # the key column missing; a view feature sent too
    err = _status(lambda: c.predict("scorer", columns={"x": [[1.0]]}))
    assert err.status == 400 and "user_id" in err.message
    err = _status(lambda: c.predict("scorer", columns={"x": [[1.0]], "user_id": ["p1"], "clicks_1h": [[4.0]]}))
    assert err.status == 400 and "clicks_1h" in err.message and "user_activity" in err.message
    info = c.info()["models"]["scorer"]
    assert info["feature_views"] == ["user_activity"]
    # with sampling on, the sample holds the request's inputs and the filled-in features, no event column
    c.activate("scorer", 1, deploy={"sample_rate": 1.0})
    c.http.request("POST", "/v1/models/scorer/predict", json.dumps(
        {"columns": {"user_id": ["p1"], "x": [[1.0]]}, "at": at}).encode(), "application/json")
    table = c.samples("scorer")[0]
    cols = {n for n in table.column_names if n.startswith("in.")}
    assert cols == {"in.x", "in.clicks_1h", "in.avg_price_2d", "in.qty_1d"}, cols
    assert table.column("in.clicks_1h").to_pylist()[-1] in (2, [2], 2.0, [2.0])


def test_changed_view_is_a_conflict(env):
    c = env["client"]
    spec = view_spec()
    spec["features"] = spec["features"][:3]
    pkg = build_package(linear_model(["x", "clicks_1h"], [1.0, 1.0]),
                        {"name": "other", "version": 1, "providers": ["cpu"], "feature_views": [spec]},
                        env["keys"].private_key)
    err = _status(lambda: c.install(pkg))
    assert err.status == 409 and "user_activity" in err.message
    assert "other" not in c.info()["models"]
    bad = view_spec(name="broken")
    bad["features"][0]["window_us"] = 31 * D  # over the ttl
    pkg = build_package(linear_model(["x", "clicks_1h"], [1.0, 1.0]),
                        {"name": "other", "version": 1, "providers": ["cpu"], "feature_views": [bad]},
                        env["keys"].private_key)
    err = _status(lambda: c.install(pkg))
    assert err.status == 422 and "clicks_1h" in err.message and "ttl" in err.message


def test_acknowledged_events_survive_kill_9(tmp_path):
    """Batches are posted while the agent is killed with SIGKILL; after a restart every acknowledged
    batch is counted exactly once, and the one in flight entirely or not at all."""
    keys = make_keys(tmp_path / "keys")
    store = tmp_path / "store-k"
    trust(store, keys)
    agent = start_agent(tmp_path, name="k", store=store)
    c = DeviceClient(agent.url, TOKEN)
    feats = [f for f in feature_list() if f["name"] in ("n_1d", "qty_1d")]
    c.install(build_package(linear_model(["n_1d"], [1.0]),
                            {"name": "m", "version": 1, "providers": ["cpu"],
                             "feature_views": [view_spec(features=feats)]}, keys.private_key))
    host = agent.url.split("//")[1]
    acked: list[int] = []
    inflight: list[int] = []
    stop = threading.Event()

    def post():
        b = 0
        while not stop.is_set():
            rows = [{"user_id": f"b{b}", "ts": T0 + b, "qty": 1} for _ in range(200)] + \
                   [{"user_id": "all", "ts": T0 + b, "qty": 1}]
            conn = http.client.HTTPConnection(host, timeout=10)  # no retry: a lost answer is not resent
            inflight[:] = [b]
            try:
                conn.request("POST", "/v1/events", json.dumps({"table": "app_events", "rows": rows,
                                                               "batch_id": f"k{b}"}),
                             {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
                if conn.getresponse().status == 200:
                    acked.append(b)
            except OSError:
                return
            finally:
                conn.close()
            b += 1

    th = threading.Thread(target=post)
    th.start()
    wait_for(lambda: len(acked) >= 30, what="30 acknowledged batches")
    time.sleep(0.01 * (os.getpid() % 7))  # somewhere in the middle of a request
    agent.kill(signal.SIGKILL)
    stop.set()
    th.join(20)
    agent = start_agent(tmp_path, name="k", store=store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        at = T0 + 10**6
        for b in acked:
            assert c.features("user_activity", f"b{b}", at)["features"]["n_1d"] == 200, b
        last = inflight[0]
        n_last = c.features("user_activity", f"b{last}", at)["features"]["n_1d"]
        assert n_last in (0, 200) if last not in acked else n_last == 200
        n_all = c.features("user_activity", "all", at)["features"]["n_1d"]
        assert n_all == len(acked) + (n_last == 200 and last not in acked)
        assert c.features("user_activity", f"b{max(acked) + 2}", at)["features"]["n_1d"] == 0
        # the client retries the batch in flight and an acknowledged one (same batch ids): each applied once
        for b in (last, acked[-1]):
            rows = [{"user_id": f"b{b}", "ts": T0 + b, "qty": 1} for _ in range(200)] + \
                   [{"user_id": "all", "ts": T0 + b, "qty": 1}]
            dup = c.post_events("app_events", rows, batch_id=f"k{b}")["duplicate"]
            assert dup == (b in acked or n_last == 200)
            assert c.features("user_activity", f"b{b}", at)["features"]["n_1d"] == 200
        assert c.features("user_activity", "all", at)["features"]["n_1d"] == len(set(acked) | {last})
        print(f"acknowledged {len(acked)} batches before the kill; the one in flight applied: {n_last == 200}")
    finally:
        agent.kill()


def test_bounds_evict_oldest_keys_and_count_them(tmp_path):
    """max_keys: after a merge (every 32,768 events) the keys with the oldest newest-event are gone, the
    others exact; rows past the horizon expire and keys with none left are dropped; all counted in
    /v1/metrics and kept across a restart."""
    from device_bridge.agent.features import TAIL_ROWS

    keys = make_keys(tmp_path / "keys")
    store = tmp_path / "store-b"
    trust(store, keys)
    snap = {"MLSQL_DEVICE_TEST_SNAPSHOT_BYTES": "0"}  # the log is replaced by a snapshot at any size
    agent = start_agent(tmp_path, name="b", store=store, env=snap)
    c = DeviceClient(agent.url, TOKEN)
    feats = [f for f in feature_list() if f["name"] in ("n_1d", "qty_1d")]
    c.install(build_package(linear_model(["n_1d"], [1.0]),
                            {"name": "m", "version": 1, "providers": ["cpu"],
                             "feature_views": [view_spec(features=feats)]}, keys.private_key),
              deploy={"max_keys": 50})
    n = TAIL_ROWS + 100
    # 200 keys; key i's events end at T0 + i minutes: keys 150..199 are the newest
    k = np.arange(n) % 200
    ts = T0 + k * 60 * US - (np.arange(n) // 200)
    order = np.argsort(ts, kind="stable")
    rows = [{"user_id": f"k{int(k[i]):03d}", "ts": int(ts[i]), "qty": 1} for i in order]
    c.post_events("app_events", rows[:20_000])
    log_first = c.metrics()["features"]["user_activity"]["log_bytes"]
    c.post_events("app_events", rows[20_000:])
    m = c.metrics()["features"]["user_activity"]
    assert m["keys"] == 50 and m["evicted_keys_max_keys"] == 150 and m["merges"] == 1
    # the merge replaced the log by a snapshot of the 50 keys left: smaller than the first 20,000 events
    assert m["log_bytes"] < log_first
    at = T0 + 200 * 60 * US
    per_key = np.bincount(k, minlength=200)
    assert c.features("user_activity", "k199", at)["features"]["n_1d"] == per_key[199]
    assert c.features("user_activity", "k150", at)["features"]["n_1d"] == per_key[150]
    assert c.features("user_activity", "k149", at)["features"]["n_1d"] == 0  # evicted: starts empty
    # events 10 days later: everything before them falls past the horizon at the next merge
    late = [{"user_id": "late", "ts": T0 + 10 * D + i, "qty": 2} for i in range(TAIL_ROWS)]
    c.post_events("app_events", late)
    m = c.metrics()["features"]["user_activity"]
    assert m["keys"] == 1 and m["evicted_keys_ttl"] == 50 and m["expired_rows"] >= 50 * 160
    err = _status(lambda: c.features("user_activity", "k199", at))
    assert err.status == 400 and "at" in err.message
    agent.kill(signal.SIGKILL)
    agent = start_agent(tmp_path, name="b", store=store, env=snap)
    try:
        c = DeviceClient(agent.url, TOKEN)
        m2 = c.metrics()["features"]["user_activity"]
        assert {k: m2[k] for k in ("keys", "evicted_keys_ttl", "evicted_keys_max_keys", "expired_rows")} == \
            {k: m[k] for k in ("keys", "evicted_keys_ttl", "evicted_keys_max_keys", "expired_rows")}
        v = c.features("user_activity", "late", T0 + 11 * D)["features"]
        assert v == {"n_1d": TAIL_ROWS, "qty_1d": 2 * TAIL_ROWS}
    finally:
        agent.kill()


def test_max_state_mb_bounds_the_state(tmp_path):
    keys = make_keys(tmp_path / "keys")
    store = tmp_path / "store-s"
    trust(store, keys)
    agent = start_agent(tmp_path, name="s", store=store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        feats = [f for f in feature_list() if f["name"] in ("n_1d",)]
        c.install(build_package(linear_model(["n_1d"], [1.0]),
                                {"name": "m", "version": 1, "providers": ["cpu"],
                                 "feature_views": [view_spec(features=feats)]}, keys.private_key),
                  deploy={"max_state_mb": 1})
        n = 80_000  # 25 bytes a row (key id, time, arrival, one flag): 2 MB, twice the bound
        rows = [{"user_id": f"s{i % 400}", "ts": T0 + i, "qty": 1} for i in range(n)]
        for lo in range(0, n, 20_000):
            c.post_events("app_events", rows[lo:lo + 20_000])
        m = c.metrics()["features"]["user_activity"]
        assert m["evicted_keys_max_state"] > 0
        assert m["rows"] * 25 <= (1 << 20) + 25 * 32_768  # the bound, plus at most one tail since the merge
    finally:
        agent.kill()


def test_no_views_no_store(env, tmp_path):
    """A device whose packages carry no view has no features.db and answers 404 for events."""
    store = tmp_path / "store-plain"
    trust(store, env["keys"])
    agent = start_agent(tmp_path, name="plain", store=store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        err = _status(lambda: c.post_events("app_events", [{"user_id": "a", "ts": T0}]))
        assert err.status == 404
        assert not (store / "features.db").exists()
    finally:
        agent.kill()



def test_trigger_runs_the_model_for_matching_events(env, tmp_path):
    """DEPLOY's trigger (compiled from SQL by the notebook side): a purchase event runs the model for its
    key with the features as of the event and the event's own price; the answer equals the same graph
    fed those values; a key with no matching event has none; the latency is in /v1/metrics."""
    from mlsql.deploy.triggers import compile_trigger

    keys = make_keys(tmp_path / "keys")
    store = tmp_path / "store-t"
    trust(store, keys)
    agent = start_agent(tmp_path, name="t", store=store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        inputs = ["price", "clicks_1h", "qty_1d"]
        trig = compile_trigger({"on_table": "app_events", "when_sql": "kind = 'purchase' AND price > 5"})
        c.install(build_package(linear_model(inputs, [1.0, 10.0, 2.0]),
                                {"name": "buyer", "version": 1, "providers": ["cpu"],
                                 "feature_views": [view_spec()]}, keys.private_key), deploy={"trigger": trig})
        c.install(build_package(linear_model(inputs, [1.0, 10.0, 2.0]),
                                {"name": "plain", "version": 1, "providers": ["cpu"]}, keys.private_key))
        t = T0 + 40 * D
        c.post_events("app_events", [
            {"user_id": "t1", "ts": t, "kind": "click", "price": 1.0, "qty": 1},
            {"user_id": "t1", "ts": t + 5, "kind": "purchase", "price": 20.0, "qty": 1},  # a match, not the latest
            {"user_id": "t1", "ts": t + 10, "kind": "click", "price": 1.0, "qty": 2},
            {"user_id": "t2", "ts": t + 10, "kind": "purchase", "price": 3.0, "qty": 1},  # price <= 5: no run
            {"user_id": "t1", "ts": t + 20, "kind": "purchase", "price": 30.0, "qty": 4},
            {"user_id": "t1", "ts": t + 30, "kind": "click", "price": 1.0, "qty": 8}])  # after: not in its features
        got = wait_for(lambda: c.http.request("GET", "/v1/models/buyer/latest", params={"key": "t1"}),
                       what="the triggered answer")
        vals = c.features("user_activity", "t1", t + 20)["features"]
        assert (vals["clicks_1h"], vals["qty_1d"]) == (2, 8)
        direct = c.predict("plain", columns={"price": [[30.0]], "clicks_1h": [[2.0]], "qty_1d": [[8.0]]})
        assert got["outputs"]["y"] == direct["outputs"]["y"][0] and got["at"] == t + 20
        err = _status(lambda: c.http.request("GET", "/v1/models/buyer/latest", params={"key": "t2"}))
        assert err.status == 404
        trig_m = c.metrics()["triggers"]["buyer"]
        assert trig_m["keys"] == 1 and trig_m["errors"] == 0 and trig_m["latency_ms"]["n"] == 1
        # a trigger on a table the model's views do not read is refused at install
        bad = compile_trigger({"on_table": "other_events", "when_sql": "kind = 'x'"})
        err = _status(lambda: c.install(build_package(linear_model(inputs, [1.0, 1.0, 1.0]), {
            "name": "buyer2", "version": 1, "providers": ["cpu"], "feature_views": [view_spec()]}, keys.private_key),
            deploy={"trigger": bad}))
        assert err.status == 400 and "other_events" in err.message
    finally:
        agent.kill()


def test_integer_keys_and_mixed_timestamps(env, tmp_path):
    """A view keyed by an int64 column: events as JSON (timestamps as integers and ISO strings in one
    batch) and as binary columns; GET /v1/features and predict take the key as an integer."""
    keys = make_keys(tmp_path / "keys")
    store = tmp_path / "store-i"
    trust(store, keys)
    agent = start_agent(tmp_path, name="i", store=store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        schema = [{"name": "uid", "type": "int64"}, {"name": "ts", "type": "timestamp"},
                  {"name": "amount", "type": "float64"}]
        spec = {"format": 1, "name": "spend", "table": "payments", "key": "uid", "time_col": "ts", "ttl_us": 2 * D,
                "schema": schema, "sql": "(by hand)",
                "features": [{"name": "paid_1h", "agg": "sum", "arg": {"col": "amount"}, "filter": None,
                              "window_us": H, "type": "float64"},
                             {"name": "n_1h", "agg": "count", "arg": None, "filter": None, "window_us": H,
                              "type": "int64"}]}
        c.install(build_package(linear_model(["paid_1h", "n_1h"], [1.0, 100.0]),
                                {"name": "payer", "version": 1, "providers": ["cpu"], "feature_views": [spec]},
                                keys.private_key))
        t = T0 + 50 * D
        iso = np.datetime_as_string(np.datetime64(t + 1, "us"), unit="us")  # no offset: read as UTC
        c.post_events("payments", [{"uid": 7, "ts": t, "amount": 2.5}, {"uid": 7, "ts": iso, "amount": 1.0},
                                   {"uid": 8, "ts": t, "amount": 9.0}])
        c.post_events("payments", columns={"uid": np.array([7, 7]), "ts": np.array([t + 2, t + H + 3]),
                                           "amount": np.array([0.5, 100.0])})
        assert c.features("spend", 7, t + 2)["features"] == {"paid_1h": 4.0, "n_1h": 3}
        assert c.features("spend", 7, t + H + 1)["features"] == {"paid_1h": 1.5, "n_1h": 2}  # t out; t + 1 = at - w in
        y = c.http.request("POST", "/v1/models/payer/predict", json.dumps(
            {"columns": {"uid": [7, 8, 9]}, "at": t + 2}).encode(), "application/json")["outputs"]["y"]
        assert y[0] == [4.0 + 300.0] and y[1] == [9.0 + 100.0] and y[2] == [None]  # 9: no event, sum NULL
        err = _status(lambda: c.features("spend", "seven", t))
        assert err.status == 400 and "integer" in err.message
    finally:
        agent.kill()


def test_a_retried_batch_is_applied_once(env):
    """A batch posted again with the same batch_id (a retry after a lost answer) is acknowledged and not
    applied twice; another id is another batch."""
    c = env["client"]
    at = T0 + 60 * D
    rows = [{"user_id": "retry", "ts": at, "kind": "click", "qty": 1}]
    assert c.post_events("app_events", rows, batch_id="b-1")["duplicate"] is False
    assert c.post_events("app_events", rows, batch_id="b-1") == {"table": "app_events", "rows": 1,
                                                                 "views": ["user_activity"], "duplicate": True}
    assert c.features("user_activity", "retry", at)["features"]["n_1d"] == 1
    c.post_events("app_events", rows, batch_id="b-2")
    assert c.features("user_activity", "retry", at)["features"]["n_1d"] == 2
    err = _status(lambda: c.post_events("app_events", rows, batch_id="x" * 129))
    assert err.status == 400 and "batch_id" in err.message
