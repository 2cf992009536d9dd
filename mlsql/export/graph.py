"""The ONNX graph of a trained model: raw inputs as a device has them (double with NaN for NULL,
string with '' for NULL, bool) → the TRANSFORM compiled from its fitted SQL → the automatic
encoding → the estimator (trees in ensemble or tensor form, linear, MLP) → ``predicted_<label>``
and, for classifiers, ``predicted_<label>_probs``."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import ExportError

log = logging.getLogger(__name__)

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
        if len(spec.get("shape") or [None]) > 1 or spec["type"] not in ("float64", "string", "bool"):
            # an imported graph's tensor input: each row's array as the input's shape and type
            from mlsql.export.imported import tensor_feed

            out[spec["name"]] = tensor_feed(col, spec)
        elif spec["type"] == "float64":
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

    if getattr(model, "onnx_bytes", None) is not None:  # an imported graph is its own estimator
        from mlsql.export.imported import imported_graph

        return imported_graph(model)
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


