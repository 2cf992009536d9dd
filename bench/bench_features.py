"""Feature views on the device: ingest rate, the predict cost of filling features in, state per key.

    python bench/bench_features.py [--events 200000] [--keys 1000] [--requests 3000]

One real agent process pinned to one core (``taskset -c 0``; the client runs beside it), with a view
of 10 features (counts, sums, avg, min, max, last, count distinct; windows of 1 hour to 7 days):

- events ingested per second: ``--events`` events over ``--keys`` keys and 3 days, in time order, in
  POST /v1/events batches of 1,000 (JSON rows) and of 10,000 (binary columns), each acknowledged
  (committed) before the next is sent; the goal is 50,000 events/s or more;
- predict p50 of one row: the model whose package carries the view (the request sends the key and x;
  the agent fills the 10 features in) against the same ONNX graph fed the 10 values in the request
  (goal: at most 0.2 ms added), requests interleaved, one client thread, keep-alive connection;
- state bytes per key: /v1/metrics' state_bytes over the keys held.

Prints the figures and writes bench/results/features.json with the load averages before and after.
The SQL side's ``ML.FEATURES_AT`` figure (bench/bench_features_at.py, over 10 million events) is
added under ``features_at`` when that script exists (its ``run()``).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "device_bridge"))

from bridge_procs import start_bridge  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from device_bridge import columns as colfmt  # noqa: E402
from device_bridge.client import DeviceClient  # noqa: E402
from device_bridge.keys import load_or_create_keypair, public_key_to_pem  # noqa: E402
from device_bridge.package import build_package  # noqa: E402

TOKEN = "bench-token"
RESULTS = HERE / "results" / "features.json"
US = 1_000_000
H, D = 3600 * US, 86400 * US
T0 = 1_790_000_000 * US


def _eq(col, lit):
    return {"op": "=", "args": [{"col": col}, {"lit": lit}]}


FEATURES = [
    {"name": "clicks_1h", "agg": "count", "arg": None, "filter": _eq("kind", "click"), "window_us": H, "type": "int64"},
    {"name": "n_1d", "agg": "count", "arg": None, "filter": None, "window_us": D, "type": "int64"},
    {"name": "qty_1d", "agg": "sum", "arg": {"col": "qty"}, "filter": None, "window_us": D, "type": "int64"},
    {"name": "avg_price_7d", "agg": "avg", "arg": {"col": "price"}, "filter": None, "window_us": 7 * D,
     "type": "float64"},
    {"name": "max_price_7d", "agg": "max", "arg": {"col": "price"}, "filter": None, "window_us": 7 * D,
     "type": "float64"},
    {"name": "min_price_1d", "agg": "min", "arg": {"col": "price"}, "filter": None, "window_us": D, "type": "float64"},
    {"name": "spend_7d", "agg": "sum", "arg": {"op": "*", "args": [{"col": "price"}, {"col": "qty"}]},
     "filter": _eq("kind", "purchase"), "window_us": 7 * D, "type": "float64"},
    {"name": "purchases_1d", "agg": "count", "arg": None, "filter": _eq("kind", "purchase"), "window_us": D,
     "type": "int64"},
    {"name": "n_kinds_1d", "agg": "count_distinct", "arg": {"col": "kind"}, "filter": None, "window_us": D,
     "type": "int64", "max_distinct": 64},
    {"name": "last_qty_1d", "agg": "last", "arg": {"col": "qty"}, "filter": None, "window_us": D, "type": "int64"},
]
SCHEMA = [{"name": "user_id", "type": "string"}, {"name": "ts", "type": "timestamp"},
          {"name": "kind", "type": "string"}, {"name": "price", "type": "float64"}, {"name": "qty", "type": "int64"}]
VIEW = {"format": 1, "name": "activity", "table": "app_events", "key": "user_id", "time_col": "ts", "ttl_us": 30 * D,
        "schema": SCHEMA, "features": FEATURES, "sql": "(bench)"}
INPUTS = ["x"] + [f["name"] for f in FEATURES]


def model() -> bytes:
    """y = w . [x, features] over float32 [N, 1] inputs (a linear scorer, as exported models are)."""
    nodes = [helper.make_node("Concat", INPUTS, ["all"], axis=1), helper.make_node("MatMul", ["all", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1]) for n in INPUTS],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [len(INPUTS), 1], [0.1] * len(INPUTS))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def events(n: int, n_keys: int, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    ts = np.sort(T0 + rng.integers(0, 3 * D, n))
    return {"user_id": np.array([f"u{k:05d}" for k in rng.integers(0, n_keys, n)]), "ts": ts,
            "kind": np.array(["click", "view", "purchase", "share"])[rng.integers(0, 4, n)],
            "price": np.round(rng.gamma(2.0, 20.0, n), 2), "qty": rng.integers(1, 10, n)}


def post(conn: http.client.HTTPConnection, body: bytes, ctype: str) -> None:
    conn.request("POST", "/v1/events", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"events: {resp.status} {data[:300]!r}")


def ingest(url: str, ev: dict, lo: int, hi: int, batch: int, binary: bool) -> tuple[float, int]:
    """Seconds to send events lo..hi in batches (bodies built before the clock starts)."""
    bodies = []
    for a in range(lo, hi, batch):
        b = min(hi, a + batch)
        if binary:
            bodies.append(colfmt.encode({k: v[a:b] for k, v in ev.items()}, {"table": "app_events"}))
        else:
            rows = [{"user_id": u, "ts": t, "kind": k, "price": p, "qty": q} for u, t, k, p, q in zip(
                ev["user_id"][a:b].tolist(), ev["ts"][a:b].tolist(), ev["kind"][a:b].tolist(),
                ev["price"][a:b].tolist(), ev["qty"][a:b].tolist())]
            bodies.append(json.dumps({"table": "app_events", "rows": rows}).encode())
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=60)
    ctype = colfmt.CONTENT_TYPE if binary else "application/json"
    t0 = time.perf_counter()
    for body in bodies:
        post(conn, body, ctype)
    s = time.perf_counter() - t0
    conn.close()
    return s, hi - lo


def predict_p50(url: str, values: dict, keys: list[str], at: int, n: int) -> dict:
    """p50/p90 in ms of one-row JSON predicts: the view model (key + x) and the direct model (x and
    the 10 values), interleaved on one keep-alive connection."""
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=60)
    hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    times = {"view": [], "direct": []}
    for i in range(n):
        k = keys[i % len(keys)]
        reqs = {"view": ("/v1/models/with_view/predict",
                         json.dumps({"columns": {"user_id": [k], "x": [[1.0]]}, "at": at}).encode()),
                "direct": ("/v1/models/direct/predict",
                           json.dumps({"columns": {"x": [[1.0]], **{f: [[v]] for f, v in values[k].items()}}}).encode())}
        for name in (("view", "direct") if i % 2 else ("direct", "view")):
            path, body = reqs[name]
            t0 = time.perf_counter()
            conn.request("POST", path, body, hdr)
            resp = conn.getresponse()
            data = resp.read()
            dt = (time.perf_counter() - t0) * 1000
            if resp.status != 200:
                raise RuntimeError(f"{name}: {resp.status} {data[:300]!r}")
            if i >= 100:  # the first 100 warm up
                times[name].append(dt)
    conn.close()
    out = {name: {"p50_ms": round(float(np.percentile(t, 50)), 4), "p90_ms": round(float(np.percentile(t, 90)), 4)}
           for name, t in times.items()}
    out["added_p50_ms"] = round(out["view"]["p50_ms"] - out["direct"]["p50_ms"], 4)
    return out


def features_at_figure() -> dict | None:
    """The SQL side's ML.FEATURES_AT bench, when bench/bench_features_at.py exists: its run()."""
    path = HERE / "bench_features_at.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("bench_features_at", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=3_000)
    a = ap.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-features-") as d:
        tmp = Path(d)
        kp = load_or_create_keypair(tmp / "keys")
        pub = tmp / "ws.pub"
        pub.write_bytes(public_key_to_pem(kp.public_key))
        proc, listening = start_bridge(["serve", "--name", "bench-f", "--port", "0", "--store", str(tmp / "store"),
                                        "--token", TOKEN, "--trust", str(pub), "--cores", "1"], tmp, "agent",
                                       command=["taskset", "-c", "0", sys.executable, "-m", "device_bridge"])
        url = listening[0]["url"]
        try:
            c = DeviceClient(url, TOKEN)
            c.install(build_package(model(), {"name": "with_view", "version": 1, "providers": ["cpu"],
                                              "feature_views": [VIEW]}, kp.private_key))
            c.install(build_package(model(), {"name": "direct", "version": 1, "providers": ["cpu"]}, kp.private_key))
            ev = events(a.events, a.keys)
            half = a.events // 2
            s_json, n_json = ingest(url, ev, 0, half, 1_000, binary=False)
            s_bin, n_bin = ingest(url, ev, half, a.events, 10_000, binary=True)
            m = c.metrics()["features"]["activity"]
            at = int(ev["ts"][-1])
            keys = sorted(set(ev["user_id"][:5000].tolist()))[:200]
            values = {k: {f: (v if v is not None else 0.0) for f, v in c.features("activity", k, at)["features"].items()}
                      for k in keys}
            lat = predict_p50(url, values, keys, at, a.requests)
        finally:
            proc.kill()
            proc.wait(10)
    res = {
        "ingest": {"json_rows_batches_of_1000": {"events": n_json, "seconds": round(s_json, 3),
                                                  "events_per_s": round(n_json / s_json)},
                   "binary_columns_batches_of_10000": {"events": n_bin, "seconds": round(s_bin, 3),
                                                       "events_per_s": round(n_bin / s_bin)},
                   "goal_events_per_s": 50_000, "agent_cores": "taskset -c 0"},
        "predict_one_row": {**lat, "goal_added_ms": 0.2, "features": len(FEATURES), "requests": a.requests},
        "state": {"keys": m["keys"], "rows": m["rows"], "state_bytes": m["state_bytes"],
                  "bytes_per_key": round(m["state_bytes"] / max(1, m["keys"])),
                  "bytes_per_event": round(m["state_bytes"] / max(1, m["rows"]), 1), "log_bytes": m["log_bytes"]},
        "features_at": features_at_figure(),
        "bench_seconds": None,
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "command": "python bench/bench_features.py " + " ".join(sys.argv[1:]),
    }
    res["bench_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    fa = res["features_at"] or {}
    print(f"\nThe four figures (issue 25), one run of {res['bench_seconds']:.0f} s, load average before "
          f"{res['load_avg_before']}, after {res['load_avg_after']}:\n"
          f"  ingest: {res['ingest']['json_rows_batches_of_1000']['events_per_s']:,} events/s (JSON rows), "
          f"{res['ingest']['binary_columns_batches_of_10000']['events_per_s']:,} events/s (binary columns); goal 50,000\n"
          f"  predict p50 added by filling {len(FEATURES)} features in: {lat.get('added_p50_ms')} ms; goal 0.2\n"
          f"  ML.FEATURES_AT over {fa.get('events', 0):,} events: {fa.get('ratio')}x the hand-written DuckDB SQL; goal 1.1\n"
          f"  state: {res['state']['bytes_per_key']:,} bytes per key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
