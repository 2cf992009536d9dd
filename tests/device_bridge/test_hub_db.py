"""The hub's state in a database: SQLite (default, STORE/hub.db) and a real PostgreSQL server that the
tests start themselves (pgserver: a self-contained PostgreSQL from PyPI). The same behaviour tests
run on both; the JSON store of the hubs before the database is imported with nothing lost.

``hub_store_json/`` was written by the hub before this change (commit b50fa22): agents alpha and
bravo registered, charlie enrolled then revoked, three packages, scorer v1 then v2 desired on alpha
(so v1 is its previous desired state), group canary, one reported event. ``agent_tokens.json`` holds
the credentials that hub gave out (test data only)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from device_test_helpers import (
    TOKEN,
    Proc,
    enroll,
    make_keys,
    package,
    start_agent,
    start_hub,
    stored,
    trust,
    wait_for,
)

from device_bridge.client import HubClient

pytestmark = pytest.mark.timeout(120)
OLD_STORE = Path(__file__).parent / "hub_store_json"


def hub_args(db_url) -> list[str]:
    return ["--db", db_url] if db_url else []


def call(url: str, method: str, path: str, token: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def hub_fails_to_start(tmp: Path, *args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "device_bridge", "hub", "--port", "0", "--token", TOKEN, *args],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr


def test_a_json_store_is_imported_on_first_start_with_nothing_lost(tmp_path, db_url):
    store = tmp_path / "hub"
    shutil.copytree(OLD_STORE, store)
    old = json.loads((store / "hub_state.json").read_text())
    old_bytes = (store / "hub_state.json").read_bytes()
    old_creds = (store / "credentials.json").read_bytes()
    tokens = json.loads((store / "agent_tokens.json").read_text())
    hub = start_hub(tmp_path, hub_args(db_url))
    try:
        hc = HubClient(hub.url, TOKEN)
        agents = {a["name"]: a for a in hc.agents()}
        assert set(agents) == set(old["agents"]) == {"alpha", "bravo"}
        for name, info in old["agents"].items():
            for field in ("url", "group", "providers", "registered_at"):
                assert agents[name][field] == info[field], (name, field)
            assert agents[name]["desired"] == old["desired"][name]
        assert agents["alpha"]["desired"]["scorer"]["version"] == 2
        assert {b["sha256"]: b for b in hc.http.request("GET", "/v1/blobs")["blobs"]} == old["blobs"]
        # the group the operator listed still decides: alpha is in canary, so a deploy to it reaches alpha only
        hc.set_desired("ranker", sha256=next(s for s, b in old["blobs"].items() if b["name"] == "ranker"),
                       group="canary")
        assert set(hc.agent("alpha")["desired"]) == {"scorer", "ranker"}
        # the previous desired state came along: restoring gives alpha v1 back
        hc.set_desired("scorer", devices=["alpha"], restore_previous=True)
        assert hc.agent("alpha")["desired"]["scorer"] == old["previous"]["alpha"]["scorer"]
        # credentials: the hashes came along (the tokens given out still work), the revocation too
        assert call(hub.url, "GET", "/v1/agents/alpha/desired", tokens["alpha"])[0] == 200
        assert call(hub.url, "GET", "/v1/agents/bravo/desired", tokens["bravo"])[0] == 200
        assert call(hub.url, "GET", "/v1/agents/charlie/desired", tokens["charlie"])[0] == 401
        assert [hc.agent(n)["credential"] for n in ("alpha", "bravo")] == ["enrolled", "enrolled"]
        # an agent downloads a package of its desired state, from the blob files that stayed where they were
        sha = old["desired"]["bravo"]["ranker"]["sha256"]
        status, data = call(hub.url, "GET", f"/v1/blobs/{sha}", tokens["bravo"])
        assert status == 200 and hashlib.sha256(data).hexdigest() == sha
    finally:
        hub.kill()
    # the old files are kept, byte for byte, as backups that no hub reads again
    assert not (store / "hub_state.json").exists() and not (store / "credentials.json").exists()
    assert (store / "hub_state.json.bak").read_bytes() == old_bytes
    assert (store / "credentials.json.bak").read_bytes() == old_creds
    hub = start_hub(tmp_path, hub_args(db_url))  # a second start imports nothing again and loses nothing
    try:
        assert HubClient(hub.url, TOKEN).agent("alpha")["desired"]["ranker"]["version"] == 1
    finally:
        hub.kill()


def test_the_state_survives_a_kill_9_of_the_hub(tmp_path, db_url):
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path, hub_args(db_url))
    hc = HubClient(hub.url, TOKEN)
    tok = hc.enroll("d1")
    tok2 = hc.enroll("d2")
    hc.revoke("d2")
    assert call(hub.url, "POST", "/v1/agents/d1/register", tok, {"url": "http://d1:7070", "group": "field"})[0] == 200
    v1, v2 = hc.upload(package(kp, 1))["sha256"], hc.upload(package(kp, 2))["sha256"]
    hc.set_desired("scorer", sha256=v1, group="field")
    hc.set_desired("scorer", sha256=v2, devices=["d1"])
    hc.set_group("canary", ["d1", "d9"])
    report = {"url": "http://d1:7070", "status": {"scorer": {"active": 2}},
              "telemetry": [{"t": 1, "events": [{"seq": 3, "kind": "installed", "model": "scorer"}]}]}
    assert call(hub.url, "POST", "/v1/agents/d1/report", tok, report)[0] == 200
    before = {"agent": hc.agent("d1"), "blobs": hc.http.request("GET", "/v1/blobs")["blobs"], "events": hc.events()}
    # reports are written behind (at most --report-flush-ms later): wait until the database has this one
    wait_for(lambda: stored(tmp_path / "hub", db_url, "SELECT 1 FROM reports WHERE agent = 'd1'"), what="report flushed")
    hub.kill()  # SIGKILL: no shutdown code runs
    if db_url is None:  # the database and its write-ahead log hold credential hashes: owner only
        db_files = sorted((tmp_path / "hub").glob("hub.db*"))
        assert len(db_files) == 3 and {stat.S_IMODE(f.stat().st_mode) for f in db_files} == {0o600}

    hub = start_hub(tmp_path, hub_args(db_url))
    try:
        hc = HubClient(hub.url, TOKEN)
        after = hc.agent("d1")
        for field in ("url", "group", "desired", "status", "last_seen", "telemetry", "registered_at", "credential"):
            assert after[field] == before["agent"][field], field
        assert after["desired"]["scorer"]["sha256"] == v2 and after["status"] == {"scorer": {"active": 2}}
        assert hc.http.request("GET", "/v1/blobs")["blobs"] == before["blobs"] and len(before["blobs"]) == 2
        assert [e["seq"] for e in hc.events()] == [3] and hc.events() == before["events"]
        assert call(hub.url, "GET", "/v1/agents/d1/desired", tok)[0] == 200  # the credential still opens
        assert call(hub.url, "GET", "/v1/agents/d2/desired", tok2)[0] == 401  # the revocation still holds
        # an event the hub already has is not counted twice after the restart
        assert call(hub.url, "POST", "/v1/agents/d1/report", tok, report)[0] == 200
        assert [e["seq"] for e in hc.events()] == [3]
        # the operator's group survived: a deploy to it reaches d1, and names d9 (not yet seen)
        assert hc.set_desired("scorer", sha256=v1, group="canary")["devices"] == ["d1", "d9"]
        hc.set_desired("scorer", devices=["d1"], restore_previous=True)
        assert hc.agent("d1")["desired"]["scorer"]["sha256"] == v2  # the previous desired state, after a restart
    finally:
        hub.kill()


def test_a_damaged_json_store_stops_the_hub_and_nothing_is_half_imported(tmp_path):
    store = tmp_path / "hub"
    shutil.copytree(OLD_STORE, store)
    good = (store / "hub_state.json").read_text()
    state = json.loads(good)
    state["previous"]["alpha"] = ["not", "a", "map"]  # after agents, groups and desired in import order
    (store / "hub_state.json").write_text(json.dumps(state))
    rc, err = hub_fails_to_start(tmp_path, "--store", str(store))
    assert rc == 2 and "hub_state.json" in err and "Traceback" not in err, err
    with sqlite3.connect(store / "hub.db") as con:  # the import's transaction rolled back whole
        tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "agents" not in tables and con.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (0,)
    assert json.loads((store / "hub_state.json").read_text()) == state  # nothing renamed or touched
    (store / "hub_state.json").write_text(good)  # repaired: the next start imports it
    hub = start_hub(tmp_path, ["--store", str(store)], name="hub2")
    try:
        assert {a["name"] for a in HubClient(hub.url, TOKEN).agents()} == {"alpha", "bravo"}
    finally:
        hub.kill()


def test_a_database_written_by_a_newer_hub_is_refused(tmp_path):
    store = tmp_path / "hub"
    hub = start_hub(tmp_path)
    hub.kill()
    with sqlite3.connect(store / "hub.db") as con:
        con.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    rc, err = hub_fails_to_start(tmp_path, "--store", str(store))
    assert rc == 2 and "schema version 99, newer than this hub's 1" in err, err


def test_an_unknown_or_unreachable_database_is_a_clear_error(tmp_path):
    rc, err = hub_fails_to_start(tmp_path, "--store", str(tmp_path / "h"), "--db", "mysql://x/y")
    assert rc == 2 and "--db must be sqlite:///PATH or postgresql://" in err, err
    rc, err = hub_fails_to_start(tmp_path, "--store", str(tmp_path / "h"), "--db",
                                 f"postgresql://u:secret@/db?host={tmp_path}/nowhere")
    assert rc == 2 and "cannot reach the hub's database" in err and "secret" not in err, err


def test_a_password_given_as_a_query_parameter_is_masked_too(tmp_path):
    """libpq takes the password as ``?password=...`` as well as ``user:pw@``: the hub's error on
    stderr names the database with that masked, and a driver message that quotes it is scrubbed."""
    rc, err = hub_fails_to_start(tmp_path, "--store", str(tmp_path / "h"), "--db",
                                 f"postgresql://u@/db?host={tmp_path}/nowhere&password=Sw0rdfish&sslmode=disable")
    assert rc == 2 and "cannot reach the hub's database" in err, err
    assert "Sw0rdfish" not in err and "password=***" in err and "sslmode=disable" in err, err
    from device_bridge.hub.db import Database, HubError

    with pytest.raises(HubError) as exc:
        Database(tmp_path / "h2", "postgresql://u:Tr0ub4dor@/db?host=/nowhere&password=Sw0rdfish")
    assert "Tr0ub4dor" not in exc.value.message and "Sw0rdfish" not in exc.value.message, exc.value.message
    assert "u:***@" in exc.value.message and "password=***" in exc.value.message, exc.value.message
    rc, err = hub_fails_to_start(tmp_path, "--store", str(tmp_path / "h"), "--db", "mysql://h/db?password=Sw0rdfish")
    assert rc == 2 and "--db must be" in err and "Sw0rdfish" not in err and "password=***" in err, err


class RoundRobin:
    """A TCP balancer on loopback for the replica test: each new connection goes to a hub picked at
    random (seeded: an agent's poll cycle is two connections, so strict turns would send every poll
    to the same hub), and to the other when that one refuses (a dead replica). It records, per connection,
    which hub took it and the request line the agent sent. Any HTTP load balancer does the same job
    in front of real replicas (docs/DEVICE.md)."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.rng = random.Random(0)
        self.served: list[tuple[int, str]] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()),
                                                       self.loop.run_forever()), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _conn(self, reader, writer):
        first = await reader.read(65536)
        start = self.rng.randrange(len(self.ports))
        for i in range(len(self.ports)):
            port = self.ports[(start + i) % len(self.ports)]
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.served.append((port, first.split(b"\r\n", 1)[0].decode("latin-1")))
            up_w.write(first)

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except OSError:
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
            return
        writer.close()

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_two_replicas_on_one_postgresql_serve_one_agent_and_it_carries_on_when_one_dies(tmp_path, postgres):
    url, kp = postgres(), make_keys(tmp_path / "keys")
    store = tmp_path / "hub"  # one blob folder for both replicas (a shared disk, or a CDN in front)
    a = start_hub(tmp_path, ["--db", url])
    b = Proc(["hub", "--port", "0", "--store", str(store), "--token", TOKEN, "--db", url], tmp_path / "ready-hubB.json")
    lb = RoundRobin([a.info["port"], b.info["port"]])
    agent = None
    try:
        ha, hb = HubClient(a.url, TOKEN), HubClient(b.url, TOKEN)
        enroll(a.url, "d1", tmp_path / "d1")  # the credential is made through A and opens B too
        trust(tmp_path / "d1", kp)
        agent = start_agent(tmp_path, "d1", tmp_path / "d1", ["--hub", lb.url, "--hub-interval", "0.1"])

        def active(hub: HubClient) -> int | None:
            return ((hub.agent("d1").get("status") or {}).get("scorer") or {}).get("active")

        def polled() -> set[int]:
            return {port for port, line in lb.served if line.startswith("GET /v1/agents/d1/desired")}

        wait_for(lambda: polled() == {a.info["port"], b.info["port"]}, what="the agent polling both replicas")
        ha.set_desired("scorer", package(kp, 1), devices=["d1"])  # upload and desired state through A
        token = (tmp_path / "d1" / "hub_token").read_text().strip()
        # the agent's own poll, at B: B keeps its answers in memory and drops them when the database's
        # desired_gen changes, within --recheck-s (1 s); 10 s leaves a loaded machine room to schedule B
        # (docs/DEVICE.md, "The poll cycle from memory")
        wait_for(lambda: (json.loads(call(b.url, "GET", "/v1/agents/d1/desired", token)[1])["models"].get("scorer")
                          or {}).get("version") == 1, timeout=10, what="v1 in B's answer")
        wait_for(lambda: active(hb) == 1, what="v1 active, as replica B sees it")
        a.kill()  # SIGKILL, in the middle of the agent's polling
        # counted after the kill, once a connection the balancer handed to A just before it has been
        # logged (the log is written after the balancer connects upstream): from here on, only B
        time.sleep(0.3)
        served = len(lb.served)
        hb.set_desired("scorer", package(kp, 2), devices=["d1"])  # the rollout goes on through B
        wait_for(lambda: active(hb) == 2, what="v2 active through B alone")
        after = lb.served[served:]
        assert after and {port for port, _ in after} == {b.info["port"]}
        assert hb.agent("d1")["desired"]["scorer"]["version"] == 2 and hb.agent("d1")["age_s"] < 5
        hb.set_desired("scorer", devices=["d1"], restore_previous=True)  # the previous state, written via A
        wait_for(lambda: active(hb) == 1, what="back to v1 through B")
    finally:
        lb.close()
        for p in (agent, a, b):
            if p is not None:
                p.kill()


def test_a_lost_postgresql_connection_costs_one_answer_not_the_hub(tmp_path, postgres):
    import psycopg

    url = postgres()
    hub = start_hub(tmp_path, ["--db", url])
    try:
        hc = HubClient(hub.url, TOKEN)
        hc.set_group("field", ["d1", "d2"])
        assert call(hub.url, "GET", "/v1/agents", TOKEN)[0] == 200
        with psycopg.connect(url, autocommit=True) as con:  # as a database restart or a failover would
            killed = con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        assert killed and all(ok for (ok,) in killed)
        answers = [call(hub.url, "GET", "/v1/agents", TOKEN) for _ in range(3)]
        for status, body in answers:  # a stale connection answers 503 'store' once, then is opened again
            assert status == 200 or (status == 503 and json.loads(body)["kind"] == "store"), (status, body)
        assert answers[-1][0] == 200 and hub.alive()
        assert hc.set_desired("scorer", absent=True, group="field")["devices"] == ["d1", "d2"]
    finally:
        hub.kill()


def test_the_cli_revokes_on_a_running_hub_within_its_recheck(tmp_path, db_url):
    """`hub revoke` is another process writing the hub's database: the running hub follows it within
    --recheck-s (it keeps checked credentials in memory and drops them when creds_gen changes), after
    the hub has opened connections in several threads (an upload runs in a worker)."""
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path, hub_args(db_url))
    try:
        hc = HubClient(hub.url, TOKEN)
        hc.upload(package(kp, 1))  # in a worker thread, with its own connection

        def cli(action: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "device_bridge", "hub", action, "d1", "--store",
                                   str(tmp_path / "hub"), *hub_args(db_url)], capture_output=True, text=True,
                                  timeout=60)

        tok = cli("enroll").stdout.strip()
        for _ in range(3):
            assert call(hub.url, "POST", "/v1/agents/d1/register", tok, {"url": "http://d1:7070"})[0] == 200
            assert call(hub.url, "GET", "/v1/agents/d1/desired", tok)[0] == 200
        out = cli("revoke")
        assert out.returncode == 0 and json.loads(out.stdout) == {"agent": "d1", "revoked": True}, out.stderr
        # within --recheck-s (1 s) of the CLI's commit; 10 s leaves a loaded machine room to schedule it
        wait_for(lambda: call(hub.url, "GET", "/v1/agents/d1/desired", tok)[0] == 401, timeout=10,
                 what="the revoked credential refused")
        assert hc.agent("d1")["credential"] == "revoked"
    finally:
        hub.kill()
