"""DEPLOY and friends from SQL, against real agent and hub processes on loopback."""

from __future__ import annotations

import json

import pytest
from bridge_procs import start_bridge

from mlsql.errors import DeviceError, MLSQLError, UnknownDeviceError

TOKEN = "sql-test-token"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import mlsql
    import mlsql.datasets
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("deploy")
    s = mlsql.connect(tmp / "ws")
    mlsql.datasets.load("penguins", session=s)
    load_or_create_keypair(s.workspace.keys_dir)
    pub = s.workspace.keys_dir / "signing_key.pub"
    agent, listening = start_bridge(["serve", "--name", "d1", "--port", "0", "--store", str(tmp / "d1"), "--token", TOKEN,
                              "--trust", str(pub)], tmp, "agent")
    try:
        s.sql(f"CREATE DEVICE 'd1' OPTIONS (url = '{listening[0]['url']}', token = '{TOKEN}')")
        s.sql("""CREATE MODEL species OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
                 max_iterations = 10) AS SELECT * FROM penguins""")
        yield s, tmp, pub
    finally:
        agent.kill()
        s.close()


def test_deploy_predict_metrics_new_version_rollback(env):
    s, _, _ = env
    r = s.sql("DEPLOY MODEL species TO DEVICE 'd1' OPTIONS (providers = ['cuda', 'cpu'])")
    assert "Deployed species@1 to d1" in r.message and "runs on cpu" in r.message
    assert "version 1 active, no previous version" in r.message and "None" not in r.message
    row = r.to_arrow().to_pylist()[0]
    assert row["active"] == 1 and row["providers"] == ["cpu"] and row["first_inference_ms"] > 0
    assert json.loads(row["placement"])["CPUExecutionProvider"] > 0
    # remote prediction equals local prediction, row for row
    remote = s.sql("SELECT predicted_species, predicted_species_probs FROM ML.PREDICT(MODEL species, TABLE penguins, "
                   "STRUCT('d1' AS device))").to_arrow()
    local = s.sql("SELECT predicted_species, predicted_species_probs FROM ML.PREDICT(MODEL species, TABLE penguins)").to_arrow()
    assert remote.num_rows == 344
    assert remote.column(0).to_pylist() == local.column(0).to_pylist()
    rp = [[p["prob"] for p in row] for row in remote.column(1).to_pylist()]
    lp = [[p["prob"] for p in row] for row in local.column(1).to_pylist()]
    assert max(abs(a - b) for x, y in zip(rp, lp) for a, b in zip(x, y)) < 1e-5
    # composes with SQL like any ML.PREDICT
    n = s.sql("SELECT count(*) FROM ML.PREDICT(MODEL species, (SELECT * FROM penguins WHERE island = 'Dream'), "
              "STRUCT('d1' AS device)) WHERE predicted_species = species").scalar()
    assert n >= 120
    # a new version, then back
    s.sql("CREATE OR REPLACE MODEL species OPTIONS (model_type = 'logistic_reg', input_label_cols = ['species']) "
          "AS SELECT * FROM penguins")
    r2 = s.sql("DEPLOY MODEL species TO DEVICE 'd1'").to_arrow().to_pylist()[0]
    assert (r2["active"], r2["previous"]) == (2, 1)
    rb = s.sql("ROLLBACK MODEL species ON DEVICE 'd1'").to_arrow().to_pylist()[0]
    assert rb["active"] == 1
    m = s.sql("SELECT version, active, requests, rows, p50_ms, providers, inputs, profiled_rows "
              "FROM ML.DEVICE_METRICS('d1') WHERE model = 'species' ORDER BY version").to_arrow().to_pylist()
    assert [x["version"] for x in m] == [1, 2] and m[0]["active"] and not m[1]["active"]
    assert m[0]["rows"] >= 344 + 124 and m[0]["p50_ms"] > 0 and m[0]["providers"] == ["cpu"]
    inputs = json.loads(m[0]["inputs"])  # well under the sampling budget: every row profiled
    assert m[0]["profiled_rows"] == m[0]["rows"] and inputs["island"]["kind"] == "string"
    assert inputs["bill_length_mm"]["count"] + round(inputs["bill_length_mm"]["null_rate"] * m[0]["rows"]) == m[0]["rows"]
    shown = s.sql("SHOW DEVICES").to_arrow().to_pylist()[0]
    assert shown["status"] == "online" and shown["models"] == ["species@1"]


def test_device_errors_are_clear(env):
    s, tmp, _ = env
    with pytest.raises(UnknownDeviceError, match="Known devices: d1"):
        s.sql("DEPLOY MODEL species TO DEVICE 'd2'")
    with pytest.raises(MLSQLError, match="providres"):
        s.sql("DEPLOY MODEL species TO DEVICE 'd1' OPTIONS (providres = ['cpu'])")
    with pytest.raises(MLSQLError, match="already exists"):
        s.sql("CREATE DEVICE 'd1' OPTIONS (url = 'http://127.0.0.1:9')")
    s.sql("CREATE DEVICE 'gone' OPTIONS (url = 'http://127.0.0.1:9', timeout_s = 2)")
    assert {r["device"]: r["status"] for r in s.sql("SHOW DEVICES").to_arrow().to_pylist()}["gone"] == "unreachable"
    with pytest.raises(DeviceError, match="gone"):
        s.sql("DEPLOY MODEL species TO DEVICE 'gone'")
    s.sql("DROP DEVICE 'gone'")
    # an agent that does not trust the workspace key refuses the package, and says how to fix it
    agent, listening = start_bridge(["serve", "--name", "untrusting", "--port", "0", "--store", str(tmp / "u"),
                              "--token", TOKEN], tmp, "untrusting")
    try:
        s.sql(f"CREATE DEVICE 'u' OPTIONS (url = '{listening[0]['url']}', token = '{TOKEN}')")
        with pytest.raises(DeviceError) as info:
            s.sql("DEPLOY MODEL species TO DEVICE 'u'")
        assert "trust" in str(info.value)
        s.sql(f"CREATE OR REPLACE DEVICE 'u' OPTIONS (url = '{listening[0]['url']}', token = 'wrong')")
        with pytest.raises(DeviceError, match="401|token"):
            s.sql("DEPLOY MODEL species TO DEVICE 'u'")
    finally:
        agent.kill()
        s.sql("DROP DEVICE IF EXISTS 'u'")
    # and the deployed model on d1 is untouched by all of this
    assert s.sql("SELECT count(*) FROM ML.PREDICT(MODEL species@1, TABLE penguins, STRUCT('d1' AS device))").scalar() == 344


def test_deploying_a_version_again(env):
    s, _, _ = env
    # the same version and export options give the same package bytes, so a device sees the same build
    a = s.sql("EXPORT MODEL species@1 OPTIONS (package = TRUE)").export.package_path.read_bytes()
    b = s.sql("EXPORT MODEL species@1 OPTIONS (package = TRUE)").export.package_path.read_bytes()
    assert a == b
    r = s.sql("DEPLOY MODEL species@1 TO DEVICE 'd1'")
    assert "already installed, re-activated" in r.message and r.to_arrow().to_pylist()[0]["active"] == 1
    r = s.sql("DEPLOY MODEL species@1 TO DEVICE 'd1' OPTIONS (providers = ['nnapi', 'cpu'])")
    assert "re-activated with providers ['nnapi', 'cpu']" in r.message and "runs on cpu" in r.message
    # another build of the same version is refused, with what to do instead; v1 keeps serving
    with pytest.raises(DeviceError, match="keeps one build per model version") as info:
        s.sql("DEPLOY MODEL species@1 TO DEVICE 'd1' OPTIONS (quantize = 'fp16')")
    assert "HTTP 409" in str(info.value)
    assert s.sql("SELECT count(*) FROM ML.PREDICT(MODEL species@1, TABLE penguins, STRUCT('d1' AS device))").scalar() == 344


@pytest.mark.slow
def test_group_rollout_through_the_hub(env):
    s, tmp, pub = env
    # --enroll-open: each simulated device enrolls itself and keeps its own hub credential; the
    # group's hub_token is the operator's
    hub, hl = start_bridge(["hub", "--port", "0", "--store", str(tmp / "hub"), "--token", TOKEN, "--enroll-open"],
                    tmp, "hub")
    fleet, _ = start_bridge(["serve", "--name", "edge", "--devices", "6", "--port", "0", "--store", str(tmp / "fleet"),
                      "--token", TOKEN, "--trust", str(pub), "--hub", hl[0]["url"], "--hub-interval", "0.2",
                      "--group", "field"], tmp, "fleet")
    try:
        names = [f"edge-{i}" for i in range(6)]
        s.sql(f"CREATE DEVICE GROUP 'field' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{TOKEN}', devices = {names})")
        ok = s.sql("DEPLOY MODEL species@1 TO GROUP 'field' OPTIONS (batch_size = 2, max_error_rate = 0.01)")
        assert "every gate passed" in ok.message
        assert [w["status"] for w in ok.to_arrow().to_pylist()] == ["passed"] * 3
        # an agent's own hub credential is no operator token: the hub refuses it, the error says which to use
        agent_cred = (tmp / "fleet" / "edge-0" / "hub_token").read_text().strip()
        assert agent_cred != TOKEN
        s.sql(f"CREATE DEVICE GROUP 'rogue' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{agent_cred}')")
        with pytest.raises(DeviceError, match="operator token") as info:
            s.sql("DEPLOY MODEL species@1 TO GROUP 'rogue'")
        assert info.value.kind == "forbidden" and info.value.status == 403
        # a gate the devices cannot pass (they run on CPU) stops the rollout at its first wave and rolls it back
        bad = s.sql("DEPLOY MODEL species@2 TO GROUP 'field' OPTIONS (batch_size = 2, required_provider = 'cuda')")
        waves = bad.to_arrow().to_pylist()
        assert "stopped at wave 0" in bad.message and len(waves) == 1 and waves[0]["status"] == "rolled_back"
        assert "cuda" in waves[0]["failures"]
        from device_bridge.client import HubClient

        status = HubClient(hl[0]["url"], TOKEN).status()
        actives = {n: ((status[n].get("status") or {}).get("species") or {}).get("active") for n in names}
        assert actives == {n: 1 for n in names}  # the wave went back to version 1; the rest never left it
        # a group that lists no devices takes every agent registered at the hub under its name
        s.sql(f"CREATE OR REPLACE DEVICE GROUP 'field' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{TOKEN}')")
        waves = s.sql("DEPLOY MODEL species@1 TO GROUP 'field' OPTIONS (batch_size = 3)").to_arrow().to_pylist()
        assert sorted(n for w in waves for n in w["device_names"]) == sorted(names)
    finally:
        fleet.kill()
        hub.kill()


def test_a_parity_gate_failure_leaves_nothing_behind(env):
    """A quantized export that loses accuracy is refused by EXPORT and by DEPLOY, and neither
    leaves a file, a registry artifact, a version tag or a package on the device."""
    s, tmp, _ = env
    s.sql("""CREATE OR REPLACE MODEL mass OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'])
             AS SELECT * FROM penguins WHERE body_mass_g IS NOT NULL""")
    uri = tmp / "gate" / "mass.onnx"
    # calibrated on a single penguin, int8 activations clip everyone else's: r2 falls below zero
    bad = "quantize = 'int8_static', calibration_query = 'SELECT * FROM penguins LIMIT 1'"
    with pytest.raises(MLSQLError) as info:
        s.sql(f"EXPORT MODEL mass OPTIONS (uri = '{uri}', {bad})")
    refused = info.value.report  # the parity report of what failed comes with the refusal
    assert not refused.passed and refused.metric_drop > refused.max_metric_drop == 0.005
    msg = str(info.value)
    assert "r2_score" in msg and "max_metric_drop = 0.005" in msg and "calibration_query" in msg, msg
    before = msg.split("r2_score ")[1].split(" native")[0]
    assert float(before) > 0.8  # the value before is named, and the value after
    assert "int8_static (a drop of" in msg
    with pytest.raises(MLSQLError, match="r2_score"):
        s.sql(f"DEPLOY MODEL mass TO DEVICE 'd1' OPTIONS ({bad})")
    assert not uri.parent.exists() or list(uri.parent.iterdir()) == []
    exports = s.workspace.exports_dir
    assert not exports.exists() or not [p for p in exports.iterdir() if p.name.startswith("mass_")]
    mv = s.registry.get("mass")
    assert [a.path for a in s.registry.client.list_artifacts(mv.run_id, "exports")] == []
    assert not [t for t in mv.tags if t.startswith("mlsql.export")]
    shown = s.sql("SHOW DEVICES").to_arrow().to_pylist()[0]
    assert not [m for m in shown["models"] if m.startswith("mass@")]
    # the same statements pass with the drop allowed, and then leave what they should
    r = s.sql(f"EXPORT MODEL mass OPTIONS (uri = '{uri}', {bad}, max_metric_drop = 10)")
    assert uri.exists() and r.export.report.metric_drop > 0.005 and r.export.report.max_metric_drop == 10.0
    assert r.export.report.passed


def test_device_list_temp_file_is_never_readable_by_others(tmp_path):
    """devices.tmp holds tokens: it is created 0600 (it used to be created 0644, then chmod-ed)."""
    import os
    import stat
    import threading

    from mlsql.deploy.devices import DeviceStore

    store = DeviceStore(tmp_path / "devices.json")
    tmp = (tmp_path / "devices.json").with_suffix(".tmp")
    tmp.write_text("{}")
    os.chmod(tmp, 0o644)  # a leftover of a crash: must not lend its mode to the next write
    seen: set[int] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                seen.add(stat.S_IMODE(os.stat(tmp).st_mode))
            except FileNotFoundError:
                pass

    old = os.umask(0)
    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(200):
            store.add(f"d{i % 3}", {"url": "http://127.0.0.1:9", "token": "secret"}, replace=True)
    finally:
        done.set()
        t.join()
        os.umask(old)
    assert seen - {0o644} <= {0o600}, seen  # only the planted leftover was ever 0644
    assert stat.S_IMODE(os.stat(tmp_path / "devices.json").st_mode) == 0o600


def test_deploy_settings_travel_to_the_agent_and_show_in_sql(env):
    """DEPLOY's sharing options (priority, deadline, queue, isolation, memory) reach the agent with the
    install and come back in SHOW DEPLOYMENTS and ML.DEVICE_METRICS; what is not given takes the
    agent's class defaults; a bad value is refused before anything is sent."""
    s, _, _ = env
    s.sql("""CREATE OR REPLACE MODEL shared_mass OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'])
             AS SELECT bill_length_mm, flipper_length_mm, body_mass_g FROM penguins WHERE body_mass_g IS NOT NULL""")
    s.sql("""DEPLOY MODEL shared_mass TO DEVICE 'd1'
             OPTIONS (priority = 'batch', timeout_ms = 5000, max_queue = 8, isolation = 'process', memory_mb = 512)""")
    s.sql("SELECT * FROM ML.PREDICT(MODEL shared_mass, (SELECT * FROM penguins LIMIT 5), STRUCT('d1' AS device))")
    shown = {r["model"]: r for r in s.sql("SHOW DEPLOYMENTS").to_arrow().to_pylist()}
    mass = shown["shared_mass"]
    assert (mass["device"], mass["version"], mass["priority"], mass["isolation"]) == ("d1", 1, "batch", "process")
    assert (mass["timeout_ms"], mass["max_queue"], mass["memory_mb"]) == (5000, 8, 512)
    assert mass["max_concurrency"] == 2  # the batch class's default: not given
    assert mass["worker_restarts"] == 0 and mass["rejected"] == 0 and mass["memory_used_mb"] > 0  # its own process
    if "species" in shown:  # deployed without options by another test: the normal class's defaults
        assert (shown["species"]["priority"], shown["species"]["isolation"]) == ("normal", "thread")
    metrics = {r["model"]: r for r in s.sql("SELECT * FROM ML.DEVICE_METRICS('d1') WHERE active").to_arrow().to_pylist()}
    assert metrics["shared_mass"]["priority"] == "batch" and metrics["shared_mass"]["queue_length"] == 0
    assert metrics["shared_mass"]["requests"] >= 1 and metrics["shared_mass"]["deadline_misses"] == 0

    with pytest.raises(MLSQLError, match="priority") as bad:
        s.sql("DEPLOY MODEL shared_mass TO DEVICE 'd1' OPTIONS (priority = 'urgent')")
    assert "realtime" in str(bad.value) and "batch" in str(bad.value)


def test_feature_view_bounds_travel_to_the_agent(env):
    """DEPLOY's max_keys and max_state_mb (the bounds of the package's feature views) reach the agent's
    deploy settings; a bad value is refused before anything is sent."""
    from device_bridge.client import DeviceClient

    s, tmp, _ = env
    s.sql("""CREATE OR REPLACE MODEL bounded_mass OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'])
             AS SELECT flipper_length_mm, body_mass_g FROM penguins WHERE body_mass_g IS NOT NULL""")
    s.sql("DEPLOY MODEL bounded_mass TO DEVICE 'd1' OPTIONS (max_keys = 5000, max_state_mb = 16)")
    ready = json.loads((tmp / "agent.ready.json").read_text())
    url = (ready.get("listening") or ready.get("devices") or [ready])[0]["url"]
    deploy = DeviceClient(url, TOKEN).info()["models"]["bounded_mass"]["deploy"]
    assert (deploy["max_keys"], deploy["max_state_mb"]) == (5000, 16)
    with pytest.raises(MLSQLError, match="max_keys"):
        s.sql("DEPLOY MODEL bounded_mass TO DEVICE 'd1' OPTIONS (max_keys = 0)")
    # trigger: the condition is compiled here and checked there (this model reads no feature view)
    with pytest.raises(MLSQLError, match="UPPER"):
        s.sql("DEPLOY MODEL bounded_mass TO DEVICE 'd1' OPTIONS (trigger = STRUCT('app_events' AS on_table, "
              "'upper(kind) = ''X''' AS when_sql))")
    with pytest.raises(DeviceError, match="no feature view"):
        s.sql("DEPLOY MODEL bounded_mass TO DEVICE 'd1' OPTIONS (trigger = STRUCT('app_events' AS on_table, "
              "'kind = ''purchase''' AS when_sql))")
    assert DeviceClient(url, TOKEN).info()["models"]["bounded_mass"]["active"] == 1  # the failed DEPLOYs left it


def test_deploy_a_trial_of_a_tuned_model(env):
    """DEPLOY ... OPTIONS (trial_id = n): the trial is registered once as a version of its own (a device
    knows a package by its version) and the device answers as ML.PREDICT with STRUCT(n AS trial_id)
    does, not as the optimal trial; deploying it again reuses that version."""
    s, _, _ = env
    s.sql("""CREATE OR REPLACE MODEL mass_t OPTIONS (model_type = 'boosted_tree_regressor',
             input_label_cols = ['body_mass_g'], num_trials = 3, hparam_tuning_algorithm = 'GRID_SEARCH',
             max_iterations = 15, max_tree_depth = HPARAM_CANDIDATES([1, 3, 5]))
             AS SELECT * EXCLUDE (species) FROM penguins WHERE body_mass_g IS NOT NULL""")
    trials = s.sql("SELECT trial_id, is_optimal FROM ML.TRIAL_INFO(MODEL mass_t)").to_arrow().to_pylist()
    other = next(r["trial_id"] for r in trials if not r["is_optimal"])
    r = s.sql(f"DEPLOY MODEL mass_t TO DEVICE 'd1' OPTIONS (trial_id = {other})")
    assert r.message.startswith(f"Registered trial {other} of mass_t@1 as mass_t@2. Deployed mass_t@2 to d1"), r.message
    q = "(SELECT * EXCLUDE (species) FROM penguins WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL)"
    on_device = s.sql(f"SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_t, {q}, STRUCT('d1' AS device))"
                      ).to_arrow().column(0).to_pylist()
    trial = s.sql(f"SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_t@1, {q}, STRUCT({other} AS trial_id))"
                  ).to_arrow().column(0).to_pylist()
    optimal = s.sql(f"SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_t@1, {q})").to_arrow().column(0).to_pylist()
    # the device's float32 graph against the float64 booster sums: PARITY_TOL, 1e-4 relative
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(on_device, trial))
    assert any(abs(a - b) > 1e-2 * abs(b) for a, b in zip(on_device, optimal))
    info = s.sql("SELECT * FROM ML.TRIAL_INFO(MODEL mass_t@1)").to_arrow().num_rows
    assert info == 3  # the tuned version keeps its trials
    again = s.sql(f"DEPLOY MODEL mass_t TO DEVICE 'd1' OPTIONS (trial_id = {other})")
    assert again.message.startswith(f"Trial {other} of mass_t@1 is mass_t@2."), again.message
    assert [v.version for v in s.registry.versions("mass_t")] == [1, 2]
    # the name alone still means the tuned model (the trial is mass_t@2)
    assert s.sql("SELECT count(*) FROM ML.TRIAL_INFO(MODEL mass_t)").scalar() == 3
    with pytest.raises(MLSQLError, match="has no trial 9"):
        s.sql("DEPLOY MODEL mass_t@1 TO DEVICE 'd1' OPTIONS (trial_id = 9)")
