"""Device data through the hub: how fast an agent's samples reach the hub's Parquet store.

    python bench/bench_device_data.py [--rows 200000] [--quick]

An agent (sample_rate = 1, the bench's xgboost model: 20 float inputs, 2 outputs) answers
batches of 256 rows while its hub is down, so its sample store fills (``--rows`` rows); then the
hub starts and the agent uploads in its report cycle (zstd Arrow batches of at most 4 MiB of
rows). Measured: seconds from the hub's start until the agent holds nothing unacknowledged, rows/s
and MB/s (store bytes) through the hub, the hub's Parquet bytes per row, and a check that the hub
holds exactly the rows answered. Prints the figures and writes bench/results/device_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_device import TOKEN, Agent, xgb_onnx  # noqa: E402

from device_bridge import columns as colfmt  # noqa: E402
from device_bridge.client import DeviceClient, HubClient  # noqa: E402
from device_bridge.keys import load_or_create_keypair, public_key_to_pem  # noqa: E402
from device_bridge.package import build_package  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub(tmp: Path, port: int) -> Agent:
    return Agent(["hub", "--port", str(port), "--store", str(tmp / "hub"), "--token", TOKEN], tmp / "hub.json")


def run(rows: int, batch: int = 256) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-devdata-") as d:
        tmp = Path(d)
        kp = load_or_create_keypair(tmp / "keys")
        pub = tmp / "ws.pub"
        pub.write_bytes(public_key_to_pem(kp.public_key))
        port = free_port()
        h = hub(tmp, port)
        store = tmp / "agent"
        store.mkdir()
        token = HubClient(h.url, TOKEN).enroll("bench-d")
        (store / "hub_token").write_text(token + "\n")
        os.chmod(store / "hub_token", 0o600)
        h.stop()  # down while the agent fills its store
        agent = Agent(["serve", "--name", "bench-d", "--port", "0", "--store", str(store), "--token", TOKEN,
                       "--trust", str(pub), "--hub", f"http://127.0.0.1:{port}", "--hub-interval", "0.2"],
                      tmp / "agent.json")
        try:
            c = DeviceClient(agent.url, TOKEN)
            c.install(build_package(xgb_onnx(100), {"name": "xgb", "version": 1, "providers": ["cpu"]}, kp.private_key),
                      deploy={"sample_rate": 1.0, "sample_max_mb": 4096})
            rng = np.random.default_rng(3)
            body = colfmt.encode({"input": rng.normal(size=(batch, 20)).astype(np.float32)})
            sent = 0
            t0 = time.perf_counter()
            while sent < rows:
                c.http.request("POST", "/v1/models/xgb/predict", body, colfmt.CONTENT_TYPE, accept=colfmt.CONTENT_TYPE)
                sent += batch
            fill_s = time.perf_counter() - t0
            while c.info()["models"]["xgb"]["samples"]["queued_rows"]:
                time.sleep(0.1)
            st = c.info()["models"]["xgb"]["samples"]
            held, store_bytes = st["rows"], st["bytes"]
            t0 = time.perf_counter()
            h = hub(tmp, port)
            hub_start_s = time.perf_counter() - t0
            while True:
                st = c.info()["models"]["xgb"]["samples"]
                if st["pending_upload_rows"] == 0 and st["queued_rows"] == 0:
                    break
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"upload not done in 600 s: {st}")
                time.sleep(0.05)
            upload_s = time.perf_counter() - t0
            hc = HubClient(h.url, TOKEN)
            t1 = time.perf_counter()
            table = hc.device_data("samples", model="xgb", max_rows=1_000_000)
            read_s = time.perf_counter() - t1
            parquet = sum(p.stat().st_size for p in (tmp / "hub" / "data").rglob("*.parquet"))
            ids = table.column("request_id")
            import pyarrow.compute as pc

            return {
                "rows_answered": sent, "rows_held_before_upload": held, "dropped_rows": st["dropped_rows"],
                "store_bytes_before_upload": store_bytes, "fill_s": round(fill_s, 2),
                "hub_start_s": round(hub_start_s, 2),
                "upload_s_from_hub_start": round(upload_s, 2),
                # from the hub's being ready (listening) to the agent's holding nothing unacknowledged
                "upload_s": round(upload_s - hub_start_s, 2),
                "rows_per_s": round(held / (upload_s - hub_start_s)),
                "store_mb_per_s": round(store_bytes / 2**20 / (upload_s - hub_start_s), 2),
                "hub_rows": table.num_rows, "hub_distinct_ids": pc.count_distinct(ids).as_py(),
                "exact": table.num_rows == sent == pc.count_distinct(ids).as_py(),
                "parquet_bytes": parquet, "parquet_bytes_per_row": round(parquet / max(1, table.num_rows), 1),
                "store_bytes_per_row": round(store_bytes / max(1, held), 1),
                "read_back_s": round(read_s, 2), "read_back_rows_per_s": round(table.num_rows / read_s),
            }
        finally:
            agent.stop()
            h.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    rows = 20_000 if a.quick else a.rows
    load_before = os.getloadavg()
    res = run(rows)
    res.update({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "quick": a.quick})
    out = HERE / "results" / "device_data.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{res['rows_held_before_upload']} sampled rows ({res['store_bytes_before_upload'] / 2**20:.1f} MB in the "
          f"agent's store) reached the hub in {res['upload_s']:.2f} s once it listened: "
          f"{res['rows_per_s']} rows/s, {res['store_mb_per_s']} MB/s; exact: {res['exact']} "
          f"({res['hub_rows']} rows, {res['hub_distinct_ids']} distinct ids, {res['rows_answered']} answered)")
    print(f"Parquet at the hub: {res['parquet_bytes_per_row']} B/row (the same 256-row body repeated: zstd finds it; agent store {res['store_bytes_per_row']} "
          f"B/row); read back {res['read_back_rows_per_s']} rows/s; load avg before "
          f"{', '.join(f'{x:.2f}' for x in res['load_avg_before'])}")
    print(f"wrote {out}")
    return 0 if res["exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
