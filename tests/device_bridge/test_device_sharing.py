"""Sharing one device (docs/DEVICE.md): deploy settings, admission control, deadlines, worker
processes that crash, hang or pass their memory budget, and the device's memory budget — against
real agent processes on loopback. The scheduler's order is checked on the real Scheduler object.
Performance (who is faster by how much) is bench/bench_agent_sched.py's job, not these tests'."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from device_test_helpers import TOKEN, make_keys, memory_model, package, start_agent, trust, wait_for

from device_bridge.client import DeviceClient
from device_bridge.errors import (
    DeviceDeadlineError,
    DeviceOverloadedError,
    DeviceRequestError,
    DeviceUnavailableError,
    PackageRejectedError,
)
from device_bridge.package import build_package

pytestmark = pytest.mark.timeout(120)
HOOKS = {"MLSQL_DEVICE_TEST_HOOKS": "1"}
ROW = {"x": [1.0], "city": ["paris"]}


# the sampling settings nobody gave: nothing sampled (the privacy default, docs/DEVICE.md)
NO_SAMPLING = {"sample_rate": 0.0, "sample_max_mb": 64, "sample_exclude": [], "sample_hash": [], "sample_salt": None,
               # nor feature view bounds or a trigger (features.py, triggers.py): the store's defaults, none
               "max_keys": None, "max_state_mb": None, "trigger": None}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def _agent(tmp_path, keys, extra=None, env=None, name="share"):
    store = tmp_path / f"store-{name}"
    trust(store, keys)
    return start_agent(tmp_path, name, store, extra, env), store


def _model_metrics(c: DeviceClient, model: str) -> dict:
    return next(e for e in c.metrics(columns=False)["models"] if e["model"] == model and e["active"])


def _crash_on(store, model: str, version: int, value: float, action: str) -> None:
    """The documented test hook (MLSQL_DEVICE_TEST_HOOKS=1): the worker does ``action`` on x == value."""
    (store / "models" / model / str(version) / ".test_crash").write_text(
        json.dumps({"column": "x", "value": value, "action": action}))


def test_deploy_settings_come_from_the_package_then_the_request_and_are_checked(tmp_path, keys):
    a, _ = _agent(tmp_path, keys)
    try:
        c = DeviceClient(a.url, TOKEN)
        # the package's own deploy settings; the class picks the defaults of the fields not given
        c.install(package(keys, 1, name="m", deploy={"priority": "batch", "timeout_ms": 5000}))
        d = c.info()["models"]["m"]["deploy"]
        assert d == {"priority": "batch", "timeout_ms": 5000, "isolation": "process", "max_concurrency": 2,
                     "max_queue": 16, "memory_mb": 1024, **NO_SAMPLING}
        assert c.info()["models"]["m"]["worker"]["state"] == "ready"
        # the request's settings win over the package's, field by field; kept with the version
        r = c.install(package(keys, 2, name="m", deploy={"priority": "batch", "timeout_ms": 5000}),
                      deploy={"timeout_ms": 700, "isolation": "thread", "max_queue": 3})
        assert r["deploy"]["timeout_ms"] == 700 and r["deploy"]["priority"] == "batch"
        info = c.info()["models"]["m"]
        assert info["deploy"]["isolation"] == "thread" and info["worker"] is None and info["deploy"]["max_queue"] == 3
        # the previous version's worker process is gone with its activation
        assert c.predict("m", columns=ROW)["version"] == 2
        # activate with other settings: they replace the earlier request's (a deploy states its whole
        # wish, as with providers); what it leaves out comes from the package, then the class defaults
        c.activate("m", 2, deploy={"priority": "realtime"})
        d = c.info()["models"]["m"]["deploy"]
        cores = c.info()["scheduler"]["cores"]  # realtime's default: a run per core
        assert d == {"priority": "realtime", "timeout_ms": 5000, "isolation": "thread", "max_concurrency": cores,
                     "max_queue": 16, "memory_mb": 256, **NO_SAMPLING}
        m = _model_metrics(c, "m")
        assert m["priority"] == "realtime" and m["isolation"] == "thread"
        # bad settings: 4xx naming the field, the model untouched
        for bad, field in (({"priority": "fast"}, "priority"), ({"max_concurrency": 0}, "max_concurrency"),
                           ({"timeout_ms": "soon"}, "timeout_ms"), ({"isolation": "vm"}, "isolation")):
            with pytest.raises(DeviceRequestError, match=f"deploy setting {field}") as e:
                c.activate("m", 2, deploy=bad)
            assert e.value.status == 400
        with pytest.raises(DeviceRequestError, match="unknown field 'prio'"):
            c.activate("m", 2, deploy={"prio": "batch"})
        with pytest.raises(DeviceRequestError, match="unknown deploy setting 'prio'"):
            c.install(package(keys, 3, name="m", deploy={"prio": "batch"}))
        with pytest.raises(PackageRejectedError, match="deploy setting memory_mb .*package's deploy field"):
            c.install(package(keys, 3, name="m", deploy={"memory_mb": 1}))
        assert c.info()["models"]["m"]["active"] == 2
    finally:
        a.kill()


def test_full_queue_answers_429_deadlines_504_and_an_overrunning_worker_is_killed(tmp_path, keys):
    a, store = _agent(tmp_path, keys, env=HOOKS)
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        c.install(package(keys, 1, name="slow"), deploy={"isolation": "process", "max_concurrency": 1,
                                                         "max_queue": 1, "timeout_ms": 800})
        c.install(package(keys, 1, name="other"))
        _crash_on(store, "slow", 1, 13.0, "hang")
        answers: dict = {}

        def call(tag, x):
            try:
                answers[tag] = c.predict("slow", columns={"x": [x], "city": ["paris"]})
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                answers[tag] = exc

        first = threading.Thread(target=call, args=("hung", 13.0))
        first.start()
        wait_for(lambda: _model_metrics(c, "slow")["running"] == 1, what="the hung run holds the only slot")
        second = threading.Thread(target=call, args=("queued", 1.0))
        second.start()
        wait_for(lambda: _model_metrics(c, "slow")["queue_length"] == 1, what="a request waiting")
        raw = urllib.request.Request(f"{a.url}/v1/models/slow/predict", method="POST",
                                     data=json.dumps({"columns": ROW}).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(raw, timeout=30)
        assert e.value.code == 429 and int(e.value.headers["Retry-After"]) >= 1
        body = json.loads(e.value.read())
        assert body["kind"] == "overloaded" and "max_queue 1" in body["error"] and body["retry_after_s"] >= 1
        with pytest.raises(DeviceOverloadedError) as e2:
            c.predict("slow", columns=ROW)
        assert e2.value.retry_after >= 1
        first.join(30)
        second.join(30)
        # the hung run: 504 at its deadline; the one behind it: 504 without ever starting
        assert isinstance(answers["hung"], DeviceDeadlineError) and "could not finish" in str(answers["hung"])
        assert isinstance(answers["queued"], DeviceDeadlineError) and "could not start" in str(answers["queued"])
        assert answers["hung"].status == 504 and answers["hung"].kind == "deadline"
        m = _model_metrics(c, "slow")
        assert m["rejected"] == 2 and m["deadline_misses_queue"] == 1 and m["deadline_misses_run"] == 1
        assert m["errors"].get("deadline") == 2
        assert c.predict("other", columns=ROW)["outputs"]["y"] == [[3.0]]  # the others never noticed
        # still running long after its deadline: killed and started again
        wait_for(lambda: _model_metrics(c, "slow")["worker_restarts"] == 1, timeout=30, what="the hung worker killed")
        last = c.info()["models"]["slow"]["worker"]["last_exit"]
        assert "still going" in last["reason"] and last["status"] == -9
        assert wait_for(lambda: c.predict("slow", columns=ROW), what="served again")["outputs"]["y"] == [[3.0]]
        # a hang on one input is that input's doing: the circuit breaker did not suspend the model
        assert c.info()["models"]["slow"]["suspended"] == []
    finally:
        a.kill()


def test_a_worker_that_crashes_is_restarted_and_the_other_models_never_notice(tmp_path, keys):
    a, store = _agent(tmp_path, keys, env=HOOKS)
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        c.install(package(keys, 1, name="crashy"), deploy={"isolation": "process"})
        c.install(package(keys, 1, name="beside"), deploy={"isolation": "process"})
        c.install(package(keys, 1, name="inside", mult=3.0), deploy={"priority": "realtime"})
        _crash_on(store, "crashy", 1, 13.0, "segfault")
        pid0 = c.info()["models"]["crashy"]["worker"]["pid"]
        stop = threading.Event()
        seen = {"ok": 0, "bad": []}

        def others():
            oc = DeviceClient(a.url, TOKEN)
            while not stop.is_set():
                for name, want in (("beside", [[3.0]]), ("inside", [[4.0]])):
                    try:
                        got = oc.predict(name, columns=ROW)["outputs"]["y"]
                        seen["ok"] += got == want
                        if got != want:
                            seen["bad"].append(got)
                    except Exception as exc:  # noqa: BLE001
                        seen["bad"].append(repr(exc))

        t = threading.Thread(target=others)
        t.start()
        try:
            for action, signame in (("segfault", "SIGSEGV"), ("abort", "SIGABRT")):
                _crash_on(store, "crashy", 1, 13.0, action)
                with pytest.raises(DeviceUnavailableError, match=f"crashed \\({signame}") as e:
                    c.predict("crashy", columns={"x": [13.0], "city": ["paris"]})
                assert e.value.status == 503 and e.value.kind == "worker"
                # back within seconds, on a new process
                assert wait_for(lambda: c.predict("crashy", columns=ROW), timeout=20,
                                what="crashy back")["outputs"]["y"] == [[3.0]]
        finally:
            stop.set()
            t.join(30)
        assert seen["bad"] == [] and seen["ok"] > 0
        info = c.info()["models"]["crashy"]["worker"]
        assert info["restarts"] == 2 and info["pid"] != pid0 and "SIGABRT" in info["last_exit"]["reason"]
        m = _model_metrics(c, "crashy")
        assert m["worker_restarts"] == 2 and m["errors"]["worker"] >= 2
        assert _model_metrics(c, "beside")["worker_restarts"] == 0
        kinds = [e["kind"] for e in c.events() if e.get("model") == "crashy"]
        assert kinds.count("worker_exit") == 2 and kinds.count("worker_restarted") == 2
        assert a.alive()
    finally:
        a.kill()


@pytest.mark.parametrize("limit", ["auto", "rlimit"])
def test_a_model_past_its_memory_budget_is_stopped_with_a_clear_error(tmp_path, keys, limit):
    """Under whichever mechanism the machine gives (auto: the worker's own memory cgroup where the
    agent may make one, else RLIMIT_AS), and under RLIMIT_AS asked for."""
    a, _ = _agent(tmp_path, keys, ["--memory-limit", limit])
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        c.install(package(keys, 1, name="other"))
        c.install(build_package(memory_model(), {"name": "mem", "version": 1, "providers": ["cpu"],
                                                 "deploy": {"isolation": "process", "memory_mb": 64}},
                                keys.private_key))
        assert c.predict("mem", columns={"n": [[1000]]})["outputs"]["y"] == [[1000.0]]
        m = _model_metrics(c, "mem")
        assert m["memory_budget_mb"] == 64 and 0 < m["memory_mb"]
        info = c.info()
        mech = info["memory_limit"]["mechanism"]
        assert mech in (("cgroup_v2", "cgroup_v1", "rlimit_as") if limit == "auto" else ("rlimit_as",))
        w = info["models"]["mem"]["worker"]
        # what the worker enforces: its holding with numpy and onnxruntime imported, plus the 64 MB
        assert w["memory_limit"]["mechanism"] == mech and w["memory_limit"]["limit_mb"] > 64
        folder = w["memory_limit"]["cgroup"]
        if mech != "rlimit_as":  # the worker is in a cgroup of its own, whose limit is the one reported
            assert Path(folder).parent == Path(info["memory_limit"]["cgroup"])
            assert (Path(folder) / "cgroup.procs").read_text().split() == [str(w["pid"])]
            limit_file = "memory.max" if mech == "cgroup_v2" else "memory.limit_in_bytes"
            # the worker rounds the limit it reports to 0.1 MB
            assert abs(int((Path(folder) / limit_file).read_text()) / 2**20 - w["memory_limit"]["limit_mb"]) <= 0.05
        else:
            # the worker rounds the limit it reports to 0.1 MB
            assert folder is None and round(w["address_space_limit_mb"], 1) == w["memory_limit"]["limit_mb"]
        # 200 MB of float32s, far past 64 MB (and well within what the machine has)
        with pytest.raises(DeviceUnavailableError, match="exceeded its memory budget of 64 MB") as e:
            c.predict("mem", columns={"n": [[50_000_000]]})
        assert e.value.status == 503 and e.value.kind == "memory"
        assert c.predict("other", columns=ROW)["outputs"]["y"] == [[3.0]]
        assert wait_for(lambda: c.predict("mem", columns={"n": [[10]]}), timeout=20,
                        what="mem back")["outputs"]["y"] == [[10.0]]
        w = c.info()["models"]["mem"]["worker"]
        # RLIMIT_AS: the allocation fails and the worker exits 75 itself; a cgroup: the kernel kills it
        assert w["restarts"] == 1 and w["last_exit"]["kind"] == "memory"
        assert w["last_exit"]["status"] == (75 if mech == "rlimit_as" else -9)
        if mech != "rlimit_as":  # the restarted worker is in a fresh cgroup, the dead one's removed
            again = w["memory_limit"]["cgroup"]
            assert w["memory_limit"]["mechanism"] == mech and again != folder and not Path(folder).exists()
            assert (Path(again) / "cgroup.procs").read_text().split() == [str(w["pid"])]
            c.delete("mem")  # and the model's last one goes with it
            wait_for(lambda: not Path(again).exists(), timeout=10, what=f"{again} removed")
        assert a.alive()
    finally:
        a.kill()


def test_the_device_memory_budget_refuses_an_install_past_it(tmp_path, keys):
    a, _ = _agent(tmp_path, keys, ["--memory-budget-mb", "300"])
    try:
        c = DeviceClient(a.url, TOKEN)
        c.install(package(keys, 1, name="a"), deploy={"memory_mb": 200})
        with pytest.raises(DeviceRequestError, match="budget of 300 MB") as e:
            c.install(package(keys, 1, name="b"), deploy={"memory_mb": 200})
        assert e.value.status == 409 and e.value.kind == "memory_budget"
        assert "b" not in c.info()["models"]
        c.install(package(keys, 1, name="b"), deploy={"memory_mb": 100})  # fits
        # a new version of a replaces a's share, it does not add to it
        c.install(package(keys, 2, name="a"), deploy={"memory_mb": 200})
        info = c.info()
        assert info["memory_budget_mb"] == 300 and info["memory_committed_mb"] == 300
        assert c.predict("a", columns=ROW)["version"] == 2
    finally:
        a.kill()


# ---------------------------------------------------------------------------- the scheduler's order


def _run(coro):
    return asyncio.run(coro)


def test_scheduler_lets_a_batch_request_that_waited_past_aging_go_first():
    from device_bridge.agent.scheduler import Scheduler

    async def scenario(aging_s):
        # shares of 1000:1: by shares alone, normal would always go first
        s = Scheduler(slots=1, aging_s=aging_s, weights={"normal": 1000.0, "batch": 1.0})
        nm = s.lane(("nm", 1), "normal", 4, 16, 1000)
        bt = s.lane(("bt", 1), "batch", 4, 16, 1000)
        order = []
        deadline = time.monotonic() + 10

        async def req(lane, tag):
            await s.start(lane, deadline, time.monotonic())
            order.append(tag)

        assert s.try_start(nm)
        s.passes["batch"] = 5.0  # batch has had its share lately
        tasks = [asyncio.create_task(req(bt, "b0"))]
        await asyncio.sleep(0.08)  # b0 waits past aging_s (0.05) ...
        tasks += [asyncio.create_task(req(nm, f"n{i}")) for i in range(3)]  # ... these have just come
        await asyncio.sleep(0)
        s.done(nm)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return order[0]

    assert _run(scenario(0.05)) == "b0"   # aged: first, whatever the shares say
    assert _run(scenario(60.0)) == "n0"   # not aged: the shares decide


def test_scheduler_shares_without_aging_and_fifo_with_priorities_off():
    from device_bridge.agent.scheduler import Scheduler

    async def scenario(priorities):
        s = Scheduler(slots=1, priorities=priorities, aging_s=60)
        nm = s.lane(("nm", 1), "normal", 4, 64, 1000)
        bt = s.lane(("bt", 1), "batch", 4, 64, 1000)
        rt = s.lane(("rt", 1), "realtime", 4, 64, 1000)
        order = []
        deadline = time.monotonic() + 10

        async def req(lane, tag):
            await s.start(lane, deadline, time.monotonic())
            order.append((tag, lane))

        assert s.try_start(bt)
        tasks = [asyncio.create_task(req(bt, f"b{i}")) for i in range(4)]
        await asyncio.sleep(0.001)
        tasks += [asyncio.create_task(req(nm, f"n{i}")) for i in range(8)]
        await asyncio.sleep(0.001)
        tasks.append(asyncio.create_task(req(rt, "r")))
        await asyncio.sleep(0)
        last = bt
        for _ in range(13):
            s.done(last)
            await asyncio.sleep(0)
            last = order[-1][1]
        await asyncio.gather(*tasks)
        return [t for t, _ in order]

    on = scenario(True)
    on = _run(on)
    assert on[0] == "r"
    # stride scheduling: 4 normal for each batch while both wait
    assert on[1:11] == ["b0", "n0", "n1", "n2", "n3", "b1", "n4", "n5", "n6", "n7"] or \
        on[1:11] == ["n0", "n1", "n2", "n3", "b0", "n4", "n5", "n6", "n7", "b1"]
    off = _run(scenario(False))
    assert off == ["b0", "b1", "b2", "b3", "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "r"]


def test_scheduler_refuses_past_max_queue_and_expires_waiters_at_their_deadline():
    from device_bridge.agent.scheduler import DeadlineMissed, Overloaded, Scheduler

    async def scenario():
        s = Scheduler(slots=1)
        ln = s.lane(("m", 1), "normal", 1, 2, 50)
        assert s.try_start(ln)
        now = time.monotonic()
        waiters = [asyncio.create_task(s.start(ln, now + 0.05, now)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await s.start(ln, now + 10, now)
        assert e.value.status == 429 and e.value.retry_after >= 1
        for w in waiters:
            with pytest.raises(DeadlineMissed):
                await w
        assert ln.queued == 0 and ln.stats.deadline_queue == 2 and ln.stats.rejected == 1
        s.done(ln)
        assert s.busy == 0 and s.try_start(ln)

    _run(scenario())


def test_ipc_messages_round_trip_arrays_of_every_kind():
    import socket

    from device_bridge.agent import ipc

    a, b = socket.socketpair()
    b.settimeout(20)  # a broken sender fails the test instead of hanging it
    arrays = {"f": np.arange(7, dtype=np.float32).reshape(7, 1), "s": np.array(["paris", "", "zürich"], dtype=object),
              "i": np.array([[1, 2], [3, 4]], dtype=np.int64), "e": np.zeros((0, 3), np.float64),
              "b": np.array([True, False])}
    big = np.random.default_rng(1).normal(size=(300_000,))  # larger than a socket buffer: sent in pieces

    def send():
        ipc.send(a, ipc.pack({"id": 1, "op": "run"}, arrays))
        ipc.send(a, ipc.pack({"id": 2}, {"big": big}))

    t = threading.Thread(target=send)
    t.start()
    h, got = ipc.recv(b)
    h2, got2 = ipc.recv(b)
    t.join()
    assert h == {"id": 1, "op": "run"} and h2 == {"id": 2}
    assert got["s"].tolist() == ["paris", "", "zürich"] and got["f"].shape == (7, 1)
    for k in ("f", "i", "e", "b"):
        assert got[k].dtype == arrays[k].dtype and np.array_equal(got[k], arrays[k])
    assert np.array_equal(got2["big"], big)
    a.close()
    with pytest.raises(ipc.Closed):
        ipc.recv(b)
    # the same messages through Frames (how the event loop and a worker read a socket: whatever one
    # read gave), whole, and cut at every few bytes (inside prefixes, headers and arrays)
    small = b"".join(bytes(p) for p in ipc.pack({"id": 1, "op": "run"}, arrays))
    stream = small + b"".join(bytes(p) for p in ipc.pack({"id": 2}, {"big": big})) + small
    for data, step in ((stream, len(stream)), (stream, 65536), (stream, 300_001), (small * 3, 7), (small * 3, 1)):
        frames, msgs = ipc.Frames(), []
        for i in range(0, len(data), step):
            msgs += frames.feed(data[i:i + step])
        assert [h for h, _ in msgs] == ([{"id": 1, "op": "run"}, {"id": 2}, {"id": 1, "op": "run"}]
                                        if data is stream else [{"id": 1, "op": "run"}] * 3)
        for h, got in msgs:
            if h["id"] == 2:
                assert np.array_equal(got["big"], big)
            else:
                assert got["s"].tolist() == ["paris", "", "zürich"]
                assert all(np.array_equal(got[k], arrays[k]) for k in ("f", "i", "e", "b"))
        assert not frames.buf  # nothing left over


def test_the_hubs_desired_deploy_settings_reach_the_agent(tmp_path, keys):
    import hashlib

    from device_test_helpers import start_hub

    from device_bridge.agent.core import AgentConfig, AgentCore
    from device_bridge.agent.hubsync import HubSync
    from device_bridge.client import HubClient

    hub = start_hub(tmp_path)
    try:
        hc = HubClient(hub.url, TOKEN)
        data = package(keys, 1, name="m")
        with pytest.raises(DeviceRequestError, match="deploy setting priority .*desired state"):
            hc.set_desired("m", data, devices=["d"], deploy={"priority": "urgent"})
        hc.set_desired("m", data, devices=["d"], deploy={"priority": "realtime", "timeout_ms": 40})
        desired = hc.http.request("GET", "/v1/agents/d/desired")["models"]["m"]
        assert desired["deploy"] == {"priority": "realtime", "timeout_ms": 40}
    finally:
        hub.kill()
    # the agent applies what the hub asks (apply() alone: the same code the poll loop runs)
    store = tmp_path / "store"
    trust(store, keys)
    core = AgentCore(AgentConfig(name="d", store=store, available_providers=["CPUExecutionProvider"]))
    core.install(None, data)
    sha = hashlib.sha256(data).hexdigest()
    sync = HubSync(core, "http://127.0.0.1:9", "t", "http://127.0.0.1:8")
    sync.apply({"m": {"sha256": sha, "version": 1, "deploy": desired["deploy"]}})
    assert "m" not in sync.errors
    d = core.info()["models"]["m"]["deploy"]
    assert d["priority"] == "realtime" and d["timeout_ms"] == 40


def test_client_error_classes_for_sharing_answers():
    from device_bridge.errors import DeviceServerError, error_for_status

    assert isinstance(error_for_status(429, "busy", kind="overloaded"), DeviceOverloadedError)
    e = error_for_status(504, "late", kind="deadline")
    assert isinstance(e, DeviceDeadlineError) and isinstance(e, DeviceUnavailableError)
    assert type(error_for_status(503, "crashed", kind="worker")) is DeviceUnavailableError
    assert type(error_for_status(503, "past budget", kind="memory")) is DeviceUnavailableError
    assert type(error_for_status(422, "does not load", kind="memory")) is DeviceRequestError
    assert type(error_for_status(409, "device budget", kind="memory_budget")) is DeviceRequestError
    assert type(error_for_status(502, "x")) is DeviceServerError


def test_ipc_sender_never_blocks_on_a_worker_that_reads_nothing():
    import socket

    from device_bridge.agent import ipc

    a, b = socket.socketpair()
    b.settimeout(20)
    sender = ipc.Sender(a)
    msgs = [np.full(200_000, i, dtype=np.float64) for i in range(6)]  # 9.6 MB: more than any socket buffer
    for i, m in enumerate(msgs):
        sender.send(ipc.pack({"id": i}, {"v": m}))  # nobody reads yet: the backlog goes from a thread
    assert sender.flushing  # (a blocking send would never have come back here)
    for i, m in enumerate(msgs):  # all of it arrives, whole and in order
        h, got = ipc.recv(b)
        assert h["id"] == i and np.array_equal(got["v"], m)
    b.close()
    wait_for(lambda: not sender.flushing, what="backlog sent")
    with pytest.raises(OSError):
        for _ in range(100):  # the other end is gone: an error, not a hang
            sender.send(ipc.pack({"id": 99}, {"v": msgs[0]}))
            time.sleep(0.01)


def _thread_cpus(pid: int) -> set[frozenset]:
    """The CPU affinity of every thread of a process (one set each; usually all equal)."""
    import os

    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:
            pass
    return out


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs Linux CPU affinity and 2 cores")
def test_realtime_traffic_keeps_a_core_free_of_batch_workers_and_gives_it_back_when_quiet(tmp_path, keys):
    import os

    every = frozenset(os.sched_getaffinity(0))
    kept = frozenset(sorted(every)[1:])  # the lowest core is the one kept for realtime work
    a, store = _agent(tmp_path, keys, env={**HOOKS, "MLSQL_DEVICE_REALTIME_RESERVE": "1"})
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        c.install(package(keys, 1, name="bt"), deploy={"priority": "batch"})  # its own worker (batch default)
        c.install(package(keys, 1, name="nt"), deploy={"isolation": "process"})  # a normal worker: never confined
        c.install(package(keys, 1, name="rt", mult=3.0), deploy={"priority": "realtime"})
        info = c.info()
        assert info["scheduler"]["realtime_reserve"]["cores"] == 1
        assert info["scheduler"]["realtime_reserve"]["active"] is False
        bt_pid = info["models"]["bt"]["worker"]["pid"]
        nt_pid = info["models"]["nt"]["worker"]["pid"]
        assert _thread_cpus(bt_pid) == {every}
        c.predict("bt", columns=ROW)  # batch traffic alone changes nothing
        assert _thread_cpus(bt_pid) == {every}
        assert c.predict("rt", columns=ROW)["outputs"]["y"] == [[4.0]]
        r = c.info()["scheduler"]["realtime_reserve"]
        assert r["active"] is True and r["batch_cpus"] == sorted(kept)
        assert _thread_cpus(bt_pid) == {kept}  # every thread, ONNX Runtime's included
        assert _thread_cpus(nt_pid) == {every}
        assert c.predict("bt", columns=ROW)["outputs"]["y"] == [[3.0]]
        # a batch worker started while realtime traffic goes on (a restart) is confined from its start
        _crash_on(store, "bt", 1, 13.0, "segfault")
        with pytest.raises(DeviceUnavailableError):
            c.predict("bt", columns={"x": [13.0], "city": ["paris"]})

        def restarted():
            c.predict("rt", columns=ROW)
            w = c.info()["models"]["bt"]["worker"]
            return w["pid"] if w["state"] == "ready" and w["pid"] != bt_pid else None

        new_pid = wait_for(restarted, timeout=20, what="bt restarted")
        assert _thread_cpus(new_pid) == {kept}
        # quiet for the window (1 s): every core again
        wait_for(lambda: _thread_cpus(new_pid) == {every}, timeout=10, what="cores given back")
        r = c.info()["scheduler"]["realtime_reserve"]
        assert r["active"] is False and r["changes"] >= 2
        assert c.predict("bt", columns=ROW)["outputs"]["y"] == [[3.0]]
    finally:
        a.kill()


def test_no_core_is_reserved_below_four_cores_unless_asked(tmp_path, keys):
    a, _ = _agent(tmp_path, keys, extra=["--cores", "2"])
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        assert c.info()["scheduler"]["realtime_reserve"]["cores"] == 0
    finally:
        a.kill()
    a, _ = _agent(tmp_path, keys, extra=["--cores", "4"], name="four")
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        import os
        want = 1 if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2 else 0
        assert c.info()["scheduler"]["realtime_reserve"]["cores"] == want
    finally:
        a.kill()


def test_the_reserve_is_set_on_the_command_line(tmp_path, keys):
    """--realtime-reserve 1 keeps a core on a 2-core budget (where the default keeps none)."""
    import os

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("CPU affinity with 2 or more cores is needed to keep one")
    a, _ = _agent(tmp_path, keys, extra=["--cores", "2", "--realtime-reserve", "1"], name="cli")
    try:
        c = DeviceClient(a.url, TOKEN, timeout=60)
        assert c.info()["scheduler"]["realtime_reserve"]["cores"] == 1
    finally:
        a.kill()
