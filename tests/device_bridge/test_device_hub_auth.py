"""One credential per agent at the hub: the shared-token finding's attacks, replayed.

Before, every agent held the one hub token, so agent A could read and set B's desired state,
re-register B elsewhere, mark B absent, report and inject events as B, and make a rollout gate
pass for B while B was offline. Now each agent has its own credential (enrolled by the
operator, stored hashed, revocable) that opens only its own ``/v1/agents/{name}/...``; the
operator's token does the rest. Real hub and agent processes on loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from device_test_helpers import (
    TOKEN,
    Proc,
    enroll,
    make_keys,
    package,
    start_agent,
    start_hub,
    trust,
    wait_for,
)

from device_bridge.client import DeviceClient, HubClient
from device_bridge.errors import DeviceAuthError, DeviceForbiddenError
from device_bridge.rollout import rollout

pytestmark = pytest.mark.timeout(120)


def _call(url: str, method: str, path: str, token: str | None, body: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _db_rows(fleet, query: str) -> list[tuple]:
    if not fleet["db_args"]:
        with sqlite3.connect(fleet["tmp"] / "hub" / "hub.db") as con:
            return con.execute(query).fetchall()
    import psycopg

    with psycopg.connect(fleet["db_args"][1]) as con:
        return con.execute(query).fetchall()


def _forbidden(answer) -> bool:
    status, body = answer
    return status == 403 and body["kind"] == "forbidden"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(tmp_path_factory, request):
    """A hub, and agents alpha and bravo, each with its own credential and v1 of 'scorer' active; the
    hub's state in SQLite (the default) or in a real PostgreSQL (conftest.py): every test runs on both."""
    tmp = tmp_path_factory.mktemp("hubauth")
    kp = make_keys(tmp / "keys")
    db_args = [] if request.param == "sqlite" else ["--db", request.getfixturevalue("postgres")()]
    hub = start_hub(tmp, db_args)
    hc = HubClient(hub.url, TOKEN)
    agents, tokens = {}, {}
    for name in ("alpha", "bravo"):
        store = tmp / f"store-{name}"
        trust(store, kp)
        tokens[name] = enroll(hub.url, name, store)  # STORE/hub_token: where the agent looks by default
        agents[name] = start_agent(tmp, name, store, ["--hub", hub.url, "--hub-interval", "0.2"])
    sha = hc.upload(package(kp, 1))["sha256"]
    hc.set_desired("scorer", sha256=sha, devices=["alpha", "bravo"])
    wait_for(lambda: all(((hc.agent(n).get("status") or {}).get("scorer") or {}).get("active") == 1
                         for n in agents), what="v1 active on alpha and bravo")
    yield {"hub": hub, "hc": hc, "agents": agents, "tokens": tokens, "kp": kp, "tmp": tmp, "sha": sha,
           "db_args": db_args}
    for p in [*agents.values(), hub]:
        p.kill()


def test_the_agent_credential_is_its_own_and_not_the_device_token(fleet):
    a, b = fleet["tokens"]["alpha"], fleet["tokens"]["bravo"]
    assert a != b and TOKEN not in (a, b) and len(a) > 40
    creds = dict(_db_rows(fleet, "SELECT name, sha256 FROM credentials"))  # the hub's database, read directly
    assert set(creds) == {"alpha", "bravo"} and creds["alpha"] == hashlib.sha256(a.encode()).hexdigest()
    assert a not in json.dumps(creds)  # kept hashed
    assert stat.S_IMODE(os.stat(fleet["tmp"] / "store-alpha" / "hub_token").st_mode) == 0o600
    # an agent's own calls work with it; the device token opens nothing at the hub
    url = fleet["hub"].url
    assert _call(url, "GET", "/v1/agents/alpha/desired", a)[0] == 200
    assert _call(url, "GET", "/v1/agents/alpha/desired", "test-token-wrong")[0] == 401
    assert fleet["hc"].agent("alpha")["credential"] == "enrolled"


def test_an_agent_cannot_read_another_agents_desired_state(fleet):
    url, a = fleet["hub"].url, fleet["tokens"]["alpha"]
    assert _call(url, "GET", "/v1/agents/alpha/desired", a)[1]["models"]["scorer"]["version"] == 1
    assert _forbidden(_call(url, "GET", "/v1/agents/bravo/desired", a))
    assert _forbidden(_call(url, "GET", "/v1/agents/bravo", a))
    assert _forbidden(_call(url, "GET", "/v1/agents", a))  # the fleet view is the operator's
    assert _forbidden(_call(url, "GET", "/v1/events", a))
    assert _forbidden(_call(url, "GET", "/v1/blobs", a))
    with pytest.raises(DeviceForbiddenError):
        HubClient(url, a).agents()


def test_an_agent_cannot_write_desired_state_nor_mark_another_absent(fleet):
    url, a, hc = fleet["hub"].url, fleet["tokens"]["alpha"], fleet["hc"]
    for body in ({"model": "scorer", "absent": True, "devices": ["bravo"]},
                 {"model": "scorer", "sha256": fleet["sha"], "devices": ["bravo"]},
                 {"model": "scorer", "restore_previous": True, "devices": ["bravo"]},
                 {"model": "scorer", "absent": True, "devices": ["alpha"]}):  # not even its own
        assert _forbidden(_call(url, "POST", "/v1/desired", a, body)), body
    assert _forbidden(_call(url, "POST", "/v1/groups/field", a, {"devices": ["alpha"]}))
    assert _forbidden(_call(url, "POST", "/v1/blobs", a, {}))
    assert hc.agent("bravo")["desired"]["scorer"]["version"] == 1
    # and bravo keeps its model (it would delete it if it had been marked absent)
    bravo = DeviceClient(fleet["agents"]["bravo"].url, TOKEN)
    assert bravo.info()["models"]["scorer"]["active"] == 1


def test_an_agent_cannot_re_register_another(fleet):
    url, a, hc = fleet["hub"].url, fleet["tokens"]["alpha"], fleet["hc"]
    before = hc.agent("bravo")["url"]
    assert _forbidden(_call(url, "POST", "/v1/agents/bravo/register", a,
                            {"url": "http://evil.example:1", "group": "field"}))
    assert hc.agent("bravo")["url"] == before == fleet["agents"]["bravo"].url
    # nor may the operator token pose as an agent: registering and reporting are the agent's own calls
    assert _forbidden(_call(url, "POST", "/v1/agents/bravo/register", TOKEN, {"url": "http://evil.example:1"}))


def test_an_agent_cannot_report_or_inject_events_as_another(fleet):
    url, a, hc = fleet["hub"].url, fleet["tokens"]["alpha"], fleet["hc"]
    forged_event = {"seq": 10**12, "type": "circuit_breaker", "agent": "bravo", "model": "scorer", "version": 1}
    forged = {"url": "http://evil.example:1", "name": "bravo", "agent": "bravo",
              "status": {"scorer": {"active": 7}}, "errors": {},
              "telemetry": [{"agent": "bravo", "models": [], "events": [forged_event]}]}
    assert _forbidden(_call(url, "POST", "/v1/agents/bravo/report", a, forged))
    assert (hc.agent("bravo")["status"] or {})["scorer"]["active"] == 1
    # on its own path, whatever the body says, the report and its events are alpha's
    status, _ = _call(url, "POST", "/v1/agents/alpha/report", a, forged)
    assert status == 200
    evs = [e for e in hc.events() if e.get("seq") == 10**12]
    assert evs and all(e["agent"] == "alpha" for e in evs)
    assert not [e for e in hc.events() if e.get("agent") == "bravo" and e.get("type") == "circuit_breaker"]
    assert (hc.agent("bravo")["status"] or {})["scorer"]["active"] == 1


def test_an_agent_downloads_only_the_packages_it_is_meant_to_run(fleet):
    url, a, hc, kp = fleet["hub"].url, fleet["tokens"]["alpha"], fleet["hc"], fleet["kp"]
    other = hc.upload(package(kp, 1, name="secret_model"))["sha256"]
    hc.set_desired("secret_model", sha256=other, devices=["bravo"])
    assert _forbidden(_call(url, "GET", f"/v1/blobs/{other}", a))
    req = urllib.request.Request(f"{url}/v1/blobs/{fleet['sha']}", headers={"Authorization": f"Bearer {a}"})
    with urllib.request.urlopen(req, timeout=10) as r:  # its own desired package: fine
        assert r.status == 200 and r.read()[:2] == b"PK"


def test_a_rollout_gate_cannot_pass_for_an_offline_device(fleet):
    """charlie runs v1, reports, goes offline. A rollout of the same package to charlie must not pass on
    charlie's old reports, and alpha cannot forge fresh ones (the required_provider gate included)."""
    hub, hc, kp, tmp, a = fleet["hub"], fleet["hc"], fleet["kp"], fleet["tmp"], fleet["tokens"]["alpha"]
    store = tmp / "store-charlie"
    trust(store, kp)
    enroll(hub.url, "charlie", store)
    charlie = start_agent(tmp, "charlie", store, ["--hub", hub.url, "--hub-interval", "0.2"])
    try:
        hc.set_desired("scorer", sha256=fleet["sha"], devices=["charlie"])
        wait_for(lambda: ((hc.agent("charlie").get("status") or {}).get("scorer") or {}).get("active") == 1,
                 what="v1 active on charlie")
    finally:
        charlie.kill()
    forged = {"url": hc.agent("charlie")["url"], "status": {"scorer": {"active": 1, "versions": [1]}},
              "errors": {}, "telemetry": [{"models": [{"model": "scorer", "version": 1, "requests": 500,
                                                        "error_count": 0, "providers": ["CPUExecutionProvider"],
                                                        "node_providers": {"CPUExecutionProvider": 3}}]}]}
    stop = threading.Event()

    def forge():
        while not stop.is_set():
            assert _forbidden(_call(hub.url, "POST", "/v1/agents/charlie/report", a, forged))
            stop.wait(0.1)
    t = threading.Thread(target=forge)
    t.start()
    try:
        rep = rollout(hc, "scorer", package(kp, 1), ["charlie"], required_provider="cpu", min_requests=0,
                      activation_timeout=2, telemetry_timeout=2, poll=0.1)
    finally:
        stop.set()
        t.join()
    assert rep.status == "stopped", rep.to_dict()
    assert any("not active within" in f and "charlie" in f for f in rep.waves[0].failures), rep.waves[0].failures


def test_a_revoked_credential_is_refused(fleet):
    hub, hc, kp, tmp = fleet["hub"], fleet["hc"], fleet["kp"], fleet["tmp"]
    store = tmp / "store-delta"
    trust(store, kp)
    token_file = tmp / "delta.token"
    # the operator's offline path: the CLI writes the hub's store, the running hub reads it again
    out = subprocess.run([sys.executable, "-m", "device_bridge", "hub", "enroll", "delta", "--store",
                          str(tmp / "hub"), *fleet["db_args"], "--out", str(token_file)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    delta = start_agent(tmp, "delta", store, ["--hub", hub.url, "--hub-interval", "0.2",
                                              "--hub-token-file", str(token_file)])
    try:
        wait_for(lambda: hc.agent("delta")["last_seen"], what="delta reports")
        assert _call(hub.url, "GET", "/v1/agents/delta/desired", token)[0] == 200
        out = subprocess.run([sys.executable, "-m", "device_bridge", "hub", "revoke", "delta", "--store",
                              str(tmp / "hub"), *fleet["db_args"]], capture_output=True, text=True)
        assert out.returncode == 0 and json.loads(out.stdout)["revoked"] is True, out
        # the running hub keeps checked credentials in memory and drops them when the database's
        # creds_gen changes: within --recheck-s (1 s) of the CLI's commit; 10 s leaves a loaded machine
        # room to schedule it (docs/DEVICE.md, "The poll cycle from memory")
        wait_for(lambda: _call(hub.url, "GET", "/v1/agents/delta/desired", token)[0] == 401, timeout=10,
                 what="the revoked credential refused")
        status, body = _call(hub.url, "GET", "/v1/agents/delta/desired", token)
        assert status == 401 and body["kind"] == "auth"
        assert hc.agent("delta")["credential"] == "revoked"
        d = DeviceClient(delta.url, TOKEN)  # the agent says why its hub sync fails
        wait_for(lambda: "401" in (d.info()["background"]["hubsync"].get("last_error") or ""),
                 what="the agent reports the refusal")
        # enrolled again into the same file: the running agent picks the new credential up
        t_again = time.time()
        out = subprocess.run([sys.executable, "-m", "device_bridge", "hub", "enroll", "delta", "--store",
                              str(tmp / "hub"), *fleet["db_args"], "--out", str(token_file)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: (d.info()["background"]["hubsync"]["last_ok"] or 0) > t_again + 0.3,
                 what="delta reports again")
        assert hc.agent("delta")["age_s"] < 2
        # through the API too: a fresh enrollment works, a revocation ends it
        again = hc.enroll("delta")
        assert again != token and _call(hub.url, "GET", "/v1/agents/delta/desired", again)[0] == 200
        assert hc.revoke("delta") is True
        assert _call(hub.url, "GET", "/v1/agents/delta/desired", again)[0] == 401
        with pytest.raises(DeviceAuthError):
            HubClient(hub.url, token).agent("delta")
        # an agent cannot enroll or revoke anyone
        a = fleet["tokens"]["alpha"]
        assert _forbidden(_call(hub.url, "POST", "/v1/agents/alpha/enroll", a, {}))
        assert _forbidden(_call(hub.url, "DELETE", "/v1/agents/bravo/credential", a))
        assert _call(hub.url, "POST", "/v1/agents/zulu/enroll", None, {})[0] == 401  # enrollment is closed
    finally:
        delta.kill()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def _any(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "no", "kind": "auth"}')

    do_GET = do_POST = _any  # noqa: N815 - http.server's names

    def log_message(self, *args):
        pass


def test_the_device_token_never_goes_to_the_hub(tmp_path, fleet):
    """Before, --hub-token defaulted to the device token: any hub (or whoever ran one) got it."""
    rec = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=rec.serve_forever, daemon=True).start()
    store = tmp_path / "s"
    trust(store, fleet["kp"])
    a = start_agent(tmp_path, "echo", store, ["--hub", f"http://127.0.0.1:{rec.server_address[1]}",
                                              "--hub-interval", "0.1"])
    try:
        wait_for(lambda: len(_Recorder.seen) >= 3, what="the agent tries the hub")
        assert all(TOKEN not in (h or "") for _, _, h in _Recorder.seen), _Recorder.seen
        assert {p for _, p, _ in _Recorder.seen} == {"/v1/agents/echo/enroll"}  # asks to enroll, nothing else
        err = DeviceClient(a.url, TOKEN).info()["background"]["hubsync"]["last_error"]
        assert "not enrolled" in err
    finally:
        a.kill()
        rec.shutdown()
    # the CLI refuses a hub credential equal to the device token
    out = subprocess.run([sys.executable, "-m", "device_bridge", "serve", "--name", "x", "--port", "0",
                          "--store", str(tmp_path / "x"), "--token", TOKEN, "--hub", "http://127.0.0.1:9",
                          "--hub-token", TOKEN], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must not be the device token" in out.stderr


def test_open_enrollment_for_development(tmp_path, fleet):
    """A hub with --enroll-open: agents enroll themselves, first come first served, never over a name
    that has or had a credential."""
    hub = start_hub(tmp_path, ["--enroll-open"], name="openhub")
    try:
        store = tmp_path / "s"
        trust(store, fleet["kp"])
        a = Proc(["serve", "--name", "fox", "--port", "0", "--store", str(store), "--token", TOKEN,
                  "--hub", hub.url, "--hub-interval", "0.2"], tmp_path / "ready-fox.json")
        try:
            hc = HubClient(hub.url, TOKEN)
            wait_for(lambda: hc.agent("fox")["last_seen"], what="fox enrolled itself and reports")
            token = (store / "hub_token").read_text().strip()
            assert token != TOKEN and stat.S_IMODE(os.stat(store / "hub_token").st_mode) == 0o600
            status, body = _call(hub.url, "POST", "/v1/agents/fox/enroll", None, {})  # a second taker
            assert status == 409 and body["kind"] == "conflict"
            assert hc.revoke("fox")
            assert _call(hub.url, "POST", "/v1/agents/fox/enroll", None, {})[0] == 409  # revoked stays revoked
        finally:
            a.kill()
    finally:
        hub.kill()


def test_each_client_has_only_the_routes_its_server_serves(fleet):
    """DeviceClient talks to an agent, HubClient to a hub: enroll is the hub's route, which an agent
    does not serve (DeviceClient.enroll used to get a 404 from it), so only HubClient has it."""
    agent = fleet["agents"]["alpha"]
    assert _call(agent.url, "GET", "/v1/info", TOKEN)[0] == 200
    assert _call(agent.url, "POST", "/v1/agents/zulu/enroll", TOKEN, {})[0] == 404
    status, body = _call(fleet["hub"].url, "POST", "/v1/agents/zulu/enroll", TOKEN, {})
    assert status == 200 and body["token"]
    assert not hasattr(DeviceClient, "enroll") and not hasattr(DeviceClient, "revoke")
    assert callable(HubClient.enroll) and callable(HubClient.revoke)
