"""A group rollout gated on model quality: real hub and agents on loopback, an app replaying traffic and
late outcomes in the background, DEPLOY ... TO GROUP ... max_metric_drop = STRUCT('accuracy' AS metric, ...).

A degraded version (trained on a threshold shifted by 0.7: about 12 accuracy points worse on the
world's truth) stops at its first wave, which goes back to the previous version, with the reason
(metric, both values, both counts) in the DEPLOY's result; a version as good as the previous one
passes every wave."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from bridge_procs import start_bridge

pytestmark = pytest.mark.timeout(300)
TOKEN = "gate-token"
GATE = "max_metric_drop = STRUCT('accuracy' AS metric, 0.02 AS drop)"


def world(n: int, seed: int) -> pa.Table:
    r = np.random.default_rng(seed)
    x = r.normal(0, 1, n)
    return pa.table({"x": x, "y": (x + r.normal(0, 0.4, n) > 0).astype(np.int64)})


class App(threading.Thread):
    """The app: requests of 50 rows round-robin over the agents, each followed by its rows' outcomes."""

    def __init__(self, urls: list[str]):
        super().__init__(daemon=True)
        self.urls, self.stop, self.sent, self.error = urls, threading.Event(), 0, None

    def post(self, url, path, body, rid=None):
        h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        if rid:
            h["X-Request-Ids"] = rid
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=h)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def run(self):
        pool = world(50_000, seed=3)
        j = 0
        try:
            while not self.stop.is_set():
                part = pool.slice((j * 50) % 49_950, 50)
                url, rid = self.urls[j % len(self.urls)], f"a{j}"
                self.post(url, "/v1/models/m/predict", {"columns": {"x": part["x"].to_pylist()}}, rid)
                self.post(
                    url,
                    "/v1/models/m/outcomes",
                    {
                        "outcomes": [
                            {"request_id": f"{rid}-{i}", "label": int(v)}
                            for i, v in enumerate(part["y"].to_pylist())
                        ]
                    },
                )
                self.sent += 50
                j += 1
        except Exception as exc:  # shown by the test, not lost in a thread
            self.error = exc


RECEIVED: list[dict] = []


def webhook() -> str:
    """A local JSON webhook (what apprise's json:// posts to); what it receives goes to RECEIVED."""
    import http.server

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            RECEIVED.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"json://127.0.0.1:{srv.server_address[1]}/hook"


def test_a_degraded_model_stops_at_its_first_wave(tmp_path):
    import mlsql
    from device_bridge.client import HubClient
    from device_bridge.keys import load_or_create_keypair

    s = mlsql.connect(tmp_path / "ws")
    load_or_create_keypair(s.workspace.keys_dir)
    pub = s.workspace.keys_dir / "signing_key.pub"
    hub, hl = start_bridge(
        ["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN, "--enroll-open"],
        tmp_path,
        "hub",
    )
    fleet, devices = start_bridge(
        [
            "serve",
            "--name",
            "edge",
            "--devices",
            "4",
            "--port",
            "0",
            "--store",
            str(tmp_path / "fleet"),
            "--token",
            TOKEN,
            "--trust",
            str(pub),
            "--hub",
            hl[0]["url"],
            "--hub-interval",
            "0.2",
            "--group",
            "field",
        ],
        tmp_path,
        "fleet",
    )
    app = None
    try:
        names = [f"edge-{i}" for i in range(4)]
        s.sql(
            f"CREATE DEVICE GROUP 'field' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{TOKEN}', devices = {names})"
        )
        s.engine.register("train_rows", world(3000, seed=1))
        s.sql("CREATE TABLE train AS SELECT x, y, CAST(x > 0.7 AS BIGINT) AS y_bad FROM train_rows")
        for label in ("y", "y_bad", "y"):  # versions 1 (good), 2 (degraded), 3 (as good as 1)
            s.sql(
                f"CREATE OR REPLACE MODEL m OPTIONS (model_type = 'logistic_reg', input_label_cols = ['y']) "
                f"AS SELECT x, {label} AS y FROM train"
            )
        assert (
            "every gate passed"
            in s.sql("DEPLOY MODEL m@1 TO GROUP 'field' OPTIONS (sample_rate = 1)").message
        )
        app = App([d["url"] for d in devices])
        app.start()

        hook_url = webhook()
        bad = s.sql(
            f"DEPLOY MODEL m@2 TO GROUP 'field' OPTIONS (rollout_percent = 25, sample_rate = 1, {GATE}, "
            f"min_outcomes = 500, wave_timeout_s = 60, notify = ['{hook_url}'])"
        )
        waves = bad.to_arrow().to_pylist()
        print(bad.message)
        assert len(waves) == 1 and waves[0]["status"] == "rolled_back" and "stopped at wave 0" in bad.message
        assert "online accuracy of version 2 is" in waves[0]["failures"]
        q = json.loads(waves[0]["metrics"])["quality"]
        assert q["n"] >= 500 and q["previous_n"] >= 500 and q["previous"] == 1
        # the degraded version is about 12 points worse on the world's truth: far beyond the 0.02 bound
        # (at n >= 500 an accuracy's standard error is under 0.02, so 0.06 is over 3 of them)
        assert q["worse_by"] > 0.06 and q["value"] < q["previous_value"]
        # the alert: one notification with the stop and its reason
        assert "; notified" in bad.message and len(RECEIVED) == 1
        assert (
            "stopped at wave 0" in RECEIVED[0]["title"]
            and "online accuracy of version 2" in RECEIVED[0]["message"]
        )
        # the reason in the hub's events too
        stops = [e for e in HubClient(hl[0]["url"], TOKEN).events() if e.get("event") == "rollout_stopped"]
        assert len(stops) == 1 and stops[0]["version"] == 2 and stops[0]["wave"] == 0
        assert (
            "online accuracy of version 2" in stops[0]["failures"][0]
            and stops[0]["metrics"]["quality"]["n"] >= 500
        )
        # and in SHOW DEPLOYMENTS, beside each agent's model: every agent back on version 1
        rows = [r for r in s.sql("SHOW DEPLOYMENTS").to_arrow().to_pylist() if r["group"] == "field"]
        assert sorted(r["device"] for r in rows) == names and {r["version"] for r in rows} == {1}
        assert all(
            "version 2 stopped at wave 0" in r["rollout_stopped"]
            and "online accuracy" in r["rollout_stopped"]
            for r in rows
        )
        from device_bridge.errors import DeviceRequestError

        with pytest.raises(DeviceRequestError, match="event must be a lower-case name"):
            HubClient(hl[0]["url"], TOKEN).post_event("Rollout Stopped!")
        status = HubClient(hl[0]["url"], TOKEN).status()
        assert {
            n: ((status[n].get("status") or {}).get("m") or {}).get("active") for n in names
        } == dict.fromkeys(names, 1)

        good = s.sql(
            f"DEPLOY MODEL m@3 TO GROUP 'field' OPTIONS (rollout_percent = 50, sample_rate = 1, {GATE}, "
            "min_outcomes = 300, wave_timeout_s = 60)"
        )
        assert [w["status"] for w in good.to_arrow().to_pylist()] == ["passed", "passed"], good.message
        assert app.error is None, app.error
    finally:
        if app is not None:
            app.stop.set()
            app.join(30)
        fleet.kill()
        hub.kill()
        s.close()
