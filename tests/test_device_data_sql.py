"""Device data from SQL: DEPLOY ... sample_rate, ML.DEVICE_DATA, late outcomes, online metrics,
against a real agent process on loopback. Every expected value comes from the rows the test sent
(the penguins table, by request id), not from the code under test."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
from bridge_procs import start_bridge

from mlsql.errors import MLSQLError

TOKEN = "data-test-token"
N = 300  # predictions sent (sampled at rate 1: all kept)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import mlsql
    import mlsql.datasets
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("devdata")
    s = mlsql.connect(tmp / "ws")
    mlsql.datasets.load("penguins", session=s)
    load_or_create_keypair(s.workspace.keys_dir)
    pub = s.workspace.keys_dir / "signing_key.pub"
    agent, listening = start_bridge(["serve", "--name", "p7", "--port", "0", "--store", str(tmp / "p7"),
                                     "--token", TOKEN, "--trust", str(pub)], tmp, "agent")
    url = listening[0]["url"]
    try:
        s.sql(f"CREATE DEVICE 'p7' OPTIONS (url = '{url}', token = '{TOKEN}')")
        s.sql("""CREATE MODEL species OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
                 max_iterations = 10) AS SELECT * FROM penguins""")
        # the rows the app will send, numbered: request id 'r<i>' is row i of this table
        s.sql("CREATE TABLE app AS SELECT row_number() OVER (ORDER BY species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex) - 1 AS i, * FROM penguins")
        yield s, url
    finally:
        agent.kill()
        s.close()


def _send(url: str, app, lo: int, hi: int, model: str = "species", prefix: str = "r"):
    """The app's traffic: rows lo..hi-1 of ``app``, a request of 10 rows at a time, with its own ids."""
    from device_bridge.client import DeviceClient

    c = DeviceClient(url, TOKEN)
    try:
        cols = [c_ for c_ in app.column_names if c_ not in ("i", "species")]
        for a in range(lo, hi, 10):
            part = app.slice(a, min(10, hi - a))
            body = {k: [None if v is None else v for v in part[k].to_pylist()] for k in cols}
            ids = [f"{prefix}{i}" for i in part["i"].to_pylist()]
            r = c.predict(model, columns=body, request_ids=ids)
            assert r["request_ids"] == ids
    finally:
        c.close()


def _log_loss(labels: list, probs: np.ndarray, classes: list) -> float:
    """Mean -log p(true class), as written (sklearn would renormalize float32 rows and warn)."""
    idx = [classes.index(x) for x in labels]
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(idx)), idx], 1e-15, 1.0))))


def test_privacy_default_keeps_nothing(env):
    s, url = env
    from device_bridge.client import DeviceClient

    s.sql("DEPLOY MODEL species TO DEVICE 'p7'")
    app = s.sql("SELECT * FROM app ORDER BY i").to_arrow()
    _send(url, app, 0, 20)
    c = DeviceClient(url, TOKEN)
    try:
        info = c.info()["models"]["species"]
        assert info["deploy"]["sample_rate"] == 0
        assert (info.get("samples") or {}).get("rows", 0) == 0
    finally:
        c.close()
    t = s.sql("SELECT * FROM ML.DEVICE_DATA('p7', MODEL species)").to_arrow()
    assert t.num_rows == 0
    # the answer's columns are there, typed, even empty
    assert t.schema.field("bill_length_mm").type == s.sql("SELECT bill_length_mm FROM penguins").to_arrow().schema[0].type
    assert {"request_id", "label", "label_at", "species", "predicted_species"} <= set(t.column_names)


def test_sampling_options_are_checked(env):
    s, _ = env
    with pytest.raises(MLSQLError, match="sample_hash names 'sexx'.*does not read") as e:
        s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1, sample_hash = ['sexx'])")
    assert "Did you mean 'sex'" in str(e.value.hint)
    with pytest.raises(MLSQLError, match="sample_rate is 0"):
        s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_exclude = ['island'])")
    with pytest.raises(MLSQLError, match="both excluded and hashed"):
        s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1, sample_exclude = ['sex'], "
              "sample_hash = ['sex'])")
    with pytest.raises(MLSQLError, match="sample_rate"):
        s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1.5)")


def test_samples_outcomes_and_online_metrics(env):
    s, url = env
    from device_bridge.client import DeviceClient

    s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1, sample_exclude = ['island'], "
          "sample_hash = ['sex'])")
    app = s.sql("SELECT * FROM app ORDER BY i").to_arrow()
    _send(url, app, 0, N)
    # late outcomes for the first 200 rows: the true species; two ids the device never saw
    truth = app.slice(0, 200)
    c = DeviceClient(url, TOKEN)
    try:
        r = c.outcomes("species", [{"request_id": f"r{i}", "label": sp}
                                   for i, sp in zip(truth["i"].to_pylist(), truth["species"].to_pylist())]
                       + [{"request_id": "nobody", "label": "Adelie"}, {"request_id": "r-none", "label": "x"}])
        assert (r["recorded"], r["unknown"]) == (200, 2)
    finally:
        c.close()

    t = s.sql("SELECT * FROM ML.DEVICE_DATA('p7', MODEL species) WHERE version = 1 AND request_id LIKE 'r%'").to_arrow()
    ids = t["request_id"].to_pylist()
    assert t.num_rows == N and sorted(ids) == sorted(f"r{i}" for i in range(N))  # each row once
    assert "island" not in t.column_names  # excluded: never stored
    by_id = {f"r{i}": k for k, i in enumerate(app["i"].to_pylist())}
    rows = [by_id[x] for x in ids]
    # inputs as sent, with their training types
    assert t["bill_length_mm"].type == app["bill_length_mm"].type
    sent = np.array(app["bill_length_mm"].to_pylist(), dtype=float)[rows]
    got = np.array(t["bill_length_mm"].to_pylist(), dtype=float)
    # float32 on the wire: 2^-24 relative
    assert np.allclose(np.nan_to_num(got), np.nan_to_num(sent), rtol=2 ** -23, atol=0)
    # hashed: HMAC-SHA256 with the workspace's salt, never the raw value
    salt = s.workspace.sample_salt().encode()
    raw_sex = [app["sex"][k].as_py() for k in rows]
    hashed = t["sex"].to_pylist()
    for raw, h in zip(raw_sex, hashed):
        if raw is not None:
            assert h != raw and h == hmac.new(salt, raw.encode(), hashlib.sha256).hexdigest()[:32]
    # outcomes joined to their own rows; the rest NULL
    labels = t["label"].to_pylist()
    for x, k, lab in zip(ids, rows, labels):
        assert lab == (app["species"][k].as_py() if int(x[1:]) < 200 else None)
    assert t["species"].to_pylist() == labels
    # the device's answers equal the notebook's (parity tolerance 1e-4 on probabilities)
    local = s.sql("SELECT i, predicted_species FROM ML.PREDICT(MODEL species, TABLE app) ORDER BY i").to_arrow()
    assert t["predicted_species"].to_pylist() == [local["predicted_species"][k].as_py() for k in rows]

    # an excluded input cannot be scored in the notebook: EVALUATE says which column is missing
    with pytest.raises(MLSQLError, match="no column 'island'"):
        s.sql("SELECT * FROM ML.EVALUATE(MODEL species, (SELECT * FROM ML.DEVICE_DATA('p7', MODEL species) "
              "WHERE label IS NOT NULL))")


def test_online_metrics(env):
    s, url = env
    from sklearn.metrics import accuracy_score

    from device_bridge.client import DeviceClient

    # every input kept this time (the same version, its deploy settings replaced)
    s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1)")
    app = s.sql("SELECT * FROM app ORDER BY i").to_arrow()
    _send(url, app, 0, 150, prefix="s")
    c = DeviceClient(url, TOKEN)
    try:
        truth = app.slice(0, 100)
        r = c.outcomes("species", [{"request_id": f"s{i}", "label": sp}
                                   for i, sp in zip(truth["i"].to_pylist(), truth["species"].to_pylist())])
        assert (r["recorded"], r["unknown"]) == (100, 0)
    finally:
        c.close()
    field = "(SELECT * FROM ML.DEVICE_DATA('p7', MODEL species) WHERE label IS NOT NULL AND request_id LIKE 's%')"
    ev = s.sql(f"SELECT accuracy, log_loss FROM ML.EVALUATE(MODEL species, {field})").to_arrow().to_pylist()[0]
    t = s.sql(f"SELECT * FROM {field}").to_arrow()
    lab = t.filter(t["label"].is_valid())
    assert lab.num_rows == 100
    # the labels are the true species of the rows sent under those ids
    by_id = dict(zip((f"s{i}" for i in app["i"].to_pylist()), app["species"].to_pylist()))
    assert lab["label"].to_pylist() == [by_id[x] for x in lab["request_id"].to_pylist()]
    assert ev["accuracy"] == pytest.approx(accuracy_score(lab["label"].to_pylist(), lab["predicted_species"].to_pylist()))
    classes = [p["label"] for p in lab["predicted_species_probs"][0].as_py()]
    probs = np.array([[p["prob"] for p in row] for row in lab["predicted_species_probs"].to_pylist()])
    # EVALUATE scores in the notebook (float64), the device in float32: PARITY_TOL 1e-4 per probability
    assert ev["log_loss"] == pytest.approx(_log_loss(lab["label"].to_pylist(), probs, classes), abs=1e-3)
    # ML.DEVICE_METRICS' online metrics cover every labelled row of the version: 200 (the first
    # test's, with sex hashed: an unknown category to the model) and these 100
    m = s.sql("SELECT sampled_rows, outcomes, online_rows, online_accuracy, online_log_loss FROM "
              "ML.DEVICE_METRICS('p7') WHERE model = 'species' AND version = 1").to_arrow().to_pylist()[0]
    allrows = s.sql("SELECT * FROM ML.DEVICE_DATA('p7', MODEL species) WHERE label IS NOT NULL").to_arrow()
    assert m["online_rows"] == 300 == allrows.num_rows and m["outcomes"] == 300 and m["sampled_rows"] >= N + 150
    lab = allrows
    probs = np.array([[p["prob"] for p in row] for row in lab["predicted_species_probs"].to_pylist()])
    assert m["online_accuracy"] == pytest.approx(accuracy_score(lab["label"].to_pylist(),
                                                                lab["predicted_species"].to_pylist()), rel=1e-12)
    assert m["online_log_loss"] == pytest.approx(_log_loss(lab["label"].to_pylist(), probs, classes), rel=1e-9)

    # since: nothing before a time in the future, everything after one in the past
    assert s.sql("SELECT count(*) FROM ML.DEVICE_DATA('p7', MODEL species, "
                 "STRUCT(TIMESTAMP '2999-01-01' AS since))").scalar() == 0
    assert s.sql("SELECT count(*) FROM ML.DEVICE_DATA('p7', MODEL species, STRUCT(TIMESTAMP '2000-01-01' AS since, "
                 "7 AS max_rows))").scalar() == 7


def test_device_data_errors(env):
    s, _ = env
    with pytest.raises(MLSQLError, match="no device or device group is called 'p8'") as e:
        s.sql("SELECT * FROM ML.DEVICE_DATA('p8')")
    assert "Known devices and groups: p7" in str(e.value.hint)
    with pytest.raises(MLSQLError, match="takes a device or device group name"):
        s.sql("SELECT * FROM ML.DEVICE_DATA(MODEL species)")
    with pytest.raises(MLSQLError, match="not a timestamp"):
        s.sql("SELECT * FROM ML.DEVICE_DATA('p7', STRUCT('yesterday' AS since))")


def test_field_debugging_and_retraining_queries_as_documented(env):
    """The two queries docs/LANGUAGE.md gives (Device data): the rows where the device's answer and
    the notebook's differ, and a retrain on the labelled field rows."""
    s, url = env
    s.sql("DEPLOY MODEL species TO DEVICE 'p7' OPTIONS (sample_rate = 1)")
    # 60 rows of all three species (the table is ordered by species)
    app = s.sql("SELECT * FROM app WHERE i % 5 = 0 ORDER BY i LIMIT 60").to_arrow()
    _send(url, app, 0, 60, prefix="f")
    debug = """
        SELECT d.provider, d.request_id, d.predicted_species AS on_device, n.predicted_species AS in_notebook,
               list_max(list_transform(list_zip(d.predicted_species_probs, n.predicted_species_probs),
                                       lambda p: abs(p[1].prob - p[2].prob))) AS gap
        FROM ML.DEVICE_DATA('p7', MODEL species@1) AS d
        JOIN ML.PREDICT(MODEL species@1, (SELECT * EXCLUDE (predicted_species, predicted_species_probs)
                                          FROM ML.DEVICE_DATA('p7', MODEL species@1))) AS n USING (request_id)
        WHERE d.version = 1 AND starts_with(request_id, 'f') AND gap > {tol}"""
    # float32 on the device, float64 in the notebook: within the export's parity tolerance
    assert s.sql(debug.format(tol="1e-4")).to_arrow().num_rows == 0
    every = s.sql(debug.format(tol="-1")).to_arrow()
    assert every.num_rows == 60 and every["on_device"].to_pylist() == every["in_notebook"].to_pylist()
    assert 0 <= max(every["gap"].to_pylist()) < 1e-4

    c = __import__("device_bridge.client", fromlist=["DeviceClient"]).DeviceClient(url, TOKEN)
    try:
        part = app.slice(0, 60)
        c.outcomes("species", [{"request_id": f"f{i}", "label": sp}
                               for i, sp in zip(part["i"].to_pylist(), part["species"].to_pylist())])
    finally:
        c.close()
    r = s.sql("""
        CREATE OR REPLACE MODEL field_species OPTIONS (model_type = 'logistic_reg', input_label_cols = ['species'])
        AS SELECT * EXCLUDE (device, model, version, request_id, predicted_at, provider, latency_ms,
                             predicted_species, predicted_species_probs, label, label_at)
           FROM ML.DEVICE_DATA('p7', MODEL species) WHERE label IS NOT NULL AND starts_with(request_id, 'f')""")
    assert "Created model field_species version 1" in r.message
    rows = s.sql("SHOW MODELS").to_arrow().to_pylist()
    assert next(m for m in rows if m["model"] == "field_species")["training_rows"] == 60
    # a model trained on ML.DEVICE_DATA exports and deploys: its query runs the function again
    d = s.sql("DEPLOY MODEL field_species TO DEVICE 'p7'")
    assert "Deployed field_species@1 to p7" in d.message


@pytest.mark.slow
def test_device_data_of_a_group_through_its_hub(env, tmp_path):
    """Two agents of group 'field' upload to their hub in their report cycle; ML.DEVICE_DATA('field')
    reads the hub's store: every sampled row once, with its device, and the outcomes joined."""
    s, _ = env
    from device_bridge.client import DeviceClient

    pub = s.workspace.keys_dir / "signing_key.pub"
    hub, hl = start_bridge(["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN,
                            "--enroll-open"], tmp_path, "hub")
    fleet, devices = start_bridge(["serve", "--name", "edge", "--devices", "2", "--port", "0", "--store",
                                   str(tmp_path / "fleet"), "--token", TOKEN, "--trust", str(pub), "--hub",
                                   hl[0]["url"], "--hub-interval", "0.2", "--group", "field"], tmp_path, "fleet")
    try:
        s.sql(f"CREATE OR REPLACE DEVICE GROUP 'field' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{TOKEN}', "
              "devices = ['edge-0', 'edge-1'])")
        ok = s.sql("DEPLOY MODEL species TO GROUP 'field' OPTIONS (batch_size = 2, sample_rate = 1)")
        assert "every gate passed" in ok.message
        app = s.sql("SELECT * FROM app WHERE i % 4 = 0 ORDER BY i LIMIT 60").to_arrow()
        for k, dev in enumerate(sorted(devices, key=lambda d: d["name"])):
            part = app.slice(30 * k, 30)
            _send(dev["url"], part, 0, 30, prefix=f"e{k}-")
            c = DeviceClient(dev["url"], TOKEN)
            try:
                r = c.outcomes("species", [{"request_id": f"e{k}-{i}", "label": sp}
                                           for i, sp in zip(part["i"].to_pylist()[:20], part["species"].to_pylist())])
                assert r["recorded"] == 20
            finally:
                c.close()
        query = ("SELECT device, request_id, label, species FROM ML.DEVICE_DATA('field', MODEL species) "
                 "WHERE starts_with(request_id, 'e')")
        import time

        deadline = time.time() + 60
        got = s.sql(query).to_arrow()
        while (got.num_rows < 60 or got["label"].null_count > 20) and time.time() < deadline:
            time.sleep(0.3)
            got = s.sql(query).to_arrow()
        assert got.num_rows == 60 and len(set(got["request_id"].to_pylist())) == 60  # each row once
        by_id = {f"e{k}-{i}": (f"edge-{k}", sp, n < 20) for k in (0, 1)
                 for n, (i, sp) in enumerate(zip(app.slice(30 * k, 30)["i"].to_pylist(),
                                                 app.slice(30 * k, 30)["species"].to_pylist()))}
        for row in got.to_pylist():
            device, species, labelled = by_id[row["request_id"]]
            assert row["device"] == device
            assert row["label"] == (species if labelled else None) == row["species"]
    finally:
        fleet.kill()
        hub.kill()


def test_device_data_on_spark_equals_duckdb(spark_ws, shared_ws, penguin_models, tmp_path):
    """The same device's rows read by a Spark session and a DuckDB session of one workspace."""
    from device_bridge.keys import load_or_create_keypair

    load_or_create_keypair(shared_ws.workspace.keys_dir)
    pub = shared_ws.workspace.keys_dir / "signing_key.pub"
    agent, listening = start_bridge(["serve", "--name", "sp", "--port", "0", "--store", str(tmp_path / "sp"),
                                     "--token", TOKEN, "--trust", str(pub)], tmp_path, "agent")
    try:
        shared_ws.sql(f"CREATE OR REPLACE DEVICE 'sp' OPTIONS (url = '{listening[0]['url']}', token = '{TOKEN}')")
        shared_ws.sql("DEPLOY MODEL species_model TO DEVICE 'sp' OPTIONS (sample_rate = 1)")
        app = shared_ws.sql("SELECT row_number() OVER () AS i, * EXCLUDE (year) FROM penguins LIMIT 40").to_arrow()
        _send(listening[0]["url"], app, 0, 40, model="species_model", prefix="k")
        q = ("SELECT request_id, version, island, bill_length_mm, predicted_species, label "
             "FROM ML.DEVICE_DATA('sp', MODEL species_model) WHERE request_id LIKE 'k%' ORDER BY request_id")
        on_duckdb = shared_ws.sql(q).to_arrow()
        on_spark = spark_ws.sql(q).to_arrow()
        assert on_duckdb.num_rows == 40
        assert on_spark.to_pylist() == on_duckdb.to_pylist()
    finally:
        agent.kill()
