"""Models trained elsewhere: an ONNX graph, a torch program or an xgboost booster file, made into a
model MLSQL scores like its own (``CREATE MODEL m OPTIONS (model_type = 'onnx', model_path = ...)``).

An ONNX graph (and a torch program, exported to ONNX here) becomes an :class:`ImportedModel`: a
``TrainedModel`` whose "encoding" turns the input columns into the graph's feeds by name (a
``FLOAT[64]`` or ``FLOAT[1][8][8]`` column into a ``[n, 1, 8, 8]`` tensor) and whose estimator runs
the graph in ONNX Runtime, batched. Its outputs are named as ``ML.PREDICT`` names those of the
closest model type: a ``[n, k]`` float output (with an integer ``[n]`` one beside it, or alone) makes
a classifier (``predicted_<label>``, ``predicted_<label>_probs``), a ``[n]`` or ``[n, 1]`` float
output a regressor (``predicted_<label>``); any other output keeps its graph name (or the one
``output_cols`` gives). An xgboost booster becomes a plain ``TrainedModel`` with MLSQL's own
xgboost estimator, so everything MLSQL does with its boosters (tree ONNX forms, explanations)
applies to it.

onnxruntime, onnx, torch and xgboost are imported on first use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import ModelError, ModelImportError
from mlsql.ml import metrics as M
from mlsql.ml.features import FeatureSpec
from mlsql.ml.model import TRAINING_INFO_SCHEMA, TrainedModel

IMPORTED_TYPES = ("onnx", "torch", "xgboost")
ONNX_FILE = "model.onnx"
BATCH_ROWS = 4096  # rows per ONNX Runtime call: bounds the feeds' memory on a large input
# ONNX element types (TensorProto) -> numpy
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
           10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_PROB_OPS = {"Softmax", "Sigmoid", "ZipMap", "LogSoftmax"}


def _empty_training_info() -> pa.Table:
    return pa.Table.from_pylist([], schema=TRAINING_INFO_SCHEMA)


# -- the graph's inputs and outputs ---------------------------------------------------------------


def _dims(value_info) -> list[int | None]:
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def describe_graph(model, path: str, output_cols: list[str] | None, label: str) -> dict:
    """What an ONNX graph reads and writes, and how ML.PREDICT names its outputs: the ``spec`` an
    :class:`OnnxEstimator` keeps. An input or output that is no tensor (a sequence, a map) is an
    error naming it."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = []
    for v in g.input:
        if v.name in inits:
            continue
        if not v.type.HasField("tensor_type") or v.type.tensor_type.elem_type not in _DTYPES | {8: None}:
            raise ModelImportError(f"{path}: graph input '{v.name}' is not a numeric, boolean or string tensor",
                                   hint="MLSQL feeds each input from one column.")
        elem = v.type.tensor_type.elem_type
        inputs.append({"name": v.name, "elem": elem, "shape": _dims(v)})
    producers = {o: n.op_type for n in g.node for o in n.output}
    outputs = []
    for v in g.output:
        if not v.type.HasField("tensor_type"):
            raise ModelImportError(
                f"{path}: graph output '{v.name}' is not a tensor (a sequence or map, e.g. a ZipMap)",
                hint="Convert the model without its ZipMap (skl2onnx: options={'zipmap': False}).")
        outputs.append({"name": v.name, "elem": v.type.tensor_type.elem_type, "shape": _dims(v),
                        "producer": producers.get(v.name, "")})
    if not inputs:
        raise ModelImportError(f"{path}: the graph has no inputs")
    if output_cols is not None and len(output_cols) != len(outputs):
        raise ModelImportError(
            f"{path}: output_cols names {len(output_cols)} outputs, but the graph has {len(outputs)}: "
            + ", ".join(o["name"] for o in outputs))
    # roles: the closest model type's columns
    def is_float(o):
        return o["elem"] in (1, 10, 11)

    def per_row(o):
        return o["shape"][1:] if o["shape"] else []

    probs = next((o for o in outputs if is_float(o) and len(per_row(o)) == 1 and (per_row(o)[0] or 0) >= 2), None)
    task, role = None, {}
    if probs is not None:
        task = "classification"
        role[probs["name"]] = "probs"
        lab = next((o for o in outputs if o["elem"] in (6, 7) and per_row(o) in ([], [1])), None)
        if lab is not None:
            role[lab["name"]] = "label"
    else:
        value = next((o for o in outputs if is_float(o) and per_row(o) in ([], [1])), None)
        if value is not None:
            task = "regression"
            role[value["name"]] = "value"
    for i, o in enumerate(outputs):
        o["role"] = role.get(o["name"], "other")
        given = output_cols[i] if output_cols is not None else None
        if o["role"] == "probs":
            o["column"] = given or f"predicted_{label}_probs"
            # a softmax (or sigmoid) at the end gives probabilities; anything else gives logits
            o["logits"] = o["producer"] not in _PROB_OPS
        elif o["role"] in ("label", "value"):
            o["column"] = given or f"predicted_{label}"
        else:
            o["column"] = given or re.sub(r"\W+", "_", o["name"]).strip("_") or f"output_{i}"
    k = per_row(probs)[0] if probs is not None else None
    return {"inputs": inputs, "outputs": outputs, "task": task, "n_classes": k}


def check_runtime(data: bytes, path: str):
    """An ONNX Runtime session of the graph, or an error naming the file and what the runtime refused
    (an operator it lacks, a wrong type)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own classes (InvalidGraph, NotImplemented, Fail)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", str(exc))
        if m:
            text = f"ONNX Runtime has no kernel for operator {m.group(1)} (opset {m.group(2)}, node '{m.group(3)}')"
        m = re.search(r"No Op registered for (\w+) with domain_version of (\d+)", str(exc))
        if m:
            text = f"ONNX Runtime does not know operator {m.group(1)} (opset {m.group(2)})"
        raise ModelImportError(f"{path}: ONNX Runtime cannot load the graph: {text}",
                               hint="Export it with operators of the standard ONNX domains, at an opset this "
                                    "onnxruntime supports.") from None


# -- feeds from Arrow columns --------------------------------------------------------------------


def _flat_values(col) -> tuple[np.ndarray, int]:
    """The numbers of a (nested) list column, flat, and how many there are per row (every row must
    have as many); a plain column has one per row."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    arr = col
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise ModelError("a NULL array where the model needs a tensor")
        arr = pc.list_flatten(arr)
    if arr.null_count:
        raise ModelError("a NULL element where the model needs a tensor")
    if n and len(arr) % n:
        raise ModelError("rows whose arrays have different lengths")
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return np.asarray(arr.to_pylist(), dtype=object), (len(arr) // n if n else 0)
    if pa.types.is_boolean(arr.type):
        return arr.to_numpy(zero_copy_only=False), (len(arr) // n if n else 0)
    return arr.to_numpy(zero_copy_only=False), (len(arr) // n if n else 0)


def column_feed(col, inp: dict, column: str, where: str) -> np.ndarray:
    """One column as the tensor ``inp`` (a graph input) takes: ``[n, *row_shape]`` of its type."""
    n = len(col)
    try:
        values, per_row = _flat_values(col)
    except ModelError as exc:
        raise ModelError(f"{where}: column '{column}' has {exc.message}") from None
    shape = list(inp["shape"][1:]) if inp["shape"] else []
    known = int(np.prod([d for d in shape if d])) if shape else 1
    unknown = [i for i, d in enumerate(shape) if not d]
    if len(unknown) == 1 and known and per_row % known == 0:
        shape[unknown[0]] = per_row // known
    want = int(np.prod(shape)) if shape else 1
    if (n and per_row != want) or len(unknown) > 1:
        dims = "×".join(str(d or "?") for d in inp["shape"][1:]) or "1"
        raise ModelError(f"{where}: column '{column}' has {per_row} value{'s' if per_row != 1 else ''} per row, "
                         f"but graph input '{inp['name']}' takes {dims} per row",
                         hint=f"Give it as an array of {want} numbers per row, e.g. FLOAT[{want}].")
    dtype = _DTYPES.get(inp["elem"], object)
    if dtype is object:
        values = values.astype(str).astype(object)
    else:
        values = values.astype(dtype, copy=False)
    return values.reshape([n, *shape]) if inp["shape"] else values.reshape([n])


# -- the estimator ---------------------------------------------------------------------------------


class OnnxEstimator:
    """An ONNX graph run by ONNX Runtime on the feeds an :class:`ImportedModel` makes."""

    kind = "onnx"
    encoding = "value"

    def __init__(self, data: bytes, spec: dict):
        self.data = data
        self.spec = spec
        self._session = None

    def __getstate__(self):  # the session stays behind (Spark ships the model as pickled bytes)
        return {"data": self.data, "spec": self.spec, "_session": None}

    @property
    def session(self):
        if self._session is None:
            self._session = check_runtime(self.data, self.spec.get("source", ONNX_FILE))
        return self._session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for the rows of ``feeds``, in batches of at most BATCH_ROWS rows (or the
        graph's fixed batch size, the last batch padded with its last row)."""
        n = len(next(iter(feeds.values())))
        fixed = {i["shape"][0] for i in self.spec["inputs"] if i["shape"] and i["shape"][0]}
        step = fixed.pop() if fixed else BATCH_ROWS
        padded = bool(self.spec["inputs"][0]["shape"] and self.spec["inputs"][0]["shape"][0])
        names = [o["name"] for o in self.spec["outputs"]]
        if n == 0:
            if padded:
                raise ModelError("no input rows for a graph of fixed batch size")
            return dict(zip(names, self.session.run(names, feeds)))
        parts: dict[str, list] = {k: [] for k in names}
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            chunk = {k: v[lo:hi] for k, v in feeds.items()}
            if padded and hi - lo < step:  # a graph of fixed batch size: pad with the last row
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - (hi - lo), axis=0)]) for k, v in chunk.items()}
            for k, v in zip(names, self.session.run(names, chunk)):
                parts[k].append(v[: hi - lo])
        return {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    def outputs_of(self, feeds) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The prediction (probabilities [n, k] or values [n], float64) and every output as run."""
        out = self.run(feeds)
        pred = None
        for o in self.spec["outputs"]:
            v = out[o["name"]]
            if o["role"] == "probs":
                z = v.reshape(len(v), -1).astype(np.float64)
                if o.get("logits"):
                    z = np.exp(z - z.max(axis=1, keepdims=True))
                    z /= z.sum(axis=1, keepdims=True)
                pred = z
            elif o["role"] == "value":
                pred = v.reshape(len(v)).astype(np.float64)
        return pred, out

    def predict_raw(self, feeds):
        pred, _ = self.outputs_of(feeds)
        if pred is None:
            raise ModelError("This imported graph has no output that ML.EVALUATE can read as a prediction",
                             hint="A classifier's [n, k] probabilities or a regressor's [n] values.")
        return pred

    def contributions(self, X):
        raise ModelError("ML.EXPLAIN_PREDICT cannot explain an imported ONNX graph: its operators are opaque",
                         hint="Attributions are available for models trained by MLSQL and imported xgboost boosters.")

    def importance(self):
        return None

    def save(self, folder):
        folder = Path(folder)
        (folder / ONNX_FILE).write_bytes(self.data)
        (folder / "estimator.json").write_text(json.dumps({"kind": self.kind, "spec": self.spec}, indent=1))

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        meta = json.loads((folder / "estimator.json").read_text())
        return cls((folder / ONNX_FILE).read_bytes(), meta["spec"])


# -- the model ---------------------------------------------------------------------------------------


class ImportedModel(TrainedModel):
    """An ONNX graph as a model: its input columns are the graph's inputs (``features`` of kind
    'tensor'), ``encode`` makes the feeds, the estimator runs the graph."""

    @property
    def onnx_bytes(self) -> bytes:
        return self.estimator.data

    @property
    def spec(self) -> dict:
        return self.estimator.spec

    def encode(self, table: pa.Table) -> dict[str, np.ndarray]:
        by_lower = {c.lower(): c for c in table.column_names}
        feeds = {}
        for f, inp in zip(self.features, self.spec["inputs"]):
            real = by_lower.get(f.name.lower())
            if real is None:
                raise ModelError(f"Input has no column '{f.name}', which feeds graph input '{inp['name']}'")
            feeds[inp["name"]] = column_feed(table.column(real), inp, real, f"model_type {self.model_type}")
        return feeds

    def predict(self, features: pa.Table, threshold: float | None = None) -> pa.Table:
        pred, out = self.estimator.outputs_of(self.encode(features))
        cols: dict[str, pa.Array] = {}
        for o in self.spec["outputs"]:
            v = out[o["name"]]
            if o["role"] == "probs":
                if not any(x["role"] == "label" for x in self.spec["outputs"]):
                    cols[f"predicted_{self.label}"] = self._labels_for(pred, threshold)
                cols[o["column"]] = self._probs_array(pred)
            elif o["role"] == "label" and pred is not None and threshold is None:
                cols[o["column"]] = self._class_array().take(pa.array(v.reshape(len(v)).astype(np.int64)))
            elif o["role"] == "label":
                cols[o["column"]] = self._labels_for(pred, threshold)
            elif o["role"] == "value":
                cols[o["column"]] = pa.array(pred, pa.float64())
            else:
                cols[o["column"]] = _tensor_column(v)
        # the label column first, then its probabilities (BigQuery ML's order)
        order = sorted(cols, key=lambda c: (c != f"predicted_{self.label}", c != f"predicted_{self.label}_probs"))
        return pa.table({c: cols[c] for c in order})

    def explain_predict(self, features, top_k=5):
        return self.estimator.contributions(None)

    def output_schema(self) -> pa.Schema:
        """The columns ML.PREDICT puts before the input's (Spark builds its result type from it)."""
        empty = {}
        for _f, inp in zip(self.features, self.spec["inputs"]):
            shape = [d or 1 for d in inp["shape"][1:]] if inp["shape"] else []
            empty[inp["name"]] = np.zeros([1, *shape], dtype=_DTYPES.get(inp["elem"], object))
        got = self.predict(pa.table({f.name: _tensor_column(empty[i["name"]]) if i["shape"][1:] else
                                    pa.array(empty[i["name"]].reshape(1))
                                    for f, i in zip(self.features, self.spec["inputs"])}))
        return got.schema

    @classmethod
    def load(cls, folder) -> ImportedModel:
        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        model = cls(
            model_type=meta["model_type"], task=meta["task"], label=meta["label"],
            label_type=meta["label_type"], classes=meta["classes"],
            features=[FeatureSpec(**f) for f in meta["features"]],
            estimator=OnnxEstimator.load(folder), eval_metrics=meta["eval_metrics"],
            training_info=_empty_training_info(), options=meta.get("options", {}),
        )
        return model

    def save(self, folder) -> None:
        super().save(folder)
        p = Path(folder) / "model.json"
        meta = json.loads(p.read_text())
        meta["imported"] = True
        p.write_text(json.dumps(meta, indent=1, default=str))


def load_any(folder) -> TrainedModel:
    """The model saved in ``folder``: an :class:`ImportedModel` (an ONNX graph) or a TrainedModel."""
    meta = json.loads((Path(folder) / "model.json").read_text())
    return (ImportedModel if meta.get("imported") else TrainedModel).load(folder)


def _tensor_column(v: np.ndarray) -> pa.Array:
    """An output tensor as one column: a number per row, or a fixed-size array per row (nested for
    each further dimension)."""
    if v.dtype == object:
        arr = pa.array(v.reshape(-1).tolist(), pa.string())
    else:
        arr = pa.array(np.ascontiguousarray(v).reshape(-1))
    for d in reversed(v.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(d))
    return arr


# -- importing ------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    if not path.exists():
        raise ModelImportError(f"{path}: no such file (model_path)",
                               hint=f"model_path names the {what} file to import, or models:/name/version.")
    if path.is_dir():
        raise ModelImportError(f"{path}: is a folder, not a {what} file")
    return path.read_bytes()


def import_onnx(path: Path, *, label: str, output_cols: list[str] | None, model_type: str = "onnx",
                class_labels: list | None = None, data: bytes | None = None) -> ImportedModel:
    """An ONNX file as a model; every error names the file and what is wrong with it."""
    import onnx

    data = _read(path, "ONNX") if data is None else data
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"{path}: not a valid ONNX model ({first[:300]})",
                               hint="The file may be truncated or not ONNX at all.") from None
    spec = describe_graph(proto, str(path), output_cols, label)
    spec["source"] = path.name
    check_runtime(data, str(path))
    classes = None
    label_type = "double"
    if spec["task"] == "classification":
        k = spec["n_classes"]
        if class_labels is not None:
            if len(class_labels) != k:
                raise ModelImportError(f"{path}: class_labels names {len(class_labels)} classes, "
                                       f"but the graph's probabilities have {k}")
            classes = list(class_labels)
            label_type = "string" if any(isinstance(c, str) for c in classes) else "int64"
            classes = [str(c) for c in classes] if label_type == "string" else [int(c) for c in classes]
        else:
            classes, label_type = list(range(k)), "int64"
    features = []
    for inp in spec["inputs"]:
        per_row = inp["shape"][1:] if inp["shape"] else []
        kind = "tensor" if per_row and int(np.prod([d or 2 for d in per_row])) > 1 else "numeric"
        arrow = {1: "float", 11: "double", 7: "int64", 6: "int32", 9: "bool", 8: "string"}.get(inp["elem"], "float")
        features.append(FeatureSpec(inp["name"], "categorical" if inp["elem"] == 8 and kind == "numeric" else kind,
                                    arrow, mean=float("nan"), encoding="tensor"))
    return ImportedModel(model_type=model_type, task=spec["task"] or "other", label=label, label_type=label_type,
                         classes=classes, features=features, estimator=OnnxEstimator(data, spec),
                         eval_metrics={}, training_info=_empty_training_info(), options={})


def import_xgboost(path: Path, *, label: str, feature_names: list[str] | None = None) -> TrainedModel:
    """An xgboost booster file (JSON or UBJ) as MLSQL's own boosted-tree model."""
    import xgboost as xgb

    from mlsql.ml.estimators import XGBEstimator

    raw = _read(path, "xgboost booster")
    b = xgb.Booster()
    try:
        b.load_model(bytearray(raw))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"{path}: not an xgboost booster in JSON or UBJ ({first[:200]})") from None
    cfg = json.loads(b.save_config())
    objective = cfg["learner"]["objective"]["name"]
    n = b.num_features()
    names = feature_names or b.feature_names or [f"f{i}" for i in range(n)]
    if len(names) != n:
        raise ModelImportError(f"{path}: the booster reads {n} features, but {len(names)} columns were named")
    if objective.startswith("reg:") and objective not in ("reg:logistic", "reg:gamma", "reg:tweedie"):
        task, classes, label_type, n_out = "regression", None, "double", 1
        model_type = "boosted_tree_regressor"
        if objective != "reg:squarederror":
            raise ModelImportError(f"{path}: objective {objective} is not supported for import",
                                   hint="Imported regressors: reg:squarederror.")
    elif objective == "binary:logistic":
        task, classes, label_type, n_out = "classification", [0, 1], "int64", 1
        model_type = "boosted_tree_classifier"
    elif objective == "multi:softprob":
        k = int(cfg["learner"]["learner_model_param"]["num_class"])
        task, classes, label_type, n_out = "classification", list(range(k)), "int64", k
        model_type = "boosted_tree_classifier"
    else:
        raise ModelImportError(f"{path}: objective {objective} is not supported for import",
                               hint="Imported boosters: reg:squarederror, binary:logistic, multi:softprob "
                                    "(train with multi:softprob rather than multi:softmax).")
    b.feature_names = None  # MLSQL feeds the matrix by position, in the order of ``features``
    est = XGBEstimator(b, objective, n_out)
    # NULL stays NaN: xgboost's own missing-value branch, as the booster was trained
    features = [FeatureSpec(nm, "numeric", "double", mean=float("nan")) for nm in names]
    return TrainedModel(model_type=model_type, task=task, label=label, label_type=label_type, classes=classes,
                        features=features, estimator=est, eval_metrics={}, training_info=_empty_training_info(),
                        options={"model_type": "xgboost"})


def load_torch(path: Path):
    """A saved ``torch.export`` program (``.pt2``) or TorchScript file: (module-like, kind)."""
    import torch

    _read(path, "torch")
    try:
        return torch.export.load(str(path)), "export"
    except Exception as first:
        try:
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception:
            why = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise ModelImportError(
                f"{path}: not a torch.export program (torch.export.save) or TorchScript file ({why[:200]})",
                hint="Save the model with torch.export.save(torch.export.export(model, args), path) or "
                     "torch.jit.save(torch.jit.script(model), path); a state_dict alone has no graph.") from None


def torch_to_onnx(path: Path, rows: dict[str, np.ndarray], opset: int = 18) -> bytes:
    """The torch program at ``path`` as ONNX (the dynamo exporter), traced on example ``rows`` (one
    array per forward argument, in order, keyed by the column that feeds it), the batch dimension
    dynamic, the graph's inputs named after those columns."""
    import io
    import warnings

    import torch

    program, kind = load_torch(path)
    names = list(rows)
    # a copy: Arrow's buffers are read-only, and torch wants tensors it may write (it warns otherwise)
    args = tuple(torch.from_numpy(np.array(v, copy=True, order="C")) for v in rows.values())
    import logging

    quiet = logging.getLogger("torch.onnx")  # the exporter logs each optional library it skips
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "export":
                # the program keeps the shapes it was exported with: a batch dimension exported as
                # dynamic stays so; a fixed one (torch.export.export without dynamic_shapes) gives a
                # graph of that batch size, which ML.PREDICT feeds in batches of it
                first = next(n for n in program.graph.nodes if n.op == "placeholder"
                             and n.name in set(program.graph_signature.user_inputs))
                b = first.meta["val"].shape[0]
                if isinstance(b, int):
                    args = tuple(torch.cat([a, a[-1:].repeat(max(b - len(a), 0), *[1] * (a.dim() - 1))])[:b]
                                 for a in args)
                onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=names,
                                                 opset_version=opset, verbose=False)
            else:
                # a ScriptModule is no Python code torch.export can trace: TorchScript's own exporter
                # (the batch dimension of every input and output dynamic)
                with torch.no_grad():
                    got = program(*args)
                n_out = 1 if isinstance(got, torch.Tensor) else len(got)
                outs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
                buf = io.BytesIO()
                torch.onnx.export(program, args, buf, dynamo=False, input_names=names, output_names=outs,
                                  opset_version=min(opset, 17),
                                  dynamic_axes={k: {0: "batch"} for k in [*names, *outs]})
                return buf.getvalue()
        onnx_program.model_proto.ir_version = min(onnx_program.model_proto.ir_version, 10)
        return onnx_program.model_proto.SerializeToString()
    except ModelImportError:
        raise
    except ImportError as exc:
        raise ModelImportError(f"{path}: exporting a torch program to ONNX needs {exc.name or 'onnxscript'}",
                               hint="pip install 'mlsql[torch]' (torch and onnxscript).") from None
    except Exception as exc:
        # the exporter's first line is often a banner ("step 1/3 ..."); its cause says what failed
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ModelImportError(f"{path}: the torch program could not be exported to ONNX on the example rows "
                               f"({first[:300]})",
                               hint="The AS SELECT's columns feed forward()'s arguments in order; check their "
                                    "shapes and types.") from None
    finally:
        quiet.setLevel(level)


def evaluation_of_rows(model: TrainedModel, table: pa.Table) -> dict:
    """Metrics on labelled example rows (an import's AS SELECT with its label column), or {}."""
    by_lower = {c.lower() for c in table.column_names}
    if model.label.lower() not in by_lower or model.task not in ("classification", "regression"):
        return {}
    ev = model.evaluation_of(table)
    if model.is_classifier:
        model.evaluation = ev
    return ev.metrics if isinstance(ev, M.Evaluation) else {}
