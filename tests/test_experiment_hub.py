"""An experiment on a device group behind a hub: real hub and agents on loopback. The agents install every
arm from their desired state and route by it; the readout reads the group's device data from the hub;
STOP ... PROMOTE rolls the winner out through the normal staged rollout."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from bridge_procs import start_bridge

from device_bridge.experiments import arm_index

pytestmark = pytest.mark.timeout(300)
TOKEN = "hub-expt-token"


def test_experiment_through_the_hub(tmp_path):
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
            "2",
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
    try:
        h = HubClient(hl[0]["url"], TOKEN)
        s.sql(f"CREATE DEVICE GROUP 'field' OPTIONS (hub = '{hl[0]['url']}', hub_token = '{TOKEN}')")
        r = np.random.default_rng(1)
        x = r.normal(0, 1, 2000)
        s.engine.register(
            "train_rows", pa.table({"x": x, "y": (x + r.normal(0, 0.4, 2000) > 0).astype(np.int64)})
        )
        for shift in (0.0, 0.5):  # versions 1 and 2
            s.sql(
                "CREATE OR REPLACE MODEL m OPTIONS (model_type = 'logistic_reg', input_label_cols = ['y']) "
                f"AS SELECT x, CAST(x > {shift} AS BIGINT) AS y FROM train_rows"
            )
        started = s.sql(
            "CREATE EXPERIMENT ab ON GROUP 'field' OPTIONS (arms = [STRUCT('m@1' AS model, 0.5 AS share), "
            "STRUCT('m@2' AS model, 0.5 AS share)], unit = 'request', metrics = ['accuracy'], "
            "min_samples_per_arm = 100)"
        )
        assert sorted(started.to_arrow()["device"].to_pylist()) == ["edge-0", "edge-1"]
        status = h.status()
        for n in ("edge-0", "edge-1"):  # both arms installed, the control active, the experiment running
            st = status[n]["status"]["m"]
            assert sorted(st["versions"]) == [1, 2] and st["active"] == 1 and st["experiment"] == "ab#1"

        sent = {}
        for j in range(30):
            url, rid = devices[j % 2]["url"], f"h{j}"
            xs = r.normal(0, 1, 20)
            hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            req = urllib.request.Request(
                url + "/v1/models/m/predict",
                method="POST",
                headers={**hdr, "X-Request-Ids": rid},
                data=json.dumps({"columns": {"x": xs.tolist()}}).encode(),
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                y = np.asarray(json.loads(resp.read())["outputs"]["predicted_y"]).ravel()
            # the arm by the shared hash: version 2 says 1 only above its 0.5 threshold
            arm = arm_index("ab#1", rid, [0.5, 0.5])
            assert (
                y == (xs > (0.5 if arm else 0.0))
            ).mean() > 0.9  # logistic fits: a few rows near the threshold
            outcomes = [{"request_id": f"{rid}-{i}", "label": int(v > 0)} for i, v in enumerate(xs)]
            req = urllib.request.Request(
                url + "/v1/models/m/outcomes",
                method="POST",
                headers=hdr,
                data=json.dumps({"outcomes": outcomes}).encode(),
            )
            urllib.request.urlopen(req, timeout=30).read()
            sent[rid] = arm
        expect = {k: 20 * sum(1 for a in sent.values() if a == k) for k in (0, 1)}
        deadline = time.monotonic() + 30
        while True:  # the agents upload in their report cycle
            res = s.sql("SELECT arm, n FROM ML.EXPERIMENT_RESULTS('ab') ORDER BY arm").to_arrow().to_pylist()
            if [x["n"] for x in res] == [expect[0], expect[1]] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [x["n"] for x in res] == [expect[0], expect[1]]

        stopped = s.sql("STOP EXPERIMENT ab PROMOTE 'm@1'")
        assert "promotion: Rolled m@1 out to group field" in stopped.message
        status = h.status()
        for n in ("edge-0", "edge-1"):
            st = status[n]["status"]["m"]
            assert st["active"] == 1 and st["experiment"] is None
        shown = s.sql("SHOW EXPERIMENTS").to_arrow().to_pylist()
        assert [(e["status"], e["promoted"]) for e in shown] == [("stopped", "m@1")]
    finally:
        fleet.kill()
        hub.kill()
        s.close()
