"""Feature views (docs/LANGUAGE.md, Feature views): CREATE/SHOW/DESCRIBE/DROP FEATURE VIEW compile
window SQL to the view spec a device installs, refuse what a device cannot compute, and
ML.FEATURES_AT gives point-in-time values equal to a hand-written DuckDB range join (a different
formulation), to a numpy evaluator of the spec, and on Spark to the same answers."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from feature_view_reference import DAY, HOUR, T0, event_log, probes_for, reference

import mlsql
from mlsql.errors import FeatureViewError, MLSQLError, UnknownColumnError, UnknownNameError, UnknownTableError

VIEW = """CREATE FEATURE VIEW user_activity OPTIONS (key = 'user_id', time_col = 'ts', ttl = INTERVAL 30 DAYS) AS
SELECT user_id,
       count(*) FILTER (WHERE kind = 'click') OVER h1 AS clicks_1h,
       count(price) OVER h1 AS priced_1h,
       sum(qty) FILTER (WHERE kind IN ('click', 'buy')) OVER h6 AS qty_6h,
       sum(price * qty) OVER d1 AS spend_1d,
       avg(price) OVER d1 AS avg_price_1d,
       min(qty) OVER h6 AS min_qty_6h,
       max(price / qty) FILTER (WHERE NOT kind = 'view' OR kind IS NULL) OVER d1 AS max_unit_1d,
       arg_max(category, ts) OVER d1 AS last_category,
       count(DISTINCT kind) OVER d1 AS n_kinds_1d,
       sum(CASE WHEN coalesce(qty, 0) > 2 THEN 1 ELSE -1 END) OVER (PARTITION BY user_id ORDER BY ts
           RANGE BETWEEN INTERVAL 90 MINUTES PRECEDING AND CURRENT ROW) AS big_90m
FROM app_events
WINDOW h1 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW),
       h6 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 6 HOURS PRECEDING AND CURRENT ROW),
       d1 AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 DAY PRECEDING AND CURRENT ROW)"""

EXACT = [
    "clicks_1h",
    "priced_1h",
    "qty_6h",
    "min_qty_6h",
    "max_unit_1d",
    "last_category",
    "n_kinds_1d",
    "big_90m",
]
ROUNDED = ["spend_1d", "avg_price_1d"]  # float64 sums: the engine adds in another order than the reference


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with an event log of 2,000 events of 40 users, the view, and probe rows."""
    s = mlsql.connect(tmp_path_factory.mktemp("fv") / "ws")
    events = event_log(2000, 40, seed=7)
    s.register("ev_arrow", events)
    s.sql("CREATE TABLE app_events AS SELECT * FROM ev_arrow")
    s.register("pr_arrow", probes_for(events, 400, seed=8))
    s.sql("CREATE TABLE probes AS SELECT * FROM pr_arrow")
    s.sql(VIEW)
    yield s
    s.close()


PROBE_QUERY = "(SELECT user_id, at, label FROM probes)"


def by_hand(con, where: str = "") -> pa.Table:
    """The features by a range self-join and GROUP BY, written by hand from the view's SQL (not from
    its spec): each feature's own time bound and filter in its FILTER clause."""
    return con.sql(f"""
        WITH p AS (SELECT row_number() OVER (ORDER BY rowid) AS pid, * FROM probes {where})
        SELECT p.pid,
          count(*) FILTER (WHERE e.ts >= p.at - INTERVAL 1 HOUR AND e.kind = 'click') AS clicks_1h,
          count(e.price) FILTER (WHERE e.ts >= p.at - INTERVAL 1 HOUR) AS priced_1h,
          sum(e.qty) FILTER (WHERE e.ts >= p.at - INTERVAL 6 HOURS AND e.kind IN ('click', 'buy')) AS qty_6h,
          sum(e.price * e.qty) AS spend_1d,
          avg(e.price) AS avg_price_1d,
          min(e.qty) FILTER (WHERE e.ts >= p.at - INTERVAL 6 HOURS) AS min_qty_6h,
          max(e.price / nullif(e.qty, 0)) FILTER (WHERE e.kind IS DISTINCT FROM 'view') AS max_unit_1d,
          arg_max(e.category, (e.ts, e.seq)) FILTER (WHERE e.category IS NOT NULL) AS last_category,
          count(DISTINCT e.kind) AS n_kinds_1d,
          sum(CASE WHEN coalesce(e.qty, 0) > 2 THEN 1 ELSE -1 END)
              FILTER (WHERE e.ts >= p.at - INTERVAL 90 MINUTES) AS big_90m
        FROM p LEFT JOIN app_events e
          ON e.user_id = p.user_id AND e.ts <= p.at AND e.ts >= p.at - INTERVAL 1 DAY
        GROUP BY p.pid ORDER BY p.pid""").to_arrow_table()


def _raw(s) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name in ("app_events", "probes"):
        con.register(f"{name}_t", s.sql(f"SELECT * FROM {name} ORDER BY rowid").table)
        con.sql(f"CREATE TABLE {name} AS SELECT * FROM {name}_t")
    return con


def assert_same_features(got: pa.Table, want: pa.Table) -> int:
    assert got.num_rows == want.num_rows
    for c in EXACT:
        assert got[c].to_pylist() == [
            None if v is None else v for v in want[c].cast(got[c].type).to_pylist()
        ], c
    for c in ROUNDED:
        g, w = (np.array(t[c].to_pylist(), dtype=float) for t in (got, want))
        assert np.array_equal(np.isnan(g), np.isnan(w)), c
        # float64 sums of ≤ 2,000 values of magnitude ≤ ~1e3 added in another order: relative 1e-12
        np.testing.assert_allclose(g[~np.isnan(g)], w[~np.isnan(w)], rtol=1e-12, err_msg=c)
    return got.num_rows


# -- statements and the spec ---------------------------------------------------------------------------
def test_create_compiles_the_view_to_its_spec(ws):
    d = ws.workspace.feature_views_dir / "user_activity.json"
    spec = json.loads(d.read_text())["spec"]
    assert (spec["format"], spec["name"], spec["table"], spec["key"], spec["time_col"], spec["ttl_us"]) == (
        1,
        "user_activity",
        "app_events",
        "user_id",
        "ts",
        30 * DAY,
    )
    assert spec["schema"] == [
        {"name": "seq", "type": "int64"},
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": "timestamp"},
        {"name": "kind", "type": "string"},
        {"name": "price", "type": "float64"},
        {"name": "qty", "type": "int64"},
        {"name": "category", "type": "string"},
    ]
    f = {x["name"]: x for x in spec["features"]}
    assert list(f) == [
        *EXACT[:3],
        "spend_1d",
        "avg_price_1d",
        "min_qty_6h",
        "max_unit_1d",
        "last_category",
        "n_kinds_1d",
        "big_90m",
    ]
    assert f["clicks_1h"] == {
        "name": "clicks_1h",
        "agg": "count",
        "arg": None,
        "window_us": HOUR,
        "type": "int64",
        "filter": {"op": "=", "args": [{"col": "kind"}, {"lit": "click"}]},
    }
    assert f["qty_6h"]["filter"] == {"op": "in", "args": [{"col": "kind"}, {"lit": "click"}, {"lit": "buy"}]}
    assert (f["qty_6h"]["agg"], f["qty_6h"]["type"], f["qty_6h"]["window_us"]) == ("sum", "int64", 6 * HOUR)
    assert f["spend_1d"]["arg"] == {"op": "*", "args": [{"col": "price"}, {"col": "qty"}]}
    assert (f["spend_1d"]["type"], f["avg_price_1d"]["type"], f["min_qty_6h"]["type"]) == ("float64",) * 2 + (
        "int64",
    )
    assert f["max_unit_1d"]["filter"] == {
        "op": "or",
        "args": [
            {"op": "not", "args": [{"op": "=", "args": [{"col": "kind"}, {"lit": "view"}]}]},
            {"op": "is_null", "args": [{"col": "kind"}]},
        ],
    }
    assert (f["last_category"]["agg"], f["last_category"]["arg"], f["last_category"]["type"]) == (
        "last",
        {"col": "category"},
        "string",
    )
    assert f["n_kinds_1d"] == {
        "name": "n_kinds_1d",
        "agg": "count_distinct",
        "arg": {"col": "kind"},
        "filter": None,
        "window_us": DAY,
        "type": "int64",
        "max_distinct": 64,
    }
    assert f["big_90m"]["window_us"] == 90 * 60_000_000
    assert f["big_90m"]["arg"]["op"] == "case" and f["big_90m"]["arg"]["args"][2] == {"lit": -1}
    assert spec["sql"].startswith("CREATE FEATURE VIEW user_activity")


def test_show_describe_drop_and_a_new_session_sees_the_view(ws, tmp_path):
    rows = ws.sql("SHOW FEATURE VIEWS").table.to_pylist()
    assert [(r["feature_view"], r["table"], r["key"], r["ttl"], len(r["features"])) for r in rows] == [
        ("user_activity", "app_events", "user_id", "30 days", 10)
    ]
    d = ws.sql("DESCRIBE FEATURE VIEW user_activity")
    desc = {r["feature"]: r for r in d.table.to_pylist()}
    assert (desc["clicks_1h"]["arg"], desc["clicks_1h"]["filter"], desc["clicks_1h"]["window"]) == (
        "*",
        "(kind = 'click')",
        "1 hour",
    )
    assert "key user_id, time ts, ttl 30 days" in d.message
    with mlsql.connect(ws.workspace.root) as other:  # a new session on the same workspace
        other.sql(VIEW.replace("user_activity", "second_view", 1))
        with pytest.raises(FeatureViewError, match="already exists") as exc:
            other.sql(VIEW.replace("user_activity", "second_view", 1))
        assert "CREATE OR REPLACE FEATURE VIEW second_view" in str(exc.value)
        assert (
            "nothing changed"
            in other.sql(VIEW.replace("VIEW user_activity", "VIEW IF NOT EXISTS second_view", 1)).message
        )
        other.sql(
            VIEW.replace(
                "CREATE FEATURE VIEW user_activity", "CREATE OR REPLACE FEATURE VIEW second_view"
            ).replace("INTERVAL 90 MINUTES", "INTERVAL 2 HOURS")
        )
        assert other.sql("DESCRIBE FEATURE VIEW second_view").table["window_us"].to_pylist()[-1] == 2 * HOUR
    assert [r["feature_view"] for r in ws.sql("SHOW FEATURE VIEWS").table.to_pylist()] == [
        "second_view",
        "user_activity",
    ]
    ws.sql("DROP FEATURE VIEW second_view")
    with pytest.raises(UnknownNameError, match="Unknown feature view 'second_vew'") as exc:
        ws.sql("DESCRIBE FEATURE VIEW second_vew")
    assert "Did you mean 'user_activity'" not in str(exc.value)
    with pytest.raises(UnknownNameError, match="user_activty") as exc:
        ws.sql("DROP FEATURE VIEW user_activty")
    assert "Did you mean 'user_activity'?" in str(exc.value)
    assert "nothing dropped" in ws.sql("DROP FEATURE VIEW IF EXISTS second_view").message
    assert [r["feature_view"] for r in ws.sql("SHOW FEATURE VIEWS").table.to_pylist()] == ["user_activity"]


H = "CREATE FEATURE VIEW bad OPTIONS (key = 'user_id', time_col = 'ts', ttl = INTERVAL 7 DAYS) AS\n"
W1 = "OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW)"


@pytest.mark.parametrize(
    "body, error, message, at",
    [
        (
            f"SELECT user_id, count(*) {W1} AS c\nFROM app_events JOIN probes ON app_events.user_id = probes.user_id",
            FeatureViewError,
            "a JOIN is not allowed",
            "JOIN",
        ),
        (
            f"SELECT user_id, count(*) {W1} AS c FROM (SELECT * FROM app_events)",
            FeatureViewError,
            "a subquery cannot run on a device",
            "(SELECT * FROM app_events",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND "
            "CURRENT ROW) AS c FROM app_events",
            FeatureViewError,
            "an unbounded window",
            "UNBOUNDED",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING "
            "AND INTERVAL 1 HOUR FOLLOWING) AS c FROM app_events",
            FeatureViewError,
            "a FOLLOWING window",
            "FOLLOWING",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id ORDER BY ts ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) "
            "AS c FROM app_events",
            FeatureViewError,
            "a ROWS frame counts rows, not time",
            "ROWS",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id, kind ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR "
            "PRECEDING AND CURRENT ROW) AS c FROM app_events",
            FeatureViewError,
            "a second partition key (kind)",
            "kind",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY kind ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND "
            "CURRENT ROW) AS c FROM app_events",
            FeatureViewError,
            "PARTITION BY kind: the view's key is user_id",
            "kind",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id ORDER BY seq RANGE BETWEEN INTERVAL 1 HOUR PRECEDING "
            "AND CURRENT ROW) AS c FROM app_events",
            FeatureViewError,
            "a window must be ORDER BY ts",
            "seq",
        ),
        (
            f"SELECT user_id, stddev(price) {W1} AS c FROM app_events",
            FeatureViewError,
            "the aggregate stddev(...) is not supported",
            "stddev",
        ),
        (
            f"SELECT user_id, sum(abs(price)) {W1} AS c FROM app_events",
            FeatureViewError,
            "abs(...) is not supported inside a feature",
            "abs",
        ),
        (
            "SELECT user_id, count(*) OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 8 DAYS PRECEDING AND "
            "CURRENT ROW) AS c FROM app_events",
            FeatureViewError,
            "is longer than the view's ttl (7 days)",
            "INTERVAL",
        ),
        (  # the device's arithmetic takes numbers only (DuckDB's + refuses a BOOLEAN too)
            f"SELECT user_id, sum((kind = 'click') + 1) {W1} AS c FROM app_events",
            FeatureViewError,
            "'+' of a bool value",
            "kind = 'click')",
        ),
        (
            f"SELECT user_id, sum(prices) {W1} AS c FROM app_events",
            UnknownColumnError,
            "Unknown column 'prices'",
            "prices",
        ),
        (
            f"SELECT user_id, count(*) {W1} AS c FROM app_event",
            UnknownTableError,
            "no event table 'app_event'",
            "app_event",
        ),
    ],
)
def test_a_view_a_device_cannot_compute_is_refused_where_it_is(ws, body, error, message, at):
    sql = "SELECT 1;\n" + H + body  # the statement's place in the script: the error points into the script
    with pytest.raises(error) as exc:
        ws.sql(sql)
    e = exc.value
    assert message in str(e)
    sp = e.span(sql)
    line = sql.split("\n")[sp.line - 1]
    assert line[sp.column - 1 :].startswith(at), (line, sp)
    if error is UnknownColumnError:
        assert "Did you mean 'price'?" in str(e)
    if error is UnknownTableError:
        assert "Did you mean 'app_events'?" in str(e)
    # nothing was stored, and the earlier view is as it was
    assert [r["feature_view"] for r in ws.sql("SHOW FEATURE VIEWS").table.to_pylist()] == ["user_activity"]


# -- ML.FEATURES_AT ------------------------------------------------------------------------------------
def test_features_at_equals_a_range_join_by_hand(ws):
    got = ws.sql(f"SELECT * FROM ML.FEATURES_AT(user_activity, {PROBE_QUERY})").table
    assert got.column_names[:3] == ["user_id", "at", "label"]
    probes = ws.sql('SELECT user_id, "at", label FROM probes ORDER BY rowid').table
    assert got.select(["user_id", "at", "label"]).equals(probes)  # every probe row, in its order
    want = by_hand(_raw(ws))
    assert assert_same_features(got, want) == 400
    # users without events: counts 0, the rest NULL
    none = got.filter(pa.compute.equal(got["user_id"], "nobody")).to_pylist()
    assert none and all(
        r["clicks_1h"] == 0 and r["n_kinds_1d"] == 0 and r["spend_1d"] is None and r["last_category"] is None
        for r in none
    )
    # the log has ties that matter for last_category and NULLs in every column
    ev = ws.sql(
        "SELECT count(*) - count(DISTINCT (user_id, ts)) AS ties, count(*) - count(category) AS nulls "
        "FROM app_events"
    ).table.to_pylist()[0]
    assert ev["ties"] > 100 and ev["nulls"] > 100


def test_the_boundary_at_and_one_microsecond_after(session):
    """An event exactly at ``at`` counts; one a microsecond after does not; one exactly at ``at - w``
    counts; one a microsecond before that does not."""
    at = T0 + 5 * DAY
    times = [at - HOUR - 1, at - HOUR, at - 1, at, at + 1]
    session.register(
        "e",
        pa.table(
            {
                "k": ["a"] * 5,
                "ts": pa.array(times, pa.timestamp("us")),
                "v": [1, 10, 100, 1000, 10000],
                "tag": ["w-1", "w", "a-1", "a", "a+1"],
                "big": pa.array(
                    [2_000_000_000] * 5, pa.int32()
                ),  # big * 2 is past INTEGER: int64 as on a device
            }
        ),
    )
    session.sql("CREATE TABLE ev AS SELECT * FROM e")
    session.sql("""CREATE FEATURE VIEW b OPTIONS (key = 'k', time_col = 'ts', ttl = INTERVAL 1 DAY) AS
        SELECT k, count(*) OVER w AS n, sum(v) OVER w AS s, arg_max(tag, ts) OVER w AS last_tag,
               min(tag) OVER w AS first_tag, sum(big * 2) OVER w AS big2
        FROM ev WINDOW w AS (PARTITION BY k ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW)""")
    session.register(
        "p",
        pa.table(
            {
                "k": ["a", "a", "a", None, "a"],
                "at": pa.array([at, at - 1, at + HOUR, at, None], pa.timestamp("us")),
            }
        ),
    )
    got = session.sql("SELECT * FROM ML.FEATURES_AT(b, (SELECT k, at FROM p))").table.to_pylist()
    assert [r["big2"] for r in got] == [12_000_000_000, 12_000_000_000, 8_000_000_000, None, None]
    assert [(r["n"], r["s"], r["last_tag"]) for r in got] == [
        (3, 10 + 100 + 1000, "a"),  # at: at - w, at - 1µs and at itself; not at + 1µs nor at - w - 1µs
        (3, 1 + 10 + 100, "a-1"),  # at - 1µs: the window [at - w - 1µs, at - 1µs]
        (2, 1000 + 10000, "a+1"),  # at + w: at itself is exactly at its window's start
        (0, None, None),  # a NULL key has no events
        (0, None, None),  # nor has a NULL time
    ]
    # the probe's time as whole microseconds gives the same
    us = session.sql("SELECT * FROM ML.FEATURES_AT(b, (SELECT k, epoch_us(at) AS at FROM p))").table
    assert us["s"].to_pylist() == [1110, 111, 11000, None, None]


def test_features_at_errors_name_what_is_missing(ws):
    with pytest.raises(UnknownColumnError, match="the probe rows have no column 'at'") as exc:
        ws.sql("SELECT * FROM ML.FEATURES_AT(user_activity, (SELECT user_id, at AS t FROM probes))")
    assert "Did you mean 't'" not in str(exc.value) and "Select it" in str(exc.value)
    with pytest.raises(UnknownNameError, match="Unknown feature view 'user_activit'"):
        ws.sql("SELECT * FROM ML.FEATURES_AT(user_activit, (SELECT user_id, at FROM probes))")
    with pytest.raises(MLSQLError, match="already have a column 'clicks_1h'"):
        ws.sql(
            "SELECT * FROM ML.FEATURES_AT(user_activity, (SELECT user_id, at, 1 AS clicks_1h FROM probes))"
        )


# -- the spec is faithful: a numpy evaluator of the spec (the agent side's reference) ----------------------
def test_the_spec_evaluated_in_numpy_equals_features_at(ws):
    spec = json.loads((ws.workspace.feature_views_dir / "user_activity.json").read_text())["spec"]
    events = ws.sql("SELECT * FROM app_events ORDER BY rowid").table
    probes = ws.sql('SELECT user_id, "at", label FROM probes ORDER BY rowid').table
    want = reference(spec, events, probes)
    got = ws.sql(f"SELECT * FROM ML.FEATURES_AT(user_activity, {PROBE_QUERY})").table
    mismatches = 0
    for c in EXACT:
        g = got[c].to_pylist()
        w = [None if v is None else type(g_ if g_ is not None else v)(v) for v, g_ in zip(want[c], g)]
        mismatches += sum(a != b for a, b in zip(g, w))
    for c in ROUNDED:
        g = np.array(got[c].to_pylist(), dtype=float)
        w = np.array(want[c], dtype=float)
        # float64 sums and means of ≤ 2,000 values in another order: relative 1e-12
        mismatches += int((np.isnan(g) != np.isnan(w)).sum())
        both = ~np.isnan(g) & ~np.isnan(w)
        mismatches += int((~np.isclose(g[both], w[both], rtol=1e-12, atol=0)).sum())
    print(
        f"spec reference vs ML.FEATURES_AT: {mismatches} mismatches over {got.num_rows} probes x "
        f"{len(EXACT) + len(ROUNDED)} features"
    )
    assert mismatches == 0


# -- the same on every engine (Spark) ------------------------------------------------------------------
def test_features_at_on_every_engine_equals_the_range_join(backend, request):
    """The same view and probes on each engine (DuckDB, Spark): the answer of the hand-written range
    join on raw DuckDB (never the engine under test)."""
    shared = request.getfixturevalue("shared_ws")
    if not shared.engine.has_relation("fv_app_events"):
        events = event_log(2000, 40, seed=11)
        shared.register("fv_ev_arrow", events)
        shared.sql("CREATE OR REPLACE TABLE fv_app_events AS SELECT * FROM fv_ev_arrow")
        shared.register("fv_pr_arrow", probes_for(events, 300, seed=12))
        shared.sql("CREATE OR REPLACE TABLE fv_probes AS SELECT * FROM fv_pr_arrow")
        shared.sql(
            VIEW.replace(
                "CREATE FEATURE VIEW user_activity", "CREATE OR REPLACE FEATURE VIEW fv_engines"
            ).replace("FROM app_events", "FROM fv_app_events")
        )
    if backend is not shared:  # Spark reads the workspace's tables as views, as the other engine tests do
        for t in ("fv_app_events", "fv_probes"):
            backend.sql(f"CREATE OR REPLACE TEMP VIEW {t} AS SELECT * FROM workspace.{t}")
    got = backend.sql(
        "SELECT * FROM ML.FEATURES_AT(fv_engines, (SELECT user_id, at, label FROM fv_probes))"
    ).table
    con = duckdb.connect()
    for t in ("fv_app_events", "fv_probes"):
        con.register(f"{t}_t", shared.sql(f"SELECT * FROM {t} ORDER BY rowid").table)
        con.sql(f"CREATE TABLE {t[3:]} AS SELECT * FROM {t}_t")
    want = by_hand(con)
    assert (
        got["user_id"].to_pylist()
        == con.sql("SELECT user_id FROM probes ORDER BY rowid").to_arrow_table()["user_id"].to_pylist()
    )
    assert assert_same_features(got, want) == 300


# -- the training hand-off -----------------------------------------------------------------------------
def test_a_model_trained_on_features_at_carries_the_view_in_its_package(ws):
    """CREATE MODEL ... FROM ML.FEATURES_AT(view, ...) records which inputs are the view's features;
    the signed package's manifest holds the view's spec, as the agent reads it."""
    from device_bridge.keys import load_or_create_keypair
    from device_bridge.package import verify_package

    ws.sql(VIEW.replace("FEATURE VIEW user_activity", "FEATURE VIEW trained_on"))
    spec = json.loads((ws.workspace.feature_views_dir / "trained_on.json").read_text())["spec"]
    ws.sql(f"""CREATE MODEL fv_model OPTIONS (model_type = 'linear_reg', input_label_cols = ['label'])
               AS SELECT clicks_1h, avg_price_1d, n_kinds_1d, label FROM ML.FEATURES_AT(trained_on, {PROBE_QUERY})""")
    desc = {r["property"]: r["value"] for r in ws.sql("DESCRIBE MODEL fv_model").table.to_pylist()}
    assert {k: v for k, v in desc.items() if k.startswith("feature_view.")} == {
        "feature_view.clicks_1h": "trained_on",
        "feature_view.avg_price_1d": "trained_on",
        "feature_view.n_kinds_1d": "trained_on",
    }
    ws.sql("DROP FEATURE VIEW trained_on")  # the model keeps the spec it was trained on: export needs no view
    path = ws.sql("EXPORT MODEL fv_model OPTIONS (package = TRUE)").export.package_path
    key = load_or_create_keypair(ws.workspace.keys_dir).public_key
    manifest, _ = verify_package(path.read_bytes(), [key])  # signed: the spec is covered by the signature
    assert manifest.to_dict()["feature_views"] == [spec]
    assert {i.name for i in manifest.inputs} == {"clicks_1h", "avg_price_1d", "n_kinds_1d"}


def test_where_is_every_features_filter_and_the_probe_order_is_kept(ws):
    """The view's WHERE is ANDed into each feature's filter; probes come back in their query's order."""
    ws.sql("""CREATE OR REPLACE FEATURE VIEW buys OPTIONS (key = 'user_id', time_col = 'ts', ttl = '1 day') AS
        SELECT count(*) FILTER (WHERE qty > 1) OVER w AS big_buys, count(*) OVER w AS buys
        FROM app_events WHERE kind = 'buy'
        WINDOW w AS (PARTITION BY user_id ORDER BY ts RANGE BETWEEN INTERVAL 6 HOURS PRECEDING AND CURRENT ROW)""")
    f = {
        x["name"]: x
        for x in json.loads((ws.workspace.feature_views_dir / "buys.json").read_text())["spec"]["features"]
    }
    is_buy = {"op": "=", "args": [{"col": "kind"}, {"lit": "buy"}]}
    assert f["buys"]["filter"] == is_buy
    assert f["big_buys"]["filter"] == {
        "op": "and",
        "args": [is_buy, {"op": ">", "args": [{"col": "qty"}, {"lit": 1}]}],
    }
    got = ws.sql(
        "SELECT * FROM ML.FEATURES_AT(buys, (SELECT user_id, at, label FROM probes ORDER BY label DESC))"
    ).table
    assert got["label"].to_pylist() == sorted(got["label"].to_pylist(), reverse=True)
    want = ws.sql("""SELECT p.label, count(e.ts) FILTER (WHERE e.qty > 1) AS big_buys, count(e.ts) AS buys
        FROM probes p LEFT JOIN app_events e ON e.user_id = p.user_id AND e.kind = 'buy'
          AND e.ts BETWEEN p."at" - INTERVAL 6 HOURS AND p."at"
        GROUP BY p.rowid, p.label ORDER BY p.label DESC""").table
    assert got["big_buys"].to_pylist() == want["big_buys"].to_pylist()
    assert got["buys"].to_pylist() == want["buys"].to_pylist() and sum(want["buys"].to_pylist()) > 50
    ws.sql("DROP FEATURE VIEW buys")


def test_a_time_column_that_is_not_a_timestamp_is_refused_at_its_option(ws):
    sql = (
        H.replace("time_col = 'ts'", "time_col = 'seq'")
        + f"SELECT count(*) {W1.replace('ts', 'seq')} AS n FROM app_events"
    )
    with pytest.raises(
        MLSQLError, match="Option time_col = 'seq': the column is int64, not a TIMESTAMP"
    ) as exc:
        ws.sql(sql)
    sp = exc.value.span(sql)
    assert sql.split("\n")[sp.line - 1][sp.column - 1 :].startswith("'seq'")


def test_a_boolean_key_is_refused_at_create(session):
    """The device keys its state by a whole number or a string: a BOOLEAN key would install nowhere."""
    session.sql(
        "CREATE TABLE flags AS SELECT i % 2 = 0 AS flag, TIMESTAMP '2024-01-01' AS ts FROM range(4) t(i)"
    )
    with pytest.raises(MLSQLError, match="Option key = 'flag': the column is bool") as exc:
        session.sql(
            "CREATE FEATURE VIEW f OPTIONS (key = 'flag', time_col = 'ts', ttl = '1 day') AS SELECT count(*) OVER "
            "(PARTITION BY flag ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW) AS n FROM flags"
        )
    assert "whole number or a string" in exc.value.hint
    assert session.sql("SHOW FEATURE VIEWS").table.num_rows == 0


def test_the_docs_state_the_window_semantics_in_the_same_words():
    """docs/LANGUAGE.md (the SQL side) and docs/DEVICE.md (the agent) hold one text of the semantics."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"

    def block(name: str) -> str:
        text = (docs / name).read_text()
        begin = text.index("<!-- feature-view-semantics:begin")
        return text[begin : text.index("<!-- feature-view-semantics:end -->", begin)]

    assert block("LANGUAGE.md") == block("DEVICE.md")
    assert "least(count(DISTINCT x), max_distinct)" in block("DEVICE.md")
