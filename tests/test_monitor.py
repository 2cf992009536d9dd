"""The live device monitor, end to end: a real agent process on loopback serving a deployed model,
a load generator sending predictions, and a real IPython kernel (jupyter_client) running the
monitor while it runs other cells too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bridge_procs import start_agent

TOKEN = "monitor-test-token"
ROOT = Path(__file__).resolve().parent.parent


def load(url: str, body: Path, seconds: float, clients: int = 2) -> subprocess.Popen:
    """bench/loadgen.py in its own process: `clients` keep-alive connections sending predictions."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadgen.py"), url, "/v1/models/species/predict",
                             "application/json", str(body), "--clients", str(clients), "--seconds", str(seconds),
                             "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Kernel:
    """A real ipykernel through jupyter_client; every iopub message is kept with its arrival time."""

    def __init__(self, env: dict):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env)
        self.seen: list[tuple[float, dict]] = []

    def run(self, code: str, timeout: float = 60) -> dict:
        msg_id = self.kc.execute(code)
        out, data, errors = [], [], []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except Exception:  # queue.Empty
                continue
            self.seen.append((time.time(), msg))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                out.append(c["text"])
            elif t == "error":
                errors.append(f"{c['ename']}: {c['evalue']}")
            elif t in ("execute_result", "display_data", "update_display_data"):
                data.append((t, c))
            elif t == "status" and c["execution_state"] == "idle":
                return {"out": "".join(out), "data": data, "errors": errors}
        raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]}")

    def drain(self, seconds: float) -> None:
        """Read iopub for `seconds` (the monitor's comm messages arrive without any cell running)."""
        end = time.time() + seconds
        while time.time() < end:
            try:
                self.seen.append((time.time(), self.kc.get_iopub_msg(timeout=max(0.05, end - time.time()))))
            except Exception:  # queue.Empty
                pass

    def value(self, expr: str):
        r = self.run(f"import json as _j; print(_j.dumps({expr}, default=str))")
        assert not r["errors"], r["errors"]
        return json.loads(r["out"].strip().splitlines()[-1])

    def updates_since(self, t0: float, comm_id: str) -> list[tuple[float, dict]]:
        return [(t, m["content"]["data"]["state"]) for t, m in self.seen
                if t >= t0 and m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == comm_id
                and m["content"]["data"].get("method") == "update" and "updates" in m["content"]["data"]["state"]]

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def wait_state(k: Kernel, cond, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    while True:
        snap = k.value("m.state_snapshot()")
        if cond(snap):
            return snap
        if time.time() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s; state {snap['status']} {snap['error']}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import mlsql
    import mlsql.datasets
    from device_bridge.keys import load_or_create_keypair

    tmp = tmp_path_factory.mktemp("monitor")
    s = mlsql.connect(tmp / "ws")
    mlsql.datasets.load("penguins", session=s)
    load_or_create_keypair(s.workspace.keys_dir)
    agent, url = start_agent(tmp, token=TOKEN, trust=tmp / "ws" / "keys" / "signing_key.pub")
    k = None
    try:
        s.sql(f"CREATE DEVICE 'd1' OPTIONS (url = '{url}', token = '{TOKEN}')")
        s.sql("""CREATE MODEL species OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
                 max_iterations = 5) AS SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm, species
                 FROM penguins""")
        s.sql("DEPLOY MODEL species TO DEVICE 'd1'")
        rows = s.sql("SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm FROM penguins "
                     "WHERE bill_length_mm IS NOT NULL ORDER BY bill_length_mm LIMIT 8").to_arrow().to_pylist()
        s.close()  # the kernel opens the workspace itself
        # 8 rows a request, flipper lengths ten times longer than any penguin's: flipper_length_mm drifts
        for r in rows:
            r["flipper_length_mm"] *= 10
        body = tmp / "body.json"
        body.write_text(json.dumps({"rows": rows}))
        env = {**os.environ, "MLSQL_HOME": str(tmp / "ws"), "PYTHONPATH": str(ROOT)}
        k = Kernel(env)
        r = k.run("import mlsql, time\nm = mlsql.monitor('d1', interval=1.0)\nm")
        assert not r["errors"], r["errors"]
        rig = {"tmp": tmp, "agent": agent, "url": url, "body": body, "k": k, "display": r["data"]}
        yield rig
        agent = rig["agent"]  # a test may have restarted it
    finally:
        if k is not None:
            k.close()
        agent.kill()
        agent.wait()


def test_monitor_updates_under_load_while_other_cells_run(rig):
    k = rig["k"]
    # the output is the widget (with a text/HTML fallback for front ends without widgets)
    (kind, shown), = [d for d in rig["display"] if d[0] == "display_data"]
    view = shown["data"]["application/vnd.jupyter.widget-view+json"]
    assert "text/plain" in shown["data"] and "device d1" in shown["data"]["text/html"]
    gen = load(rig["url"], rig["body"], seconds=10)
    try:
        time.sleep(0.5)
        t0 = time.time()
        # another cell: a 2-second loop of SELECTs on the workspace while the monitor updates
        r = k.run("s = mlsql.connect()\nn, t = 0, time.perf_counter()\n"
                  "while time.perf_counter() - t < 2:\n"
                  "    n += s.sql('SELECT count(*) FROM penguins WHERE bill_length_mm > 40').scalar() > 0\n"
                  "print(n, round(time.perf_counter() - t, 3))")
        assert not r["errors"], r["errors"]
        n_selects, took = r["out"].split()
        assert int(n_selects) >= 10 and float(took) < 3.0
        assert time.time() - t0 < 4.0, "the SELECT cell was held up"
        k.drain(max(0.0, 4.0 - (time.time() - t0)))
        ups = k.updates_since(t0, view["model_id"])
        # one comm message per interval carries the new point, the history and the rest together
        assert len(ups) >= 3, [u[1].get("updates") for u in ups]
        assert all("history" in st and "latest" in st for _, st in ups)
        counts = [st["updates"] for _, st in ups]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        snap = k.value("m.state_snapshot()")
    finally:
        gen.wait(30)
    assert snap["status"] == "live" and snap["error"] == ""
    assert snap["model"] == "species" and snap["version"] == 1
    assert snap["providers"] == ["CPUExecutionProvider"] and snap["node_providers"]["CPUExecutionProvider"] > 0
    # how it shares the device: deployed without settings, the agent's normal class, in the agent
    sharing = snap["latest"]["sharing"]
    assert (sharing["priority"], sharing["isolation"]) == ("normal", "thread")
    assert sharing["rejected"] == 0 and sharing["deadline_misses"] == 0 and sharing["queue_length"] >= 0
    # points under the load generator's 8-row requests, each from the difference of two polls (the
    # first point is the agent's own windowed figures, which include the DEPLOY's one-row first inference)
    loaded = [p for p in snap["history"][1:] if p["requests_per_s"] and p["requests_per_s"] > 0]
    assert len(loaded) >= 3
    reqs = [p["requests"] for p in loaded]
    assert reqs == sorted(reqs) and reqs[-1] > reqs[0]
    for p in loaded:  # windowed quantiles from the agent's histograms
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] < 5000
        assert p["rows_per_s"] == pytest.approx(8 * p["requests_per_s"], rel=0.05)
        assert p["error_rate"] == 0
    assert snap["latest"]["total_requests"] == snap["history"][-1]["requests"] >= reqs[-1]
    # drift: only the column we stretched is flagged, measured in training std
    drift = {d["column"]: d for d in snap["drift"]}
    assert drift["flipper_length_mm"]["flagged"] and drift["flipper_length_mm"]["score"] > 3
    assert not drift["bill_length_mm"]["flagged"] and drift["bill_length_mm"]["train_mean"] == pytest.approx(43.9, abs=0.1)
    assert drift["island"]["kind"] == "string" and not drift["island"]["flagged"]
    # events: the deploy
    assert any(e["kind"] == "installed" and e["model"] == "species" and e["version"] == 1 for e in snap["events"])
    out = json.loads(gen.stdout.read())
    assert out["errors"] == 0 and out["requests"] > 0


def test_monitor_shows_a_lost_agent_and_recovers(rig):
    k, tmp = rig["k"], rig["tmp"]
    before = k.value("m.state_snapshot()")
    assert before["status"] == "live"
    port = int(rig["url"].rsplit(":", 1)[1])
    rig["agent"].kill()
    rig["agent"].wait()
    t_kill = time.time()
    down = wait_state(k, lambda s: s["status"] == "disconnected", 6, "disconnected after the agent died")
    assert str(port) in down["error"] and ("unreachable" in down["error"] or "lost" in down["error"])
    assert 0 < down["last_ok"] <= t_kill + 0.5   # the time of the last good update is kept ...
    assert down["latest"]["total_requests"] >= before["latest"]["total_requests"] > 0  # ... and the last values
    assert "disconnected" in k.value("m._summary_text()")
    rig["agent"], url = start_agent(tmp, token=TOKEN, trust=tmp / "ws" / "keys" / "signing_key.pub", port=port,
                                    tag="agent2")
    assert url == rig["url"]
    back = wait_state(k, lambda s: s["status"] == "live" and s["last_ok"] > time.time() - 2, 15,
                      "live again after the agent came back")
    assert back["error"] == "" and back["updates"] > down["updates"] and back["version"] == 1
    assert back["providers"] == ["CPUExecutionProvider"]


def test_stop_shows_stopped_keeps_last_values_and_sends_nothing_more(rig):
    k = rig["k"]
    gen = load(rig["url"], rig["body"], seconds=3, clients=1)
    gen.wait(30)
    wait_state(k, lambda s: s["latest"].get("total_requests", 0) > 0 and s["status"] == "live", 5, "traffic seen")
    r = k.run("m.stop()")
    assert not r["errors"], r["errors"]
    # outputs the monitor showed become the static summary (what a saved notebook keeps)
    (kind, upd), = [d for d in r["data"] if d[0] == "update_display_data"]
    assert "application/vnd.jupyter.widget-view+json" not in upd["data"]
    assert "stopped" in upd["data"]["text/html"] and "species@1" in upd["data"]["text/plain"]
    snap = k.value("m.state_snapshot()")
    assert snap["status"] == "stopped"
    t0 = time.time()
    k.drain(2.5)
    assert k.value("m.state_snapshot()['updates']") == snap["updates"]
    model_id = rig["display"][0][1]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert k.updates_since(t0, model_id) == []
    assert not k.value("m._thread.is_alive()")
    # the text fallback has the last values
    text = k.value("m._repr_mimebundle_()['text/plain']")
    total = snap["latest"]["total_requests"]
    assert f"{total:,} requests" in text and "species@1 on CPUExecutionProvider" in text and "stopped" in text
    assert "drift: flipper_length_mm" in text


def test_window_quantiles_are_those_of_the_requests_between_two_polls():
    from device_bridge.telemetry import LatencyHistogram
    from mlsql.notebook.monitor import _bounds, _window_quantiles

    agent, only_new = LatencyHistogram(), LatencyHistogram()
    for ms in [0.05] * 300:  # before the first poll
        agent.add(ms)
    before = agent.snapshot()["buckets"]
    for ms in [0.2] * 100 + [1.0] * 90 + [8.0] * 8 + [40.0] * 2 + [60.0]:
        agent.add(ms)
        only_new.add(ms)
    q = _window_quantiles(agent.snapshot()["buckets"], before, _bounds())
    want = only_new.snapshot()
    assert (q["p50_ms"], q["p95_ms"], q["p99_ms"]) == (want["p50_ms"], want["p95_ms"], want["p99_ms"])
    assert 0.5 < q["p50_ms"] < 1.2 and 5 < q["p95_ms"] < 10 < 30 < q["p99_ms"] < 50
    # no request in the interval: no point rather than a zero
    assert _window_quantiles(before, before, _bounds()) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_event_lines_and_drift_without_training_statistics():
    from types import SimpleNamespace

    from mlsql.notebook.monitor import DeviceMonitor, _event_text

    trip = {"kind": "circuit_breaker", "model": "m", "version": 2, "rolled_back_to": 1,
            "reason": "error rate 0.60 over the last 20 requests"}
    assert _event_text(trip) == "circuit breaker m@2 -> rolled back to @1 - error rate 0.60 over the last 20 requests"
    assert _event_text({"kind": "rollback", "model": "m", "version": 1, "previous": 2}) == "rollback m@1 (was @2)"
    me = SimpleNamespace(drift_threshold=3.0, _unseen_threshold=0.1)
    live = {"columns": {"x": {"kind": "numeric", "count": 10, "mean": 7.0}}}
    rows, note = DeviceMonitor._drift(me, live, {"active": 1}, {"models": {}})
    assert rows == [] and "not available" in note  # an agent from before training_stats in /v1/info
    rows, note = DeviceMonitor._drift(me, live, {"training_stats": {"x": {"mean": 1.0, "std": 2.0}}}, {"models": {}})
    assert note == "" and rows[0]["score"] == 3.0 and not rows[0]["flagged"]  # 3 std: at the threshold


def test_latency_shown_is_the_newest_window_that_had_requests():
    """An interval without requests has no latency: the text summary shows the same window as
    the chart's legend (the newest with requests) and how old it is, never '–' beside a legend
    that reads 89.3 ms."""
    from types import SimpleNamespace

    from mlsql.notebook.monitor import HISTORY_FIELDS, DeviceMonitor, last_latency

    history = [[100.0, 80.1, 95.0, 99.0, 2.0, 16.0, 0.0, 10],
               [101.0, 89.3, 120.0, 130.0, 2.0, 16.0, 0.0, 12],
               [102.0, None, None, None, 0.0, 0.0, 0.0, 12],
               [103.0, None, None, None, 0.0, 0.0, 0.0, 12]]
    assert last_latency(history) == {"t": 101.0, "p50_ms": 89.3, "p95_ms": 120.0, "p99_ms": 130.0}
    assert last_latency(history[2:]) == {"t": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    me = SimpleNamespace(device_name="d1", url="http://d1", status="live", error="", last_ok=0.0, model="species",
                         version=1, providers=["CPUExecutionProvider"], drift=[], drift_note="", events=[],
                         history=history, history_fields=list(HISTORY_FIELDS),
                         latest={"p50_ms": None, "p95_ms": None, "p99_ms": None, "total_requests": 12,
                                 "requests_per_s": 0.0, "rows_per_s": 0.0, "error_rate": 0.0})
    me._latency_age = lambda q: DeviceMonitor._latency_age(me, q)
    assert "p50/p95/p99 89.3/120/130 ms (2 s ago)" in DeviceMonitor._summary_text(me)
    assert "<td>89.3 (2 s ago)</td>" in DeviceMonitor._summary_html(me)
    me.history = history[:2]  # the newest interval had requests: no age
    assert DeviceMonitor._summary_text(me).endswith("p50/p95/p99 89.3/120/130 ms")
