"""The mlsql.notebook.server REST API through a real Jupyter server (pytest-jupyter), on a real
workspace: a trained model in the MLflow store, a real device agent process on loopback, a
device that is down, a group and a job."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from bridge_procs import start_agent
from tornado.httpclient import HTTPClientError

TOKEN = "handler-test-token"
MLFLOW_UI = "http://mlflow.example:5000"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import mlsql
    import mlsql.datasets
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("server")
    s = mlsql.connect(tmp / "ws")
    mlsql.datasets.load("penguins", session=s)
    load_or_create_keypair(s.workspace.keys_dir)
    agent, url = start_agent(tmp, token=TOKEN, trust=s.workspace.keys_dir / "signing_key.pub")
    try:
        s.sql(f"CREATE DEVICE 'd1' OPTIONS (url = '{url}', token = '{TOKEN}')")
        s.sql("CREATE DEVICE ghost OPTIONS (url = 'http://127.0.0.1:9', timeout_s = 1)")
        s.sql("CREATE DEVICE GROUP line_a OPTIONS (devices = ['d1', 'ghost'])")
        s.sql("""CREATE MODEL species OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
                 max_iterations = 5) AS SELECT species, island, bill_length_mm, flipper_length_mm FROM penguins""")
        s.sql("CREATE JOB nightly OPTIONS (every = '1h') AS (SELECT count(*) FROM penguins)")
        root = s.workspace.root
        s.close()  # the job's run opens the workspace in its own kernel
        import mlsql as m

        with m.connect(root) as runner:
            runner.sql("RUN JOB nightly")
        yield root
    finally:
        agent.kill()


@pytest.fixture(autouse=True)
def _home(workspace, monkeypatch):
    monkeypatch.setenv("MLSQL_HOME", str(workspace))


@pytest.fixture
def jp_root_dir(workspace):
    return workspace.parent  # the server's root holds the workspace, as with `make lab`


@pytest.fixture
def jp_server_config():
    from traitlets.config import Config

    return Config({"ServerApp": {"jpserver_extensions": {"mlsql.notebook.server": True}},
                   "MLSQLServer": {"mlflow_ui": MLFLOW_UI}})


async def get(jp_fetch, *path):
    r = await jp_fetch("mlsql", "api", *path, request_timeout=120)
    assert r.code == 200
    return json.loads(r.body)


async def test_info(jp_fetch, workspace):
    import mlsql

    info = await get(jp_fetch, "info")
    assert info == {"version": mlsql.__version__, "workspace": str(workspace), "mlflow_ui": MLFLOW_UI}


async def test_models(jp_fetch):
    data = await get(jp_fetch, "models")
    (m,) = data["models"]
    assert m["name"] == "species" and m["model_type"] == "boosted_tree_classifier"
    (v,) = m["versions"]
    assert v["version"] == 1 and v["aliases"] == [] and len(v["run_id"]) == 32
    assert 0.5 < v["metrics"]["roc_auc"] <= 1.0 and "accuracy" in v["metrics"]
    assert v["mlflow_run_url"].startswith(MLFLOW_UI + "/#/experiments/") and v["mlflow_run_url"].endswith(v["run_id"])
    assert v["created"].endswith("+00:00")
    # 344 rows are too few for CREATE MODEL's automatic split: the metrics are the training rows'
    assert v["metrics_on"] == {"rows": 344, "held_out": False}


async def test_devices_live(jp_fetch):
    t0 = time.monotonic()
    data = await get(jp_fetch, "devices")
    assert time.monotonic() - t0 < 10
    devs = {d["name"]: d for d in data["devices"]}
    assert devs["d1"]["online"] is True and devs["d1"]["error"] is None
    assert devs["ghost"]["online"] is False and devs["ghost"]["error"]  # offline: said, not a 500
    assert devs["ghost"]["url"] == "http://127.0.0.1:9"
    assert data["groups"] == [{"name": "line_a", "devices": ["d1", "ghost"]}]


async def test_jobs(jp_fetch, workspace):
    (job,) = (await get(jp_fetch, "jobs"))["jobs"]
    assert job["name"] == "nightly" and job["schedule"].startswith("every "), job
    assert job["next_run"] > job["last_run_at"]
    assert job["last_status"] == "succeeded" and Path(job["last_output_notebook"]).is_file()
    assert job["last_output_notebook_path"] == Path(job["last_output_notebook"]).relative_to(workspace.parent).as_posix()
    assert job["last_output_notebook_path"].startswith("ws/")


async def test_jobs_last_is_the_run_in_progress(jp_fetch, workspace):
    """A job still running, with 'skipped' rows recorded after it (its schedule came round
    meanwhile): the panel's last status is the run in progress."""
    from mlsql.jobs import JobRun, JobSpec, JobStore, resolve_job_options
    from mlsql.jobs.store import utcnow

    store = JobStore(workspace)
    store.create(JobSpec("busy", "sql", "SELECT 1", resolve_job_options({"every": "1h"})))
    try:
        t = utcnow()  # recorded by this test's (live) process: not an orphan run
        store.record_start(JobRun("r-running", "busy", 1, "schedule", t, None, "running", None, "/o.ipynb"))
        store.record_start(JobRun("r-skipped", "busy", 1, "schedule", utcnow(), utcnow(), "skipped", "busy", None))
        jobs = {j["name"]: j for j in (await get(jp_fetch, "jobs"))["jobs"]}
        assert jobs["busy"]["last_status"] == "running", jobs["busy"]
        assert jobs["busy"]["last_run_at"] == t.isoformat(timespec="seconds")
    finally:
        store.drop("busy")


async def test_alerts(jp_fetch, workspace):
    """The panel's Alerts section: every alert with its interval, masked notify URLs, and its
    last check, last fired time and last error, as recorded."""
    from mlsql.jobs.alerts import AlertCheck, AlertSpec, AlertStore, resolve_alert_options
    from mlsql.jobs.store import utcnow

    store = AlertStore(workspace)
    store.create(AlertSpec("low_acc", "SELECT 1", resolve_alert_options(
        {"every": "5 minutes", "notify": ["json://127.0.0.1:9/hook", "mailto://bob:hunter2@example.com"]})))
    try:
        fired_at = utcnow()
        store.record_start(AlertCheck("c-fired", "low_acc", "schedule", fired_at, utcnow(), "fired", 3, True, False, 3,
                                      "Notification failed after 3 attempts: json://127.0.0.1:9/hook: refused"))
        store.record_start(AlertCheck("c-ok", "low_acc", "schedule", utcnow(), utcnow(), "ok", 0, False, False, 0))
        (alert,) = (await get(jp_fetch, "alerts"))["alerts"]
        assert alert["name"] == "low_acc" and alert["every"] == "5m", alert
        assert alert["notify"][0] == "json://127.0.0.1:9/hook" and "hunter2" not in json.dumps(alert)
        assert alert["last_status"] == "ok" and alert["fired_count"] == 1
        assert alert["last_fired"] == fired_at.isoformat(timespec="seconds")
        assert alert["last_error"].startswith("Notification failed after 3 attempts")
        assert alert["next_check"] > alert["last_checked"]
    finally:
        store.drop("low_acc")


async def test_deploy_end_to_end(jp_fetch):
    r = await jp_fetch("mlsql", "api", "deploys", method="POST",
                       body=json.dumps({"model": "species", "version": None, "device": "d1", "group": None,
                                        "providers": ["cpu"], "quantize": "none"}))
    assert r.code == 202
    dep_id = json.loads(r.body)["id"]
    deadline = time.monotonic() + 300
    while True:
        dep = await get(jp_fetch, "deploys", dep_id)
        if dep["state"] != "running" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert dep["state"] == "done", dep
    assert dep["error"] is None and len(dep["steps"]) >= 3
    res = dep["result"]
    assert res["version"] == 1 and res["device"] == "d1"
    assert res["placement"]["CPUExecutionProvider"] > 0
    assert res["first_inference_ms"] > 0
    assert res["parity"]["passed"] is True and res["parity"]["metric"]
    assert abs(res["parity"]["native"] - res["parity"]["onnx"]) < 1e-3
    # which rows the gate's metric is on: the training query's (all 344 penguins), not held-out rows
    assert res["parity"]["rows"] == 344 and res["parity"]["rows_from"] == "training query"
    # the device and the model now say so
    devs = {d["name"]: d for d in (await get(jp_fetch, "devices"))["devices"]}
    assert devs["d1"]["active_model"] == "species" and devs["d1"]["active_version"] == 1
    assert devs["d1"]["providers"] == ["cpu"]
    (m,) = (await get(jp_fetch, "models"))["models"]
    assert m["versions"][0]["devices"] == ["d1"]
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("mlsql", "api", "deploys", "nope-1")
    assert info.value.code == 404


@pytest.mark.parametrize("body, field", [
    ({}, "model"),
    ([], "body"),
    ({"model": "species; DROP TABLE penguins", "device": "d1"}, "model"),
    ({"model": "species", "device": "nope"}, "device"),
    ({"model": "species"}, "device"),
    ({"model": "species", "device": "d1", "group": "line_a"}, "device"),
    ({"model": "species", "group": "no_group"}, "group"),
    ({"model": "species", "device": "d1", "version": 0}, "version"),
    ({"model": "species", "device": "d1", "version": "2"}, "version"),
    ({"model": "species", "device": "d1", "quantize": "int4"}, "quantize"),
    ({"model": "species", "device": "d1", "providers": "cpu"}, "providers"),
    ({"model": "species", "device": "d1", "provider": ["cpu"]}, "provider"),
])
async def test_bad_bodies_name_the_field(jp_fetch, body, field):
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("mlsql", "api", "deploys", method="POST", body=json.dumps(body))
    assert info.value.code == 400
    message = json.loads(info.value.response.body)["message"]
    assert message.startswith(f"{field}: "), message


async def test_not_json_is_400(jp_fetch):
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("mlsql", "api", "deploys", method="POST", body="{model")
    assert info.value.code == 400 and json.loads(info.value.response.body)["message"].startswith("body: ")


@pytest.mark.parametrize("path", ["info", "models", "devices", "jobs", "alerts", "deploys/d1-1"])
async def test_refused_without_a_token(jp_fetch, path):
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong"}):
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("mlsql", "api", *path.split("/"), headers=headers)
        assert info.value.code in (401, 403)
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("mlsql", "api", "deploys", method="POST", headers={"Authorization": ""},
                       body=json.dumps({"model": "species", "device": "d1"}))
    assert info.value.code in (401, 403)


async def test_post_with_cookie_auth_needs_xsrf(jp_fetch, jp_serverapp):
    def cookies_of(r) -> dict:
        return dict(c.split(";", 1)[0].split("=", 1) for c in r.headers.get_list("Set-Cookie"))

    # log in with the token the way a browser does: the login page's XSRF cookie, then the form
    page = await jp_fetch("login", headers={"Authorization": ""})
    xsrf = cookies_of(page)["_xsrf"]
    r = await jp_fetch("login", method="POST", headers={"Authorization": "", "Cookie": f"_xsrf={xsrf}"},
                       follow_redirects=False, raise_error=False,
                       body=f"password={jp_serverapp.identity_provider.token}&_xsrf={xsrf}")
    login = {k: v for k, v in cookies_of(r).items() if k.startswith("username-")}
    assert login, r.code
    cookie = "; ".join(f"{k}={v}" for k, v in {**login, "_xsrf": xsrf}.items())
    body = json.dumps({"model": "species", "device": "nope"})
    with pytest.raises(HTTPClientError) as info:  # the login cookie without the XSRF header: refused
        await jp_fetch("mlsql", "api", "deploys", method="POST", headers={"Authorization": "", "Cookie": cookie},
                       body=body)
    assert info.value.code == 403
    with pytest.raises(HTTPClientError) as info:  # with it, the handler answers (400: no such device)
        await jp_fetch("mlsql", "api", "deploys", method="POST",
                       headers={"Authorization": "", "Cookie": cookie, "X-XSRFToken": xsrf}, body=body)
    assert info.value.code == 400
    assert json.loads(info.value.response.body)["message"].startswith("device: no device named 'nope'")
    assert (await jp_fetch("mlsql", "api", "info", headers={"Authorization": "", "Cookie": cookie})).code == 200
