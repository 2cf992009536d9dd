"""Export a trained model to one ONNX graph that takes the raw columns a device has.

raw inputs (by name: double with NaN for NULL, string with '' for NULL, bool)
  → TRANSFORM, compiled from its fitted SQL          (stage "pre")
  → the automatic encoding (mean fill, LabelEncoder, one-hot)
  → the estimator: trees (TreeEnsemble or tensor form), linear, MLP   (stage "est")
  → outputs ``predicted_<label>`` and, for classifiers, ``predicted_<label>_probs`` [N, k]

Quantization (int8 dynamic, int8 static QDQ, fp16) touches only the estimator's
MatMuls; the TRANSFORM and encoding stay exact. Every export ends with a parity
report against the native model, and fails when fp32 parity breaks.
"""

from __future__ import annotations

import html
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import ExportError
from mlsql.language.options import options_of, validate

log = logging.getLogger(__name__)

EXPORT_OPTIONS = tuple(o.name for o in options_of("EXPORT MODEL"))  # declared in mlsql.language.options
PARITY_TOL = 1e-4
# Initializers that decide which branch a row takes (split thresholds) or what a tree adds
# (leaf values, the base score): kept in float32 by every quantize mode. A threshold in
# fp16 or int8 sends rows down the other branch; the structure matrices around them
# (0/±1 path matrices, integer counts) are exact in any precision and are what gets smaller.
TREE_EXACT = ("tree_B", "tree_E", "trav_threshold", "trav_leaf", "base")


def resolve_export_options(raw: dict) -> dict:
    """EXPORT MODEL's options, checked by ``mlsql.language.options``' table, every default filled in."""
    return validate("EXPORT MODEL", raw, defaults=True)


# -- raw inputs ------------------------------------------------------------------------
def input_kind(arrow_type: str) -> str:
    t = arrow_type.lower()
    if t in ("bool", "boolean"):
        return "bool"
    if t in ("string", "large_string", "string_view", "utf8") or t.startswith("dictionary"):
        return "str"
    if t.startswith(("int", "uint", "double", "float", "halffloat", "decimal")):
        return "num"
    if t.startswith(("date32", "date64", "timestamp", "time32", "time64", "duration")):
        return "num"  # as the number the model was trained on (mlsql.ml.features.numeric_values)
    return "unsupported"


def feeds(table: pa.Table, inputs: list[dict]) -> dict[str, np.ndarray]:
    """ORT feeds for raw rows: doubles with NaN for NULL (dates as days and timestamps as seconds
    since 1970-01-01), strings with '' for NULL, bools."""
    from mlsql.ml.features import numeric_values

    by_lower = {c.lower(): c for c in table.column_names}
    out = {}
    for spec in inputs:
        col = table.column(by_lower[spec["name"].lower()])
        if spec["type"] == "float64":
            out[spec["name"]] = numeric_values(col)
        elif spec["type"] == "string":
            s = pc.fill_null(col.cast(pa.string()), "")
            out[spec["name"]] = np.asarray(s.to_numpy(zero_copy_only=False), dtype=object)
        else:
            out[spec["name"]] = pc.fill_null(col.cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
    return out


# -- the graph -------------------------------------------------------------------------
def build_graph(model, transform, raw_schema: dict[str, str], tree_format: str = "ensemble"):
    """The fp32 ONNX model and its input/output schema."""
    from onnx import TensorProto

    from mlsql.export.builder import Graph
    from mlsql.export.sqlexpr import Compiler, V

    g = Graph()
    feature_names = [f.name for f in model.features]
    if transform is not None:
        items = {n.lower(): (n, sql) for n, sql in transform.items}
        needed: list[str] = []
        for f in feature_names:
            for c in transform.reads.get(items[f.lower()][0], []) if f.lower() in items else [f]:
                if c not in needed:
                    needed.append(c)
    else:
        needed = list(feature_names)
    schema_lower = {k.lower(): (k, v) for k, v in raw_schema.items()}
    inputs, columns = [], {}
    elem = {"num": (TensorProto.DOUBLE, "float64"), "str": (TensorProto.STRING, "string"), "bool": (TensorProto.BOOL, "bool")}
    for c in needed:
        real, t = schema_lower.get(c.lower(), (c, "double"))
        kind = input_kind(t)
        if kind == "unsupported":
            raise ExportError(f"Input column '{real}' has type {t}, which the exported model cannot take",
                              hint="Turn it into a number or a string in the training query (e.g. epoch(ts)).")
        et, tname = elem[kind]
        g.add_input(real, et, ["N"])
        inputs.append({"name": real, "type": tname, "shape": [None], "nullable": kind != "bool",
                       "arrow_type": t})
        columns[real] = V(real, kind)
    values: dict[str, V] = {}
    if transform is not None:
        comp = Compiler(g, columns, dialect=transform.dialect)
        for f in feature_names:
            name, sql = items[f.lower()]
            values[f.lower()] = comp.compile_sql(sql, name)
    else:
        values = {k.lower(): v for k, v in columns.items()}

    # the automatic encoding
    blocks = []
    comp = Compiler(g, {})
    comp._output, comp._sql = "", ""
    for spec in model.features:
        v = values[spec.name.lower()]
        if spec.kind == "numeric":
            if v.kind == "str":
                raise ExportError(f"Feature '{spec.name}' was numeric at training but is a string here")
            x = comp.num(v, None) if v.kind != "num" else v.name
            filled = g.op("Where", [g.op("IsNaN", [x]), g.const(float(spec.mean or 0.0), np.float64), x])
            col = g.op("Cast", [filled], to=TensorProto.FLOAT)
            blocks.append(g.op("Unsqueeze", [col, g.const(np.array([1], np.int64))]))
        else:
            if v.kind not in ("str", "null"):
                raise ExportError(f"Feature '{spec.name}' was a string column at training but is not one here")
            s = comp.string(v, None)
            k = len(spec.categories)
            if k:
                codes = g.op("LabelEncoder", [s], domain="ai.onnx.ml", keys_strings=list(spec.categories),
                             values_int64s=list(range(k)), default_int64=k)
            else:
                zero = g.op("Cast", [g.op("Equal", [s, s])], to=TensorProto.INT64)
                codes = g.op("Mul", [zero, g.const(np.int64(0))])
                codes = g.op("Add", [codes, g.const(np.int64(k))])
            if spec.encoding == "ordinal":
                col = g.op("Cast", [codes], to=TensorProto.FLOAT)
                blocks.append(g.op("Unsqueeze", [col, g.const(np.array([1], np.int64))]))
            else:
                c2 = g.op("Unsqueeze", [codes, g.const(np.array([1], np.int64))])
                hot = g.op("Equal", [c2, g.const(np.arange(k + 1, dtype=np.int64))])
                blocks.append(g.op("Cast", [hot], to=TensorProto.FLOAT))
    X = g.op("Concat", blocks, axis=1, hint="X") if len(blocks) > 1 else blocks[0]

    # the estimator
    g.stage = "est"
    est = model.estimator
    n_features = len(model.encoded_names)
    if est.kind == "xgboost":
        from mlsql.export.trees import ensemble, margin_base, parse_booster, tensor, traversal

        n_out = est.n_out
        trees = parse_booster(est.booster, n_out)
        base = margin_base(est.booster, trees, n_out, np.zeros(n_features, np.float32))
        if tree_format == "gemm":
            margins = tensor(g, X, trees, n_out, n_features, base)
        elif tree_format == "tensor":
            margins = traversal(g, X, trees, n_out, base)
        else:
            margins = ensemble(g, X, trees, n_out, base)
        link = {"binary:logistic": "sigmoid", "multi:softprob": "softmax"}.get(est.objective, "identity")
    elif est.kind == "linear":
        # standardize first, so that every input of the MatMul is O(1) (int8 quantization needs it);
        # in double, as the native model computes: a timestamp (1.7e9 s) minus its float32 mean
        # would keep two digits
        mu, sd = est.x_mean.astype(np.float64), est.x_std.astype(np.float64)
        Xd = g.op("Cast", [X], to=TensorProto.DOUBLE)
        Z = g.op("Cast", [g.op("Div", [g.op("Sub", [Xd, g.const(mu, hint="x_mean")]), g.const(sd, hint="x_std")])],
                 to=TensorProto.FLOAT)
        W = (est.coef * sd).T.astype(np.float32)
        b = (est.intercept + est.coef @ mu).astype(np.float32)
        margins = g.op("Add", [g.op("MatMul", [Z, g.const(W, hint="coef")]), g.const(b, hint="intercept")])
        link = est.link
    elif est.kind == "dnn":
        z = g.op("Div", [g.op("Sub", [X, g.const(est.x_mean.astype(np.float32))]), g.const(est.x_std.astype(np.float32))])
        for i, (Wl, bl) in enumerate(est.weights):
            z = g.op("Add", [g.op("MatMul", [z, g.const(Wl.T.astype(np.float32), hint=f"W{i}")]),
                             g.const(bl.astype(np.float32), hint=f"b{i}")])
            if i < len(est.weights) - 1:
                z = _activation(g, z, est.activation)
        margins = z
        link = est.link
    else:
        raise ExportError(f"Cannot export a model whose estimator is '{est.kind}'")

    g.stage = "post"
    outputs = []
    label_out = f"predicted_{model.label}"
    if model.task == "regression":
        value = g.op("Squeeze", [g.op("Slice", [margins, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                                                 g.const(np.array([1], np.int64))]), g.const(np.array([1], np.int64))])
        g.add_output(g.op("Cast", [value], to=TensorProto.DOUBLE), label_out, TensorProto.DOUBLE, ["N"])
        outputs.append({"name": label_out, "type": "float64", "shape": [None]})
    else:
        if link == "sigmoid":
            m0 = g.op("Slice", [margins, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                                g.const(np.array([1], np.int64))])
            p1 = g.op("Sigmoid", [m0])
            probs = g.op("Concat", [g.op("Sub", [g.const(np.float32(1.0)), p1]), p1], axis=1)
        else:
            probs = g.op("Softmax", [margins], axis=1)
        idx = g.op("ArgMax", [probs], axis=1, keepdims=0)
        classes = np.array(model.classes, dtype=object if model.label_type == "string" else
                           (np.bool_ if model.label_type == "bool" else np.int64))
        labels = g.op("Gather", [g.const(classes, hint="classes"), idx], axis=0)
        ctype = {"string": (TensorProto.STRING, "string"), "bool": (TensorProto.BOOL, "bool")}.get(
            model.label_type, (TensorProto.INT64, "int64"))
        g.add_output(labels, label_out, ctype[0], ["N"])
        g.add_output(probs, f"{label_out}_probs", TensorProto.FLOAT, ["N", len(model.classes)])
        outputs += [{"name": label_out, "type": ctype[1], "shape": [None]},
                    {"name": f"{label_out}_probs", "type": "float32", "shape": [None, len(model.classes)]}]
    return g.model(doc=f"MLSQL {model.model_type} predicting {model.label}"), inputs, outputs


def _activation(g, z: str, name: str) -> str:
    if name == "relu":
        return g.op("Relu", [z])
    if name == "relu6":
        return g.op("Clip", [z, g.const(np.float32(0)), g.const(np.float32(6))])
    if name == "tanh":
        return g.op("Tanh", [z])
    if name == "sigmoid":
        return g.op("Sigmoid", [z])
    if name == "elu":
        return g.op("Elu", [z])
    if name == "selu":
        return g.op("Selu", [z])
    if name == "gelu":  # exact erf form
        half = g.op("Mul", [z, g.const(np.float32(0.5))])
        erf = g.op("Erf", [g.op("Div", [z, g.const(np.float32(np.sqrt(2.0)))])])
        return g.op("Mul", [half, g.op("Add", [erf, g.const(np.float32(1.0))])])
    if name == "crelu":
        return g.op("Concat", [g.op("Relu", [z]), g.op("Relu", [g.op("Neg", [z])])], axis=1)
    raise ExportError(f"Activation '{name}' cannot be exported")


# -- quantization ------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantSettings:
    """One way to run onnxruntime.quantization. ``reduce_range`` stores weights in 7 bits: x86-64
    CPUs without AVX-512 VNNI multiply u8 × s8 pairs into saturating int16 (255·127·2 > 32767),
    which 7-bit weights cannot overflow."""

    reduce_range: bool = False

    def describe(self, mode: str) -> str:
        if mode == "fp16":
            return "fp16 weights"
        return f"{mode}, {'7-bit' if self.reduce_range else '8-bit'} weights"


def quantization_candidates(mode: str, model_proto) -> list[QuantSettings]:
    """The settings the parity step tries, in order of preference; it keeps the first one whose
    metric holds on the CPU at hand. Tree models go straight to 7-bit weights: their quantized
    weights are the ±1 path matrix, exact in 7 bits, so nothing is lost and no CPU saturates."""
    if mode not in ("int8", "int8_static"):
        return [QuantSettings()]
    if any("tree_C" in i.name for i in model_proto.graph.initializer):
        return [QuantSettings(reduce_range=True)]
    return [QuantSettings(), QuantSettings(reduce_range=True)]


def _quantizable(model_proto) -> list[str]:
    """The estimator's MatMul/Gemm nodes whose weight may be quantized (never a tree's leaves)."""
    return [n.name for n in model_proto.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name.startswith("est/")
            and not any(k in n.input[1] for k in TREE_EXACT)]


def quantize(model_proto, mode: str, calibration_feeds: list[dict] | None = None,
             settings: QuantSettings = QuantSettings()):
    """A quantized copy of the model; only the estimator's MatMul/Gemm (stage 'est') change,
    and of a tree model only its structure, never thresholds or leaf values (TREE_EXACT)."""
    import onnx

    if mode == "none":
        return model_proto
    if mode == "fp16":
        return _fp16_weights(model_proto)
    est_matmuls = _quantizable(model_proto)
    if not est_matmuls:  # nothing to quantize (e.g. a TreeEnsemble op): same graph
        return model_proto
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        extra = {"MatMulConstBOnly": True}
        # per-channel scales for 2-D weights; batched 3-D weights (tensor-form trees) take one scale
        dims = {i.name: len(i.dims) for i in model_proto.graph.initializer}
        per_channel = all(dims.get(n.input[1], 2) == 2 for n in model_proto.graph.node if n.name in est_matmuls)
        quiet = _QuietQuantizer()
        if mode == "int8":
            onnx.save(model_proto, src)
            with quiet:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                                 nodes_to_quantize=est_matmuls, per_channel=per_channel,
                                 reduce_range=settings.reduce_range, extra_options=extra)
        else:
            if not calibration_feeds:
                raise ExportError("quantize = 'int8_static' needs calibration rows")

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(calibration_feeds)

                def get_next(self):
                    return next(self.it, None)

            # a dense layer as one Gemm (bias inside) and its Relu quantized too: ORT then runs
            # the layer as one QGemm with no float Add or Quantize/Dequantize pair between layers
            fused = _bias_into_gemm(model_proto)
            onnx.save(fused, src)
            est_nodes = [n.name for n in fused.graph.node if n.name.startswith("est/")
                         and (n.name in est_matmuls or n.op_type == "Relu")]
            with quiet:
                quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["MatMul", "Gemm", "Relu"], nodes_to_quantize=est_nodes,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, reduce_range=settings.reduce_range, extra_options=extra)
        return onnx.load(dst)


class _QuietQuantizer(logging.Filter):
    """onnxruntime.quantization warns through the root logger ('Please consider pre-processing
    before quantization'), which a notebook shows as an error box; those go to our debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname:
            log.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True

    def __enter__(self):
        root = logging.getLogger()
        # with no handler, logging.warning() would install a stderr one for good (basicConfig)
        self._null = logging.NullHandler() if not root.handlers else None
        if self._null:
            root.addHandler(self._null)
        root.addFilter(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeFilter(self)
        if self._null:
            root.removeHandler(self._null)


def _bias_into_gemm(model_proto):
    """The estimator's MatMul(x, W) + b (W a 2-D initializer, b a 1-D one, the sum's only use)
    as one Gemm(x, W, b). Our estimators only multiply [N, k] activations by 2-D weights."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    g = m.graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in g.output}
    nodes, merged = [], set()
    for n in g.node:
        if id(n) in merged:
            continue
        w = (dims.get(n.input[1]) if n.op_type == "MatMul" and n.name.startswith("est/")
             and n.output[0] not in graph_outputs else None)
        add = users.get(n.output[0], [])
        if w is not None and len(w) == 2 and len(add) == 1 and add[0].op_type == "Add":
            bias = [x for x in add[0].input if x != n.output[0]]
            if len(bias) == 1 and dims.get(bias[0]) == [w[1]]:
                nodes.append(helper.make_node("Gemm", [n.input[0], n.input[1], bias[0]], list(add[0].output),
                                              name=n.name))
                merged.add(id(add[0]))
                continue
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return m


def _fp16_weights(model_proto):
    """Store the estimator's float32 weights in half precision, upcast by a Cast node at load.

    Halves the file; CPU providers fold the Casts and compute in fp32, accelerators
    that prefer fp16 can run the weights as they are.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    new_inits, casts = [], []
    for init in m.graph.initializer:
        if (init.data_type == TensorProto.FLOAT and init.name.startswith("est/")
                and not any(k in init.name for k in TREE_EXACT)):
            arr = numpy_helper.to_array(init)
            if arr.size > 16:
                half = numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16")
                new_inits.append(half)
                casts.append(helper.make_node("Cast", [half.name], [init.name], name=init.name + "_upcast",
                                              to=TensorProto.FLOAT))
                continue
        new_inits.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(new_inits)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(casts + nodes)
    return m


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


def _metric(model, sample: pa.Table, pred: np.ndarray) -> tuple[str | None, float | None]:
    from mlsql.ml import metrics as M

    by_lower = {c.lower(): c for c in sample.column_names}
    if model.label.lower() not in by_lower:
        return None, None
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

    metric, m_native = _metric(model, sample, native)
    _, m_onnx = _metric(model, sample, onnx_out)
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
            m_q = _metric(model, sample, q_out)[1]
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


def build_device_package(result: ExportResult, *, name: str, version: int, key_dir: Path, label: str,
                         classes: list | None, model_type: str, metrics: dict, stats: dict,
                         providers: list[str] | None = None, out: Path | None = None,
                         created_at: str | None = None) -> bytes:
    """Sign the exported model into a device package (device_bridge's format).

    ``created_at``: the model version's registration time, so that the same version exported
    with the same options gives the same bytes (and the same sha256) every time."""
    from device_bridge.keys import load_or_create_keypair
    from device_bridge.package import build_package

    kp = load_or_create_keypair(key_dir)
    fields = {
        "name": name, "version": int(version),
        "inputs": [{k: v for k, v in i.items() if k in ("name", "type", "shape", "nullable")} for i in result.inputs],
        "outputs": result.outputs, "providers": providers or ["cpu"],
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "label": label, "classes": classes, "model_type": model_type,
        "quantize": result.options["quantize"], "tree_format": result.options.get("tree_format", "ensemble"),
        "training_stats": stats,
        "parity": {k: v for k, v in result.report.to_dict().items() if k != "latency_ms"},
    }
    if created_at is not None:
        fields["created_at"] = created_at
    return build_package(result.model_bytes, fields, kp.private_key, out=out)
