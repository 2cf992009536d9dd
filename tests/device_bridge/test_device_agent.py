"""Real agent processes on loopback: deploy, predict, metrics, versions, crash safety, security, fuzz."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from device_test_helpers import TOKEN, make_keys, package, scorer_model, start_agent, trust, wait_for

from device_bridge.client import DeviceClient
from device_bridge.errors import (
    DeviceAuthError,
    DeviceNotFoundError,
    DeviceRequestError,
    DeviceUnavailableError,
    InvalidInputError,
    PackageRejectedError,
)
from device_bridge.keys import load_or_create_keypair
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys):
    tmp = tmp_path_factory.mktemp("agent")
    store = tmp / "store"
    trust(store, keys)
    a = start_agent(tmp, "dev", store)
    yield a
    a.kill()


def test_deploy_predict_metrics_new_version_rollback(agent, keys):
    c = DeviceClient(agent.url, TOKEN)
    r = c.install(package(keys, 1, mult=2.0))
    assert r["active"] == 1 and r["providers"] == ["CPUExecutionProvider"]
    assert r["node_providers"]["CPUExecutionProvider"] >= 3
    out = c.predict("scorer", columns={"x": [1.0, 2.0], "city": ["paris", "rome"]})
    assert out["version"] == 1 and out["outputs"]["y"] == [[3.0], [4.0]]
    out = c.predict("scorer", rows=[{"x": 0.5, "city": "paris"}])
    assert out["outputs"]["y"] == [[2.0]]
    out = c.predict_batch("scorer", {"x": np.arange(256, dtype=np.float32), "city": np.array(["paris"] * 256)})
    assert out["rows"] == 256 and out["outputs"]["y"][255] == [511.0]

    c.install(package(keys, 2, mult=3.0))
    assert c.predict("scorer", columns={"x": [1.0], "city": ["rome"]})["outputs"]["y"] == [[3.0]]
    m = c.metrics()
    v1 = next(e for e in m["models"] if e["version"] == 1)
    assert v1["requests"] == 3 and v1["rows"] == 259 and v1["latency"]["p50_ms"] > 0
    assert v1["columns"]["x"]["count"] == 259 and v1["columns"]["city"]["top"][0]["value"] == "paris"
    assert m["active"]["scorer"] == 2

    r = c.rollback("scorer")
    assert r["active"] == 1 and r["previous"] == 2
    assert c.predict("scorer", columns={"x": [1.0], "city": ["rome"]})["version"] == 1
    c.activate("scorer", 2)
    info = c.info()
    assert info["models"]["scorer"]["versions"] == [1, 2] and info["models"]["scorer"]["active"] == 2
    assert info["onnxruntime"] and "CPUExecutionProvider" in info["available_providers"]
    snap = next(iter(c.stream(interval=0.05, count=1)))
    assert snap["agent"] == "dev" and any(e["kind"] == "rollback" for e in snap["events"])

    # keep the last 3 versions only
    c.install(package(keys, 3))
    c.install(package(keys, 4))
    assert c.info()["models"]["scorer"]["versions"] == [2, 3, 4]
    # same version, other content: refused; same bytes again: idempotent
    with pytest.raises(DeviceRequestError, match="already installed with different content"):
        c.install(package(keys, 4, mult=9.0))


def test_refuses_bad_packages(agent, keys, tmp_path):
    c = DeviceClient(agent.url, TOKEN)
    good = package(keys, 10, name="other")
    tampered = bytearray(good)
    idx = tampered.find(b"LabelEncoder")
    tampered[idx] ^= 1
    with pytest.raises(PackageRejectedError, match="tampered|modified"):
        c.install(bytes(tampered))
    stranger = load_or_create_keypair(tmp_path / "stranger")
    with pytest.raises(PackageRejectedError, match="does not trust"):
        c.install(build_package(scorer_model(), {"name": "other", "version": 1}, stranger.private_key))
    unsigned = good.replace(b"manifest.sig", b"manifest.xyz")
    with pytest.raises(PackageRejectedError):
        c.install(unsigned)
    with pytest.raises(PackageRejectedError, match="not a valid package"):
        c.install(b"PK\x03\x04 garbage")
    with pytest.raises(DeviceAuthError):
        DeviceClient(agent.url, "wrong").install(good)
    with pytest.raises(DeviceNotFoundError, match="unknown model 'nope'"):
        c.predict("nope", columns={"x": [1.0]})
    assert "other" not in c.info()["models"]


def test_oversized_package_refused(tmp_path, keys):
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "small", store, ["--max-package-mb", "0.01"])
    try:
        c = DeviceClient(a.url, TOKEN)
        big = build_package(scorer_model(), {"name": "scorer", "version": 1}, keys.private_key,
                            extra_files={"pad.bin": b"\0" * 20000})
        with pytest.raises(DeviceRequestError, match="over the limit"):
            c.install(big)
        assert c.info()["models"] == {}
    finally:
        a.kill()


def test_kill_9_during_install_keeps_old_version(tmp_path, keys):
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "crash", store, env={"MLSQL_DEVICE_TEST_INSTALL_PAUSE": "30"})
    c = DeviceClient(a.url, TOKEN, timeout=60)
    t = threading.Thread(target=lambda: _swallow(c.install, package(keys, 1)), daemon=True)
    t.start()
    wait_for(lambda: (store / "models" / "scorer" / "1").exists(), what="v1 unpacked")
    a.kill()  # SIGKILL mid-install, before the state switch: nothing was active -> nothing is
    a = start_agent(tmp_path, "crash", store)
    c = DeviceClient(a.url, TOKEN)
    assert c.info()["models"] == {}
    assert not (store / "models" / "scorer" / "1").exists()  # orphan cleaned up
    c.install(package(keys, 1))
    a.kill()
    a = start_agent(tmp_path, "crash", store, env={"MLSQL_DEVICE_TEST_INSTALL_PAUSE": "30"})
    c = DeviceClient(a.url, TOKEN, timeout=60)
    t = threading.Thread(target=lambda: _swallow(c.install, package(keys, 2, mult=5.0)), daemon=True)
    t.start()
    wait_for(lambda: (store / "models" / "scorer" / "2").exists(), what="v2 unpacked")
    # v1 still serves while v2 is being installed
    assert c.predict("scorer", columns={"x": [1.0], "city": ["x"]})["version"] == 1
    a.kill()
    a = start_agent(tmp_path, "crash", store)
    try:
        c = DeviceClient(a.url, TOKEN)
        out = c.predict("scorer", columns={"x": [1.0], "city": ["x"]})
        assert out["version"] == 1 and out["outputs"]["y"] == [[2.0]]
        assert c.info()["models"]["scorer"]["versions"] == [1]
        c.install(package(keys, 2, mult=5.0))  # the retried install works
        assert c.predict("scorer", columns={"x": [1.0], "city": ["x"]})["outputs"]["y"] == [[5.0]]
    finally:
        a.kill()


def _swallow(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the agent is killed under it
        pass


def test_circuit_breaker_counts_only_failures_of_the_model_not_of_a_request(tmp_path, keys):
    """Attack: 20+ anonymous requests whose values make the model fail used to suspend the only
    version (persisted: everyone got 503). Now a failure that a known-good row does not reproduce
    is the request's (422 model_input) and never trips the breaker; a session that fails for every
    input still does, and rolls back."""
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "cb", store, ["--breaker-window", "50", "--breaker-min-requests", "20",
                                            "--breaker-threshold", "0.3", "--open-reads"],
                    env={"MLSQL_DEVICE_TEST_HOOKS": "1"})
    try:
        c = DeviceClient(a.url, TOKEN)
        c.install(package(keys, 1))
        c.install(package(keys, 2, fragile=True))
        anon = DeviceClient(a.url)  # no token: --open-reads lets anyone predict
        assert anon.predict("scorer", columns={"x": [1.0], "city": ["a"]})["version"] == 2
        for _ in range(40):
            with pytest.raises(InvalidInputError, match="failed on this input") as e:
                anon.predict("scorer", columns={"x": [7.0], "city": ["a"]})  # x >= 3: Gather out of bounds
            assert e.value.kind == "model_input" and e.value.status == 422
        info = c.info()["models"]["scorer"]
        assert info["active"] == 2 and info["suspended"] == []
        assert anon.predict("scorer", columns={"x": [1.0], "city": ["a"]})["version"] == 2
        m = {e["version"]: e for e in c.metrics()["models"]}
        assert m[2]["errors"] == {"model_input": 40} and not m[2]["suspended"]

        # the session itself breaks (as when an execution provider dies): every input fails
        (store / "models" / "scorer" / "2" / ".test_broken").write_text("")
        for _ in range(25):
            try:
                anon.predict("scorer", columns={"x": [1.0], "city": ["a"]})
            except DeviceUnavailableError:
                pass
        info = c.info()["models"]["scorer"]
        assert info["active"] == 1 and 2 in info["suspended"], (info, c.events())
        ev = [e for e in c.events() if e["kind"] == "circuit_breaker"]
        assert ev and ev[0]["version"] == 2 and ev[0]["rolled_back_to"] == 1
        assert anon.predict("scorer", columns={"x": [7.0], "city": ["a"]})["version"] == 1
        m = {e["version"]: e for e in c.metrics()["models"]}
        assert m[2]["errors"]["runtime"] >= 1 and m[2]["suspended"]
    finally:
        a.kill()


def _raw(url, method, path, body=None, headers=None):
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_fuzz_no_5xx(agent, keys):
    c = DeviceClient(agent.url, TOKEN)
    if "scorer" not in c.info()["models"]:
        c.install(package(keys, 1))
    rng = random.Random(7)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    good = {"columns": {"x": [1.0], "city": ["a"]}}
    values = [None, True, 1, -1, 2**70, 1.5, 1e308, "", "x" * 300, [], {}, [1, 2], [[1]], {"a": 1},
              "NaN", [None], ["paris"], [1e400], "\udcff"]

    def rnd_json():
        kind = rng.randrange(10)
        if kind == 0:
            return {"rows": [{rng.choice(["x", "city", "y", ""]): rng.choice(values)
                              for _ in range(rng.randrange(3))} for _ in range(rng.randrange(3))]}
        if kind == 1:
            return {"columns": {rng.choice(["x", "city", "z"]): rng.choice(values) for _ in range(2)}}
        if kind == 2:
            return {"columns": {"x": [rng.choice(values)], "city": [rng.choice(values)]}}
        if kind == 3:
            return rng.choice(values)
        if kind == 4:
            return {"rows": rng.choice(values), "columns": rng.choice(values)}
        if kind == 5:
            return {"version": rng.choice(values), "providers": rng.choice(values)}
        if kind == 6:
            return {"url": rng.choice(["ftp://x", "http://127.0.0.1:1/x", 5, None]), "sha256": rng.choice(values)}
        return good

    def rnd_body():
        kind = rng.randrange(8)
        if kind == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        if kind == 1:
            return b"{" * rng.randrange(1, 5000)
        if kind == 2:
            return b'{"columns": {"x": [NaN], "city": ["a"]}}'
        if kind == 3:
            return b"PK\x05\x06" + b"\0" * 18
        try:
            return json.dumps(rnd_json()).encode()
        except (ValueError, UnicodeEncodeError):
            return b"{}"

    paths = ["/v1/models/scorer/predict", "/v1/models/nope/predict", "/v1/models/scorer/install",
             "/v1/models/install", "/v1/models/scorer/activate", "/v1/models/scorer/rollback",
             "/v1/models/scorer", "/v1/info", "/v1/metrics", "/v1/metrics/stream?count=1&interval=x",
             "/v1/models/..%2f..%2fetc/predict", "/v1/nothing", "/v1/models/scorer/predict?version=abc",
             "/v1/models/scorer/predict?version=99", "/v1/models/%00/install", "/v1/models//predict",
             "/v1/models/scorer/x/predict"]
    ctypes = ["application/json", "application/x-npz", "application/x-mlsql-columns", "text/plain", "",
              "application/octet-stream"]
    statuses = {}
    for _ in range(600):
        path = rng.choice(paths)
        method = rng.choice(["POST", "POST", "GET", "DELETE", "PUT"])
        if path.endswith("scorer") and method == "DELETE" and rng.random() < 0.9:
            method = "GET"  # mostly keep the model installed
        h = {"Content-Type": rng.choice(ctypes)}
        if rng.random() < 0.7:
            h.update(auth if rng.random() < 0.8 else {"Authorization": rng.choice(["Bearer x", "Basic a", "Bearer"])})
        status, body = _raw(agent.url, method, path, rnd_body() if method != "GET" else None, h)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (method, path, status, body[:300])
        if status >= 400 and method != "HEAD":
            assert "error" in json.loads(body), body
        if path.endswith("scorer") and method == "DELETE" and status == 200:
            c.install(package(keys, 1))
    assert agent.alive()
    assert c.health()["ok"]
    assert sum(statuses.values()) == 600 and any(s >= 400 for s in statuses)
    # predict has a fast path beside the router: its edges answer as the router does
    for method, path, want, words in [("POST", "/v1/models//predict", 404, "Not Found"),
                                      ("POST", "/v1/models/scorer/x/predict", 404, "Not Found"),
                                      ("GET", "/v1/models/scorer/predict", 405, "Method Not Allowed"),
                                      ("POST", "/v1/models/nope/predict", 404, "nope")]:
        status, body = _raw(agent.url, method, path, b"{}" if method == "POST" else None,
                            {"Content-Type": "application/json", **auth})
        assert status == want and words in json.loads(body)["error"], (method, path, status, body)


def test_tls_and_body_limit(tmp_path, keys):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "tls", store, ["--tls-cert", str(tmp_path / "cert.pem"),
                                             "--tls-key", str(tmp_path / "key.pem"), "--max-body-mb", "0.001"])
    try:
        assert a.url.startswith("https://")
        c = DeviceClient(a.url, TOKEN, verify=str(tmp_path / "cert.pem"))
        c.install(package(keys, 1))
        assert c.predict("scorer", columns={"x": [1.0], "city": ["paris"]})["outputs"]["y"] == [[3.0]]
        with pytest.raises(DeviceRequestError, match="over the limit"):
            c.predict("scorer", columns={"x": [1.0] * 500, "city": ["a"] * 500})
        from device_bridge.errors import DeviceUnreachableError

        with pytest.raises(DeviceUnreachableError):  # self-signed: refused without the CA file
            DeviceClient(a.url, TOKEN).health()
    finally:
        a.kill()


def test_providers_reported_and_strict(tmp_path, keys):
    store = tmp_path / "s"
    trust(store, keys)
    # this agent believes NNAPI is offered (as on an Android build); ORT here has no NNAPI, so the
    # session really runs on CPU, and the agent must say so rather than echo the request
    a = start_agent(tmp_path, "android", store, ["--fake-providers", "NnapiExecutionProvider,CPUExecutionProvider",
                                                 "--ort-threads", "2"])
    try:
        c = DeviceClient(a.url, TOKEN)
        assert c.info()["ort_threads"] == 2
        r = c.install(package(keys, 1), providers=["nnapi", "cuda", "cpu"])
        assert r["provider_attempts"][0]["providers"] == ["NnapiExecutionProvider", "CPUExecutionProvider"]
        assert r["providers"] == ["CPUExecutionProvider"]
        assert set(r["node_providers"]) == {"CPUExecutionProvider"}
        with pytest.raises(DeviceRequestError, match="strict_providers: cuda not available"):
            c.install(package(keys, 2), providers=["cuda"], strict_providers=True)
        assert c.info()["models"]["scorer"]["active"] == 1
        with pytest.raises(DeviceRequestError, match="unknown provider 'tpu'"):
            c.install(package(keys, 3), providers=["tpu"])
        m = c.metrics()["models"][0]
        assert m["providers"] == ["CPUExecutionProvider"] and m["node_providers"]["CPUExecutionProvider"] >= 3
    finally:
        a.kill()
    # after a restart the placement comes from the version's providers.json
    cached = json.loads((store / "models" / "scorer" / "1" / ".placement.json").read_text())
    assert cached["node_providers"] == m["node_providers"]
    a = start_agent(tmp_path, "android", store)
    try:
        assert DeviceClient(a.url, TOKEN).info()["models"]["scorer"]["node_providers"] == m["node_providers"]
    finally:
        a.kill()
    bad = subprocess.run([sys.executable, "-m", "device_bridge", "serve", "--name", "x", "--store", str(tmp_path / "x"),
                          "--token", "t", "--ort-threads", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--ort-threads must be 0" in bad.stderr


def test_install_from_url_via_hub(tmp_path, keys):
    from device_test_helpers import start_hub

    from device_bridge.client import HubClient

    hub = start_hub(tmp_path)
    store = tmp_path / "s"
    trust(store, keys)
    a = start_agent(tmp_path, "pull", store)
    try:
        pkg = package(keys, 1)
        meta = HubClient(hub.url, TOKEN).upload(pkg)
        c = DeviceClient(a.url, TOKEN)
        url = f"{hub.url}/v1/blobs/{meta['sha256']}"
        with pytest.raises(DeviceRequestError, match="401"):
            c.install_from_url("scorer", url, meta["sha256"])  # the hub wants its token
        with pytest.raises(DeviceRequestError, match="does not match sha256"):
            c.install_from_url("scorer", url, "0" * 64, token=TOKEN)
        r = c.install_from_url("scorer", url, meta["sha256"], token=TOKEN)
        assert r["active"] == 1
    finally:
        a.kill()
        hub.kill()


def test_kill_9_at_random_moments_keeps_a_consistent_store(tmp_path, keys):
    store = tmp_path / "s"
    trust(store, keys)
    rng = random.Random(3)
    a = start_agent(tmp_path, "chaos", store)
    DeviceClient(a.url, TOKEN).install(package(keys, 1))
    pad = {"pad.bin": b"\1" * (6 << 20)}  # a bigger package: the install takes long enough to be cut
    pkgs = {v: build_package(scorer_model(float(v)), {"name": "scorer", "version": v}, keys.private_key,
                             extra_files=pad) for v in range(2, 8)}
    for v in range(2, 8):
        c = DeviceClient(a.url, TOKEN, timeout=30)
        t = threading.Thread(target=_swallow, args=(c.install, pkgs[v]), daemon=True)
        t.start()
        time.sleep(rng.uniform(0.0, 0.15))
        a.kill()
        a = start_agent(tmp_path, "chaos", store)
        c = DeviceClient(a.url, TOKEN)
        info = c.info()["models"]["scorer"]
        # killed before the switch (v - 1 still active: the last loop ended with v - 1 active) or after it
        assert info["active"] in (v - 1, v), (v, info)
        out = c.predict("scorer", columns={"x": [1.0], "city": ["x"]})
        assert out["version"] == info["active"] and out["outputs"]["y"] == [[float(max(2, out["version"]))]]
        on_disk = {p.name for p in (store / "models" / "scorer").iterdir()}
        assert on_disk == {str(x) for x in info["versions"]}  # no orphans, nothing missing
        if info["active"] != v:
            c.install(pkgs[v])
    a.kill()
