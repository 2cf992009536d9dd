"""Experiments on a real agent on loopback: both arms installed, each unpinned prediction served by its
arm's version (the hash of device_bridge/experiments.py), the arm recorded in the sample (its
version), sticky across an agent restart and a reinstall of the arms' packages."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from device_test_helpers import TOKEN, make_keys, package, start_agent, trust

from device_bridge.client import DeviceClient
from device_bridge.experiments import arm_index, position

pytestmark = pytest.mark.timeout(120)
SAMPLED = {"sample_rate": 1.0}


def _name_in_arm(arm: int) -> str:
    """An agent name the hash puts in ``arm`` of a 50/50 experiment 'exp-1' (found, not assumed)."""
    return next(f"dev-{i}" for i in range(100) if arm_index("exp-1", f"dev-{i}", [0.5, 0.5]) == arm)


def _y(c: DeviceClient, **kw) -> float:
    ans = c.predict("scorer", columns={"x": [1.0], "city": ["rome"]}, **kw)
    return float(np.asarray(ans["outputs"]["y"]).ravel()[0])


def test_position_is_uniform_and_stable():
    # a fixed value: the hash is sha256, the same on every machine and release
    assert (
        position("exp-1", "dev-0")
        == int.from_bytes(__import__("hashlib").sha256(b"exp-1\x00dev-0").digest()[:8], "big") / 2.0**64
    )
    xs = np.array([position("e", i) for i in range(20_000)])
    # 20,000 uniform draws: a share's count has sd sqrt(20000 * 0.3 * 0.7) = 65, so 0.3 ± 0.01 is ±3 sd
    assert abs((xs < 0.3).mean() - 0.3) < 0.01
    assert [arm_index("e", u, [0.2, 0.3, 0.5]) for u in range(50)] == [
        arm_index("e", u, [0.2, 0.3, 0.5]) for u in range(50)
    ]


def test_device_arm_is_served_recorded_and_sticky(tmp_path):
    kp = make_keys(tmp_path / "keys")
    name = _name_in_arm(0)  # the arm of version 1, which is NOT the active version
    store = tmp_path / "store"
    trust(store, kp)
    agent = start_agent(tmp_path, name, store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        p1, p2 = package(kp, 1, mult=2.0), package(kp, 2, mult=3.0)
        c.install(p1, deploy=SAMPLED)
        c.install(p2, deploy=SAMPLED)  # version 2 active
        assert _y(c) == 3.0
        r = c.set_experiment(
            "scorer",
            {
                "id": "exp-1",
                "unit": "device",
                "arms": [{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}],
            },
        )
        assert r["arm"] == 1
        assert _y(c, request_ids=["routed"]) == 2.0  # x * 2: version 1 serves this device
        assert _y(c, version=2, request_ids=["pinned"]) == 3.0  # a pinned version is served as asked
        table, _ = c.samples("scorer")
        version_of = dict(zip(table.column("request_id").to_pylist(), table.column("version").to_pylist()))
        assert (version_of["routed"], version_of["pinned"]) == (
            1,
            2,
        )  # the arm (its version) is in the sample
        agent.kill()
        agent = start_agent(tmp_path, name, store)  # restart
        c = DeviceClient(agent.url, TOKEN)
        assert c.info()["models"]["scorer"]["experiment_arm"] == 1
        assert _y(c) == 2.0
        c.install(p2, deploy=SAMPLED)  # the arms' packages installed again (an older one without activating)
        c.install(p1, deploy=SAMPLED, activate=False)
        assert _y(c) == 2.0
        c.stop_experiment("scorer")
        assert _y(c) == 3.0  # back to the active version
    finally:
        agent.kill()


def test_request_unit_and_bad_settings(tmp_path):
    kp = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    trust(store, kp)
    agent = start_agent(tmp_path, "dev-r", store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        c.install(package(kp, 1, mult=2.0))
        c.install(package(kp, 2, mult=3.0))
        exp = {
            "id": "exp-r",
            "unit": "request",
            "arms": [{"version": 1, "share": 0.3}, {"version": 2, "share": 0.7}],
        }
        c.set_experiment("scorer", exp)
        got = []
        for i in range(40):
            req = urllib.request.Request(
                agent.url + "/v1/models/scorer/predict",
                method="POST",
                data=json.dumps({"columns": {"x": [1.0], "city": ["rome"]}}).encode(),
                headers={
                    "Authorization": f"Bearer {TOKEN}",
                    "Content-Type": "application/json",
                    "X-Request-Ids": f"req{i}",
                },
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                got.append(float(np.asarray(json.loads(resp.read())["outputs"]["y"]).ravel()[0]))
        expect = [2.0 if arm_index("exp-r", f"req{i}", [0.3, 0.7]) == 0 else 3.0 for i in range(40)]
        assert got == expect and set(got) == {2.0, 3.0}
        # bad settings: 400 naming the field, nothing changed
        for bad, field in [
            ({**exp, "arms": [{"version": 1, "share": 0.3}, {"version": 2, "share": 0.6}]}, "sum to 1"),
            ({**exp, "unit": "planet"}, "experiment.unit"),
            ({**exp, "arms": [{"version": 1, "share": 0.5}, {"version": 9, "share": 0.5}]}, "no version 9"),
            ({**exp, "colour": 1}, "unknown experiment field 'colour'"),
        ]:
            req = urllib.request.Request(
                agent.url + "/v1/models/scorer/experiment",
                method="PUT",
                data=json.dumps(bad).encode(),
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(req, timeout=10)
            assert ei.value.code in (400, 409) and field in json.loads(ei.value.read())["error"]
        assert c.info()["models"]["scorer"]["experiment"]["id"] == "exp-r"
        # without the token: 401
        req = urllib.request.Request(agent.url + "/v1/models/scorer/experiment", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == 401
        # a model deleted takes its experiment with it: installed again, it serves its active version
        c.delete("scorer")
        c.install(package(kp, 3, mult=5.0))
        assert _y(c) == 5.0 and c.info()["models"]["scorer"]["experiment"] is None
    finally:
        agent.kill()


def test_column_unit_routes_each_value_and_refuses_mixed_batches(tmp_path):
    kp = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    trust(store, kp)
    agent = start_agent(tmp_path, "dev-c", store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        c.install(package(kp, 1, mult=2.0))
        c.install(package(kp, 2, mult=3.0))
        shares = [0.5, 0.5]
        with pytest.raises(Exception, match="'colour' is not an input column of scorer"):
            c.set_experiment(
                "scorer",
                {
                    "id": "exp-c",
                    "unit": "colour",
                    "arms": [{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}],
                },
            )
        c.set_experiment(
            "scorer",
            {
                "id": "exp-c",
                "unit": "city",
                "arms": [{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}],
            },
        )
        cities = [f"city{i}" for i in range(12)]
        arm = {ct: arm_index("exp-c", ct, shares) for ct in cities}
        assert set(arm.values()) == {0, 1}  # both arms among these values (found, not assumed)
        for ct in cities:  # x * 2 on version 1, x * 3 on version 2 (no city is 'paris': + 0)
            y = c.predict("scorer", columns={"x": [1.0, 1.0], "city": [ct, ct]})["outputs"]["y"]
            assert np.asarray(y).ravel().tolist() == [2.0 + arm[ct]] * 2
        same = [ct for ct in cities if arm[ct] == 1][:2]
        y = c.predict("scorer", columns={"x": [1.0, 1.0], "city": same})["outputs"]["y"]
        assert np.asarray(y).ravel().tolist() == [3.0, 3.0]  # several values of one arm: one run
        a0, a1 = next(ct for ct in cities if arm[ct] == 0), next(ct for ct in cities if arm[ct] == 1)
        with pytest.raises(Exception, match="rows 0 and 2 of this request fall in different arms") as ei:
            c.predict("scorer", columns={"x": [1.0, 1.0, 1.0], "city": [a0, a0, a1]})
        assert getattr(ei.value, "status", None) == 400
    finally:
        agent.kill()
