"""Device data comes back: sampling on the device, request ids, late outcomes, upload to the hub.

Real agent and hub processes on loopback. Every count is checked against what the test itself
sent (request ids from the answers, input values it chose), never against the agent's own report.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest
from device_test_helpers import (
    TOKEN,
    Proc,
    enroll,
    make_keys,
    package,
    start_agent,
    trust,
    wait_for,
)
from onnx import TensorProto, helper

from device_bridge.agent.sampling import CHUNK_BYTES
from device_bridge.client import DeviceClient, HubClient
from device_bridge.errors import DeviceRequestError
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(240)

EMAIL = "zz-secret-email-{}@example.org"   # markers searched for, byte for byte, in every stored file
USER = "zz-user-{}-7f3a"
HOOKS = {"MLSQL_DEVICE_TEST_HOOKS": "1"}


def privacy_model() -> bytes:
    """y = 2x (+ 0 from each string column, so that the graph uses them); inputs x float [N,1],
    email and user_id string [N,1]."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["x2"])]
    for col in ("email", "user_id"):
        nodes.append(helper.make_node("LabelEncoder", [col], [f"{col}_z"], domain="ai.onnx.ml",
                                      keys_strings=["-"], values_floats=[0.0], default_float=0.0))
    nodes += [helper.make_node("Add", ["x2", "email_z"], ["s1"]), helper.make_node("Add", ["s1", "user_id_z"], ["y"])]
    graph = helper.make_graph(
        nodes, "privacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1]),
         helper.make_tensor_value_info("email", TensorProto.STRING, [None, 1]),
         helper.make_tensor_value_info("user_id", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, token: str | None, body: bytes, ctype: str = "application/json"):
    req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": ctype})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def files_holding(folder: Path, needle: bytes) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``needle`` (SQLite's WAL and free pages too)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def data_files(hub_store: Path) -> list[str]:
    return sorted(str(p.relative_to(hub_store)) for p in (hub_store / "data").rglob("*.parquet"))


def samples_state(c: DeviceClient, model: str) -> dict:
    return c.info()["models"][model]["samples"]


def settled(c: DeviceClient, model: str) -> bool:
    s = samples_state(c, model)
    return s["queued_rows"] == 0 and s["pending_upload_rows"] == 0


# ---------------------------------------------------------------------- direct device (no hub)


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devdata")
    kp = make_keys(tmp / "keys")
    store = tmp / "store-solo"
    trust(store, kp)
    agent = start_agent(tmp, "solo", store)
    yield {"agent": agent, "kp": kp, "store": store, "c": DeviceClient(agent.url, TOKEN), "tmp": tmp}
    agent.kill()


def test_nothing_is_sampled_unless_a_deploy_asks(device):
    c, kp = device["c"], device["kp"]
    c.install(package(kp, 1, name="quiet"))
    ans = c.predict("quiet", columns={"x": [1.0, 2.0], "city": ["paris", "rome"]})
    # every answer carries one request id per row, sampled or not
    assert len(ans["request_ids"]) == 2 and len(set(ans["request_ids"])) == 2
    prefix = ans["request_ids"][0].rsplit("-", 1)[0]
    assert ans["request_ids"] == [f"{prefix}-0", f"{prefix}-1"] and len(prefix) == 32
    info = c.info()["models"]["quiet"]
    assert info["deploy"]["sample_rate"] == 0.0
    assert info["samples"]["rows"] == 0 and info["samples"]["queued_rows"] == 0
    assert not (device["store"] / "samples.db").exists()  # no store at all
    # an outcome for a request that was not sampled is unknown: counted, not kept
    assert c.outcomes("quiet", [{"request_id": ans["request_ids"][0], "label": 1}]) == {"recorded": 0, "unknown": 1}
    table, cursor = c.samples("quiet", "outcomes")
    assert table.num_rows == 0 and cursor == 0


def test_sampling_names_must_be_inputs(device):
    """A name in sample_exclude / sample_hash that the model does not read is refused by the agent
    itself (a direct API caller's typo would otherwise store the column it meant): 400 naming it and
    the model's inputs, nothing installed."""
    c, kp = device["c"], device["kp"]
    for field in ("sample_exclude", "sample_hash"):
        with pytest.raises(DeviceRequestError, match=f"deploy setting {field} names 'ctiy', which is not an input "
                                                     r"of the model \(its inputs: x, city\)") as e:
            c.install(package(kp, 1, name="typo"), deploy={"sample_rate": 1.0, field: ["ctiy"],
                                                          "sample_salt": "s"})
        assert e.value.status == 400
    assert "typo" not in c.info()["models"]
    c.install(package(kp, 1, name="typo"), deploy={"sample_rate": 1.0, "sample_exclude": ["city"]})
    assert c.info()["models"]["typo"]["deploy"]["sample_exclude"] == ["city"]


def test_direct_device_serves_its_samples_by_cursor_exactly_once(device):
    c, kp = device["c"], device["kp"]
    c.install(package(kp, 1, name="solo"), deploy={"sample_rate": 1.0})
    sent: dict[str, float] = {}
    for i in range(12):  # single rows and batches, generated and caller-given ids
        xs = [float(i * 10 + j) for j in range(1 + i % 4)]
        if i % 3 == 0:
            ids = [f"mine-{i}-{j}" for j in range(len(xs))]
            body = json.dumps({"columns": {"x": xs, "city": ["rome"] * len(xs)}, "request_ids": ids}).encode()
            ans = c.http.request("POST", "/v1/models/solo/predict", body, "application/json")
            assert ans["request_ids"] == ids
        else:
            ans = c.predict("solo", columns={"x": xs, "city": ["rome"] * len(xs)})
        sent.update(zip(ans["request_ids"], xs))
    # a binary batch with a caller prefix in the header: ids are <prefix>-<row>
    cols = {"x": np.array([[100.0], [101.0], [102.0]], np.float32), "city": np.array([["paris"]] * 3)}
    from device_bridge import columns as colfmt

    c.http.request("POST", "/v1/models/solo/predict", colfmt.encode(cols), colfmt.CONTENT_TYPE,
                   accept=colfmt.CONTENT_TYPE, headers={"X-Request-Ids": "batch7"})
    assert c.http.last_header("X-Request-Ids") == "batch7"
    sent.update({f"batch7-{j}": 100.0 + j for j in range(3)})
    wait_for(lambda: samples_state(c, "solo")["rows"] == len(sent), what="all samples written")
    seen: dict[str, float] = {}
    cursor, pages = 0, 0
    while True:
        page, cursor2 = c.samples("solo", since=cursor, max_rows=7)
        if page.num_rows == 0:
            assert cursor2 == cursor
            break
        assert page.num_rows <= 7 and cursor2 == page.column("seq")[-1].as_py() > cursor
        for rid, x in zip(page.column("request_id").to_pylist(), page.column("in.x").to_pylist()):
            assert rid not in seen
            seen[rid] = x
        cursor, pages = cursor2, pages + 1
    assert seen == sent  # every row once, with the input the test sent for that id
    assert pages == -(-len(sent) // 7)
    page, _ = c.samples("solo", max_rows=1)
    assert page.schema.field("predicted_at").type == pa.timestamp("us", tz="UTC")
    assert page.schema.field("version").type == pa.int32()
    assert page.column("model").to_pylist() == ["solo"] and page.column("device").to_pylist() == ["solo"]
    # y = 2x + (city == 'paris'): the stored output is the model's, as ORT gave it ([N, 1])
    assert page.schema.field("out.y").type == pa.list_(pa.float32(), 1)
    first = page.column("request_id")[0].as_py()
    assert page.column("out.y")[0].as_py() == [2 * sent[first]]


def test_outcomes_bad_bodies_are_400_naming_the_field_and_record_nothing(device):
    c, url = device["c"], device["agent"].url
    rid = c.predict("solo", columns={"x": [5.0], "city": ["rome"]})["request_ids"][0]
    wait_for(lambda: samples_state(c, "solo")["queued_rows"] == 0, what="written")
    before = samples_state(c, "solo")
    good = {"request_id": rid, "label": 1}
    for outcomes, field in (([good, {"request_id": 5, "label": 1}], "outcomes[1].request_id"),
                           ([good, {"request_id": "a"}], "outcomes[1].label"),
                           ([good, {"request_id": "a", "label": [1]}], "outcomes[1].label"),
                           ([good, {"request_id": "a", "label": 1, "extra": 2}], "outcomes[1].extra"),
                           ([good, "x"], "outcomes[1]"),
                           ([good, {"request_id": "r" * 129, "label": 1}], "outcomes[1].request_id")):
        status, ans = post(url, "/v1/models/solo/outcomes", TOKEN, json.dumps({"outcomes": outcomes}).encode())
        assert status == 400 and field in ans["error"], (outcomes, ans)
    status, ans = post(url, "/v1/models/solo/outcomes", TOKEN, b'{"labels": []}')
    assert status == 400 and "outcomes" in ans["error"]
    status, ans = post(url, "/v1/models/solo/outcomes", TOKEN,
                       json.dumps({"outcomes": [good] * 10_001}).encode())
    assert status == 413
    assert post(url, "/v1/models/solo/outcomes", None, json.dumps({"outcomes": [good]}).encode())[0] == 401
    assert post(url, "/v1/models/nope/outcomes", TOKEN, json.dumps({"outcomes": [good]}).encode())[0] == 404
    after = samples_state(c, "solo")
    assert after["outcomes"] == before["outcomes"] and after["unknown_outcomes"] == before["unknown_outcomes"]
    # and a good one is recorded (the store was not left in a half-written state)
    assert c.outcomes("solo", [good]) == {"recorded": 1, "unknown": 0}


def test_request_ids_bad_are_400(device):
    url = device["agent"].url
    for body in ({"columns": {"x": [1.0, 2.0], "city": ["a", "b"]}, "request_ids": ["one"]},
                 {"columns": {"x": [1.0], "city": ["a"]}, "request_ids": [5]},
                 {"columns": {"x": [1.0], "city": ["a"]}, "request_ids": ["r" * 129]},
                 {"columns": {"x": [1.0], "city": ["a"]}, "request_ids": None}):
        status, ans = post(url, "/v1/models/solo/predict", TOKEN, json.dumps(body).encode())
        assert status == 400 and "request_ids" in ans["error"], (body, ans)


def test_the_store_is_bounded_oldest_dropped_and_counted(device):
    c, kp = device["c"], device["kp"]
    c.install(package(kp, 1, name="small"), deploy={"sample_rate": 1.0, "sample_max_mb": 1})
    n_req, per = 12, 4000
    for i in range(n_req):
        c.predict_batch("small", {"x": np.full((per, 1), float(i), np.float32), "city": np.array([["rome"]] * per)})
    wait_for(lambda: samples_state(c, "small")["queued_rows"] == 0, what="written", timeout=60)
    s = samples_state(c, "small")
    assert s["dropped_rows"] > 0
    assert s["rows"] + s["dropped_rows"] == n_req * per  # every row is held or counted as dropped
    # the budget holds, but for the newest chunk, kept whole (sampling.py: _bound): at most about
    # CHUNK_BYTES of Arrow buffers, plus its IPC framing (schema and batch messages, well under 4 KiB)
    assert s["bytes"] <= (1 << 20) + CHUNK_BYTES + 4096
    table, _ = c.samples("small", max_rows=1_000_000)
    assert table.num_rows == s["rows"]
    # the oldest went first: what is left is the newest requests' rows
    assert min(table.column("in.x").to_pylist()) > 0
    assert max(table.column("in.x").to_pylist()) == n_req - 1


def test_samples_survive_a_kill_9_of_the_agent_whole(device, tmp_path):
    kp = device["kp"]
    store = tmp_path / "store-k9"
    trust(store, kp)
    agent = start_agent(tmp_path, "k9", store)
    c = DeviceClient(agent.url, TOKEN)
    c.install(package(kp, 1), deploy={"sample_rate": 1.0})
    ids = []
    for i in range(30):
        ids += c.predict("scorer", columns={"x": [float(i)] * 3, "city": ["rome"] * 3})["request_ids"]
    wait_for(lambda: samples_state(c, "scorer")["queued_rows"] == 0, what="written")
    agent.kill()  # SIGKILL
    agent = start_agent(tmp_path, "k9", store)
    try:
        c = DeviceClient(agent.url, TOKEN)
        table, _ = c.samples("scorer", max_rows=10_000)
        got = table.column("request_id").to_pylist()
        assert sorted(got) == sorted(ids) and len(set(got)) == len(got)
        # whole rows: no null in any column
        assert all(table.column(n).null_count == 0 for n in table.column_names)
        with sqlite3.connect(store / "samples.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        agent.kill()


# ---------------------------------------------------------------------- with a hub


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleetdata")
    kp = make_keys(tmp / "keys")
    port = free_port()
    hub = Proc(["hub", "--port", str(port), "--store", str(tmp / "hub"), "--token", TOKEN],
               tmp / "ready-hub.json")
    hc = HubClient(hub.url, TOKEN)
    tokens, stores = {}, {}
    for name in ("alpha", "bravo"):
        stores[name] = tmp / f"store-{name}"
        trust(stores[name], kp)
        tokens[name] = enroll(hub.url, name, stores[name])
    hc.set_group("field", ["alpha", "bravo"])
    state = {"hub": hub, "hc": hc, "tmp": tmp, "kp": kp, "port": port, "tokens": tokens, "stores": stores,
             "agents": {}}
    yield state
    for p in [*state["agents"].values(), state["hub"]]:
        p.kill()


def _start(fleet, name: str, env: dict | None = None) -> Proc:
    p = start_agent(fleet["tmp"], name, fleet["stores"][name],
                    ["--hub", f"http://127.0.0.1:{fleet['port']}", "--hub-interval", "0.2"], env=env)
    fleet["agents"][name] = p
    return p


def test_n_predictions_give_exactly_n_rows_after_kill_9_mid_upload_and_a_hub_restart(fleet):
    hc, kp = fleet["hc"], fleet["kp"]
    # alpha pauses 3 s between the hub's acknowledgement and its own bookkeeping, 9 rows an upload
    alpha = _start(fleet, "alpha", {**HOOKS, "MLSQL_DEVICE_TEST_UPLOAD_PAUSE": "3",
                                    "MLSQL_DEVICE_TEST_UPLOAD_ROWS": "9"})
    c = DeviceClient(alpha.url, TOKEN)
    hc.set_desired("scorer", package(kp, 1), devices=["alpha"], deploy={"sample_rate": 1.0})
    wait_for(lambda: c.info()["models"].get("scorer", {}).get("active") == 1, what="scorer active on alpha")
    sent: dict[str, float] = {}
    for i in range(40):
        xs = [float(i * 100 + j) for j in range(1 + i % 5)]
        ans = c.predict("scorer", columns={"x": xs, "city": ["rome"] * len(xs)})
        sent.update(zip(ans["request_ids"], xs))
    n = len(sent)
    assert n == sum(1 + i % 5 for i in range(40)) == 120
    wait_for(lambda: samples_state(c, "scorer")["queued_rows"] == 0, what="all samples on alpha's disk")
    # the hub has stored some rows whose chunks alpha still holds: kill alpha there
    wait_for(lambda: 0 < hc.device_data("samples", model="scorer").num_rows < n, what="a first upload")
    alpha.kill()
    stored_before = hc.device_data("samples", model="scorer").num_rows
    assert 0 < stored_before < n and samples_state_offline(fleet["stores"]["alpha"]) > 0
    fleet["hub"].kill()  # SIGKILL: its marks are whatever its files say
    alpha = _start(fleet, "alpha")  # comes back while the hub is down: its uploads fail, it keeps the rows
    c = DeviceClient(alpha.url, TOKEN)
    assert samples_state(c, "scorer")["pending_upload_rows"] > 0
    fleet["hub"] = Proc(["hub", "--port", str(fleet["port"]), "--store", str(fleet["tmp"] / "hub"),
                         "--token", TOKEN], fleet["tmp"] / "ready-hub.json")
    wait_for(lambda: settled(c, "scorer"), what="alpha's samples all acknowledged", timeout=60)
    table = hc.device_data("samples", model="scorer")
    ids = table.column("request_id").to_pylist()
    assert table.num_rows == n and len(set(ids)) == n  # no loss, no duplicate
    assert dict(zip(ids, table.column("in.x").to_pylist())) == sent
    assert set(table.column("device").to_pylist()) == {"alpha"}
    # the files say the same: each (agent, seq) once
    files = data_files(fleet["tmp"] / "hub")
    assert files and all("/group=field/model=scorer/day=" in f for f in files if f.startswith("data/samples"))


def samples_state_offline(store: Path) -> int:
    """Rows in a stopped agent's store, read with sqlite3 by hand."""
    with sqlite3.connect(store / "samples.db") as db:
        return int(db.execute("SELECT COALESCE(SUM(rows), 0) FROM chunks").fetchone()[0])


def test_outcomes_join_the_right_rows(fleet):
    hc = fleet["hc"]
    c = DeviceClient(fleet["agents"]["alpha"].url, TOKEN)
    samples = hc.device_data("samples", model="scorer")
    by_id = dict(zip(samples.column("request_id").to_pylist(), samples.column("in.x").to_pylist()))
    chosen = sorted(by_id)[::3]
    # the label is worked out from the input the test sent: 10 x as an integer, a string for odd ones
    labels = {r: (int(10 * by_id[r]) if int(by_id[r]) % 2 == 0 else f"odd-{int(by_id[r])}") for r in chosen}
    ans = c.outcomes("scorer", [{"request_id": r, "label": lab} for r, lab in labels.items()]
                     + [{"request_id": "never-answered", "label": 1}, {"request_id": chosen[0] + "0", "label": 1}])
    assert ans == {"recorded": len(chosen), "unknown": 2}
    wait_for(lambda: settled(c, "scorer"), what="outcomes uploaded")
    out = hc.device_data("outcomes", model="scorer")
    got = dict(zip(out.column("request_id").to_pylist(), out.column("label").to_pylist()))
    assert got == {r: json.dumps(lab) for r, lab in labels.items()}
    for r, text in got.items():  # joined by request id, each label belongs to its own row's input
        lab = json.loads(text)
        assert lab == (int(10 * by_id[r]) if int(by_id[r]) % 2 == 0 else f"odd-{int(by_id[r])}")
    assert samples_state(c, "scorer")["unknown_outcomes"] == 2


def test_excluded_column_never_leaves_the_device_and_hashed_is_not_raw(fleet):
    hc, kp = fleet["hc"], fleet["kp"]
    bravo = _start(fleet, "bravo", {**HOOKS, "MLSQL_DEVICE_TEST_UPLOAD_PAUSE": "0"})
    c = DeviceClient(bravo.url, TOKEN)
    salt = "workspace-salt-1"
    pkg = build_package(privacy_model(), {"name": "privacy", "version": 1, "providers": ["cpu"]}, kp.private_key)
    hc.set_desired("privacy", pkg, devices=["bravo"], deploy={
        "sample_rate": 1.0, "sample_exclude": ["email"], "sample_hash": ["user_id"], "sample_salt": salt})
    wait_for(lambda: c.info()["models"].get("privacy", {}).get("active") == 1, what="privacy active on bravo")
    deploy = c.info()["models"]["privacy"]["deploy"]
    assert deploy["sample_salt"] == "set" and salt not in json.dumps(c.info())
    n = 25
    emails = [EMAIL.format(i) for i in range(n)]
    users = [USER.format(i % 5) for i in range(n)]
    ans = c.predict("privacy", columns={"x": [float(i) for i in range(n)], "email": emails, "user_id": users})
    # on the device, before the upload: the writer has the rows, the store has no email
    wait_for(lambda: samples_state(c, "privacy")["queued_rows"] == 0, what="written")
    store = fleet["stores"]["bravo"]
    assert (store / "samples.db").exists()
    for marker in (b"zz-secret-email-", b"zz-user-"):
        assert files_holding(store, marker) == [], marker
    wait_for(lambda: settled(c, "privacy"), what="uploaded")
    hub_store = fleet["tmp"] / "hub"
    assert any("model=privacy" in f for f in data_files(hub_store))
    for marker in (b"zz-secret-email-", b"zz-user-"):
        assert files_holding(hub_store, marker) == [], marker
        assert files_holding(store, marker) == [], marker
    table = hc.device_data("samples", model="privacy")
    assert "in.email" not in table.column_names and table.num_rows == n
    by_id = dict(zip(table.column("request_id").to_pylist(), table.column("in.user_id").to_pylist()))
    for rid, user in zip(ans["request_ids"], users):
        want = hmac.new(salt.encode(), user.encode(), hashlib.sha256).hexdigest()[:32]  # by hand
        assert by_id[rid] == want != user
    assert len(set(by_id.values())) == 5  # equal inputs hash equal: joins and counts still work


# ---------------------------------------------------------------------- the upload endpoint's refusals


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write(table)
    return sink.getvalue().to_pybytes()


def _rows(n: int, first: int, agent: str = "alpha", model: str = "probe") -> pa.Table:
    return pa.table({
        "request_id": pa.array([f"forged-{first + i}" for i in range(n)]),
        "predicted_at": pa.array(np.full(n, 1_700_000_000_000_000, np.int64), pa.timestamp("us", tz="UTC")),
        "device": pa.array([agent] * n), "model": pa.array([model] * n),
        "version": pa.array(np.ones(n, np.int32)), "provider": pa.array(["cpu"] * n),
        "latency_ms": pa.array(np.ones(n)), "in.x": pa.array(np.ones(n, np.float32)),
        "seq": pa.array(np.arange(first, first + n, dtype=np.int64)),
    })


def test_an_agent_cannot_upload_for_another_and_bad_uploads_store_nothing(fleet):
    hub_url, hub_store, hc = fleet["hub"].url, fleet["tmp"] / "hub", fleet["hc"]
    a = fleet["tokens"]["alpha"]
    before = data_files(hub_store)
    rows_before = hc.device_data("samples").num_rows
    q = "/v1/agents/{}/data?kind=samples&model=probe&first={}&last={}"
    body = _stream(_rows(5, 10**9))
    # alpha's credential on bravo's path, the operator on an agent's path, no credential
    status, ans = post(hub_url, q.format("bravo", 10**9, 10**9 + 4), a, body, "application/vnd.apache.arrow.stream")
    assert status == 403 and ans["kind"] == "forbidden"
    assert post(hub_url, q.format("alpha", 10**9, 10**9 + 4), TOKEN, body)[0] == 403
    assert post(hub_url, q.format("alpha", 10**9, 10**9 + 4), None, body)[0] == 401
    bad = [
        (q.format("alpha", 10**9, 10**9 + 4), b"not arrow at all", 400),
        (q.format("alpha", 10**9, 10**9 + 4), body[: len(body) // 2], 400),            # cut short
        (q.format("alpha", 10**9, 10**9 + 2), body, 400),                             # seq beyond last
        (q.format("alpha", 10**9, 10**9 + 4).replace("kind=samples", "kind=logs"), body, 400),
        (q.format("alpha", 10**9, 10**9 + 4).replace("model=probe", "model=other"), body, 400),
        (q.format("alpha", 10**9, 10**9 + 4).replace("model=probe", "model=..%2Fx"), body, 400),
        ("/v1/agents/alpha/data?kind=samples&model=probe&first=x&last=1", body, 400),
        (q.format("alpha", 10**9, 10**9 + 4), _stream(_rows(5, 10**9).drop_columns(["seq"])), 400),
        (q.format("alpha", 10**9, 10**9 + 4), _stream(_rows(5, 10**9).drop_columns(["request_id"])), 400),
        (q.format("alpha", 10**9, 10**9 + 4), _stream(_rows(5, 10**9).append_column("email", pa.array(["e"] * 5))), 400),
        (q.format("alpha", 10**9, 10**9 + 4),
         _stream(_rows(5, 10**9).set_column(8, "seq", pa.array([10**9 + k for k in (0, 2, 1, 3, 4)], pa.int64()))), 400),
        (q.format("alpha", 10**9, 10**9 + 4),
         _stream(_rows(5, 10**9).set_column(4, "version", pa.array(["1"] * 5))), 400),
    ]
    for path, data, want in bad:
        status, ans = post(hub_url, path, a, data, "application/vnd.apache.arrow.stream")
        assert status == want and isinstance(ans.get("kind"), str), (path, status, ans)
    # oversized: refused from its Content-Length, before the body is read (the hub may close the
    # connection on a sender still writing, so the head goes alone)
    import http.client

    conn = http.client.HTTPConnection(hub_url.split("//")[1], timeout=30)
    conn.putrequest("POST", q.format("alpha", 10**9, 10**9 + 4))
    conn.putheader("Authorization", f"Bearer {a}")
    conn.putheader("Content-Length", str((8 << 20) + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["kind"] == "too_large"
    conn.close()
    assert data_files(hub_store) == before  # nothing stored by any of them
    assert hc.device_data("samples").num_rows == rows_before
    # reading device data is the operator's
    for tok, want in ((a, 403), (None, 401)):
        req = urllib.request.Request(hub_url + "/v1/data/samples")
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == want
    # and the same body on alpha's own path is taken once, whatever the retries
    ok = q.format("alpha", 10**9, 10**9 + 4)
    assert post(hub_url, ok, a, body, "application/vnd.apache.arrow.stream") == (200, {"acked": 10**9 + 4, "stored": 5})
    assert post(hub_url, ok, a, body, "application/vnd.apache.arrow.stream") == (200, {"acked": 10**9 + 4, "stored": 0})
    forged = hc.device_data("samples", model="probe")
    mine = [d for r, d in zip(forged.column("request_id").to_pylist(), forged.column("device").to_pylist())
            if r.startswith("forged-")]
    assert mine == ["alpha"] * 5
    usage = hc.data_usage()
    assert usage["groups"]["field"]["files"] >= 1 and usage["groups"]["field"]["dropped_rows"] == 0
