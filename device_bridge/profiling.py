"""Per-operator profiles of an ONNX model with ONNX Runtime's profiler (``ML.PROFILE``): the same
code in the notebook (in-process) and on the device agent (``POST /v1/models/<name>/profile``).

For each batch size: a session with profiling on is created (its load time measured), run a few
times to warm up, then ``runs`` times, each run timed by the caller's clock; the profiler's node
events of the timed runs (``cat == "Node"``, ``<node>_kernel_time``, with ``op_name`` and the
``provider`` that ran the kernel) are summed per node. Needs only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

MAX_RUNS = 200
MAX_BATCH = 1024
MAX_BATCH_SIZES = 4
WARMUP = 3

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "nnapi": "NnapiExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
              "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider",
              "qnn": "QNNExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}


class ProfileError(ValueError):
    """Settings a profile cannot run with (the message says which)."""


def check_settings(batch_sizes, runs, provider) -> tuple[list[int], int, str]:
    """The settings, checked and bounded (a profile's cost is runs × Σ batch sizes)."""
    if not isinstance(batch_sizes, list) or not batch_sizes or len(batch_sizes) > MAX_BATCH_SIZES:
        raise ProfileError(f"batch_sizes must be a list of 1 to {MAX_BATCH_SIZES} whole numbers")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BATCH for b in batch_sizes):
        raise ProfileError(f"each batch size must be a whole number from 1 to {MAX_BATCH}")
    if not isinstance(runs, int) or isinstance(runs, bool) or not 1 <= runs <= MAX_RUNS:
        raise ProfileError(f"runs must be a whole number from 1 to {MAX_RUNS}")
    name = _PROVIDERS.get(str(provider).lower())
    if name is None:
        raise ProfileError(f"unknown provider {provider!r}; one of {', '.join(_PROVIDERS)}")
    import onnxruntime as ort

    if name not in ort.get_available_providers():
        raise ProfileError(f"provider {provider!r} is not available here (this onnxruntime offers "
                           f"{', '.join(ort.get_available_providers())})")
    return [int(b) for b in batch_sizes], int(runs), name


def profile(model_bytes: bytes, feeds_for: Callable[[int], dict[str, np.ndarray]], batch_sizes: list[int],
            runs: int, provider: str = "cpu") -> list[dict]:
    """Rows ``{node, op_type, provider, batch_size, calls, total_ms, mean_ms, share_of_time, value}``:
    one per operator node and batch size (``mean_ms``: per timed run), then summary rows (op_type
    ``summary``; ``value`` holds the figure): ``session_load_ms``, ``mean_ms`` (the timed runs'
    mean by the wall clock), ``p50_ms``, ``p95_ms``, ``peak_rss_mb`` (the process's peak resident
    memory), ``model_size_bytes``."""
    import onnxruntime as ort

    batch_sizes, runs, prov = check_settings(batch_sizes, runs, provider)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mlsql-profile-") as tmp:
        for b in batch_sizes:
            feeds = feeds_for(b)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, f"b{b}")
            t0 = time.perf_counter()
            sess = ort.InferenceSession(model_bytes, so, providers=[prov])
            load_ms = (time.perf_counter() - t0) * 1000.0
            for _ in range(WARMUP):
                sess.run(None, feeds)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append((time.perf_counter() - t) * 1000.0)
            path = sess.end_profiling()
            with open(path) as f:
                events = json.load(f)
            rows += _node_rows(events, b, runs)
            mean = statistics.fmean(times)
            total_nodes = sum(r["total_ms"] for r in rows if r["batch_size"] == b and r["op_type"] != "summary")
            for r in rows:
                if r["batch_size"] == b and r["op_type"] != "summary":
                    r["share_of_time"] = r["total_ms"] / total_nodes if total_nodes else 0.0
            q = np.percentile(times, [50, 95])
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
            for name, value in (("session_load_ms", load_ms), ("mean_ms", mean), ("p50_ms", float(q[0])),
                                ("p95_ms", float(q[1])), ("peak_rss_mb", rss), ("model_size_bytes", len(model_bytes))):
                rows.append({"node": name, "op_type": "summary", "provider": prov, "batch_size": b, "calls": runs,
                             "total_ms": None, "mean_ms": None, "share_of_time": None, "value": float(value)})
    return rows


def _node_rows(events: list, batch: int, runs: int) -> list[dict]:
    """Kernel times per node over the timed runs: those inside the last ``runs`` model runs (the
    warm-up runs come first)."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    timed = model_runs[-runs:]
    if not timed:
        return []
    lo = timed[0]["ts"]
    hi = timed[-1]["ts"] + timed[-1]["dur"]
    per: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not lo <= e["ts"] <= hi:
            continue
        node = e["name"][: -len("_kernel_time")]
        args = e.get("args") or {}
        r = per.setdefault(node, {"node": node, "op_type": args.get("op_name", ""),
                                  "provider": args.get("provider", ""), "batch_size": batch, "calls": 0,
                                  "total_ms": 0.0})
        r["calls"] += 1
        r["total_ms"] += e["dur"] / 1000.0
    out = sorted(per.values(), key=lambda r: -r["total_ms"])
    for r in out:
        r["mean_ms"] = r["total_ms"] / runs
        r["value"] = r["mean_ms"]
    return out


def synthetic_feeds(inputs: list[dict], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a batch of ``batch`` rows of the schema ``inputs`` (``{"name", "type", "shape"}``, a
    package's manifest): uniform numbers in [0, 1), empty strings, False. What a device profiles on
    when no rows are sent (timing, not answers)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in inputs:
        row = [d if isinstance(d, int) and d > 0 else 1 for d in (i.get("shape") or [None])[1:]]
        shape = [batch, *row]
        t = i["type"]
        if t == "string":
            out[i["name"]] = np.full(shape, "", dtype=object)
        elif t == "bool":
            out[i["name"]] = np.zeros(shape, dtype=bool)
        elif t.startswith(("int", "uint")):
            out[i["name"]] = np.zeros(shape, dtype=t)
        else:
            out[i["name"]] = rng.random(shape).astype(t)
    return out
