"""Long-poll of the desired state (hub/longpoll.py): a real hub and a real agent on loopback. The
agent's report interval is long (30 s), so a new version active well before it came through the
held request; a held request ends at its wait; a change made through another hub process wakes it;
past --max-held a request is answered at once."""

from __future__ import annotations

import json
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

from device_bridge.client import HubClient

pytestmark = pytest.mark.timeout(120)


def get_desired(url: str, token: str, etag: str | None = None, query: str = ""):
    """(status, body, ETag, seconds taken)."""
    req = urllib.request.Request(f"{url}/v1/agents/d1/desired{query}",
                                 headers={"Authorization": f"Bearer {token}", **({"If-None-Match": etag} if etag else {})})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers.get("ETag"), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None, e.headers.get("ETag"), time.monotonic() - t0


def test_an_agent_on_a_30_s_interval_gets_a_new_version_through_the_long_poll(tmp_path):
    kp = make_keys(tmp_path / "keys")
    hub = start_hub(tmp_path)
    agent = None
    try:
        hc = HubClient(hub.url, TOKEN)
        enroll(hub.url, "d1", tmp_path / "d1")
        trust(tmp_path / "d1", kp)
        agent = start_agent(tmp_path, "d1", tmp_path / "d1", ["--hub", hub.url, "--hub-interval", "30",
                                                              "--hub-wait", "25"])
        wait_for(lambda: any(a["name"] == "d1" for a in hc.agents()), what="the agent's first report")
        time.sleep(0.5)  # its first cycle done: from here on it reports only every 30 s, or on a change
        hc.set_desired("scorer", package(kp, 1), devices=["d1"])
        # the next timed report is 30 s away: active before 15 s means the held request brought it
        # (15 s leaves a loaded machine room for the download and the install)
        wait_for(lambda: ((hc.agent("d1").get("status") or {}).get("scorer") or {}).get("active") == 1,
                 timeout=15, what="v1 active through the long-poll")
        hc.set_desired("scorer", package(kp, 2), devices=["d1"])
        wait_for(lambda: ((hc.agent("d1").get("status") or {}).get("scorer") or {}).get("active") == 2,
                 timeout=15, what="v2 active through the long-poll")
    finally:
        for p in (agent, hub):
            if p is not None:
                p.kill()


def test_a_held_request_ends_at_its_wait_and_a_change_through_another_hub_wakes_it(tmp_path):
    kp = make_keys(tmp_path / "keys")
    a = start_hub(tmp_path, ["--recheck-s", "0.2"])
    b = Proc(["hub", "--port", "0", "--store", str(tmp_path / "hub"), "--token", TOKEN, "--recheck-s", "0.2"],
             tmp_path / "ready-hubB.json")  # a second process on the same SQLite database
    try:
        token = enroll(a.url, "d1", tmp_path / "d1")
        status, doc, etag, _ = get_desired(b.url, token)
        assert status == 200 and doc["models"] == {} and etag
        status, doc, etag2, took = get_desired(b.url, token, etag, "?wait=1")
        assert status == 304 and etag2 == etag and took >= 1.0  # held for the whole second: nothing changed
        status, doc, _, took = get_desired(b.url, token, etag)  # no wait: at once
        assert status == 304
        held: list = []
        th = threading.Thread(target=lambda: held.append(get_desired(b.url, token, etag, "?wait=30")))
        th.start()
        time.sleep(0.5)
        HubClient(a.url, TOKEN).set_desired("scorer", package(kp, 1), devices=["d1"])  # through the other hub
        th.join(40)
        status, doc, etag3, took = held[0]
        assert status == 200 and doc["models"]["scorer"]["version"] == 1 and etag3 != etag
        assert took < 30  # woken by the change (B saw it at its next recheck), not by the wait's end
        for query, field in [("?wait=61", "wait"), ("?wait=x", "wait"), ("?wait=nan", "wait"),
                             ("?wait=-1", "wait"), ("?colour=1", "colour")]:
            status, err, _, _ = get_desired(b.url, token, etag, query)
            assert status == 400 and field in err["error"], (query, err)
    finally:
        a.kill()
        b.kill()


def test_past_max_held_a_request_is_answered_at_once(tmp_path):
    hub = start_hub(tmp_path, ["--max-held", "2", "--max-wait-s", "5"])
    try:
        token = enroll(hub.url, "d1", tmp_path / "d1")
        _, _, etag, _ = get_desired(hub.url, token)
        done: list = []

        def hold(tag):
            done.append((tag, get_desired(hub.url, token, etag, "?wait=5")))

        threads = [threading.Thread(target=hold, args=(f"held{i}",)) for i in range(2)]
        for th in threads:
            th.start()
        time.sleep(1.5)  # both held (two small requests; the hub answers an unchanged state in microseconds)
        hold("third")  # the third, past --max-held 2: one look, answered at once
        for th in threads:
            th.join(20)
        assert [tag for tag, _ in done][0] == "third"
        assert {tag: ans[0] for tag, ans in done} == {"held0": 304, "held1": 304, "third": 304}
        assert all(ans[3] >= 5.0 for tag, ans in done if tag != "third")  # the held ones ran to their wait
        status, err, _, _ = get_desired(hub.url, token, etag, "?wait=6")  # over this hub's --max-wait-s 5
        assert status == 400 and "from 0 to 5 seconds" in err["error"]
    finally:
        hub.kill()
