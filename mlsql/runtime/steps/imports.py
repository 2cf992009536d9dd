"""``CREATE MODEL m OPTIONS (model_type = 'onnx' | 'torch' | 'xgboost', model_path = ...) [AS SELECT ...]``:
a model trained elsewhere, read from its file, checked against its example rows, and registered as
a version like any other. The computation is mlsql.ml.imported's; this module finds the file,
reads the rows and registers."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, ModelImportError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState
from mlsql.runtime.steps.ml_functions import META_FILE

_SUFFIXES = {"onnx": (".onnx",), "torch": (".pt2", ".pt", ".pth", ".ts"), "xgboost": (".json", ".ubj", ".model")}


def resolve_path(s: SessionState, model_path: str, model_type: str, into: Path) -> Path:
    """The local file ``model_path`` names: a path, or an MLflow URI (``models:/name/3``,
    ``runs:/<run id>/<path>``) of the workspace's store, downloaded into ``into``."""
    if not model_path.startswith(("models:/", "runs:/")):
        return Path(model_path).expanduser()
    try:
        if model_path.startswith("models:/"):  # the workspace's registry: models:/name/3, models:/name@alias
            ref = model_path[len("models:/"):].strip("/")
            name, _, rest = ref.replace("@", "/@", 1).partition("/")
            version = int(rest) if rest.isdigit() else None
            alias = rest[1:] if rest.startswith("@") else (rest or None) if version is None else None
            local = s.registry.local_path(s.registry.get(name, version, alias))
        else:
            import mlflow.artifacts

            s.registry.client  # noqa: B018 -- creates the workspace's store if it is new
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_path, dst_path=str(into),
                                                             tracking_uri=s.workspace.tracking_uri))
    except Exception as exc:
        first = str(getattr(exc, "message", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"{model_path}: not found in the workspace's MLflow store ({first[:200]})") from None
    if local.is_dir():
        found = sorted(p for p in local.rglob("*") if p.suffix.lower() in _SUFFIXES[model_type])
        if model_type == "xgboost":
            found = [p for p in found if p.name not in ("estimator.json", "model.json", "evaluation.json")] or found
        if not found:
            raise ModelImportError(f"{model_path}: holds no {model_type} file ({', '.join(_SUFFIXES[model_type])})")
        local = found[0]
    return local


def import_model(s: SessionState, step: P.CreateModelStep, params, aliases: list[str]) -> Result:
    """Import the model ``step`` names and register it as the next version of ``step.model``."""
    from mlsql.ml import imported as I

    name, opts = step.model, step.options
    mt = opts["model_type"]
    label = (opts.get("input_label_cols") or ["label"])[0]
    started = time.time()
    data = None
    if step.query is not None:
        data = s.engine.query(step.query, P.params_for(step.query, params))
        if data.num_rows == 0:
            raise MLSQLError(f"The example rows (AS SELECT) of model {name} are empty",
                             hint="They trace a torch program and check the import: give a few rows.")
    with tempfile.TemporaryDirectory(prefix="mlsql-import-") as tmp:
        path = resolve_path(s, str(opts["model_path"]), mt, Path(tmp) / "download")
        inputs = [c for c in data.column_names if c.lower() != label.lower()] if data is not None else None
        if mt == "xgboost":
            model = I.import_xgboost(path, label=label, feature_names=inputs)
        elif mt == "torch":
            model = I.import_onnx(path, label=label, output_cols=opts.get("output_cols"), model_type="torch",
                                  class_labels=opts.get("class_labels"),
                                  data=I.torch_to_onnx(path, _torch_rows(path, data, inputs)))
        else:
            model = I.import_onnx(path, label=label, output_cols=opts.get("output_cols"),
                                  class_labels=opts.get("class_labels"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        metrics = {}
        if data is not None:
            _check_columns(model, data, path)
            try:  # the rows really go through: shapes and types are checked now, not at the first ML.PREDICT
                model.predict(data)
                metrics = I.evaluation_of_rows(model, data)
            except MLSQLError as exc:
                raise ModelImportError(f"{path}: {exc.message}", hint=exc.hint) from None
        model.eval_metrics = metrics
        input_columns = [f.name for f in model.features]
        d = Path(tmp) / "model"
        model.save(d)
        meta = {
            "query_sql": step.query_sql or None,
            "query_params": None,
            "input_columns": input_columns,
            "training_stats": {},
            "training_schema": {f.name: str(f.type) for f in data.schema} if data is not None else {},
            "data_rows": data.num_rows if data is not None else 0,
            "query_dialect": "duckdb",
            "engine": s.engine.name,
            "imported_from": str(opts["model_path"]),
            "imported_sha256": digest,
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=1))
        given = {k: v for k, v in step.given.items() if k.lower() not in ("aliases", "alias")}
        examples = None
        if data is not None:
            sample = data.slice(0, 20)
            examples = (sample.select(input_columns), model.predict(sample))
        mv = s.registry.register(
            name, d, params={k: str(v) for k, v in given.items()}, metrics=metrics, sql=step.statement,
            tags={"model_type": mt, "label": label, "imported_from": str(opts["model_path"]),
                  "imported_sha256": digest, "data_rows": str(meta["data_rows"])},
            aliases=aliases, started=started, ended=time.time(), examples=examples,
        )
    outs = (", ".join(model.output_schema().names) if hasattr(model, "spec")
            else f"predicted_{label}" + (f", predicted_{label}_probs" if model.is_classifier else ""))
    table = pa.table({"model": [name], "version": [mv.version], "model_type": [mt],
                      "inputs": [", ".join(input_columns)], "outputs": [outs],
                      **{k: pa.array([v], pa.float64()) for k, v in metrics.items() if v is not None}})
    shown = "; " + ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items() if v is not None) if metrics else ""
    return Result(table, kind="create_model",
                  message=f"Imported model {name} version {mv.version} ({mt}) from {opts['model_path']}: "
                          f"reads {', '.join(input_columns)}; ML.PREDICT gives {outs}{shown}.")


def _check_columns(model, data: pa.Table, path: Path) -> None:
    """Every input the model reads is a column of the example rows, or an error naming the file,
    the inputs nothing feeds and the columns there are."""
    have = {c.lower() for c in data.column_names}
    missing = [f.name for f in model.features if f.name.lower() not in have]
    if missing:
        raise ModelImportError(
            f"{path}: no column of the AS SELECT feeds the model's input{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}",
            hint=f"The model reads {', '.join(f.name for f in model.features)}; the query gives "
                 f"{', '.join(data.column_names)}. Name each column after the input it feeds (AS ...).")


def _torch_rows(path: Path, data, inputs: list[str]) -> dict:
    """The example rows as forward()'s arguments, in column order: each column an array of the
    shape the program was exported with ([n, *per-row shape]), or of the column's own nesting
    (a TorchScript file records no shapes)."""
    import numpy as np

    from mlsql.ml import imported as I

    program, kind = I.load_torch(path)
    shapes: list = []
    if kind == "export":
        shapes = [list(n.meta["val"].shape[1:]) for n in program.graph.nodes
                  if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)]
    if kind == "export" and len(shapes) != len(inputs):
        raise ModelImportError(f"{path}: forward() takes {len(shapes)} tensor argument{'s' if len(shapes) != 1 else ''}, "
                               f"but the AS SELECT gives {len(inputs)} column{'s' if len(inputs) != 1 else ''} "
                               f"besides the label: {', '.join(inputs)}")
    rows = {}
    for i, c in enumerate(inputs):
        col = data.column(c)
        if kind == "export":
            dtype = {"torch.float32": "float", "torch.float64": "double", "torch.int64": "int64"}.get(
                str([n for n in program.graph.nodes if n.op == "placeholder"
                     and n.name in set(program.graph_signature.user_inputs)][i].meta["val"].dtype), "float")
            shape = [None, *[int(d) for d in shapes[i]]]
        else:
            dtype, shape, t = "float", [None], col.type
            while hasattr(t, "value_type") and (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)):
                shape.append(t.list_size if pa.types.is_fixed_size_list(t) else None)
                t = t.value_type
        elem = {"float": 1, "double": 11, "int64": 7}[dtype]
        try:
            rows[c] = I.column_feed(col, {"name": c, "elem": elem, "shape": shape}, c, f"{path}")
        except MLSQLError as exc:
            raise ModelImportError(exc.message, hint=exc.hint) from None
        rows[c] = np.ascontiguousarray(rows[c])
    return rows
