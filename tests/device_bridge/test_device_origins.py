"""Packages from any origin and delta updates, with a real hub and real agents on loopback, and a
static origin (a plain file server over the folder `mlsql-device hub publish` writes, answering
Range like a CDN): an origin down, a cut download resumed with Range (also after the agent is
killed), a tampered blob refused, a delta that does not apply. Each ends with the fleet on the new
version and the earlier versions still installed and serving."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from device_test_helpers import (
    TOKEN,
    enroll,
    make_keys,
    scorer_model,
    start_agent,
    start_hub,
    stored,
    trust,
    wait_for,
)
from static_origin import StaticOrigin, dead_url

from device_bridge.client import DeviceClient, HubClient
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(120)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(hub_store: Path, folder: Path) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "device_bridge", "hub", "publish", str(folder), "--store", str(hub_store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def agent_on(tmp: Path, hub, kp, name: str = "dev", extra: list[str] | None = None):
    store = tmp / f"store-{name}"
    trust(store, kp)
    enroll(hub.url, name, store)
    return start_agent(tmp, name, store, ["--hub", hub.url, "--hub-interval", "0.2", *(extra or [])]), store


def active(hc: HubClient, name: str, model: str = "scorer"):
    return ((hc.status().get(name) or {}).get("status") or {}).get(model, {}).get("active")


def downloads(agent) -> list[dict]:
    return [e for e in DeviceClient(agent.url, TOKEN).events() if e.get("kind") == "download"]


def predict(agent, version: int | None = None) -> float:
    out = DeviceClient(agent.url, TOKEN).predict(
        "scorer", columns={"x": [1.0], "city": ["rome"]}, version=version
    )
    return out["outputs"]["y"][0][0] if "outputs" in out else out["y"][0][0]


def big_package(kp, version: int, mult: float, seed: int) -> bytes:
    """A package with 64 KiB of random weights beside the graph: big enough that a cut answer is cut
    mid-file, and a new seed makes a delta as large as the package."""
    return build_package(
        scorer_model(mult),
        {"name": "scorer", "version": version, "providers": ["cpu"]},
        kp.private_key,
        extra_files={"weights.bin": random.Random(seed).randbytes(1 << 16)},
    )


def test_origins_in_order_a_down_origin_a_cut_download_resumed_and_a_tampered_blob_refused(tmp_path):
    kp = make_keys(tmp_path / "keys")
    site = tmp_path / "site"
    cdn = StaticOrigin(site)
    bad_site = tmp_path / "bad"
    bad_site.mkdir()
    bad = StaticOrigin(bad_site)
    down = dead_url()
    hub = start_hub(
        tmp_path,
        [
            "--origin",
            down,
            "--origin",
            bad.url + "/",
            "--origin",
            cdn.url,
            "--hub-blobs",
            "last",
            "--deltas",
            "off",
        ],
    )
    agent = None
    try:
        hc = HubClient(hub.url, TOKEN)
        v1, v2 = big_package(kp, 1, 2.0, 1), big_package(kp, 2, 3.0, 2)
        for p in (v1, v2):
            hc.upload(p)
        answer = publish(tmp_path / "hub", site)
        assert answer["written"] == 2 and answer["missing_from_store"] == []
        assert (site / sha(v1)).read_bytes() == v1 and (site / sha(v2)).read_bytes() == v2
        assert publish(tmp_path / "hub", site)["already_there"] == 2  # nothing written twice

        # the hub's own blob endpoint answers Range as a static origin does
        req = urllib.request.Request(
            f"{hub.url}/v1/blobs/{sha(v1)}",
            headers={"Authorization": f"Bearer {TOKEN}", "Range": "bytes=1000-"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-{len(v1) - 1}/{len(v1)}"
            assert r.read() == v1[1000:]

        # v1: the first origin is down, the second lacks the blob (404), the third cuts its first
        # answer after 20,000 bytes: the agent asks that origin for the rest, from byte 20,000
        cdn.cut_after[sha(v1)] = 20_000
        agent, _ = agent_on(tmp_path, hub, kp)
        hc.set_desired("scorer", sha256=sha(v1), devices=["dev"])
        wait_for(lambda: active(hc, "dev") == 1, what="v1 active")
        asked = cdn.requests_for(sha(v1))
        assert [(e["range"], e["status"], e["sent"]) for e in asked] == [
            (None, 200, 20_000),
            ("bytes=20000-", 206, len(v1) - 20_000),
        ], asked
        assert all(
            e["authorization"] is None for e in cdn.log + bad.log
        )  # the hub credential stays with the hub
        ev = downloads(agent)[-1]
        assert ev["via"] == "full" and ev["url"] == f"{cdn.url}/{sha(v1)}" and ev["bytes"] == len(v1)
        assert [a["url"].split("/")[2] for a in ev["attempts"]][:2] == [
            down.split("/")[2],
            bad.url.split("/")[2],
        ]
        assert predict(agent) == pytest.approx(2.0)  # y = x * 2 (float32 of exact small integers)

        # v2: the second origin now serves a tampered copy (one byte flipped): refused by its hash,
        # the third origin's copy installed; nothing of the tampered bytes kept on the device
        tampered = bytearray(v2)
        tampered[len(v2) // 2] ^= 0xFF
        (bad_site / sha(v2)).write_bytes(bytes(tampered))
        hc.set_desired("scorer", sha256=sha(v2), devices=["dev"])
        wait_for(lambda: active(hc, "dev") == 2, what="v2 active")
        ev = downloads(agent)[-1]
        assert ev["url"] == f"{cdn.url}/{sha(v2)}", ev
        assert any(
            "sha256 mismatch" in (a["error"] or "") and a["url"].startswith(bad.url) for a in ev["attempts"]
        )
        info = DeviceClient(agent.url, TOKEN).info()
        scorer = (
            info["models"]["scorer"]
            if isinstance(info["models"], dict)
            else next(m for m in info["models"] if m["name"] == "scorer")
        )
        assert scorer["versions"] == [1, 2], scorer
        assert not list((tmp_path / "store-dev" / "downloads").glob("*.part"))
        assert predict(agent) == pytest.approx(3.0) and predict(agent, version=1) == pytest.approx(2.0)
    finally:
        for p in (agent, hub):
            if p is not None:
                p.kill()
        cdn.close()
        bad.close()


def test_a_download_cut_by_a_killed_agent_resumes_from_its_part_file_after_a_restart(tmp_path):
    kp = make_keys(tmp_path / "keys")
    site = tmp_path / "site"
    cdn = StaticOrigin(site)
    hub = start_hub(tmp_path, ["--origin", cdn.url, "--hub-blobs", "last", "--deltas", "off"])
    agent = None
    try:
        hc = HubClient(hub.url, TOKEN)
        v1 = big_package(kp, 1, 2.0, 1)
        hc.upload(v1)
        publish(tmp_path / "hub", site)
        cdn.stall_after[sha(v1)] = 30_000  # 30,000 bytes, then the answer hangs: the agent is killed there
        agent, store = agent_on(tmp_path, hub, kp)
        hc.set_desired("scorer", sha256=sha(v1), devices=["dev"])
        part = store / "downloads" / f"{sha(v1)}.part"
        wait_for(
            lambda: part.exists() and part.stat().st_size == 30_000, what="30,000 bytes in the part file"
        )
        agent.kill()
        cdn.release.set()
        agent = start_agent(tmp_path, "dev", store, ["--hub", hub.url, "--hub-interval", "0.2"])
        wait_for(lambda: active(hc, "dev") == 1, what="v1 active after the restart")
        asked = cdn.requests_for(sha(v1))
        assert [e["range"] for e in asked] == [None, "bytes=30000-"], asked
        assert asked[1]["status"] == 206 and asked[1]["sent"] == len(v1) - 30_000
        assert not part.exists()
        assert predict(agent) == pytest.approx(2.0)
    finally:
        for p in (agent, hub):
            if p is not None:
                p.kill()
        cdn.close()


def test_delta_updates_once_per_pair_and_the_full_package_when_a_delta_does_not_apply_or_is_too_big(tmp_path):
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path)
    agents = []
    try:
        hc = HubClient(hub.url, TOKEN)
        v1, v2 = big_package(kp, 1, 2.0, 1), big_package(kp, 2, 3.0, 1)  # same weights, a new graph constant
        v3, v4 = big_package(kp, 3, 4.0, 1), big_package(kp, 4, 5.0, 4)  # v4: all-new weights
        for p in (v1, v2, v3, v4):
            hc.upload(p)
        a, _ = agent_on(tmp_path, hub, kp, "da")
        b, _ = agent_on(tmp_path, hub, kp, "db")
        agents += [a, b]
        names = ["da", "db"]

        def on(version):
            wait_for(lambda: all(active(hc, n) == version for n in names), what=f"v{version} on both")

        hc.set_desired("scorer", sha256=sha(v1), devices=names)
        on(1)
        assert all(downloads(x)[-1]["via"] == "full" for x in agents)  # nothing to patch from yet

        hc.set_desired("scorer", sha256=sha(v2), devices=names)
        on(2)
        deltas = tmp_path / "hub" / "deltas"
        for x in agents:
            ev = downloads(x)[-1]
            assert ev["via"] == "delta" and ev["base"] == 1 and ev["package_bytes"] == len(v2), ev
            assert ev["bytes"] < 0.05 * len(v2), ev  # 64 KiB of unchanged weights: copied, not sent
        made = sorted(p.name for p in deltas.iterdir())
        assert made == [f"{sha(v1)}-{sha(v2)}.zst"]  # made once for the pair, served to both

        # a delta that does not apply (the hub's cached copy damaged): each agent rebuilds bytes
        # whose checksum fails, and takes the full package
        (deltas / f"{sha(v2)}-{sha(v3)}.zst").write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4000))
        hc.set_desired("scorer", sha256=sha(v3), devices=names)
        on(3)
        for x in agents:
            ev = downloads(x)[-1]
            assert ev["via"] == "full" and "DeltaError" in ev["delta_error"], ev

        # a delta over half the package (all-new weights): not sent, marked, the full package used
        hc.set_desired("scorer", sha256=sha(v4), devices=names)
        on(4)
        assert (deltas / f"{sha(v3)}-{sha(v4)}.none").exists()
        for x in agents:
            ev = downloads(x)[-1]
            assert ev["via"] == "full" and "404" in ev["delta_error"], ev
            assert predict(x) == pytest.approx(5.0) and predict(x, version=3) == pytest.approx(4.0)
    finally:
        for p in (*agents, hub):
            p.kill()


def test_bad_delta_requests_origins_and_publish_calls_are_clear_errors(tmp_path):
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path)
    try:
        hc = HubClient(hub.url, TOKEN)
        v1, v2 = big_package(kp, 1, 2.0, 1), big_package(kp, 2, 3.0, 1)
        other = build_package(
            scorer_model(1.0), {"name": "other", "version": 1, "providers": ["cpu"]}, kp.private_key
        )
        for p in (v1, v2, other):
            hc.upload(p)
        cred = hc.enroll("dx")
        hc.set_desired("scorer", sha256=sha(v2), devices=["dx"])

        def get(path: str, token: str = TOKEN):
            req = urllib.request.Request(hub.url + path, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())["error"]

        delta = f"/v1/blobs/{sha(v2)}/delta"
        assert get(f"{delta}?from=abc") == (
            400,
            "from must be the sha256 (64 hex digits) of the package the agent has",
        )
        code, msg = get(f"{delta}?from={sha(v1)}&x=1")
        assert code == 400 and "unknown parameter 'x'" in msg
        code, msg = get(f"{delta}?from={sha(other)}")  # another model's package: no delta between them
        assert code == 404 and "not an older version of scorer" in msg
        code, msg = get(f"/v1/blobs/{sha(v1)}/delta?from={sha(v2)}")  # backwards
        assert code == 404 and "not an older version" in msg
        code, msg = get(f"/v1/blobs/{sha(other)}/delta?from={sha(v1)}", cred)  # not in dx's desired state
        assert code == 403 and "only the packages of its desired state" in msg
        code, body = get(f"{delta}?from={sha(v1)}", cred)
        assert code == 200 and len(body) < len(v2) // 2
        assert get(f"{delta}?from={sha(v1)}", "wrong")[0] == 401
        assert not (tmp_path / "hub" / "deltas" / f"{sha(other)}-{sha(v2)}.zst").exists()
    finally:
        hub.kill()
    for args, err in (
        (["--origin", "ftp://x/y"], "must be an http(s) base URL"),
        (["--hub-blobs", "off"], "name at least one origin"),
        (["--delta-max-ratio", "2"], "--delta-max-ratio must be in (0, 1]"),
    ):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "device_bridge",
                "hub",
                "--store",
                str(tmp_path / "h2"),
                "--token",
                TOKEN,
                "--port",
                "0",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and err in p.stderr, p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "device_bridge", "hub", "publish", "--store", str(tmp_path / "h2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "name the folder" in p.stderr, p.stderr


def test_part_files_are_bounded_and_a_part_that_does_not_continue_the_file_is_started_over(tmp_path):
    """origins.fetch on its own (the agent's download), against a real static origin."""
    from device_bridge import origins

    site = tmp_path / "site"
    site.mkdir()
    blob = random.Random(7).randbytes(50_000)
    (site / sha(blob)).write_bytes(blob)
    cdn = StaticOrigin(site)
    folder = tmp_path / "downloads"
    folder.mkdir()
    try:
        # three stale part files of other packages: the two newest others go down to one, plus this one
        for i, name in enumerate(("a" * 64, "b" * 64, "c" * 64)):
            p = folder / f"{name}.part"
            p.write_bytes(b"x" * 10)
            os.utime(p, (1_000_000 + i, 1_000_000 + i))
        # a part whose bytes are not this file's head, at an origin that ignores Range: it answers the
        # whole file (200), which replaces the part
        origins.part_path(folder, sha(blob)).write_bytes(b"\0" * 1000)
        cdn.ignore_range = True
        got = origins.fetch([f"{cdn.url}/{sha(blob)}"], sha(blob), folder, 1 << 20)
        assert got.data == blob and [(a.start, a.status) for a in got.attempts] == [(1000, 200)]
        assert sorted(p.name for p in folder.iterdir()) == [f"{'c' * 64}.part"]  # the newest other part stays
        # the same wrong head at an origin that honours Range: the bytes do not hash to the package, so
        # the part is dropped and the origin asked for the whole file once
        origins.part_path(folder, sha(blob)).write_bytes(b"\0" * 1000)
        cdn.ignore_range = False
        got = origins.fetch([f"{cdn.url}/{sha(blob)}"], sha(blob), folder, 1 << 20)
        assert got.data == blob
        assert [(a.start, a.status) for a in got.attempts] == [(1000, 206), (0, 200)], got.attempts
        assert "sha256 mismatch" in got.attempts[0].error
        # over the device's package limit: refused, nothing kept
        with pytest.raises(origins.FetchError, match="over the limit of 10000"):
            origins.fetch([f"{cdn.url}/{sha(blob)}"], sha(blob), folder, 10_000)
        assert not origins.part_path(folder, sha(blob)).exists()
    finally:
        cdn.close()


def test_deltas_published_to_a_static_origin_are_used_and_a_corrupt_one_falls_back_to_the_full_package(
    tmp_path,
):
    """`hub publish` writes the deltas beside the blobs; desired state lists them on the origin; the
    agent rebuilds the package from the origin's delta without asking the hub for a delta or a blob,
    and takes the full package when the origin's delta is damaged (and the hub has none)."""
    kp = make_keys(tmp_path / "keys")
    site = tmp_path / "site"
    cdn = StaticOrigin(site)
    hub = start_hub(tmp_path, ["--origin", cdn.url])  # the hub's own blob URL first, its deltas on
    agent = None
    try:
        hc = HubClient(hub.url, TOKEN)
        v1, v2, v3 = (big_package(kp, v, m, 1) for v, m in ((1, 2.0), (2, 3.0), (3, 4.0)))  # same weights
        for p in (v1, v2, v3):
            hc.upload(p)
        answer = publish(tmp_path / "hub", site)
        # --delta-bases 2 (default): v1->v2, v1->v3, v2->v3
        assert answer["written"] == 3 and answer["deltas_written"] == 3, answer
        assert publish(tmp_path / "hub", site)["deltas_already_there"] == 3
        agent, _ = agent_on(tmp_path, hub, kp)
        hc.set_desired("scorer", sha256=sha(v1), devices=["dev"])
        wait_for(lambda: active(hc, "dev") == 1, what="v1 active")

        hc.set_desired("scorer", sha256=sha(v2), devices=["dev"])
        listed = _get_json(hub.url, "/v1/agents/dev/desired")[1]["models"]["scorer"]["deltas"]
        assert [d["from"] for d in listed] == [sha(v1)]
        d12 = listed[0]["sha256"]
        assert listed[0]["urls"] == [f"{cdn.url}/{d12}"] and (site / d12).stat().st_size == listed[0]["size"]
        wait_for(lambda: active(hc, "dev") == 2, what="v2 active")
        ev = downloads(agent)[-1]
        assert ev["via"] == "delta" and ev["url"] == f"{cdn.url}/{d12}" and ev["base"] == 1, ev
        assert ev["package_bytes"] == len(v2) and ev["bytes"] < 0.05 * len(v2), ev  # the weights copied
        assert [e["status"] for e in cdn.requests_for(d12)] == [200]
        assert cdn.requests_for(sha(v2)) == []  # nor the full package from the origin
        # the hub makes a delta at the first request to its own endpoint: none was asked for
        assert not (tmp_path / "hub" / "deltas" / f"{sha(v1)}-{sha(v2)}.zst").exists()
        assert predict(agent) == pytest.approx(3.0)

        # v3: both of the origin's deltas to it (from v2 and from v1, both installed) damaged (their
        # bytes no longer hash to their names), and the hub has no delta of the pair it would send
        # (v2 -> v3) worth sending: the full package, checked and signed, is installed
        damaged = []
        for base in (v2, v1):
            (row,) = stored(
                tmp_path / "hub", None, f"SELECT value FROM meta WHERE key = 'delta:{sha(v3)}:{sha(base)}'"
            )
            damaged.append(json.loads(row[0])["sha256"])
        for d in set(damaged):  # the two deltas may be the same bytes (v1 and v2 differ in one constant)
            broken = bytearray((site / d).read_bytes())
            broken[len(broken) // 2] ^= 0xFF
            (site / d).write_bytes(bytes(broken))
        (tmp_path / "hub" / "deltas" / f"{sha(v2)}-{sha(v3)}.none").write_bytes(b"")
        hc.set_desired("scorer", sha256=sha(v3), devices=["dev"])
        listed = _get_json(hub.url, "/v1/agents/dev/desired")[1]["models"]["scorer"]["deltas"]
        assert [(d["from"], d["sha256"]) for d in listed] == list(
            zip([sha(v2), sha(v1)], damaged)
        )  # newest first
        wait_for(lambda: active(hc, "dev") == 3, what="v3 active")
        ev = downloads(agent)[-1]
        assert ev["via"] == "full" and ev["bytes"] == len(v3), json.dumps(ev)
        for base in (2, 1):
            assert f"origin delta from version {base}: FetchError" in ev["delta_error"], ev
        assert ev["delta_error"].count("sha256 mismatch") == 2, ev
        assert "no delta" in ev["delta_error"], ev  # then the hub's own: 404
        assert predict(agent) == pytest.approx(4.0) and predict(agent, version=2) == pytest.approx(3.0)
    finally:
        for p in (agent, hub):
            if p is not None:
                p.kill()
        cdn.close()


def _get_json(url: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())
