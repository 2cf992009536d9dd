"""The poll cycle from memory (hub/cache.py), with real hub processes on loopback: an agent's desired
state and report answered before routing, alike to the routes' answers and errors; and two hub
processes on one database, where a desired state, a group change and a revocation made through one
(or by the CLI) reach the other's answers kept in memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from device_test_helpers import TOKEN, Proc, enroll, make_keys, package, start_hub, wait_for

from device_bridge.client import HubClient

pytestmark = pytest.mark.timeout(120)


def call(
    url: str,
    path: str,
    token: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        url + path, data=body, method=method, headers={"Authorization": f"Bearer {token}", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def version(body: bytes, model: str = "scorer"):
    return (json.loads(body)["models"].get(model) or {}).get("version")


def report(version_: int) -> bytes:
    return json.dumps(
        {
            "url": "http://d1.invalid",
            "status": {"scorer": {"active": version_}},
            "errors": {},
            "telemetry": [],
        }
    ).encode()


def test_the_poll_cycle_from_memory_answers_as_the_routes_do(tmp_path):
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path, ["--recheck-s", "0.2"])
    try:
        hc = HubClient(hub.url, TOKEN)
        d1 = enroll(hub.url, "d1", tmp_path / "d1")
        d2 = enroll(hub.url, "d2", tmp_path / "d2")
        hc.set_desired("scorer", package(kp, 1), devices=["d1"])
        first = call(hub.url, "/v1/agents/d1/desired", d1)
        time.sleep(0.5)  # the hub's first read of its change markers: from here on answers are kept
        answers = [
            call(hub.url, "/v1/agents/d1/desired", d1) for _ in range(3)
        ]  # the first fills, then memory
        operator = call(hub.url, "/v1/agents/d1/desired", TOKEN)  # through the route
        for status, headers, body in [first, *answers, operator]:
            assert status == 200 and version(body) == 1
            assert body == first[2] and headers["etag"] == first[1]["etag"]
            assert headers["content-type"] == "application/json" and headers["x-mlsql-max-wait"] == "60"
        etag = first[1]["etag"]
        # the ETag is the sha256 of the document (sorted keys), as before answers were kept
        doc = json.loads(first[2])
        assert etag == '"' + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32] + '"'
        status, headers, body = call(hub.url, "/v1/agents/d1/desired", d1, headers={"If-None-Match": etag})
        assert (status, body, headers["etag"], headers["x-mlsql-max-wait"]) == (304, b"", etag, "60")
        status, _, body = call(
            hub.url, "/v1/agents/d1/desired?wait=1", d1, headers={"If-None-Match": '"old"'}
        )
        assert status == 200 and version(body) == 1  # a wait with another ETag: at once
        # what the kept answer must not hide: another agent's credential, and the routes' 400s
        call(hub.url, "/v1/agents/d2/desired", d2)  # d2's credential kept too
        status, _, body = call(hub.url, "/v1/agents/d1/desired", d2)
        assert status == 403 and "only /v1/agents/d2/" in json.loads(body)["error"]
        for query in ("?wait=x", "?wait=-1", "?wait=61", "?wait=1&x=2"):
            status, _, body = call(
                hub.url, f"/v1/agents/d1/desired{query}", d1, headers={"If-None-Match": etag}
            )
            assert status == 400 and json.loads(body)["kind"] == "request", (query, body)
        assert call(hub.url, "/v1/agents/d1/desired", "mlsqlhub_wrong")[0] == 401

        # reports: the first through the route (it learns the agent is registered), then from memory
        for v in (1, 2):
            status, _, body = call(
                hub.url, "/v1/agents/d1/report", d1, "POST", report(v), {"Content-Type": "application/json"}
            )
            assert status == 200 and json.loads(body) == {"ok": True, "received": 0}
        for raw, message in (
            (b"{nope", "malformed JSON"),
            (b"[1]", "body must be a JSON object"),
            (json.dumps({"telemetry": "x"}).encode(), "telemetry must be a list"),
        ):
            status, _, body = call(
                hub.url, "/v1/agents/d1/report", d1, "POST", raw, {"Content-Type": "application/json"}
            )
            assert status == 400 and message in json.loads(body)["error"], body
        status, _, body = call(hub.url, "/v1/agents/d1/report", d2, "POST", report(9))
        assert status == 403
        assert hc.agent("d1")["status"] == {"scorer": {"active": 2}}  # the last good report, not d2's
        # a change through this hub: the next poll has it
        hc.set_desired("scorer", package(kp, 2), devices=["d1"])
        status, headers, body = call(hub.url, "/v1/agents/d1/desired", d1, headers={"If-None-Match": etag})
        assert status == 200 and version(body) == 2 and headers["etag"] != etag
    finally:
        hub.kill()


def test_a_change_a_new_group_and_a_revocation_through_one_hub_reach_the_others_kept_answers(tmp_path):
    """Hub B keeps d1's answer and credential; each change is made through hub A (or the CLI) and
    must reach B's answers: B reads the database's change markers every --recheck-s 0.2 s. Without
    that read, B would answer from memory forever (each step below would time out)."""
    kp = make_keys(tmp_path / "keys")
    a = start_hub(tmp_path, ["--recheck-s", "0.2"])
    b = Proc(
        ["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN, "--recheck-s", "0.2"],
        tmp_path / "ready-hubB.json",
    )  # a second process on the same SQLite database
    try:
        ha = HubClient(a.url, TOKEN)
        d1 = enroll(a.url, "d1", tmp_path / "d1")
        d2 = enroll(a.url, "d2", tmp_path / "d2")
        ha.set_desired("scorer", package(kp, 1), devices=["d1"])

        def poll_b(token: str = d1) -> tuple[int, bytes]:
            status, _, body = call(b.url, "/v1/agents/d1/desired", token)
            return status, body

        wait_for(lambda: version(poll_b()[1]) == 1, what="v1 at hub B")
        time.sleep(0.5)
        assert all(version(poll_b()[1]) == 1 for _ in range(3))  # kept at B

        # 1. a desired state through A. The bound is --recheck-s (0.2 s) plus one read; 10 s leaves a
        # loaded 2-core machine room to schedule the hub, it does not measure the bound
        t0 = time.monotonic()
        ha.set_desired("scorer", package(kp, 2), devices=["d1"])
        wait_for(lambda: version(poll_b()[1]) == 2, timeout=10, what="v2 at hub B")
        print(f"a change through A reached B's answers after {time.monotonic() - t0:.3f} s")

        # 2. a new group: d1 registers through A with a group whose rule names another model
        call(
            a.url,
            "/v1/agents/d2/register",
            d2,
            "POST",
            json.dumps({"url": "http://d2", "group": "g2"}).encode(),
        )
        ha.set_desired("other", package(kp, 1, name="other"), group="g2")
        wait_for(lambda: version(poll_b()[1]) == 2, what="B answers again")
        time.sleep(0.5)
        assert version(poll_b()[1], "other") is None  # d1 is in no group yet: kept so at B
        status, _, _ = call(
            a.url,
            "/v1/agents/d1/register",
            d1,
            "POST",
            json.dumps({"url": "http://d1", "group": "g2"}).encode(),
        )
        assert status == 200
        wait_for(lambda: version(poll_b()[1], "other") == 1, timeout=10, what="g2's model at hub B")

        # 3. a revocation by the CLI on the store, while both hubs run and keep d1's credential
        p = subprocess.run(
            [sys.executable, "-m", "device_bridge", "hub", "revoke", "d1", "--store", str(tmp_path / "hub")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        wait_for(lambda: poll_b()[0] == 401, timeout=10, what="d1 refused at hub B")
        wait_for(
            lambda: call(a.url, "/v1/agents/d1/desired", d1)[0] == 401, timeout=10, what="d1 refused at A"
        )
        assert poll_b(d2)[0] == 403  # d2 still known, still only its own paths
    finally:
        a.kill()
        b.kill()
