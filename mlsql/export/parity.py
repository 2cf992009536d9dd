"""The export itself: the graph built and checked against the native model on rows of the training
query (fp32 parity within ``PARITY_TOL``; the quantized graph's metric within ``max_metric_drop``,
trying each quantization setting in turn), latency measured, and a ``ParityReport`` that says what
held; a refused export raises with that report and writes nothing."""

from __future__ import annotations

import html
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import ExportError
from mlsql.export.graph import build_graph, feeds
from mlsql.export.quantize import quantization_candidates, quantize

PARITY_TOL = 1e-4

# -- parity -----------------------------------------------------------------------------------
@dataclass
class ParityReport:
    model: str
    quantize: str
    tree_format: str | None
    rows: int
    rows_from: str  # which rows every figure below is computed on (the caller's sample)
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_diff_quantized: float | None
    mean_abs_diff_quantized: float | None
    metric: str | None
    metric_native: float | None
    metric_onnx: float | None
    metric_quantized: float | None
    metric_drop: float | None  # metric_native - metric_quantized
    max_metric_drop: float
    quantize_settings: str | None  # what the parity step chose for this CPU
    size_bytes: int
    size_bytes_fp32: int
    latency_ms: dict = field(default_factory=dict)  # {native|onnx_fp32|onnx_<q>: {batch_1, batch_256}}
    passed: bool = field(init=False, default=False)  # both checks below held; set from the figures, never given

    def __post_init__(self) -> None:
        # export_model's two checks, read from the figures themselves: fp32 parity within PARITY_TOL,
        # and the quantized metric's drop (when there is one) within max_metric_drop
        fp32_ok = not self.max_abs_diff > PARITY_TOL
        quantized_ok = self.metric_drop is None or not self.metric_drop > self.max_metric_drop
        self.passed = fp32_ok and quantized_ok

    def to_dict(self) -> dict:
        return asdict(self)

    def to_table(self) -> pa.Table:
        rows = [(k, _fmt(v)) for k, v in self.to_dict().items() if k != "latency_ms"]
        for who, lat in self.latency_ms.items():
            for b, ms in lat.items():
                rows.append((f"latency_ms.{who}.{b}", _fmt(ms)))
        return pa.table({"property": [r[0] for r in rows], "value": [r[1] for r in rows]})

    def _repr_html_(self) -> str:
        t = self.to_table()
        body = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(v)}</td></tr>"
                       for p, v in zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
        return f"<table><tr><th>parity</th><th></th></tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _outputs_as_array(model, outs: list[np.ndarray]) -> np.ndarray:
    if model.task == "regression":
        return np.asarray(outs[0], dtype=np.float64)
    return np.asarray(outs[1], dtype=np.float64)


def _latency(fn, batch: int, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def ort_session(model_bytes: bytes, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=list(providers))


def _gate_hint(model, opts: dict, tried: list[str]) -> str:
    tips = []
    if model.estimator.kind == "xgboost" and opts["tree_format"] != "ensemble":
        tips.append("tree_format = 'ensemble' (exact; quantization leaves it as it is)")
    if opts["quantize"] == "int8":
        tips.append("quantize = 'int8_static' with a calibration_query of representative rows")
    elif opts["quantize"] == "int8_static":
        tips.append("a calibration_query whose rows cover the data the model will see")
    tips.append("quantize = 'none' (fp32)")
    tips.append("or a larger max_metric_drop if the loss is acceptable")
    return f"Tried {'; '.join(tried)}. Try " + ", ".join(tips) + "."


def _metric(model, sample: pa.Table, pred: np.ndarray, native: np.ndarray | None = None
            ) -> tuple[str | None, float | None]:
    """The headline metric of ``pred`` on ``sample``'s labels; without a label column (an imported
    model's example rows may have none), with ``native`` given: how far ``pred`` agrees with it
    (``agreement``: the share of rows with the same class, or r2 of the values against native's)."""
    from mlsql.ml import metrics as M

    by_lower = {c.lower(): c for c in sample.column_names}
    if model.label.lower() not in by_lower:
        if native is None or model.task not in ("classification", "regression"):
            return None, None
        if model.task == "regression":
            return "agreement_r2", M.regression_metrics(native, pred)["r2_score"]
        return "agreement", float((np.argmax(pred, axis=1) == np.argmax(native, axis=1)).mean())
    try:
        sub, y = model._labelled(sample)
    except Exception:
        return None, None
    if len(y) != len(pred):
        keep = pc.is_valid(sample.column(by_lower[model.label.lower()])).to_numpy(zero_copy_only=False)
        pred = pred[keep]
    if model.task == "regression":
        return "r2_score", M.regression_metrics(y, pred)["r2_score"]
    m = M.classification_metrics(y, pred)
    if len(model.classes) == 2:
        return "roc_auc", m["roc_auc"]
    return "accuracy", m["accuracy"]


@dataclass
class ExportResult:
    path: Path
    model_bytes: bytes
    inputs: list[dict]
    outputs: list[dict]
    report: ParityReport
    options: dict

    def _repr_html_(self):
        return self.report._repr_html_()


def _set_opset(proto, opset: int) -> None:
    """Stamp the requested ONNX opset (the option ``opset``). The graph uses no op whose meaning
    changed between opsets 13 and 21; the checker and the parity run on ONNX Runtime below refuse
    a graph that needs a newer one (an ExportError naming the op)."""
    import onnx

    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx") and o.version != opset:
            o.version = opset
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"The exported graph cannot be written at opset {opset}: {exc}".split("\n")[0],
                                  hint="Leave opset at its default (17), or choose a newer one.") from None


def export_model(model, transform, raw_schema: dict[str, str], options: dict, sample: pa.Table,
                 native_predict: Callable[[pa.Table], np.ndarray], out_path: str | Path,
                 calibration: pa.Table | None = None, name: str = "model",
                 rows_from: str = "the rows given") -> ExportResult:
    """Export ``model`` (with its fitted ``transform``) to ``out_path``; see the module docstring.
    ``rows_from`` says what ``sample`` is, for the report and its messages; ``options``: EXPORT
    MODEL's, checked (``resolve_export_options``)."""
    opts = options
    proto, inputs, outputs = build_graph(model, transform, raw_schema, opts["tree_format"])
    if getattr(model, "onnx_bytes", None) is None:  # an imported graph keeps the opset it was made at
        _set_opset(proto, opts["opset"])
    fp32 = proto.SerializeToString()
    if sample.num_rows == 0:
        raise ExportError("No rows to check the exported model against (the training query returned none)")
    feed = feeds(sample, inputs)
    try:
        sess = ort_session(fp32)
        onnx_out = _outputs_as_array(model, sess.run(None, feed))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"The exported graph does not run on ONNX Runtime: {exc}") from exc
    native = np.asarray(native_predict(sample), dtype=np.float64)
    diff = np.abs(onnx_out - native)
    if model.task == "regression":  # float32 holds ~7 digits: compare relative to the value
        diff = diff / np.maximum(1.0, np.abs(native))
    max_diff, mean_diff = float(np.nanmax(diff)), float(np.nanmean(diff))

    metric, m_native = _metric(model, sample, native, native)
    _, m_onnx = _metric(model, sample, onnx_out, native)
    q_bytes, q_out, m_q, q_sess, chosen = fp32, None, None, None, None
    qd = drop = None

    def report(latency: dict | None = None) -> ParityReport:
        """The report of what has been checked so far (``passed`` follows from its figures)."""
        return ParityReport(
            model=name, quantize=opts["quantize"],
            tree_format=opts["tree_format"] if model.estimator.kind == "xgboost" else None,
            rows=sample.num_rows, rows_from=rows_from, max_abs_diff=max_diff, mean_abs_diff=mean_diff,
            max_abs_diff_quantized=None if qd is None else float(np.nanmax(qd)),
            mean_abs_diff_quantized=None if qd is None else float(np.nanmean(qd)),
            metric=metric, metric_native=m_native, metric_onnx=m_onnx, metric_quantized=m_q,
            metric_drop=drop, max_metric_drop=opts["max_metric_drop"],
            quantize_settings=chosen,
            size_bytes=len(q_bytes), size_bytes_fp32=len(fp32), latency_ms=latency or {},
        )

    def refused(err: ExportError) -> ExportError:
        err.report = report()  # what failed, for a caller to read: passed is False
        return err

    if max_diff > PARITY_TOL:
        raise refused(ExportError(
            f"The ONNX graph of {name} disagrees with the native model: max difference {max_diff:.3g} "
            f"on {sample.num_rows} {rows_from} (tolerance {PARITY_TOL:g}); nothing was written",
        ))

    # the quantized graph: each candidate setting in turn, the first whose metric holds on this CPU
    tried: list[str] = []
    if opts["quantize"] != "none":
        calib = calibration if calibration is not None else sample
        calib_feeds = None
        if opts["quantize"] == "int8_static":
            cf = feeds(calib, inputs)
            n = calib.num_rows
            calib_feeds = [{k: v[a:a + 64] for k, v in cf.items()} for a in range(0, n, 64)]
        for settings in quantization_candidates(opts["quantize"], proto):
            q_bytes = quantize(proto, opts["quantize"], calib_feeds, settings).SerializeToString()
            q_sess = ort_session(q_bytes)
            q_out = _outputs_as_array(model, q_sess.run(None, feed))
            m_q = _metric(model, sample, q_out, native)[1]
            chosen = settings.describe(opts["quantize"])
            tried.append(f"{chosen}: {metric} {m_q:.4f}" if m_q is not None else chosen)
            if m_q is None or m_native - m_q <= opts["max_metric_drop"]:
                break
    qd = None if q_out is None else np.abs(q_out - native)
    if qd is not None and model.task == "regression":
        qd = qd / np.maximum(1.0, np.abs(native))
    drop = None if m_q is None or m_native is None else m_native - m_q
    if drop is not None and drop > opts["max_metric_drop"]:
        raise refused(ExportError(
            f"The {opts['quantize']} export of {name} loses accuracy: {metric} {m_native:.4f} native, "
            f"{m_q:.4f} {opts['quantize']} (a drop of {drop:.4f}; max_metric_drop = {opts['max_metric_drop']:g}) "
            f"on {sample.num_rows} {rows_from}; nothing was written, registered or deployed",
            hint=_gate_hint(model, opts, tried),
        ))

    # latency: one row and a batch of 256, ONNX Runtime on CPU vs the native model
    def rows(b):
        idx = np.arange(b) % sample.num_rows
        return sample.take(pa.array(idx))

    r1, r256 = rows(1), rows(256)
    lat_feeds = {1: feeds(r1, inputs), 256: feeds(r256, inputs)}
    feats = {1: r1, 256: r256}
    lat = {"native": {f"batch_{b}": _latency(lambda b: native_predict(feats[b]), b, 15 if b == 1 else 7) for b in (1, 256)},
           "onnx_fp32": {f"batch_{b}": _latency(lambda b: sess.run(None, lat_feeds[b]), b, 50 if b == 1 else 20)
                         for b in (1, 256)}}
    if q_sess is not None:
        lat[f"onnx_{opts['quantize']}"] = {f"batch_{b}": _latency(lambda b: q_sess.run(None, lat_feeds[b]), b,
                                                                  50 if b == 1 else 20) for b in (1, 256)}
    checked = report(lat)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(q_bytes)
    tmp.replace(out_path)
    return ExportResult(out_path, q_bytes, inputs, outputs, checked, opts)


