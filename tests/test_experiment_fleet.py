"""An A/B experiment on a simulated fleet: two real agents on loopback in a device group, the replay
client of docs/DEVICE.md ("Experiments") sending traffic and late outcomes, and MLSQL's statements.

Arm B is truly worse: version 2 was trained on a shifted threshold, so on the replayed pool it is
about 5 accuracy points below version 1 (measured here with ML.PREDICT on the whole pool, a path
that shares nothing with the readout). The readout must say so with p < 0.01 once the outcomes
arrived, the job's promotion rule (docs/JOBS.md) must refuse B, and every bad CREATE EXPERIMENT
must fail with a message naming what was wrong, leaving everything as it was.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from bridge_procs import start_agent

from device_bridge.experiments import arm_index
from mlsql.errors import MLSQLError

pytestmark = pytest.mark.timeout(300)
TOKEN = "expt-token"
ROWS_PER_REQUEST = 100
REQUESTS = 64  # 6,400 rows: about 3,200 labelled rows per arm (FLEET_ROWS_PER_ARM of test_experiment_stats)
ARMS = "[STRUCT('m@1' AS model, 0.5 AS share), STRUCT('m@2' AS model, 0.5 AS share)]"


def world(n: int, seed: int) -> pa.Table:
    """x ~ N(0, 1); the truth y = 1{x + N(0, 0.4) > 0}."""
    r = np.random.default_rng(seed)
    x = r.normal(0, 1, n)
    y = (x + r.normal(0, 0.4, n) > 0).astype(np.int64)
    return pa.table({"x": x, "y": y})


def replay(urls: list[str], pool: pa.Table, prefix: str) -> dict[str, int]:
    """The documented replay client: requests of ROWS_PER_REQUEST rows round-robin over the agents,
    each named by an X-Request-Ids prefix (its rows get <prefix>-<row>), then the late outcomes of
    every row. Returns the rows sent per request prefix."""
    sent = {}
    for j in range(REQUESTS):
        part = pool.slice(j * ROWS_PER_REQUEST, ROWS_PER_REQUEST)
        rid = f"{prefix}{j}"
        url = urls[j % len(urls)]
        body = json.dumps({"columns": {"x": part["x"].to_pylist()}}).encode()
        req = urllib.request.Request(
            f"{url}/v1/models/m/predict",
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": "application/json",
                "X-Request-Ids": rid,
            },
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert len(json.loads(resp.read())["request_ids"]) == part.num_rows
        outcomes = [
            {"request_id": f"{rid}-{i}", "label": int(v)} for i, v in enumerate(part["y"].to_pylist())
        ]
        req = urllib.request.Request(
            f"{url}/v1/models/m/outcomes",
            data=json.dumps({"outcomes": outcomes}).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["recorded"] == part.num_rows
        sent[rid] = part.num_rows
    return sent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import mlsql
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("expt")
    s = mlsql.connect(tmp / "ws")
    load_or_create_keypair(s.workspace.keys_dir)
    pub = s.workspace.keys_dir / "signing_key.pub"
    procs = []
    try:
        urls = []
        for name in ("f1", "f2"):
            p, url = start_agent(tmp, token=TOKEN, trust=pub, name=name, tag=name)
            procs.append(p)
            urls.append(url)
            s.sql(f"CREATE DEVICE '{name}' OPTIONS (url = '{url}', token = '{TOKEN}')")
        s.sql("CREATE DEVICE GROUP 'field' OPTIONS (devices = ['f1', 'f2'])")
        train = world(3000, seed=1)
        s.engine.register("train_rows", train)
        s.sql("CREATE TABLE train AS SELECT x, y, CAST(x > 0.38 AS BIGINT) AS y_shifted FROM train_rows")
        s.sql(
            "CREATE MODEL m OPTIONS (model_type = 'logistic_reg', input_label_cols = ['y']) AS SELECT x, y FROM train"
        )
        s.sql(
            "CREATE OR REPLACE MODEL m OPTIONS (model_type = 'logistic_reg', input_label_cols = ['y']) "
            "AS SELECT x, y_shifted AS y FROM train"
        )
        yield s, urls
    finally:
        for p in procs:
            p.kill()
        s.close()


def test_bad_experiments_are_refused_and_change_nothing(fleet):
    s, _ = fleet
    s.sql("CREATE DEVICE GROUP 'empty' OPTIONS (devices = [])")
    cases = [
        (
            "[STRUCT('m@1' AS model, 0.5 AS share), STRUCT('m@2' AS model, 0.4 AS share)]",
            "",
            "shares sum to 0.9",
        ),
        ("[STRUCT('m@1' AS model, 0.5 AS share), STRUCT('m@7' AS model, 0.5 AS share)]", "", "m@7|version 7"),
        ("[STRUCT('nope@1' AS model, 0.5 AS share), STRUCT('m@2' AS model, 0.5 AS share)]", "", "nope"),
        (ARMS, ", metrics = ['acuracy']", "unknown metric 'acuracy'"),
        (
            ARMS,
            ", metrics = ['accuracy'], primary_metric = 'log_loss'",
            "primary_metric = 'log_loss' is not among",
        ),
        (ARMS, ", unit = 'colour'", "unit = 'colour': not 'device', 'request' or an input column of m@1"),
    ]
    for arms, more, message in cases:
        with pytest.raises(MLSQLError, match=message):
            s.sql(f"CREATE EXPERIMENT bad ON GROUP 'field' OPTIONS (arms = {arms}{more})")
    with pytest.raises(MLSQLError, match="'empty' has no devices"):
        s.sql(f"CREATE EXPERIMENT bad ON GROUP 'empty' OPTIONS (arms = {ARMS})")
    assert s.sql("SHOW EXPERIMENTS").to_arrow().num_rows == 0
    with pytest.raises(MLSQLError, match="Unknown experiment 'bad'"):
        s.sql("SELECT * FROM ML.EXPERIMENT_RESULTS('bad')")


def test_worse_arm_is_detected_and_its_promotion_refused(fleet):
    s, urls = fleet
    r = s.sql(
        f"CREATE EXPERIMENT ab ON GROUP 'field' OPTIONS (arms = {ARMS}, unit = 'request', "
        "metrics = ['accuracy', 'log_loss', 'p95_latency_ms'], primary_metric = 'accuracy', "
        "min_samples_per_arm = 1000)"
    )
    assert r.to_arrow().num_rows == 2  # one row per device
    with pytest.raises(MLSQLError, match="'ab' is already running on group 'field'"):
        s.sql(f"CREATE EXPERIMENT again ON GROUP 'field' OPTIONS (arms = {ARMS})")

    pool = world(REQUESTS * ROWS_PER_REQUEST, seed=2)
    sent = replay(urls, pool, "q")

    # the truth, by another path: each version's accuracy on the whole pool through ML.PREDICT
    s.engine.register("pool_rows", pool)
    truth = (
        s.sql("""SELECT (SELECT avg(CAST(predicted_y = y AS DOUBLE)) FROM ML.PREDICT(MODEL m@1, TABLE pool_rows))
                          - (SELECT avg(CAST(predicted_y = y AS DOUBLE)) FROM ML.PREDICT(MODEL m@2, TABLE pool_rows))
                     AS drop""")
        .to_arrow()["drop"][0]
        .as_py()
    )
    print(f"true accuracy drop of B on the pool: {truth:.4f}")
    assert 0.035 < truth < 0.065  # the world is built for 5 points (0.38 shift, see world())

    res = s.sql("SELECT * FROM ML.EXPERIMENT_RESULTS('ab')").to_pandas()
    acc = res[(res.metric == "accuracy")].set_index("arm")
    # each request's arm from the assignment hash, independently of the agent: the rows per arm
    expect_b = sum(n for rid, n in sent.items() if arm_index("ab#1", rid, [0.5, 0.5]) == 1)
    assert acc.loc["B", "n"] == expect_b and acc.loc["A", "n"] == len(pool) - expect_b
    b = acc.loc["B"]
    print(
        f"readout: delta {b.delta_vs_control:.4f} [{b.delta_ci_low:.4f}, {b.delta_ci_high:.4f}], p = {b.p_value:.2e}"
    )
    assert b.p_value < 0.01 and bool(b.significant) and b.delta_vs_control < 0
    assert b.delta_ci_low < -truth < b.delta_ci_high  # the 95 % interval covers the true drop (seeded data)
    assert bool(res.trustworthy.all()) and set(res.assigned) == {
        sum(1 for rid in sent if arm_index("ab#1", rid, [0.5, 0.5]) == k) for k in (0, 1)
    }
    assert set(res.metric) == {"accuracy", "log_loss", "p95_latency_ms"}
    assert res[res.metric == "log_loss"].set_index("arm").loc["B", "delta_vs_control"] > 0

    # the job's rule (docs/JOBS.md): promote B only when its primary metric is significantly better
    rule = (
        "SELECT error('not promoting m@2: ' || metric || ' ' || round(delta_vs_control, 4) || ', p = ' || p_value) "
        "FROM ML.EXPERIMENT_RESULTS('ab') WHERE arm = 'B' AND is_primary AND NOT (better AND trustworthy);\n"
        "STOP EXPERIMENT ab PROMOTE 'm@2'"
    )
    with pytest.raises(MLSQLError, match="not promoting m@2: accuracy -0.0"):
        s.sql(rule)
    # the same rule as a scheduled job, run now: its run fails with the refusal and promotes nothing
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)  # this checkout's mlsql in the job's kernel
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old_path if old_path else "")
    try:
        s.sql(f"CREATE JOB promote_b OPTIONS (every = '1h') AS ({rule})")
        with pytest.raises(MLSQLError, match="Job promote_b failed") as job:
            s.sql("RUN JOB promote_b")
        assert "not promoting m@2: accuracy -0.0" in str(job.value)
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
    shown = s.sql("SHOW EXPERIMENTS").to_arrow().to_pylist()
    assert [(e["experiment"], e["status"], e["promoted"]) for e in shown] == [("ab", "running", None)]

    before = s.sql(
        "SELECT arm, metric, n, value, p_value FROM ML.EXPERIMENT_RESULTS('ab') ORDER BY ALL"
    ).to_arrow()
    stopped = s.sql("STOP EXPERIMENT ab").to_arrow()
    assert set(stopped["status"].to_pylist()) == {"stopped"}
    after = s.sql(
        "SELECT arm, metric, n, value, p_value FROM ML.EXPERIMENT_RESULTS('ab') ORDER BY ALL"
    ).to_arrow()
    assert after.equals(before)  # the final readout is kept
    shown = s.sql("SHOW EXPERIMENTS").to_arrow().to_pylist()
    assert [(e["experiment"], e["status"]) for e in shown] == [("ab", "stopped")]


def test_monitor_widget_shows_the_experiment_and_its_button_promotes(fleet):
    """The experiment monitor (mlsql/notebook/experiment_monitor.py): the arms side by side as the
    readout has them, the primary metric's points with their intervals, the sample-ratio flag, and the
    Promote button's message running STOP EXPERIMENT ... PROMOTE through the session."""
    from device_bridge.client import DeviceClient
    from mlsql.notebook.experiment_monitor import ExperimentMonitor

    s, urls = fleet
    s.sql(
        f"CREATE EXPERIMENT w ON GROUP 'field' OPTIONS (arms = {ARMS}, unit = 'request', metrics = ['accuracy'])"
    )
    replay(urls, world(REQUESTS * ROWS_PER_REQUEST, seed=4), "w")
    m = ExperimentMonitor(s, "w", interval=60)  # its thread reads once; the test refreshes by hand
    try:
        m.refresh()
        q = "SELECT arm, model, n, delta_vs_control FROM ML.EXPERIMENT_RESULTS('w') WHERE metric = 'accuracy' ORDER BY arm"
        sql = s.sql(q).to_arrow().to_pylist()
        assert (
            [(a["arm"], a["model"]) for a in m.arms]
            == [(r["arm"], r["model"]) for r in sql]
            == [("A", "m@1"), ("B", "m@2")]
        )
        assert [a["metrics"]["accuracy"]["n"] for a in m.arms] == [r["n"] for r in sql]
        assert m.arms[1]["metrics"]["accuracy"]["delta_vs_control"] == pytest.approx(
            sql[1]["delta_vs_control"], rel=1e-12
        )
        assert m.primary_metric == "accuracy" and m.trustworthy and m.status == "running"
        points = [p for p in m.history if p[1] == "B"]
        assert points and points[-1][3] < points[-1][2] < points[-1][4]  # value inside its interval
        m.promote("m@9")
        assert "not an arm of experiment 'w'" in m.promote_result and m.status == "running"
        m._on_message(m, {"promote": "m@1"}, [])  # what the button sends
        assert "promoted m@1 to group field" in m.promote_result and m.status == "stopped"
    finally:
        m.stop()
    shown = [e for e in s.sql("SHOW EXPERIMENTS").to_arrow().to_pylist() if e["experiment"] == "w"]
    assert [(e["status"], e["promoted"]) for e in shown] == [("stopped", "m@1")]
    for url in urls:
        info = DeviceClient(url, TOKEN).info()["models"]["m"]
        assert info["active"] == 1 and info["experiment"] is None
