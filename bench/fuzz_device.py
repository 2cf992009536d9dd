"""Fuzz a real agent and a real hub: malformed JSON, x-mlsql-columns, .npz and Arrow bodies, lying
headers, every endpoint (outcomes, samples, device-data uploads and reads included), with and
without tokens (the agent's own hub credential for its uploads). Passes when no answer is a 5xx, neither
process dies, and the agent's RSS stays under a bound.

    python bench/fuzz_device.py [--requests 10000] [--seconds 300] [--rss-mb 400]

Prints and writes bench/results/fuzz.json. tests/device_bridge/test_device_fuzz.py runs a
shorter version of the same.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import random
import struct
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "device_bridge"))
sys.path.insert(0, str(ROOT))

from device_test_helpers import TOKEN, Proc, make_keys, package, trust  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fuzz.json"
VALUES = [None, True, False, 0, 1, -1, 2**63, 2**70, 10**400, 1.5, 1e300, 1e308, -1e308, 1e-320, "", "x" * 300,
          "paris", "\udcff", [], {}, [1, 2], [[1]], [None], ["paris"], {"a": 1}, "NaN"]
DTYPES = ["<f8", "<f4", "<f2", "<i8", "<u1", "|b1", "<U0", "<U1", "<U5", "|S3", "|O", "<c8", "<M8[s]", "V4",
          "<U99999999", "nope", 5, None]
SHAPES = [[1], [1, 1], [3, 1], [0], [0, 1], [100001, 1], [1, 10**8], [2**31 - 1] * 4, [-1], [1.5], "x", [],
          [1, 1, 1, 1, 1], [10**12]]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def npy(descr, shape, data: bytes = b"", fortran=False, version=1) -> bytes:
    hdr = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape) if isinstance(shape, list) else shape}, }}"
    hdr = hdr.encode("latin1", "replace")
    hdr += b" " * ((-(len(hdr) + 11)) % 64) + b"\n"
    head = struct.pack("<H", len(hdr)) if version == 1 else struct.pack("<I", len(hdr))
    return b"\x93NUMPY" + bytes([version, 0]) + head + hdr + data


class Gen:
    def __init__(self, seed: int, sha: str):
        self.r = random.Random(seed)
        self.sha = sha

    def value(self):
        return self.r.choice(VALUES)

    def json_body(self) -> bytes:
        r = self.r
        k = r.randrange(17)
        if k in (15, 16):
            return self.events_body()
        elif k == 0:
            obj = {"rows": [{r.choice(["x", "city", "y", "", "user_id"]): self.value() for _ in range(r.randrange(3))}
                            for _ in range(r.randrange(4))]}
        elif k == 1:
            obj = {"columns": {r.choice(["x", "city", "v"]): self.value() for _ in range(2)}}
        elif k in (2, 3):
            obj = {"columns": {"x": [self.value() for _ in range(r.randrange(1, 4))],
                               "city": [self.value() for _ in range(r.randrange(1, 4))]}}
            if r.random() < 0.3:  # the feature view model: its key column, and sometimes at
                obj = {"columns": {"price": [[r.choice([1.0, self.value()])]], "user_id": [r.choice(["u1", self.value()])]}}
                if r.random() < 0.5:
                    obj["at"] = r.choice([1_790_000_000_000_000, "2026-01-01T00:00:00Z", self.value(), [1, 2]])
        elif k == 4:
            obj = {"columns": {"v": [[self.value()]]}}
        elif k == 5:
            obj = {"version": self.value(), "providers": self.value(), "strict_providers": self.value()}
        elif k == 6:
            obj = {"url": r.choice(["ftp://x", "http://127.0.0.1:1/x", "http://[::1", 5, None, "file:///etc/passwd"]),
                   "sha256": self.value(), "token": self.value()}
        elif k == 7:
            obj = {"model": r.choice(["scorer", 5, None, "../x"]), "sha256": r.choice([self.sha, "0" * 64, 5]),
                   "devices": self.value(), "group": self.value(), "absent": self.value(),
                   "restore_previous": self.value(), "providers": self.value(),
                   **({"experiment": r.choice([self.value(), {"id": "e", "unit": "device", "arms": [
                       {"version": 1, "share": 0.5, "sha256": r.choice([self.sha, "0" * 64])},
                       {"version": self.value(), "share": 0.5, "sha256": self.sha}]}])} if r.random() < 0.3 else {})}
        elif k == 8:
            obj = {"url": self.value(), "group": self.value(), "providers": self.value(), "status": self.value(),
                   "errors": self.value(), "telemetry": [{"models": self.value(), "events": self.value()}]}
        elif k == 12:
            obj = {"outcomes": [r.choice([{"request_id": self.value(), "label": self.value()},
                                          {"request_id": "x-0", "label": self.value(), "extra": 1},
                                          {"request_id": "r" * r.choice([1, 128, 129])}, self.value()])
                                for _ in range(r.choice([0, 1, 3, 50]))]}
        elif k == 14:  # ML.PROFILE on the device: small valid settings now and then, garbage otherwise
            obj = {"batch_sizes": r.choice([[1], [1, 2], self.value(), [0], [10**9]]),
                   "runs": r.choice([1, 2, self.value(), 10**9]), "provider": r.choice(["cpu", self.value()]),
                   **({"version": self.value()} if r.random() < 0.3 else {})}
        elif k == 15:  # an experiment's settings (PUT /v1/models/{name}/experiment)
            obj = {"id": r.choice(["e", self.value(), "e" * 300]),
                   "unit": r.choice(["device", "request", "city", "x", self.value()]),
                   "arms": r.choice([[{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}],
                                     [{"version": self.value(), "share": self.value()}] * r.choice([1, 2, 17]),
                                     self.value()])}
        elif k == 13:
            obj = {"columns": {"x": [1.0, 2.0], "city": ["paris", "rome"]}, "request_ids": self.value()}
        elif k == 9:
            return r.choice([b"{" * r.randrange(1, 20000), b"[" * 3000, b'{"columns": {"x": [NaN]}}',
                             b'{"columns": {"x": [1e999], "city": ["a"]}}', b"\xff\xfe", b"", b"null",
                             b'{"rows": [' + b"{}," * r.randrange(1000) + b"{}]}"])
        elif k == 10:
            return bytes(r.randrange(256) for _ in range(r.randrange(80)))
        else:
            obj = {"columns": {"x": [1.0], "city": ["paris"]}}
        try:
            return json.dumps(obj).encode()
        except (ValueError, UnicodeEncodeError, OverflowError):
            return b"{}"

    def events_body(self) -> bytes:
        """POST /v1/events: valid events half of the time, odd fields, types and tables otherwise."""
        r = self.r
        cols = ["user_id", "ts", "kind", "price", "qty", "category", "zz"]
        good = {"user_id": r.choice(["u1", "u2"]), "ts": 1_790_000_000_000_000 + r.randrange(10**9),
                "kind": "click", "price": 1.5, "qty": 2, "category": "c"}
        rows = [dict(good) if r.random() < 0.7 else
                {r.choice(cols): r.choice([self.value(), r.choice(["2026-01-01T00:00:00Z", "garbage", 2**62])])
                 for _ in range(r.randrange(6))} for _ in range(r.choice([0, 1, 1, 3, 40]))]
        obj = {"table": r.choice(["app_events", "app_events", "app_events", "nope", 5, None]), "rows": rows}
        if r.random() < 0.1:
            obj[r.choice(["columns", "at", "zz"])] = self.value()
        try:
            return json.dumps(obj).encode()
        except (ValueError, UnicodeEncodeError, OverflowError):
            return b"{}"

    def columns_body(self) -> bytes:
        r = self.r
        cols = []
        data = b""
        for name in r.sample(["x", "city", "v", "zz"], r.randrange(0, 4)):
            d, sh = r.choice(DTYPES), r.choice(SHAPES)
            cols.append({"name": name, "dtype": d, "shape": sh})
            data += bytes(r.randrange(256) for _ in range(r.choice([0, 4, 8, 64])))
        if r.random() < 0.1:  # events as binary columns, right or wrong types
            from device_bridge.columns import encode

            n = r.randrange(1, 50)
            cols_ev = {"user_id": np.array([r.choice(["u1", "u2", ""])] * n),
                       "ts": np.full(n, r.choice([1_790_000_000_000_000, 2**62, -1]), np.int64).astype(
                           r.choice(["<i8", "<f8", "<u8"])),
                       "price": np.full(n, r.choice([1.0, np.nan, np.inf]))}
            for name in r.sample(list(cols_ev), r.randrange(0, 2)):
                del cols_ev[name]
            return encode(cols_ev, r.choice([{"table": "app_events"}, {"table": 5}, {}]))
        if r.random() < 0.3:  # a valid batch
            from device_bridge.columns import encode

            n = r.randrange(1, 50)
            return encode({"x": np.full((n, 1), r.choice([1.0, 1e300, np.nan, -3.0]), np.float64),
                           "city": np.array([[r.choice(["paris", "", "\u00e9t\u00e9"])]] * n)})
        header = json.dumps({"columns": cols, "meta": self.value()} if r.random() < 0.9 else self.value()).encode()
        if r.random() < 0.05:
            header = b"[" * 50000
        hlen = len(header) if r.random() < 0.9 else r.choice([0, 2**31, len(header) + 100])
        return b"MLC1" + struct.pack("<I", hlen % 2**32) + header + data

    def arrow_body(self) -> bytes:
        """Arrow IPC streams: the envelope's columns or some of them, of right and wrong types, odd
        sequence numbers, compressed or not, cut short or with bytes flipped."""
        import pyarrow as pa

        r = self.r
        n = r.choice([0, 1, 3, 20])
        gens = {
            "str": lambda: pa.array([r.choice(["a", "", "\u00e9", "x" * 200]) for _ in range(n)], pa.string()),
            "int64": lambda: pa.array([r.choice([0, 1, -1, 2**62, 5]) for _ in range(n)], pa.int64()),
            "seq": lambda: pa.array(np.arange(n, dtype=np.int64) + r.choice([1, 50, 2**40]), pa.int64()),
            "int32": lambda: pa.array([1] * n, pa.int32()),
            "f64": lambda: pa.array([r.choice([0.0, 1e300, float("nan")]) for _ in range(n)], pa.float64()),
            "ts": lambda: pa.array([r.choice([0, 1_700_000_000_000_000, 2**62]) for _ in range(n)],
                                   pa.timestamp(r.choice(["us", "s", "ns"]), tz=r.choice(["UTC", None]))),
            "null": lambda: pa.nulls(n, pa.string()),
        }
        names = ["request_id", "predicted_at", "device", "model", "version", "provider", "latency_ms", "seq",
                 "in.x", "out.y", "label", "label_at", "zz"]
        want = {"request_id": "str", "predicted_at": "ts", "device": "str", "model": "str", "version": "int32",
                "provider": "str", "latency_ms": "f64", "seq": "seq", "in.x": "f64", "out.y": "f64",
                "label": "str", "label_at": "ts", "zz": "str"}
        cols = {}
        for name in (names if r.random() < 0.5 else r.sample(names, r.randrange(0, len(names)))):
            kind = want[name] if r.random() < 0.95 else r.choice(list(gens))
            cols[name] = gens[kind]()
        if "model" in cols and r.random() < 0.7:
            cols["model"] = pa.array(["scorer"] * n, pa.string())
        table = pa.table(cols) if cols else pa.table({"a": pa.array([], pa.int8())})
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=r.choice([None, "zstd", "lz4"]))
        with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
            w.write(table)
        body = bytearray(sink.getvalue().to_pybytes())
        if body and r.random() < 0.2:
            for _ in range(r.randrange(1, 6)):
                body[r.randrange(len(body))] ^= r.randrange(1, 256)
        if body and r.random() < 0.1:
            body = body[: r.randrange(len(body))]
        return bytes(body)

    def npz_body(self) -> bytes:
        r = self.r
        out = io.BytesIO()
        comp = zipfile.ZIP_DEFLATED if r.random() < 0.3 else zipfile.ZIP_STORED
        with zipfile.ZipFile(out, "w", compression=comp) as z:
            for name in r.sample(["x", "city", "v", "zz", "../x"], r.randrange(0, 4)):
                if r.random() < 0.3:
                    arr = np.full((r.randrange(1, 20), 1), r.choice([1.0, 7.0, 1e300]), np.float32) \
                        if name != "city" else np.array([["paris"]] * r.randrange(1, 20))
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    member = buf.getvalue()
                else:
                    member = npy(r.choice(DTYPES), r.choice(SHAPES),
                                 bytes(r.randrange(256) for _ in range(r.choice([0, 8, 64]))),
                                 r.choice([False, True]), r.choice([1, 1, 2]))
                z.writestr(name + r.choice([".npy", ".npy", "", ".txt"]), member)
        body = bytearray(out.getvalue())
        if body and r.random() < 0.2:  # corrupt a few bytes (headers, deflate streams, directory)
            for _ in range(r.randrange(1, 6)):
                body[r.randrange(len(body))] ^= r.randrange(1, 256)
        return bytes(body)


AGENT_PATHS = ["/v1/models/scorer/predict", "/v1/models/wide/predict", "/v1/models/nope/predict",
               "/v1/models/scorer/predict?version=abc", "/v1/models/scorer/predict?version=99",
               "/v1/models/scorer/install", "/v1/models/install", "/v1/models/scorer/activate",
               "/v1/models/scorer/rollback", "/v1/models/scorer", "/v1/models/nope", "/v1/info", "/v1/health",
               "/v1/metrics", "/v1/metrics?columns=0", "/v1/metrics/stream?count=1&interval=x",
               "/v1/metrics/stream?count=1&interval=nan", "/v1/metrics/stream?count=1", "/v1/events",
               "/v1/models/..%2f..%2fetc/predict", "/v1/models//predict", "/v1/models/%00/install", "/v1/nothing",
               "/v1/models/scorer/outcomes", "/v1/models/nope/outcomes", "/v1/models/%00/outcomes",
               "/v1/models/scorer/profile", "/v1/models/nope/profile", "/v1/models/%00/profile",
               "/v1/models/scorer/experiment", "/v1/models/nope/experiment", "/v1/models/%00/experiment",
               "/v1/samples?model=scorer", "/v1/samples?model=scorer&kind=outcomes&since=0&max_rows=5",
               "/v1/samples?model=scorer&since=-1", "/v1/samples?model=nope", "/v1/samples?kind=x",
               "/v1/samples?model=scorer&max_rows=abc", "/v1/samples?model=scorer&since=99999999999999999999999",
               "/v1/events?table=app_events", "/v1/events?table=nope", "/v1/features/fv?key=u1",
               "/v1/features/fv?key=u1&at=abc", "/v1/features/fv?key=u1&at=2026-01-01T00:00:00Z",
               "/v1/features/fv?key=u1&at=-99999999999999999999", "/v1/features/fv", "/v1/features/nope?key=1",
               "/v1/features/fv?key=u1&zz=1", "/v1/models/fvm/predict", "/v1/models/fvm/predict?at=1790000000000000",
               "/v1/models/fvm/predict?at=nope", "/v1/models/fvm/latest?key=u1", "/v1/models/fvm/latest",
               "/v1/models/scorer/latest?key=u1"]
HUB_PATHS = ["/v1/blobs", "/v1/blobs/{sha}", "/v1/blobs/" + "0" * 64, "/v1/blobs/..%2f..%2fetc%2fpasswd",
             "/v1/blobs/{sha}/delta?from={sha}", "/v1/blobs/{sha}/delta?from=" + "0" * 64,
             "/v1/blobs/{sha}/delta", "/v1/blobs/{sha}/delta?from=..%2f..&x=1", "/v1/blobs/%00/delta?from=zz",
             "/v1/agents", "/v1/agents/fz", "/v1/agents/%00/register", "/v1/agents/edge-1/register",
             "/v1/agents/edge-1/desired", "/v1/agents/edge-1/report", "/v1/desired", "/v1/groups/field",
             "/v1/groups/" + "g" * 300, "/v1/events", "/v1/nothing",
             "/v1/agents/fz/data?kind=samples&model=scorer&first=1&last=100",
             "/v1/agents/fz/data?kind=outcomes&model=scorer&first=1&last=5",
             "/v1/agents/fz/data?kind=samples&model=scorer&first=50&last=1099511627825",
             "/v1/agents/fz/data?kind=x&model=..&first=-1&last=0", "/v1/agents/fz/data",
             "/v1/agents/edge-1/data?kind=samples&model=scorer&first=1&last=2",
             "/v1/data/samples", "/v1/data/outcomes?since=2020-01-01", "/v1/data/samples?since=garbage",
             "/v1/data/samples?group=_none&model=scorer&max_rows=0", "/v1/data/usage", "/v1/data/nope",
             "/v1/agents/edge-1/desired?wait=0.05", "/v1/agents/edge-1/desired?wait=99",
             "/v1/agents/edge-1/desired?wait=nan", "/v1/agents/edge-1/desired?wait=1e400&x=1",
             "/v1/agents/fz/desired", "/v1/agents/fz/desired?wait=0.05", "/v1/agents/fz/desired?wait=-1",
             "/v1/agents/fz/report", "/v1/agents/fz/desired?wait=0&wait=1",
             "/v1/rollouts", "/v1/rollouts/field/scorer", "/v1/rollouts/field/scorer/stop",
             "/v1/rollouts/" + "g" * 300 + "/scorer/stop", "/v1/rollouts/field/%00"]
CTYPES = ["application/json", "application/x-npz", "application/x-mlsql-columns", "text/plain", "",
          "application/octet-stream", "application/json; charset=latin1", "application/vnd.apache.arrow.stream"]


def one_request(gen: Gen, agent_url: str, hub_url: str, agent_cred: str | None = None
                ) -> tuple[str, str, str, dict, bytes]:
    r = gen.r
    to_hub = r.random() < 0.25
    base = hub_url if to_hub else agent_url
    path = r.choice(HUB_PATHS if to_hub else AGENT_PATHS).replace("{sha}", gen.sha)
    if r.random() < 0.8:  # mostly the method the route takes, so that the bodies reach the handlers
        gets = ("/v1/info", "/v1/health", "/v1/metrics", "/v1/events", "/desired", "/v1/agents", "/v1/blobs/",
                "/v1/samples", "/v1/data/", "/v1/features/", "/latest")
        method = "GET" if (any(g in path for g in gets) or path.rstrip("/").endswith(("/fz", "scorer", "nope"))) \
            and not path.startswith("/v1/agents/fz/data") and not path.startswith("/v1/agents/edge-1/data") else "POST"
        if path == "/v1/blobs" and r.random() < 0.5:
            method = "GET"
        if path.startswith("/v1/events") and r.random() < 0.7:  # GET: telemetry events; POST: app events
            method = "POST"
        if path.endswith("/experiment"):
            method = "PUT" if r.random() < 0.8 else "DELETE"
    else:
        method = r.choice(["POST", "GET", "DELETE", "PUT", "PATCH"])
    if not to_hub and method == "DELETE" and path in ("/v1/models/scorer", "/v1/models/wide"):
        method = "GET"  # keep the models installed: deleting is allowed, and would end the test early
    ctype = r.choice(CTYPES)
    if "/data?" in path and r.random() < 0.7:  # uploads: mostly Arrow, so that the checks are reached
        ctype = "application/vnd.apache.arrow.stream"
    if method in ("GET", "DELETE"):
        body = b""
    elif "npz" in ctype:
        body = gen.npz_body()
    elif "columns" in ctype:
        body = gen.columns_body()
    elif "arrow" in ctype:
        body = gen.arrow_body()
    else:
        body = gen.json_body()
    if path.startswith("/v1/events") and method == "POST" and r.random() < 0.6:
        ctype = r.choice(["application/json", "application/json", ""])
        body = gen.events_body()
    headers = {"Content-Type": ctype}
    roll = r.random()
    own = "/data?" in path or path.startswith(("/v1/agents/fz/desired", "/v1/agents/fz/report"))
    if roll < 0.75 and agent_cred and to_hub and own:  # the agent's own credential: an upload, or the poll
        headers["Authorization"] = f"Bearer {agent_cred}"  # cycle the hub answers from memory (hub/cache.py)
    elif roll < 0.75:
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif roll < 0.85:
        headers["Authorization"] = r.choice(["Bearer x", "Basic a", "Bearer", "Bearer " + "\u00e9" * 3, "x" * 5000])
    if "/desired" in path and r.random() < 0.5:  # long-poll: a held request (a short wait) or at once
        headers["If-None-Match"] = r.choice(['"0"', "*", "", "\u00e9" * 3, "x" * 3000])
    if r.random() < 0.1:
        headers["Accept"] = r.choice(["application/x-npz", "application/x-mlsql-columns", "*/*", "text/html"])
    if r.random() < 0.05 and not to_hub and "/predict" in path:
        headers["X-Request-Ids"] = r.choice(["p", "a,b", "", "x" * 200, "\u00e9t\u00e9", ",", "a" * 121])
    if r.random() < 0.03:
        headers["Content-Length"] = r.choice(["-1", "abc", "99999999999999999999", str(len(body) + 5)])
    return base, method, path, headers, body


def run(n_requests: int = 10_000, seconds: float = 300.0, seed: int = 1, threads: int = 4,
        rss_bound_mb: float = 400.0, workdir: Path | None = None) -> dict:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="mlsql-fuzz-"))
    keys = make_keys(tmp / "keys")
    hub = Proc(["hub", "--port", "0", "--store", str(tmp / "hub"), "--token", TOKEN, "--body-timeout", "1",
                "--enroll-open"],  # the agent enrolls itself (its own hub credential)
               tmp / "ready-hub.json")
    store = tmp / "agent"
    trust(store, keys)
    agent = Proc(["serve", "--name", "fz", "--port", "0", "--store", str(store), "--token", TOKEN,
                  "--hub", hub.url, "--hub-interval", "0.5", "--body-timeout", "1", "--request-timeout", "2"],
                 tmp / "ready-agent.json")
    from device_bridge.client import DeviceClient, HubClient
    from device_bridge.package import build_package

    sys.path.insert(0, str(ROOT / "tests" / "device_bridge"))
    from test_device_security import float64_model

    c = DeviceClient(agent.url, TOKEN)
    c.install(package(keys, 1), deploy={"sample_rate": 1.0, "sample_hash": ["city"], "sample_salt": "fuzz"})
    c.install(build_package(float64_model(), {"name": "wide", "version": 1, "providers": ["cpu"]}, keys.private_key))
    from test_features_agent import linear_model, view_spec

    c.install(build_package(linear_model(["price", "clicks_1h"], [1.0, 2.0]),
                            {"name": "fvm", "version": 1, "providers": ["cpu"],
                             "feature_views": [view_spec(name="fv")]}, keys.private_key),
              deploy={"sample_rate": 1.0, "max_keys": 1000, "max_state_mb": 8,
                      "trigger": {"on_table": "app_events", "when": {"op": "=", "args": [{"col": "kind"},
                                                                                        {"lit": "click"}]}}})
    # a second version and an experiment by column: predictions go through the arm routing from the start
    c.install(package(keys, 2, mult=3.0), activate=False, deploy={"sample_rate": 1.0, "sample_hash": ["city"],
                                                                   "sample_salt": "fuzz"})
    c.set_experiment("scorer", {"id": "fz", "unit": "city",
                                "arms": [{"version": 1, "share": 0.5}, {"version": 2, "share": 0.5}]})
    sha = HubClient(hub.url, TOKEN).upload(package(keys, 1))["sha256"]
    deadline0 = time.time() + 30
    while not (store / "hub_token").exists() and time.time() < deadline0:  # the agent enrolls itself
        time.sleep(0.05)
    agent_cred = (store / "hub_token").read_text().strip() if (store / "hub_token").exists() else None
    rss_start = rss_mb(agent.p.pid)
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    fives: list = []
    conn_errors: list = []
    rss_max = [rss_start]
    protocol = [0]
    no_kind: list = []
    sent = [0]
    deadline = time.time() + seconds
    per_thread = -(-n_requests // threads)

    def worker(i: int) -> None:
        gen = Gen(seed * 1000 + i, sha)
        conns: dict[str, http.client.HTTPConnection] = {}
        for _ in range(per_thread):
            if time.time() > deadline:
                return
            base, method, path, headers, body = one_request(gen, agent.url, hub.url, agent_cred)
            hostport = base.split("//", 1)[1]
            for attempt in (0, 1):
                conn = conns.get(hostport) or http.client.HTTPConnection(hostport, timeout=15)
                conns[hostport] = conn
                try:
                    conn.putrequest(method, path, skip_accept_encoding=True)
                    for hk, hv in headers.items():
                        conn.putheader(hk, hv.encode("utf-8", "replace") if isinstance(hv, str) else hv)
                    if "Content-Length" not in headers:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    if resp.getheader("connection", "").lower() == "close" or "Content-Length" in headers:
                        conn.close()
                        conns.pop(hostport, None)
                    break
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conns.pop(hostport, None)
                    if attempt:  # refused twice: the server closed on us (allowed for lying headers)
                        status, data = -1, repr(exc).encode()
            with lock:
                sent[0] += 1
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500:
                    fives.append({"method": method, "path": path, "status": status, "answer": data[:300].decode(
                        "utf-8", "replace"), "ctype": headers.get("Content-Type")})
                elif status == -1 and "Content-Length" not in headers:
                    conn_errors.append({"method": method, "path": path, "error": data[:200].decode()})
                if sent[0] % 250 == 0:
                    rss_max[0] = max(rss_max[0], rss_mb(agent.p.pid))
                if status == 400 and data.startswith(b"Invalid HTTP request"):
                    protocol[0] += 1  # uvicorn's HTTP parser refused the request line or headers itself
                elif status >= 400 and status != -1 and data:
                    try:
                        assert isinstance(json.loads(data).get("kind"), str)
                    except Exception:  # noqa: BLE001 - recorded as a finding
                        no_kind.append({"method": method, "path": path, "status": status,
                                        "answer": data[:200].decode("utf-8", "replace")})

    t0 = time.time()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.time() - t0
    rss_max[0] = max(rss_max[0], rss_mb(agent.p.pid))
    alive = {"agent": agent.alive(), "hub": hub.alive()}
    try:
        healthy = DeviceClient(agent.url, TOKEN).predict("scorer", columns={"x": [1.0], "city": ["paris"]})["rows"] == 1
        healthy = healthy and bool(HubClient(hub.url, TOKEN).agents())
        # the device data endpoints still answer: the agent's samples and the hub's Parquet read back
        healthy = healthy and DeviceClient(agent.url, TOKEN).samples("scorer", max_rows=10)[0].num_rows > 0
        HubClient(hub.url, TOKEN).device_data("samples", max_rows=10)
    except Exception as exc:  # noqa: BLE001 - reported
        healthy = False
        conn_errors.append({"final_check": repr(exc)})
    bg = DeviceClient(agent.url, TOKEN).info().get("background", {}) if alive["agent"] else {}
    try:  # the valid events among the fuzz reached the feature view (the checks were passed, not only hit)
        fv = DeviceClient(agent.url, TOKEN).metrics()["features"]["fv"]
        feature_events = {"events": fv["events"], "batches": fv["batches"], "keys": fv["keys"]}
    except Exception as exc:  # noqa: BLE001 - reported
        feature_events = {"error": repr(exc)}
    agent.kill()
    hub.kill()
    res = {
        "requests": sent[0], "seconds": round(elapsed, 1), "requests_per_s": round(sent[0] / max(elapsed, 1e-9), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "5xx": len(fives), "examples_5xx": fives[:20],
        "http_parser_400": protocol[0], "errors_without_kind": len(no_kind), "examples_without_kind": no_kind[:10],
        "connection_errors": len(conn_errors), "examples_connection_errors": conn_errors[:10],
        "crashes": sum(not v for v in alive.values()), "alive": alive, "healthy_after": healthy,
        "agent_rss_mb": {"start": round(rss_start, 1), "max": round(rss_max[0], 1), "bound": rss_bound_mb},
        "background": bg, "seed": seed, "threads": threads, "feature_events": feature_events,
    }
    res["ok"] = (res["5xx"] == 0 and res["crashes"] == 0 and healthy and res["connection_errors"] == 0
                 and not no_kind
                 and rss_max[0] < rss_bound_mb)
    return res


def main() -> int:
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # the generator's own casts of 1e300 to float32
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rss-mb", type=float, default=400.0)
    a = ap.parse_args()
    res = run(a.requests, a.seconds, a.seed, a.threads, a.rss_mb)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
