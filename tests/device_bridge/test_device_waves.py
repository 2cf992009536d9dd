"""Devices joining a group mid-rollout get the wave their hash falls into, and devices that slept
through the whole rollout converge on its end state in one download: a real hub and simulated
devices (``--devices K``: K agents in one process, each with its own store and hub sync)."""

from __future__ import annotations

import hashlib

import pytest
from device_test_helpers import TOKEN, Proc, make_keys, package, start_hub, wait_for

from device_bridge.client import DeviceClient, HubClient
from device_bridge.errors import DeviceError
from device_bridge.keys import public_key_to_pem

pytestmark = pytest.mark.timeout(120)


def point(device: str, model: str) -> float:
    """The wave point as docs/DEVICE.md defines it, computed here by hand."""
    return int(hashlib.sha256(f"{model}\0{device}".encode()).hexdigest()[:16], 16) / 2**64 * 100


def test_devices_joining_mid_rollout_get_their_wave_and_sleepers_converge_in_one_download(tmp_path, db_url):
    kp = make_keys(tmp_path / "keys")
    pub = tmp_path / "ws.pub"
    pub.write_bytes(public_key_to_pem(kp.public_key))
    hub = start_hub(tmp_path, ["--enroll-open", *(["--db", db_url] if db_url else [])])
    procs: dict[str, Proc] = {}

    def devices(prefix: str, k: int) -> Proc:
        return Proc(
            [
                "serve",
                "--name",
                prefix,
                "--devices",
                str(k),
                "--port",
                "0",
                "--store",
                str(tmp_path / prefix),
                "--token",
                TOKEN,
                "--trust",
                str(pub),
                "--hub",
                hub.url,
                "--hub-interval",
                "0.2",
                "--group",
                "field",
            ],
            tmp_path / f"ready-{prefix}.json",
        )

    try:
        hc = HubClient(hub.url, TOKEN)
        v1, v2 = package(kp, 1), package(kp, 2, mult=3.0)
        procs["early"] = devices("early", 6)
        early = [f"early-{i}" for i in range(6)]
        wait_for(lambda: {a["name"] for a in hc.agents()} >= set(early), what="6 devices registered")

        def active(names):
            status = hc.status()
            return {
                n: ((status.get(n) or {}).get("status") or {}).get("scorer", {}).get("active") for n in names
            }

        for kwargs, err in (
            ({"devices": early, "percent": 50}, "percent needs a group (and no devices)"),
            ({"group": "field", "percent": 0}, "percent must be a number in (0, 100], got 0"),
            ({"group": "field", "percent": "50"}, "percent must be a number in (0, 100], got '50'"),
            ({"group": "field", "percent": 101}, "percent must be a number in (0, 100], got 101"),
        ):
            with pytest.raises(DeviceError) as exc:
                hc.set_desired("scorer", v1, **kwargs)
            assert exc.value.status == 400 and err in str(exc.value), exc.value
        with pytest.raises(DeviceError) as exc:
            hc.set_desired("scorer", group="field", restore_previous=True, percent=50)
        assert "restore_previous takes no percent" in str(exc.value)
        for d in early:  # the refused calls desired nothing
            assert hc.http.request("GET", f"/v1/agents/{d}/desired")["models"] == {}
        hc.set_desired("scorer", v1, group="field")
        wait_for(lambda: set(active(early).values()) == {1}, what="v1 on the group")

        # wave 1: half the group by wave point; the others stay on v1
        answer = hc.set_desired("scorer", v2, group="field", percent=50)
        first = sorted(d for d in early if point(d, "scorer") < 50)
        assert sorted(answer["devices"]) == first and 0 < len(first) < 6, (answer, first)
        want = {d: 2 if d in first else 1 for d in early}
        wait_for(lambda: active(early) == want, what=f"wave 1: {want}")

        # four devices join mid-rollout: each on the side of 50 its own point falls
        procs["late"] = devices("late", 4)
        late = [f"late-{i}" for i in range(4)]
        want_late = {d: 2 if point(d, "scorer") < 50 else 1 for d in late}
        assert set(want_late.values()) == {1, 2}, want_late  # these names fall on both sides
        wait_for(lambda: active(late) == want_late, what=f"joiners on their waves: {want_late}")

        # the joiners sleep through the rest of the rollout; one more device is new to the hub
        procs.pop("late").kill()
        hc.set_desired("scorer", v2, group="field", percent=100)
        wait_for(lambda: set(active(early).values()) == {2}, what="v2 on every awake device")
        procs["late"] = devices("late", 4)
        procs["sleeper"] = devices("sleeper", 1)
        wait_for(lambda: set(active([*late, "sleeper"]).values()) == {2}, what="sleepers on v2")
        sha2 = hashlib.sha256(v2).hexdigest()
        for info in procs["late"].info["devices"] + procs["sleeper"].info["devices"]:
            c = DeviceClient(info["url"], TOKEN)
            got = [e for e in c.events() if e.get("kind") == "download"]  # since this start: one, of v2
            # a joiner left on v1 patches it to v2; one that had v2 already downloads nothing; the new
            # device downloads v2 whole: never v1 first
            expected = {1: [(sha2, "delta")], 2: []}.get(want_late.get(info["name"]), [(sha2, "full")])
            assert [(e["sha256"], e["via"]) for e in got] == expected, (info["name"], got)
            y = c.predict("scorer", columns={"x": [1.0], "city": ["rome"]})["outputs"]["y"][0][0]
            assert y == pytest.approx(3.0)  # y = 3 x: exact in float32

        # the rollout undone for the group: the hub desires v1 for every device, those that only ever
        # had the rule's answer too; the devices that have v1 installed go back to it (a joiner that
        # got v2 first, and the sleeper, refuse to install an older version: anti-rollback)
        hc.set_desired("scorer", group="field", restore_previous=True)
        sha1 = hashlib.sha256(v1).hexdigest()
        for d in [*early, *late, "sleeper"]:
            assert hc.http.request("GET", f"/v1/agents/{d}/desired")["models"]["scorer"]["sha256"] == sha1, d
        had_v1 = [*early, *(d for d in late if want_late[d] == 1)]
        wait_for(lambda: set(active(had_v1).values()) == {1}, what=f"v1 again on {had_v1}")
    finally:
        for p in (*procs.values(), hub):
            p.kill()
