"""Feature views end to end (issue 25's Must-show): one view written in SQL, its values computed
offline by ``ML.FEATURES_AT`` on DuckDB and on Spark, and on a real device agent process fed the same
events in time order after ``DEPLOY MODEL ... TO DEVICE`` installed the view from the model's package.
The two halves were built apart to the view spec; this is the test that they mean the same."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from bridge_procs import start_agent
from feature_view_reference import DAY, HOUR, T0, event_log

import mlsql
from mlsql.errors import DeviceError

TOKEN = "fv-device-token"
N_EVENTS, N_KEYS, N_PROBES, BATCH = 100_000, 1_000, 2_000, 2_000

# every aggregate kind; qty is an INTEGER (int32) column: qty * 1000000000 passes 2^31, which both
# sides must compute in int64; count(DISTINCT price) over 3 days passes the default max_distinct (64)
VIEW = """CREATE OR REPLACE FEATURE VIEW {name} OPTIONS (key = 'user_id', time_col = 'ts', ttl = INTERVAL 30 DAYS) AS
SELECT user_id,
       count(*) FILTER (WHERE kind = 'click') OVER h1 AS clicks_1h,
       sum(qty * 1000000000) FILTER (WHERE kind IN ('click', 'buy')) OVER h6 AS qty_g_6h,
       avg(price) OVER d1 AS avg_price_1d,
       min(qty) OVER h6 AS min_qty_6h,
       max(price) OVER d1 AS max_price_1d,
       arg_max(category, ts) OVER d1 AS last_category,
       count(DISTINCT kind) OVER d1 AS n_kinds_1d,
       count(DISTINCT price) OVER d3 AS n_prices_3d
FROM {table}
WINDOW h1 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW),
       h6 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 6 HOURS PRECEDING AND CURRENT ROW),
       d1 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 DAY PRECEDING AND CURRENT ROW),
       d3 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 3 DAYS PRECEDING AND CURRENT ROW)"""
EXACT = ["clicks_1h", "qty_g_6h", "min_qty_6h", "max_price_1d", "last_category", "n_kinds_1d", "n_prices_3d"]
INPUTS = ["clicks_1h", "n_kinds_1d", "n_prices_3d"]  # counts: never NULL, so every probe has a prediction


def time_ordered_events() -> pa.Table:
    """The reference generator's log (ties, NULLs in every value column, an int32 column), in time
    order: the table's row order is the order the device receives the events in, so ``last``'s ties
    (the latest arrival) are the same event offline and on the device."""
    ev = event_log(N_EVENTS, N_KEYS, seed=25)
    ev = ev.take(np.argsort(ev["ts"].cast(pa.int64()).to_numpy(), kind="stable"))
    return ev.set_column(0, "seq", pa.array(np.arange(N_EVENTS), pa.int64()))


def probes(ev: pa.Table) -> pa.Table:
    """2,000 (key, time) probes: a quarter exactly at an event's time, a tenth exactly one window
    (1 hour) after one, the rest at random microseconds over the 3 days; a request column ``x``."""
    rng = np.random.default_rng(26)
    ts = ev["ts"].cast(pa.int64()).to_numpy()
    users = ev["user_id"].to_numpy(zero_copy_only=False)
    pick = rng.integers(0, N_EVENTS, N_PROBES)
    at = T0 + rng.integers(0, 3 * DAY, N_PROBES)
    at[:500] = ts[pick[:500]]
    at[500:700] = ts[pick[500:700]] + HOUR
    who = np.where(
        np.arange(N_PROBES) < 700, users[pick], [f"u{u}" for u in rng.integers(0, N_KEYS, N_PROBES)]
    )
    return pa.table(
        {
            "user_id": pa.array(who, pa.string()),
            "at": pa.array(at, pa.timestamp("us")),
            "x": pa.array(rng.normal(size=N_PROBES)),
            "label": pa.array(rng.normal(size=N_PROBES)),
        }
    )


def load_tables(sess, ev: pa.Table, pr: pa.Table, prefix: str) -> None:
    """The events, the labels (the probes) and the view, in a session's workspace."""
    sess.register(f"{prefix}ev_arrow", ev)
    sess.sql(f"CREATE OR REPLACE TABLE {prefix}app_events AS SELECT * FROM {prefix}ev_arrow")
    sess.register(f"{prefix}pr_arrow", pr)
    sess.sql(f"CREATE OR REPLACE TABLE {prefix}labels AS SELECT * FROM {prefix}pr_arrow")
    sess.sql(VIEW.format(name=f"{prefix}activity", table=f"{prefix}app_events"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from device_bridge.client import DeviceClient
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("fvdev")
    s = mlsql.connect(tmp / "ws")
    ev = time_ordered_events()
    pr = probes(ev)
    load_tables(s, ev, pr, "")
    load_or_create_keypair(s.workspace.keys_dir)
    agent, url = start_agent(tmp, token=TOKEN, trust=s.workspace.keys_dir / "signing_key.pub")
    try:
        s.sql(f"CREATE DEVICE 'phone' OPTIONS (url = '{url}', token = '{TOKEN}')")
        yield {
            "s": s,
            "ev": ev,
            "pr": pr,
            "client": DeviceClient(url, TOKEN),
            "tmp": tmp,
        }
    finally:
        agent.kill()
        s.close()


def _json_rows(ev: pa.Table, lo: int, hi: int) -> list[dict]:
    part = ev.slice(lo, hi - lo).drop_columns(["seq"])  # times as microseconds since the epoch
    return part.set_column(part.schema.get_field_index("ts"), "ts", part["ts"].cast(pa.int64())).to_pylist()


def _mismatches(got: dict, want: pa.Table, where: str) -> int:
    bad = 0
    for c in EXACT:
        w = want[c].to_pylist()
        bad += sum(a != b for a, b in zip(got[c], w))
    # an average of ≤ ~35 prices (magnitude ≤ ~200) summed in another order: float64 rounding, 1e-12 relative
    g = np.array([np.nan if v is None else v for v in got["avg_price_1d"]], float)
    w = np.array([np.nan if v is None else v for v in want["avg_price_1d"].to_pylist()], float)
    bad += int((np.isnan(g) != np.isnan(w)).sum())
    both = ~np.isnan(g) & ~np.isnan(w)
    bad += int((~np.isclose(g[both], w[both], rtol=1e-12, atol=0)).sum())
    print(
        f"device vs ML.FEATURES_AT on {where}: {bad} mismatches over {len(got['clicks_1h'])} probes x "
        f"{len(EXACT) + 1} features"
    )
    return bad


@pytest.mark.slow  # 30 s to 90 s here (load 2 to 11): 100,000 events to a real agent, Spark started
def test_device_features_equal_features_at_on_duckdb_and_spark(env, shared_ws, spark_ws):
    s, c, ev, pr = env["s"], env["client"], env["ev"], env["pr"]
    load_tables(shared_ws, ev, pr, "fvd_")  # Spark reads the shared workspace's tables, as its other tests do
    for t in ("fvd_app_events", "fvd_labels"):
        spark_ws.sql(f"CREATE OR REPLACE TEMP VIEW {t} AS SELECT * FROM workspace.{t}")
    spec = json.loads((s.workspace.feature_views_dir / "activity.json").read_text())["spec"]
    other = json.loads((shared_ws.workspace.feature_views_dir / "fvd_activity.json").read_text())["spec"]
    assert {**other, "name": "activity", "table": "app_events", "sql": None} == {**spec, "sql": None}
    # train on point-in-time features, DEPLOY: the view travels in the package and is installed
    s.sql(f"""CREATE MODEL churn OPTIONS (model_type = 'linear_reg', input_label_cols = ['label'])
              AS SELECT {", ".join(INPUTS)}, x, label FROM ML.FEATURES_AT(activity, (SELECT user_id, at, x, label FROM labels))""")
    s.sql("DEPLOY MODEL churn TO DEVICE 'phone'")
    assert "activity" in c.metrics()["features"]

    # replay in time order; each probe asked once every event up to its time was sent
    ts = ev["ts"].cast(pa.int64()).to_numpy()
    at = pr["at"].cast(pa.int64()).to_numpy()
    users = pr["user_id"].to_pylist()
    order = np.argsort(at, kind="stable")
    got: dict[str, list] = {f["name"]: [None] * N_PROBES for f in spec["features"]}
    nxt = 0

    def ask(before: int) -> None:
        nonlocal nxt
        while nxt < N_PROBES and at[order[nxt]] < before:
            i = int(order[nxt])
            vals = c.features("activity", users[i], int(at[i]))["features"]
            for name in got:
                got[name][i] = vals[name]
            nxt += 1

    for lo in range(0, N_EVENTS, BATCH):
        ask(int(ts[lo]))
        hi = min(N_EVENTS, lo + BATCH)
        assert c.post_events("app_events", _json_rows(ev, lo, hi))["rows"] == hi - lo
    ask(np.iinfo(np.int64).max)
    assert nxt == N_PROBES and sum(got["clicks_1h"]) > 500
    assert max(got["n_prices_3d"]) == 64  # the count distinct cap is reached

    q = "SELECT * FROM ML.FEATURES_AT({v}, (SELECT user_id, at, x, label FROM {t})) "
    duck = s.sql(q.format(v="activity", t="labels")).table
    spark = spark_ws.sql(q.format(v="fvd_activity", t="fvd_labels")).table
    assert duck["user_id"].to_pylist() == spark["user_id"].to_pylist() == users
    assert _mismatches(got, duck, "DuckDB") == 0
    assert _mismatches(got, spark, "Spark") == 0

    # the device's predictions from the key, the request's own column and `at`, equal ML.PREDICT on the
    # FEATURES_AT rows: the package's graph computes in float32 (inputs cast to float32, a 4-term dot
    # product): relative 1e-5 of the largest term, well above float32's 6e-8 per operation
    ans = c.http.request(
        "POST",
        "/v1/models/churn/predict",
        json.dumps({"columns": {"user_id": users, "x": pr["x"].to_pylist()}, "at": at.tolist()}).encode(),
        "application/json",
    )
    (out,) = ans["outputs"].values()
    dev = np.array(out, float).reshape(N_PROBES)
    s.register("duck_rows", duck)
    local = np.array(
        s.sql("SELECT predicted_label FROM ML.PREDICT(MODEL churn, TABLE duck_rows)")
        .table["predicted_label"]
        .to_pylist(),
        float,
    )
    scale = 1.0 + np.abs(local).max()
    assert np.abs(dev - local).max() <= 1e-5 * scale, np.abs(dev - local).max()


def test_the_leakage_boundary_is_the_same_offline_and_on_the_device(env):
    """An event exactly at the probe time is counted, one a microsecond after is not; an event exactly
    one window before is counted, one a microsecond earlier is not: on DuckDB and on the device."""
    s, c = env["s"], env["client"]
    at = T0 + 5 * DAY  # after the replayed log: this key's own events only
    times = [at - HOUR - 1, at - HOUR, at, at + 1]
    rows = [
        {
            "user_id": "edge",
            "ts": t,
            "kind": "click",
            "price": 10.0 * (i + 1),
            "qty": i + 1,
            "category": f"c{i}",
        }
        for i, t in enumerate(times)
    ]
    c.post_events("app_events", rows)
    dev = c.features("activity", "edge", at)["features"]
    s.register(
        "edge_arrow",
        pa.table(
            {
                "user_id": [r["user_id"] for r in rows],
                "ts": pa.array(times, pa.timestamp("us")),
                "kind": [r["kind"] for r in rows],
                "price": [r["price"] for r in rows],
                "qty": pa.array([r["qty"] for r in rows], pa.int32()),
                "category": [r["category"] for r in rows],
            }
        ),
    )
    s.sql("CREATE TABLE edge_events AS SELECT CAST(NULL AS BIGINT) AS seq, * FROM edge_arrow")
    s.sql(VIEW.format(name="edge_view", table="edge_events"))
    off = s.sql(
        f"SELECT * FROM ML.FEATURES_AT(edge_view, (SELECT 'edge' AS user_id, make_timestamp({at}) AS at))"
    ).table.to_pylist()[0]
    # at - 1 hour and at; not at - 1 hour - 1 µs, not at + 1 µs
    assert dev["clicks_1h"] == off["clicks_1h"] == 2
    assert dev["last_category"] == off["last_category"] == "c2"  # the event at `at`, not the one after
    assert dev["max_price_1d"] == off["max_price_1d"] == 30.0
    assert dev["min_qty_6h"] == off["min_qty_6h"] == 1


def test_an_integer_key_and_iso_times_mean_the_same_on_both_sides(env):
    """A view keyed by a whole-number column (an INTEGER in DuckDB, int64 on the device), its events
    sent with ISO-8601 times and its probes asked with ISO-8601 ``at``: the same values as offline."""
    s, c, ev = env["s"], env["client"], env["ev"].slice(0, 5_000)
    s.register("int_arrow", ev)
    s.sql("""CREATE TABLE int_events AS SELECT CAST(substr(user_id, 2) AS INTEGER) AS uid, ts, kind, price, qty,
             category FROM int_arrow""")
    s.sql("""CREATE FEATURE VIEW by_uid OPTIONS (key = 'uid', time_col = 'ts', ttl = INTERVAL 1 DAY) AS
             SELECT count(*) OVER w AS n_6h, sum(qty) OVER w AS qty_6h, arg_max(category, ts) OVER w AS cat_6h
             FROM int_events
             WINDOW w AS (PARTITION BY uid ORDER BY ts RANGE BETWEEN INTERVAL 6 HOURS PRECEDING AND CURRENT ROW)""")
    s.sql("""CREATE TABLE int_probes AS SELECT uid, ts + INTERVAL 1 HOUR AS at, 1.0 AS label
             FROM int_events USING SAMPLE 200 ROWS (reservoir, 5)""")
    s.sql("""CREATE MODEL by_uid_model OPTIONS (model_type = 'linear_reg', input_label_cols = ['label'])
             AS SELECT n_6h, label FROM ML.FEATURES_AT(by_uid, (SELECT uid, at, label FROM int_probes))""")
    s.sql("DEPLOY MODEL by_uid_model TO DEVICE 'phone'")
    rows = s.sql(
        "SELECT uid, strftime(ts, '%Y-%m-%dT%H:%M:%S.%f') AS ts, kind, price, qty, category "
        "FROM int_events ORDER BY rowid"
    ).table.to_pylist()
    assert isinstance(rows[0]["uid"], int) and isinstance(rows[0]["ts"], str)
    c.post_events("int_events", rows)
    want = s.sql(
        "SELECT uid, strftime(at, '%Y-%m-%dT%H:%M:%S.%f') AS iso, n_6h, qty_6h, cat_6h "
        "FROM ML.FEATURES_AT(by_uid, (SELECT uid, at FROM int_probes))"
    ).table.to_pylist()
    got = [c.features("by_uid", w["uid"], w["iso"])["features"] for w in want]
    bad = [
        (w, g)
        for w, g in zip(want, got)
        if (g["n_6h"], g["qty_6h"], g["cat_6h"]) != (w["n_6h"], w["qty_6h"], w["cat_6h"])
    ]
    assert not bad and sum(w["n_6h"] for w in want) > 200, bad[:3]
    # ML.PREDICT on the device cannot take the features from the query's rows: a clear error, not the agent's 400
    with pytest.raises(DeviceError, match="features of view by_uid are among its inputs") as exc:
        s.sql(
            "SELECT * FROM ML.PREDICT(MODEL by_uid_model, (SELECT * FROM ML.FEATURES_AT(by_uid, "
            "(SELECT uid, at FROM int_probes))), STRUCT('phone' AS device))"
        )
    assert "ML.FEATURES_AT" in exc.value.hint
