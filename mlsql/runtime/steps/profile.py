"""``ML.PROFILE(MODEL m [, STRUCT('d' AS device, [1, 32] AS batch_sizes, 50 AS runs, 'cpu' AS provider)])``:
the model's ONNX graph run with ONNX Runtime's profiler, in the notebook's process or on a device
(``device_bridge.profiling``, the same code on both sides), one row per operator node and batch size
plus summary rows."""

from __future__ import annotations

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError

PROFILE_SCHEMA = [("node", "string"), ("op_type", "string"), ("provider", "string"), ("batch_size", "int64"),
                  ("calls", "int64"), ("total_ms", "float64"), ("mean_ms", "float64"), ("share_of_time", "float64"),
                  ("value", "float64")]
TOP_OPERATORS = 12  # bars in the chart


def profile(c) -> pa.Table:
    """ML.PROFILE's rows (``c``: the ML function's call, mlsql.runtime.steps.ml_functions.Call)."""
    from device_bridge import profiling

    st = c.settings
    batch_sizes = list(st.get("batch_sizes") or [1, 32])
    runs = int(st.get("runs") or 50)
    provider = str(st.get("provider") or "cpu")
    if st.get("device"):
        from mlsql.deploy.remote import remote_profile

        dev = c.s.devices.get(str(st["device"]))
        version = c.lm.version.version if (c.step.model.version or c.step.model.alias) else None
        rows = remote_profile(dev, c.lm.version.name, version, batch_sizes, runs, provider)
    else:
        data, feeds_for = _graph_and_feeds(c, max(batch_sizes))
        try:
            rows = profiling.profile(data, feeds_for, batch_sizes, runs, provider)
        except profiling.ProfileError as exc:
            raise MLSQLError(f"ML.PROFILE of {c.lm.version.ref}: {exc}") from None
    schema = pa.schema([(n, getattr(pa, "int64" if t == "int64" else t)() if t != "string" else pa.string())
                        for n, t in PROFILE_SCHEMA])
    table = pa.Table.from_pylist(rows, schema=schema)
    _chart(c, rows, batch_sizes)
    return table


def _graph_and_feeds(c, most: int):
    """The model's fp32 export graph (what EXPORT writes and a device runs) and, per batch size, its
    feeds from the model's example rows (its training query), repeated to fill the batch."""
    import numpy as np

    from mlsql.export import build_graph, feeds

    lm = c.lm
    proto, inputs, _ = build_graph(lm.model, lm.transform, lm.meta.get("training_schema", {}), "ensemble")
    if lm.meta.get("query_sql") and not lm.meta.get("query_mlsql"):
        # rows of the training (or import's example) query, as EXPORT samples them
        sample = c.s.engine.sample(lm.meta["query_sql"], max(most, 17), seed=42,
                                   params=lm.meta.get("query_params") or None)
    elif c.data is not None:
        sample = c.data
    else:
        from device_bridge.profiling import synthetic_feeds

        return proto.SerializeToString(), lambda b: synthetic_feeds(inputs, b)
    if sample.num_rows == 0:
        raise MLSQLError(f"ML.PROFILE of {lm.version.ref}: no example rows to run the model on")

    def feeds_for(b: int):
        return feeds(sample.take(pa.array(np.arange(b) % sample.num_rows)), inputs)

    return proto.SerializeToString(), feeds_for


def _chart(c, rows: list[dict], batch_sizes: list[int]) -> None:
    """The top operators of the largest batch size as bars (mean ms per run)."""
    import numpy as np

    from mlsql.output.plots import BarPanel

    if c.charts is None:
        return
    b = max(batch_sizes)
    ops = sorted((r for r in rows if r["op_type"] != "summary" and r["batch_size"] == b),
                 key=lambda r: -(r["mean_ms"] or 0.0))[:TOP_OPERATORS]
    if ops:
        c.charts.append(BarPanel(f"Top operators, batch {b}", [f"{r['node']} ({r['op_type']})" for r in ops],
                                 np.array([r["mean_ms"] for r in ops]), xlabel="ms per run"))
