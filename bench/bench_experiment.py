"""Experiments: what the readout's statistics cost, and what an experiment costs the agent's predict path.

    python bench/bench_experiment.py [--rows 100000] [--seconds 2] [--rounds 3]

1. **Readout statistics** (mlsql/ml/experiments.py): ``readout`` over two arms of ``--rows``
   labelled rows each, metrics accuracy (z test), log_loss (Welch) and p95_latency_ms (bootstrap,
   2,000 replicates over ``--rows // 10`` requests per arm); and the bootstrap alone: the readout's
   (each replicate's percentile drawn from the order statistics' Beta laws: one sort, O(1) a
   replicate) against resampling by index (numpy, blocks of replicates as one index matrix each,
   ``np.percentile`` per row: the textbook bootstrap), in the same run.
2. **Predict path**: one agent, one model (the scorer of the device tests: x * 2 + city), single-row
   JSON predictions from one keep-alive connection for ``--seconds`` per round, in turns: no
   experiment, an experiment by device, an experiment by request (each request with its own
   ``X-Request-Ids``, hashed per request); the median requests/s of ``--rounds`` rounds each.

Prints the figures with the load average and writes bench/results/experiment.json.
"""

from __future__ import annotations

import argparse
import http.client
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "device_bridge"))

from bench_device import TOKEN, Agent  # noqa: E402


def bench_stats(rows: int) -> dict:
    from mlsql.ml import experiments as X

    rng = np.random.default_rng(0)
    reqs = max(rows // 10, 10)
    data = {
        arm: {
            "accuracy": (rng.random(rows) < p).astype(float),
            "log_loss": rng.exponential(0.4, rows),
            "p95_latency_ms": rng.lognormal(1.0, 0.3, reqs),
        }
        for arm, p in (("A", 0.85), ("B", 0.80))
    }
    X.readout(data, ["A", "B"], [0.5, 0.5], ["accuracy"], {"A": 1, "B": 1})  # scipy imported before timing
    t0 = time.perf_counter()
    X.readout(
        data, ["A", "B"], [0.5, 0.5], ["accuracy", "log_loss", "p95_latency_ms"], {"A": reqs, "B": reqs}
    )
    readout_s = time.perf_counter() - t0
    a = data["A"]["p95_latency_ms"]
    t0 = time.perf_counter()
    X.bootstrap_percentiles(a, 95.0, X.BOOTSTRAP_REPLICATES, np.random.default_rng(1))
    vec_s = time.perf_counter() - t0
    r = np.random.default_rng(1)
    t0 = time.perf_counter()
    block = max(1, 4_000_000 // a.size)
    for s in range(0, X.BOOTSTRAP_REPLICATES, block):
        k = min(block, X.BOOTSTRAP_REPLICATES - s)
        np.percentile(a[r.integers(0, a.size, size=(k, a.size))], 95.0, axis=1)
    loop_s = time.perf_counter() - t0
    return {
        "rows_per_arm": rows,
        "requests_per_arm": reqs,
        "readout_s": readout_s,
        "bootstrap_order_statistics_s": vec_s,
        "bootstrap_resampling_s": loop_s,
        "bootstrap_speedup": loop_s / vec_s,
    }


def _rate(url: str, seconds: float, header_ids: bool) -> float:
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=30)
    body = json.dumps({"columns": {"x": [1.0], "city": ["rome"]}}).encode()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        if header_ids:
            h["X-Request-Ids"] = f"r{n}"
        conn.request("POST", "/v1/models/scorer/predict", body, h)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        n += 1
    conn.close()
    return n / seconds


def bench_predict(seconds: float, rounds: int) -> dict:
    from device_test_helpers import make_keys, package, trust

    from device_bridge.client import DeviceClient

    with tempfile.TemporaryDirectory(prefix="bench-expt-") as d:
        tmp = Path(d)
        kp = make_keys(tmp / "keys")
        store = tmp / "store"
        trust(store, kp)
        agent = Agent(
            ["serve", "--name", "bench-e", "--port", "0", "--store", str(store), "--token", TOKEN],
            tmp / "ready.json",
        )
        try:
            c = DeviceClient(agent.url, TOKEN)
            c.install(package(kp, 1, mult=2.0))
            c.install(package(kp, 2, mult=3.0))
            arms = [{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}]
            modes = {"none": (None, False), "device": ("device", False), "request": ("request", True)}
            got: dict[str, list[float]] = {m: [] for m in modes}
            _rate(agent.url, 0.5, False)  # warm: both sessions loaded below, the connection path warm
            for _ in range(rounds):
                for mode, (unit, ids) in modes.items():
                    if unit is None:
                        c.stop_experiment("scorer")
                    else:
                        c.set_experiment("scorer", {"id": "bench", "unit": unit, "arms": arms})
                    got[mode].append(_rate(agent.url, seconds, ids))
            med = {m: float(np.median(v)) for m, v in got.items()}
            return {
                "seconds": seconds,
                "rounds": rounds,
                "requests_per_s": got,
                "median_requests_per_s": med,
                "device_vs_none": med["device"] / med["none"],
                "request_vs_none": med["request"] / med["none"],
            }
        finally:
            agent.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "experiment.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    stats = bench_stats(args.rows)
    print(
        f"readout, 2 arms x {stats['rows_per_arm']} rows, 3 metrics: {stats['readout_s'] * 1000:.0f} ms; "
        f"bootstrap of {stats['requests_per_arm']} requests: order statistics "
        f"{stats['bootstrap_order_statistics_s'] * 1000:.1f} ms, resampling {stats['bootstrap_resampling_s'] * 1000:.0f} ms "
        f"({stats['bootstrap_speedup']:.0f}x)"
    )
    pred = bench_predict(args.seconds, args.rounds)
    m = pred["median_requests_per_s"]
    print(
        f"single-row predicts/s: no experiment {m['none']:.0f}, by device {m['device']:.0f} "
        f"({pred['device_vs_none']:.2f}), by request {m['request']:.0f} ({pred['request_vs_none']:.2f})"
    )
    load_after = os.getloadavg()
    print(f"load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_average": {"before": load_before, "after": load_after},
        "stats": stats,
        "predict": pred,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
