"""Unit tests: provider selection (fake availability lists), telemetry, breaker, input validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_bridge import providers as prov
from device_bridge.agent import inputs as inp
from device_bridge.package import Column
from device_bridge.rollout import evaluate_gates, plan_waves
from device_bridge.telemetry import CircuitBreaker, LatencyHistogram, NumericStats, StringStats

ANDROID = ["NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]
GPU_BOX = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
PLAIN = ["CPUExecutionProvider"]


def test_nnapi_preferred_on_android():
    plan = prov.plan_providers(["nnapi", "cuda", "cpu"], ANDROID)
    assert plan.candidates[0] == ["NnapiExecutionProvider", "CPUExecutionProvider"]
    assert plan.candidates[-1] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in plan.skipped


def test_cuda_chosen_on_gpu_box_and_cpu_appended():
    plan = prov.plan_providers(["nnapi", "cuda"], GPU_BOX)
    assert plan.candidates == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    assert set(plan.skipped) == {"NnapiExecutionProvider"}


def test_plain_cpu_falls_back():
    plan = prov.plan_providers(["nnapi", "cuda", "cpu"], PLAIN)
    assert plan.candidates == [["CPUExecutionProvider"]]


def test_strict_refuses_missing_provider():
    with pytest.raises(prov.ProviderError, match="nnapi not available"):
        prov.plan_providers(["nnapi"], GPU_BOX, strict=True)
    plan = prov.plan_providers(["cuda"], GPU_BOX, strict=True)
    assert plan.candidates == [["CUDAExecutionProvider"]] and plan.strict


def test_unknown_provider_named():
    with pytest.raises(prov.ProviderError, match="unknown provider 'tpu'"):
        prov.plan_providers(["tpu"], PLAIN)
    assert prov.to_ort_name("CUDA") == "CUDAExecutionProvider"
    assert prov.to_ort_name("cudaexecutionprovider") == "CUDAExecutionProvider"


class _FakeSession:
    def __init__(self, providers):
        self._p = providers

    def get_providers(self):
        return self._p


def test_create_session_falls_down_the_list():
    plan = prov.plan_providers(["nnapi", "cpu"], ANDROID)

    def factory(path, so, providers):
        if "NnapiExecutionProvider" in providers:
            raise RuntimeError("NNAPI cannot compile this model")
        return _FakeSession(providers)

    res = prov.create_session("m.onnx", plan, factory)
    assert res.providers == ["CPUExecutionProvider"]
    assert res.attempts[0]["error"].startswith("RuntimeError") and res.attempts[1]["error"] is None


def test_strict_does_not_fall_back():
    plan = prov.plan_providers(["cuda"], GPU_BOX, strict=True)

    def factory(path, so, providers):
        raise RuntimeError("no libcudart")

    with pytest.raises(prov.ProviderError, match="no libcudart"):
        prov.create_session("m.onnx", plan, factory)


def test_serving_session_reports_its_own_placement(tmp_path):
    """profile=True: node placement comes from the serving session (no second session), the profiler is
    stopped afterwards and its file removed; threads=1 gives one intra-op thread per session."""
    from device_test_helpers import scorer_model

    path = tmp_path / "m.onnx"
    path.write_bytes(scorer_model(3.0))
    plan = prov.plan_providers(["cpu"], PLAIN)
    res = prov.create_session(str(path), plan, threads=1, profile=True)
    assert res.node_providers == {"CPUExecutionProvider": 3}
    assert res.session.get_session_options().intra_op_num_threads == 1
    out = res.session.run(None, {"x": np.array([[2.0]], np.float32), "city": np.array([["paris"]], object)})
    assert out[0].tolist() == [[7.0]]
    assert list(tmp_path.iterdir()) == [path]
    plain = prov.create_session(str(path), plan)
    assert plain.node_providers is None and plain.session.get_session_options().intra_op_num_threads == 0


def test_count_node_providers():
    events = [
        {"cat": "Session", "name": "model_loading"},
        {"cat": "Node", "name": "a_kernel_time", "args": {"provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "a_fence_before", "args": {"provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "b_kernel_time", "args": {"provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "c_kernel_time", "args": {"provider": "CUDAExecutionProvider"}},
    ]
    assert prov.count_node_providers(events) == {"CPUExecutionProvider": 1, "CUDAExecutionProvider": 2}


def test_histogram_quantiles_close():
    h = LatencyHistogram()
    rng = np.random.default_rng(0)
    xs = rng.lognormal(0, 1, 20000)
    for x in xs:
        h.add(float(x))
    for q in (0.5, 0.95, 0.99):
        true = np.quantile(xs, q)
        assert abs(h.quantile(q) - true) / true < 0.1


def test_welford_matches_numpy_and_counts_nulls():
    s = NumericStats()
    rng = np.random.default_rng(1)
    parts = [rng.normal(5, 2, n) for n in (1, 7, 100, 3)]
    for p in parts:
        s.update(p)
    s.update(np.array([np.nan, 1.0]))
    allv = np.concatenate(parts + [np.array([1.0])])
    snap = s.snapshot()
    assert snap["mean"] == pytest.approx(allv.mean())
    assert snap["std"] == pytest.approx(allv.std(ddof=1))
    assert snap["null_rate"] == pytest.approx(1 / (allv.size + 1))


def test_string_stats_bounded():
    s = StringStats(capacity=8, vocab=frozenset({"a"}), secret=b"k")
    s.update(np.array(["a"] * 300 + [f"x{i}" for i in range(1000)], dtype=object))
    snap = s.snapshot()
    assert len(s.counts) <= 8 and snap["top"][0]["value"] == "a"
    # values outside the training vocabulary never leave as text: a keyed hash and the unseen rate
    assert all(set(t) == {"hash", "count"} for t in snap["top"][1:]) and "x" not in json.dumps(snap)
    assert snap["unseen_rate"] == pytest.approx(1000 / 1300) and snap["mean_length"] > 1


def test_breaker_trips_once():
    b = CircuitBreaker(window=10, min_requests=5, threshold=0.5)
    assert not any(b.record(False) for _ in range(3))
    trips = [b.record(True) for _ in range(10)]
    assert trips.count(True) == 1


def test_input_validation_messages():
    specs = [inp.make_spec(Column("x", "float32", (None, 1)), None),
             inp.make_spec(Column("city", "string", (None, 1)), None)]
    feed, n = inp.feed_from_json({"rows": [{"x": 1, "city": "a"}, {"x": 2.5, "city": "b"}]}, specs)
    assert n == 2 and feed["x"].shape == (2, 1) and feed["x"].dtype == np.float32
    for payload, msg in [
        ({"rows": [{"x": 1, "cty": "a"}]}, "did you mean 'city'"),
        ({"rows": [{"x": "1", "city": "a"}]}, "expected a float32 number"),
        ({"columns": {"x": [1], "city": [3]}}, "expected a string"),
        ({"columns": {"x": [None], "city": ["a"]}}, "not nullable"),
        ({"columns": {"x": [1, 2], "city": ["a"]}}, "has 1 values"),
        ([1, 2], "JSON object"),
        ({"columns": {"x": [1], "city": ["\ud800"]}}, "lone surrogate"),
    ]:
        with pytest.raises(inp.InputError, match=msg):
            inp.feed_from_json(payload, specs)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64", "uint8"])
@pytest.mark.parametrize("shape", [(), (1,), (4,)])
def test_numeric_json_fast_path_equals_the_per_value_check(monkeypatch, dtype, shape):
    """Plain numbers take one type scan and one conversion; the array is the same as the per-value
    path's, and every unusual value still gets the per-value path's message naming the row."""
    spec = inp.InputSpec("x", dtype, shape, False)
    rng = np.random.default_rng(0)
    raw = rng.normal(scale=50, size=(3, *shape))
    values = (np.abs(raw).round() if dtype.startswith(("int", "uint")) else raw).tolist()
    if dtype.startswith(("int", "uint")):
        values = np.asarray(values, dtype=np.int64).tolist()
    fast = inp.column_array(spec, values)
    with monkeypatch.context() as m:
        m.setattr(inp, "_fast_numeric", lambda *a: None)
        slow = inp.column_array(spec, values)
    assert fast.dtype == slow.dtype == np.dtype(dtype) and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)

    def first(bad):
        return [bad] if shape == () else [[bad] * (shape[0] or 1)]
    big = 10 ** 400 if dtype.startswith("float") else 2 ** 70
    for bad, msg in [(None, "not nullable"), (True, "expected"), ("1", "expected"),
                     (big, "out of range"),
                     (float("inf"), "out of range" if dtype.startswith("float") else "not an integer")]:
        with pytest.raises(inp.InputError, match=msg):
            inp.column_array(spec, first(bad) + values)
    if shape == (4,):
        with pytest.raises(inp.InputError, match="expected 4 values, got 3"):
            inp.column_array(spec, [[1, 2, 3]])


def test_binary_string_columns_are_checked_for_valid_unicode():
    from device_bridge import columns as colfmt

    specs = [inp.make_spec(Column("city", "string", (None,)), None)]
    ok = colfmt.encode({"city": np.array(["paris", "köln", "東京"])})
    feed, n = inp.feed_from_columns(ok, specs, 1 << 20)
    assert n == 3 and feed["city"].tolist() == ["paris", "köln", "東京"]
    for cp in (0xD800, 0xDFFF, 0x110000):  # UTF-32 code units that are not characters
        units = np.array([[80, 97], [cp, 0]], dtype=np.uint32).view("<U2").reshape(2)
        with pytest.raises(inp.InputError, match="column 'city': strings are not valid Unicode"):
            inp.feed_from_columns(colfmt.encode({"city": units}), specs, 1 << 20)


def test_waves_and_gates():
    devs = [f"d{i}" for i in range(20)]
    assert [len(w) for w in plan_waves(devs, rollout_percent=10)] == [2] * 10
    assert [len(w) for w in plan_waves(devs, batch_size=8)] == [8, 8, 4]
    entries = {"d0": {"requests": 100, "error_count": 5, "latency": {"p95_ms": 3.0},
                      "providers": ["CPUExecutionProvider"], "node_providers": {"CPUExecutionProvider": 4},
                      "columns": {"x": {"mean": 3.0, "count": 100}}}}
    fails, metrics = evaluate_gates(entries, {"x": {"mean": 0.0, "std": 1.0}}, max_error_rate=0.01,
                                    max_p95_ms=1.0, required_provider="nnapi", max_drift=1.0)
    assert len(fails) == 4 and metrics["drift"]["x"] == pytest.approx(3.0)
    assert evaluate_gates(entries, {}, max_error_rate=0.1, required_provider="cpu")[0] == []


def test_vector_column_stats_per_element():
    from device_bridge.telemetry import VersionTelemetry

    vt = VersionTelemetry("m", 1)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    vt.record_success(1.0, 5, {"v": a})
    vt.record_success(1.0, 7, {"v": b})
    both = np.vstack([a, b])
    snap = vt.snapshot()["columns"]
    for j in range(3):
        assert snap[f"v[{j}]"]["mean"] == pytest.approx(both[:, j].mean())
        assert snap[f"v[{j}]"]["std"] == pytest.approx(both[:, j].std(ddof=1))


def test_single_rows_are_profiled_exactly_in_blocks():
    from device_bridge.telemetry import PENDING_ROWS, VersionTelemetry

    vt = VersionTelemetry("m", 1)
    vt.vocab = {"city": frozenset({"paris", "lyon"})}
    rng = np.random.default_rng(5)
    x = rng.normal(3, 2, 150)
    x[7] = np.nan
    cities = np.array(["paris", "lyon", None] * 50, dtype=object)
    for i in range(150):  # 150 single-row requests: two blocks of PENDING_ROWS, the rest pending
        vt.record_success(0.1, 1, {"x": x[i:i + 1], "n": np.array([i]), "city": cities[i:i + 1]})
    vt.record_success(0.1, 20, {"x": x[:20], "n": np.arange(20), "city": cities[:20]})  # a batch in between
    assert 150 % PENDING_ROWS  # the snapshot has to profile what is still pending
    snap = vt.snapshot()
    cols = snap["columns"]
    allx = np.concatenate([x, x[:20]])
    finite = allx[np.isfinite(allx)]
    assert snap["profiled_rows"] == 170 and cols["x"]["count"] == finite.size == 168
    assert cols["x"]["mean"] == pytest.approx(finite.mean()) and cols["x"]["std"] == pytest.approx(finite.std(ddof=1))
    assert cols["x"]["null_rate"] == pytest.approx(2 / 170)
    alln = np.concatenate([np.arange(150), np.arange(20)])
    assert cols["n"]["mean"] == pytest.approx(alln.mean()) and cols["n"]["max"] == 149
    top = {d["value"]: d["count"] for d in cols["city"]["top"]}
    assert top == {"paris": 57, "lyon": 57} and cols["city"]["null_rate"] == pytest.approx(56 / 170)


def test_column_stats_are_a_bounded_sample_under_load():
    from device_bridge import telemetry

    vt = telemetry.VersionTelemetry("m", 1)
    x = np.arange(1000, dtype=np.float64)
    for _ in range(100):  # 100,000 rows, well within a second or two
        vt.record_success(1.0, 1000, {"x": x, "y": x * 2})
    snap = vt.snapshot()
    assert snap["requests"] == 100 and snap["rows"] == 100_000
    # every request counted, the statistics only cover the budget (per second; a second boundary may pass)
    assert telemetry.STATS_ROWS_PER_S <= snap["profiled_rows"] <= 3 * (telemetry.STATS_ROWS_PER_S + 1000)
    assert snap["profiled_rows"] % 1000 == 0
    assert snap["columns"]["x"]["count"] == snap["profiled_rows"]
    assert snap["columns"]["x"]["mean"] == pytest.approx(499.5) and snap["columns"]["y"]["max"] == 1998.0


def test_one_huge_batch_is_profiled_up_to_the_budget_and_wide_rows_are_not_buffered():
    from device_bridge import telemetry

    vt = telemetry.VersionTelemetry("m", 1)
    x = np.arange(100_000, dtype=np.float64)
    vt.record_success(1.0, 100_000, {"x": x})
    snap = vt.snapshot()
    assert snap["rows"] == 100_000 and snap["profiled_rows"] == telemetry.STATS_ROWS_PER_S
    assert snap["columns"]["x"]["max"] == telemetry.STATS_ROWS_PER_S - 1  # the batch's first rows

    vt = telemetry.VersionTelemetry("m", 2)
    wide = np.ones((1, 200_000), np.float32)  # 800 kB a row: profiled at once, never held in the buffer
    for _ in range(5):
        vt.record_success(1.0, 1, {"v": wide})
    assert vt._pending_rows == 0
    assert vt.snapshot()["columns"]["v[0]"]["count"] == 5


def test_agent_imports_stay_small():
    import subprocess
    import sys

    code = ("import sys; import device_bridge.cli, device_bridge.agent.app, device_bridge.agent.core, "
            "device_bridge.agent.hubsync, device_bridge.hub, onnxruntime; "
            "bad = [m for m in ('duckdb', 'mlflow', 'torch', 'pandas', 'pyarrow', 'mlsql', 'sklearn', 'onnx', "
            "'xgboost', 'httpx') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_columns_format_round_trip_and_refusals():
    import struct

    import numpy as np
    import pytest

    from device_bridge.columns import ColumnsError, decode, encode

    cols = {"x": np.array([1.5, np.nan, 3.0]), "city": np.array(["paris", "", "oslo"], dtype=object),
            "flag": np.array([True, False, True]), "k": np.arange(3, dtype=np.int64),
            "m": np.ones((3, 2), dtype=np.float32)}
    arrays, meta = decode(encode(cols, {"model": "m", "version": 2}))
    assert meta == {"model": "m", "version": 2}
    assert arrays["city"].tolist() == ["paris", "", "oslo"] and arrays["flag"].dtype == bool
    assert np.array_equal(arrays["x"], cols["x"], equal_nan=True) and arrays["m"].shape == (3, 2)
    good = encode({"x": np.zeros(4)})
    header_len = struct.unpack_from("<I", good, 4)[0]

    def with_header(h: bytes, tail: bytes = b"") -> bytes:
        return b"MLC1" + struct.pack("<I", len(h)) + h + tail

    bad = [b"", b"PK\x03\x04", good[:4], b"MLC1" + struct.pack("<I", 1 << 30),
           good[:-1],  # truncated buffer
           with_header(b"not json"), with_header(b"[]"), with_header(b'{"columns": [1]}'),
           with_header(b'{"columns": [{"name": "x", "dtype": "|O", "shape": [1]}]}', b"\0" * 8),
           with_header(b'{"columns": [{"name": "x", "dtype": "<f8", "shape": [-1]}]}'),
           with_header(b'{"columns": [{"name": "x", "dtype": "<f8", "shape": [2]}, {"name": "x", "dtype": "<f8", "shape": [0]}]}',
                       b"\0" * 16),
           with_header(b'{"columns": [{"name": "x", "dtype": "nope", "shape": [1]}]}')]
    for body in bad:
        with pytest.raises(ColumnsError):
            decode(body)
    assert header_len > 0
    with pytest.raises(ColumnsError, match="over the limit"):
        decode(good, max_bytes=8)


def test_batched_numeric_statistics_equal_per_column_ones():
    import numpy as np

    from device_bridge.telemetry import VersionTelemetry

    rng = np.random.default_rng(5)
    a = rng.normal(3, 2, 300)
    a[::7] = np.nan
    b = rng.integers(0, 10, 300).astype(np.int64)
    c = np.array(["x", "y", ""] * 100)
    batched, single = VersionTelemetry("m", 1), VersionTelemetry("m", 1)
    batched.vocab = single.vocab = {"c": frozenset({"x", "y", ""})}
    for lo in range(0, 300, 100):  # three batches of 100 rows (the vectorized block path)
        batched.record_success(1.0, 100, {"a": a[lo:lo + 100], "b": b[lo:lo + 100], "c": c[lo:lo + 100]})
    for i in range(300):  # one row at a time (the scalar path)
        single.record_success(1.0, 1, {"a": a[i:i + 1], "b": b[i:i + 1], "c": c[i:i + 1]})
    sb, ss = batched.snapshot(), single.snapshot()
    for col in ("a", "b"):
        x, y = sb["columns"][col], ss["columns"][col]
        assert x["count"] == y["count"] and abs(x["null_rate"] - y["null_rate"]) < 1e-12
        assert abs(x["mean"] - y["mean"]) < 1e-9 and abs(x["std"] - y["std"]) < 1e-9
        assert (x["min"], x["max"]) == (y["min"], y["max"])
    ok = a[~np.isnan(a)]
    assert abs(sb["columns"]["a"]["mean"] - ok.mean()) < 1e-9 and abs(sb["columns"]["a"]["std"] - ok.std(ddof=1)) < 1e-9
    top = {d["value"]: d["count"] for d in sb["columns"]["c"]["top"]}
    assert top == {d["value"]: d["count"] for d in ss["columns"]["c"]["top"]} == {"x": 100, "y": 100, "": 100}


def test_hub_asking_for_providers_that_cannot_load_leaves_the_serving_session(tmp_path):
    import hashlib

    from device_test_helpers import make_keys, package, trust

    from device_bridge.agent.core import AgentConfig, AgentCore
    from device_bridge.agent.hubsync import HubSync

    kp = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    trust(store, kp)
    core = AgentCore(AgentConfig(name="d", store=store, available_providers=["CPUExecutionProvider"]))
    data = package(kp, 1)
    core.install(None, data)
    sha = hashlib.sha256(data).hexdigest()
    serving = core.resolve("scorer").session
    sync = HubSync(core, "http://127.0.0.1:9", "t", "http://127.0.0.1:8")  # apply() only: no hub needed
    strict_cuda = {"scorer": {"sha256": sha, "version": 1, "providers": ["cuda"], "strict_providers": True}}
    for _ in range(3):  # polls: the failed activation is reported, not retried, and nothing is unloaded
        sync.apply(strict_cuda)
        assert "cuda not available" in sync.errors["scorer"]["error"]
        assert core.resolve("scorer").session is serving
    assert core.predict(core.resolve("scorer"), {"x": np.ones((1, 1), np.float32),
                                                 "city": np.array([["a"]], dtype=object)}, 1)["version"] == 1
    # a preference that can load is applied (another wish than the one that failed)
    sync.apply({"scorer": {"sha256": sha, "version": 1, "providers": ["cuda", "cpu"]}})
    assert "scorer" not in sync.errors
    assert core.info()["models"]["scorer"]["preferred_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert core.resolve("scorer").session is not serving


def test_info_reports_the_active_versions_numeric_training_statistics(tmp_path):
    from device_test_helpers import make_keys, package, trust

    from device_bridge.agent.core import AgentConfig, AgentCore

    kp = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    trust(store, kp)
    core = AgentCore(AgentConfig(name="d", store=store, available_providers=["CPUExecutionProvider"]))
    core.install(None, package(kp, 1, training_stats={"x": {"mean": 1.5, "std": 0.5, "null_rate": 0.0},
                                                      "city": {"values": ["paris", "rome"]}}))
    # the monitor's drift flags compare these with the live input means; training values stay out
    assert core.info()["models"]["scorer"]["training_stats"] == {"x": {"mean": 1.5, "std": 0.5, "null_rate": 0.0}}


def test_a_stalled_body_gets_408_at_its_deadline_while_other_reads_complete():
    """Body deadlines share one sweep per event loop: the stalled read ends with a 408 near its
    deadline, a read that completes is untouched, and a cancellation from elsewhere stays one."""
    import asyncio
    import time

    from starlette.requests import Request

    from device_bridge import web
    from device_bridge.errors import ApiError

    def request(receive):
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"5")],
                 "query_string": b""}
        return Request(scope, receive)

    async def main():
        stalled = asyncio.Event()

        async def never():
            await stalled.wait()
            return {"type": "http.request", "body": b"", "more_body": False}

        parts = [b"ab", b"cde"]

        async def slow_but_steady():
            await asyncio.sleep(0.05)
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

        t0 = time.monotonic()
        late = asyncio.create_task(web.read_body(request(never), 100, 0.3))
        fine = asyncio.create_task(web.read_body(request(slow_but_steady), 100, 5.0))
        assert await fine == b"abcde"
        try:
            await late
        except ApiError as exc:
            assert exc.status == 408 and "0.3 s" in exc.message
        else:
            raise AssertionError("a stalled body was accepted")
        assert 0.25 <= time.monotonic() - t0 < 1.5
        other = asyncio.create_task(web.read_body(request(never), 100, 5.0))
        await asyncio.sleep(0.05)
        other.cancel()
        try:
            await other
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("an outside cancellation was swallowed")
        assert not web._body_watch().reads

    asyncio.run(main())


def test_two_folds_at_once_count_every_request_once():
    """The fold thread and a /v1/metrics snapshot fold at the same time: each takes what is still
    queued, none fails on what the other took (it raised IndexError: a 500 from /v1/metrics, seen
    in CI), and every request is counted exactly once."""
    import sys
    import threading

    from device_bridge.telemetry import VersionTelemetry

    t = VersionTelemetry("m", 1)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes: the race, made likely
    stop, errors = threading.Event(), []

    def folder():
        while not stop.is_set():
            try:
                t.fold()
            except Exception as exc:  # shown by the assert below
                errors.append(exc)
                return

    folders = [threading.Thread(target=folder) for _ in range(3)]
    for f in folders:
        f.start()
    x = np.arange(4, dtype=np.float32)
    for _ in range(20_000):
        t.record_success(0.5, 4, {"x": x})
    stop.set()
    for f in folders:
        f.join()
    sys.setswitchinterval(switch)
    t.fold()
    assert not errors, errors[:1]
    assert t.requests == 20_000 and t.rows == 80_000
