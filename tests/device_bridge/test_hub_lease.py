"""Scheduled rollouts that the hub advances itself, and the lease that lets one replica decide:
two real hub processes on one real PostgreSQL (pgserver) both run the driver; each wave advances
once, and when the lease holder is killed the other replica finishes the rollout."""

from __future__ import annotations

import json
import threading
import time

import pytest
from device_test_helpers import TOKEN, Proc, make_keys, package, wait_for
from test_hub_db import call

from device_bridge.client import HubClient
from device_bridge.hub.db import Database
from device_bridge.hub.schedule import Lease

pytestmark = pytest.mark.timeout(120)
DEVICES = [f"d{i:02d}" for i in range(40)]


def test_two_processes_race_for_the_lease_and_exactly_one_wins(tmp_path, db_url):
    """Two hubs' databases (each its own connection) ask for a free lease at the same instant, 10
    times: one wins each time; the loser gets it only once the winner's expires."""
    dbs = [Database(tmp_path / "store", db_url) for _ in range(2)]
    # 2 s: the race and the renewal below fit in it on a loaded machine (a few transactions)
    leases = [Lease(db, "waves", f"replica-{i}", ttl_s=2.0) for i, db in enumerate(dbs)]
    try:
        for _ in range(10):
            with dbs[0].tx() as t:
                t.run("DELETE FROM meta WHERE key = 'lease:waves'")
            go, won = threading.Barrier(2), [None, None]

            def race(i, go=go, won=won):
                go.wait()
                won[i] = leases[i].hold()

            threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(10)
            assert sorted(won) == [False, True], won
        winner = won.index(True)
        loser = 1 - winner
        assert leases[winner].hold() and not leases[loser].hold()  # renewed; still not the loser's
        time.sleep(2.1)  # past the 2 s expiry on the database's clock (time.sleep sleeps at least that)
        assert leases[loser].hold()
        with dbs[winner].tx() as t:
            assert not leases[winner].held_in(t)  # the old holder's fencing check now fails
    finally:
        for db in dbs:
            db.close()


def _replica(tmp_path, url, name):
    return Proc(["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN, "--db", url,
                 "--lease-s", "1", "--replica", name], tmp_path / f"ready-{name}.json")


def _plan(url, model="scorer"):
    status, body = call(url, "GET", f"/v1/rollouts/field/{model}", TOKEN)
    assert status == 200, body
    return json.loads(body)


def _version_of(url, device):
    status, body = call(url, "GET", f"/v1/agents/{device}/desired", TOKEN)
    assert status == 200, body
    return (json.loads(body)["models"].get("scorer") or {}).get("version")


def test_two_replicas_advance_each_wave_once_and_the_other_takes_over_when_the_holder_dies(tmp_path, postgres):
    url, kp = postgres(), make_keys(tmp_path / "keys")
    hubs = {"A": _replica(tmp_path, url, "A"), "B": _replica(tmp_path, url, "B")}
    try:
        ha = HubClient(hubs["A"].url, TOKEN)
        ha.set_group("field", DEVICES)
        v1 = ha.upload(package(kp, 1))["sha256"]
        status, body = call(hubs["A"].url, "POST", "/v1/rollouts", TOKEN,
                            {"model": "scorer", "group": "field", "sha256": v1, "waves": [10, 50, 100],
                             "every_s": 1.0})
        assert status == 200, body
        first = [d for d in DEVICES if _version_of(hubs["B"].url, d) == 1]  # read through the other replica
        assert 0 < len(first) < len(DEVICES)  # the first wave only (10 % of 40 by the hash; never all)
        wait_for(lambda: _plan(hubs["B"].url)["status"] == "completed", what="the rollout completed")
        plan = _plan(hubs["A"].url)
        # both replicas' drivers ran all along: each wave was advanced once, all by one lease holder
        assert [(a["step"], a["percent"]) for a in plan["advanced"]] == [(0, 10), (1, 50), (2, 100)]
        assert len({a["by"] for a in plan["advanced"][1:]}) == 1
        assert all(_version_of(hubs["A"].url, d) == 1 for d in DEVICES)

        v2 = ha.upload(package(kp, 2))["sha256"]
        status, body = call(hubs["B"].url, "POST", "/v1/rollouts", TOKEN,
                            {"model": "scorer", "group": "field", "sha256": v2, "waves": [20, 40, 60, 80, 100],
                             "every_s": 0.8})
        assert status == 200, body
        wait_for(lambda: _plan(hubs["B"].url)["step"] >= 1, what="the second wave")
        holder = json.loads(call(hubs["B"].url, "GET", "/v1/rollouts", TOKEN)[1])["lease"]["holder"]
        assert holder in hubs
        hubs[holder].kill()  # SIGKILL: its lease is never given back
        other = "B" if holder == "A" else "A"
        at_kill = _plan(hubs[other].url)["step"]
        wait_for(lambda: _plan(hubs[other].url)["status"] == "completed", what="the survivor finishing it")
        plan = _plan(hubs[other].url)
        assert [(a["step"], a["percent"]) for a in plan["advanced"]] == [(0, 20), (1, 40), (2, 60), (3, 80), (4, 100)]
        assert {a["by"] for a in plan["advanced"][1:at_kill + 1]} == {holder}
        assert {a["by"] for a in plan["advanced"][at_kill + 1:]} == {other}
        assert at_kill < 4  # the survivor advanced at least one wave itself
        assert all(_version_of(hubs[other].url, d) == 2 for d in DEVICES)
    finally:
        for p in hubs.values():
            p.kill()


def test_a_hub_started_with_drive_rollouts_off_never_advances_a_wave(tmp_path):
    kp = make_keys(tmp_path / "keys")
    hub = Proc(["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN, "--lease-s", "0.4",
                "--drive-rollouts", "off"], tmp_path / "ready-off.json")
    try:
        hc = HubClient(hub.url, TOKEN)
        hc.set_group("field", DEVICES)
        plan = hc.schedule_rollout("scorer", "field", [10, 100], 0.2, package(kp, 1))
        assert plan["step"] == 0 and plan["waves"] == [10, 100]
        time.sleep(1.5)  # 7 times every_s and nearly 4 lease periods: a driver would have advanced it
        assert _plan(hub.url)["step"] == 0 and _plan(hub.url)["status"] == "running"
        assert hc.rollouts()["lease"] is None  # never taken
        assert hc.stop_rollout("field", "scorer")["status"] == "stopped"
    finally:
        hub.kill()


def test_of_two_stops_at_once_one_rolls_back_and_bad_rollouts_are_refused(tmp_path, postgres):
    url, kp = postgres(), make_keys(tmp_path / "keys")
    hubs = [_replica(tmp_path, url, "A"), _replica(tmp_path, url, "B")]
    try:
        ha = HubClient(hubs[0].url, TOKEN)
        ha.set_group("field", DEVICES)
        v1 = ha.upload(package(kp, 1))["sha256"]
        ha.set_desired("scorer", sha256=v1, group="field")
        v2 = ha.upload(package(kp, 2))["sha256"]
        body = {"model": "scorer", "group": "field", "sha256": v2, "waves": [50, 100], "every_s": 600}
        assert call(hubs[0].url, "POST", "/v1/rollouts", TOKEN, body)[0] == 200
        status, err = call(hubs[1].url, "POST", "/v1/rollouts", TOKEN, body)
        assert status == 409 and "stop it first" in json.loads(err)["error"]
        answers = [None, None]

        def stop(i):
            answers[i] = call(hubs[i].url, "POST", "/v1/rollouts/field/scorer/stop", TOKEN, {"rollback": True})

        threads = [threading.Thread(target=stop, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert sorted(s for s, _ in answers) == [200, 409], answers
        assert _plan(hubs[1].url)["status"] == "rolled_back"
        assert all(_version_of(hubs[1].url, d) == 1 for d in DEVICES)  # the whole group back on v1
        for bad, field in [({**body, "waves": [50, 40, 100]}, "waves"), ({**body, "waves": [10, 50]}, "waves"),
                           ({**body, "every_s": 0}, "every_s"), ({**body, "group": None}, "group"),
                           ({**body, "sha256": "x"}, "sha256"), ({**body, "colour": 1}, "colour")]:
            status, err = call(hubs[0].url, "POST", "/v1/rollouts", TOKEN, bad)
            assert status == 400 and field in json.loads(err)["error"], (bad, err)
        assert _plan(hubs[0].url)["status"] == "rolled_back"  # the refused ones changed nothing
    finally:
        for p in hubs:
            p.kill()
