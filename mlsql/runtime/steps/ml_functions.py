"""ML table functions (``ML.PREDICT``, ``ML.EVALUATE``, ``ML.EXPLAIN_PREDICT``, ...): load a registered
model version and score the Arrow rows of its input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, ModelError, UnknownColumnError
from mlsql.language.options import validate
from mlsql.plan import planner as P
from mlsql.runtime.registry import ModelVersion
from mlsql.runtime.steps import SessionState

if TYPE_CHECKING:
    from mlsql.plan.transform import FittedTransform

TRANSFORM_FILE = "transform.json"
META_FILE = "mlsql_meta.json"


@dataclass
class LoadedModel:
    """A registered model version, loaded and ready to score Arrow tables."""

    version: ModelVersion
    model: Any  # mlsql.ml.TrainedModel
    transform: FittedTransform | None
    meta: dict

    @property
    def label(self) -> str:
        return self.model.label

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.model.features]


def load_model(s: SessionState, spec: P.ModelSpec) -> LoadedModel:
    """The model version ``spec`` names, loaded once per session."""
    mv = s.registry.get(spec.name, spec.version, spec.alias)
    key = (mv.name, mv.version)
    if key not in s.loaded_models:
        from mlsql.ml import TrainedModel
        from mlsql.plan.transform import FittedTransform

        path = s.registry.local_path(mv)
        model = TrainedModel.load(path)
        tf = path / TRANSFORM_FILE
        transform = FittedTransform.from_json(tf.read_text()) if tf.exists() else None
        meta_path = path / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        s.loaded_models[key] = LoadedModel(mv, model, transform, meta)
    return s.loaded_models[key]


def model_features(s: SessionState, lm: LoadedModel, data: pa.Table, *, need_label: bool, func: str) -> pa.Table:
    """The model's input columns (after TRANSFORM) for ``data``; label kept if present."""
    cols = data.column_names
    label = lm.label
    if need_label and label.lower() not in {c.lower() for c in cols} and lm.transform is None:
        raise UnknownColumnError(
            label, cols, message=f"ML.{func} input has no label column '{label}' for model {lm.version.ref}"
        )
    if lm.transform is not None:
        tmp = s.engine.temp_name("in")
        s.engine.register(tmp, data)
        try:
            sql = lm.transform.select_sql(tmp, cols, optional=set() if need_label else {label})
            data = s.engine.query(sql)
        finally:
            s.engine.unregister(tmp)
        cols = data.column_names
    by_lower = {c.lower(): c for c in cols}
    wanted = lm.feature_names + ([label] if label.lower() in by_lower else [])
    missing_inputs(lm.version.ref, lm.feature_names, cols, func, label=label)
    arrays, names = [], []
    for name in wanted:
        real = by_lower[name.lower()]
        arrays.append(data.column(real))
        names.append(name)
    out = pa.table(arrays, names=names)
    from mlsql.ml.features import check_input_types

    check_input_types(out, lm.model.features, where=f"ML.{func} with model {lm.version.ref}")
    return out


def model_inputs(lm: LoadedModel) -> list[str]:
    """The columns a model reads from its input rows: its features, or what its TRANSFORM reads
    to make them (the label's own columns left out)."""
    if lm.transform is None:
        return lm.feature_names
    out: dict[str, str] = {}
    for name in lm.transform.output_columns:
        if name.lower() != lm.label.lower():
            out.update({c.lower(): c for c in lm.transform.reads.get(name, []) if c.lower() not in out})
    return list(out.values())


def missing_inputs(ref: str, inputs: list[str], columns: list[str], func: str, *, label: str | None) -> None:
    """Every column of ``inputs`` (what model ``ref`` reads) must be among ``columns`` (its input
    rows'); else an ``UnknownColumnError`` naming all the missing ones and the model's inputs. A
    did-you-mean only offers a column not already used for something else: not one of the
    model's inputs (present, it is read as itself) nor the label."""
    have = {c.lower() for c in columns}
    missing = [c for c in inputs if c.lower() not in have]
    if not missing:
        return
    taken = {c.lower() for c in inputs} | ({label.lower()} if label else set())
    free = [c for c in columns if c.lower() not in taken]
    from mlsql.errors import did_you_mean

    guesses = [(m, did_you_mean(m, free)) for m in missing]
    guesses = [(m, g) for m, g in guesses if g]
    if len(missing) == 1:
        message = f"ML.{func} input has no column '{missing[0]}', which model {ref} needs"
        hint = f"Did you mean '{guesses[0][1]}'? " if guesses else ""
    else:
        message = (f"ML.{func} input has no columns {', '.join(repr(m) for m in missing)}, "
                   f"which model {ref} needs")
        hint = "".join(f"For '{m}', did you mean '{g}'? " for m, g in guesses)
    shown = inputs if len(inputs) <= 30 else [*inputs[:30], f"... ({len(inputs) - 30} more)"]
    hint += f"Model {ref} reads {len(inputs)} input column{'s' if len(inputs) != 1 else ''}: {', '.join(shown)}."
    err = UnknownColumnError(missing[0], free, message=message, hint=hint)
    err.function, err.missing = func, missing
    raise err


def _column_names(data) -> list[str]:
    """The columns of input rows: an Arrow table's, or a lazy engine frame's (Spark). Not by
    ``getattr``: on a Spark Connect DataFrame any attribute name is a column reference."""
    if isinstance(data, pa.Table | pa.RecordBatch):
        return list(data.column_names)
    return list(data.columns)


# the functions that score input rows with the model: the input must have every column it reads
_SCORING = ("PREDICT", "EXPLAIN_PREDICT", "EVALUATE", "CONFUSION_MATRIX", "ROC_CURVE")


def run_ml(s: SessionState, step: P.MLStep, params, charts: list | None = None) -> pa.Table:
    """One ML table function's rows (on Spark, PREDICT and EXPLAIN_PREDICT: a Spark DataFrame, run when
    the statement's query fetches its rows)."""
    func = step.func
    data = None
    # where the engine scores where its data is (Spark): PREDICT and EXPLAIN_PREDICT give a lazy
    # frame scored there, EVALUATE aggregates there
    scorer = (s.engine.executor_scorer() if func in ("PREDICT", "EXPLAIN_PREDICT", "EVALUATE")
              and not any(k.lower() == "device" for k in step.settings) else None)
    if step.input_sql is not None:
        read = s.engine.dataframe if scorer is not None else s.engine.query
        data = read(step.input_sql, P.params_for(step.input_sql, params))
    if func == "DEVICE_METRICS":
        from mlsql.deploy.remote import metrics_table

        if len(step.args) != 1 or not isinstance(step.args[0], str):
            raise MLSQLError("ML.DEVICE_METRICS takes one device name: ML.DEVICE_METRICS('my-device')")
        return metrics_table(s.devices.get(step.args[0]))
    if func == "JOB_RUNS":
        from mlsql.jobs.statements import job_runs_table

        return job_runs_table(s.workspace, step.args)
    if step.model is None:
        raise MLSQLError(f"ML.{func} is not available in this version of MLSQL")
    lm = load_model(s, step.model)
    model = lm.model
    st = validate(f"ML.{func}", step.settings)  # names, types and ranges: mlsql.language.options' table
    if data is not None and func in _SCORING:  # on every engine, before any scoring: one message
        missing_inputs(lm.version.ref, model_inputs(lm), _column_names(data), func, label=lm.label)
    if func == "PREDICT" and st.get("device"):
        from mlsql.deploy.remote import remote_predict

        data = _require_input(data, func, step)
        dev = s.devices.get(str(st["device"]))
        version = lm.version.version if (step.model.version or step.model.alias) else None
        preds = remote_predict(dev, lm.version.name, version, data, lm.label, model.classes, model.label_type)
        return _hconcat(preds, data)
    if scorer is not None and func in ("PREDICT", "EXPLAIN_PREDICT"):
        return scorer.predict(s.engine, lm, _require_input(data, func, step), func, st)
    if func == "PREDICT":
        data = _require_input(data, func, step)
        preds = model.predict(model_features(s, lm, data, need_label=False, func=func),
                              **({"threshold": float(st["threshold"])} if "threshold" in st else {}))
        return _hconcat(preds, data)
    if func == "EXPLAIN_PREDICT":
        data = _require_input(data, func, step)
        top_k = int(st.get("top_k_features", 5))
        out = model.explain_predict(model_features(s, lm, data, need_label=False, func=func), top_k=top_k)
        _chart(charts, "attribution", out)
        return _hconcat(out, data)
    if func == "EVALUATE":
        if data is None:
            metrics = dict(model.eval_metrics)
            _chart(charts, "evaluation", model.evaluation)  # the curves of the evaluation rows kept at training
        elif scorer is not None:
            ev = scorer.evaluate(s.engine, lm, data, float(st["threshold"]) if "threshold" in st else None)
            metrics = ev.metrics
            _chart(charts, "evaluation", ev)
        else:
            feats = model_features(s, lm, data, need_label=True, func=func)
            kw = {"threshold": float(st["threshold"])} if "threshold" in st else {}
            ev = model.evaluation_of(feats, **kw)  # metrics, ROC curve(s), confusion matrix in one pass
            metrics = ev.metrics
            _chart(charts, "evaluation", ev)
        return pa.table({k: pa.array([v], pa.float64()) for k, v in metrics.items()})
    if func == "FEATURE_IMPORTANCE":
        return _chart(charts, "importance", model.feature_importance())
    if func == "TRAINING_INFO":
        return _chart(charts, "loss", model.training_info)
    if func in ("CONFUSION_MATRIX", "ROC_CURVE"):
        data = _require_input(data, func, step)
        feats = model_features(s, lm, data, need_label=True, func=func)
        if func == "ROC_CURVE":
            return _chart(charts, "roc_table", model.roc_curve(feats))
        kw = {"threshold": float(st["threshold"])} if "threshold" in st else {}
        return _chart(charts, "confusion_table", model.confusion_matrix(feats, **kw))
    raise MLSQLError(f"ML.{func} is not available in this version of MLSQL")


def _chart(charts: list | None, kind: str, data):
    """Add the charts of ``data`` (mlsql.output.plots panels, drawn only when the result is shown) to
    ``charts``, the statement's; ``data`` back."""
    if charts is not None and data is not None:
        from mlsql.output import plots

        charts.extend(plots.panels(kind, data))
    return data


def _require_input(data, func: str, step) -> pa.Table:
    if data is None:
        raise MLSQLError(
            f"ML.{func} needs input rows",
            hint=f"Write ML.{func}(MODEL {step.model}, TABLE my_table) or ML.{func}(MODEL {step.model}, (SELECT ...)).",
        )
    return data


def _hconcat(new: pa.Table, data: pa.Table) -> pa.Table:
    """Prediction columns first, then the input columns (BigQuery ML's order)."""
    if new.num_rows != data.num_rows:
        raise ModelError(f"Model returned {new.num_rows} rows for {data.num_rows} input rows")
    taken = {c.lower() for c in new.column_names}
    names = list(new.column_names)
    arrays = list(new.columns)
    for name, col in zip(data.column_names, data.columns):
        if name.lower() not in taken:
            names.append(name)
            arrays.append(col)
    return pa.table(arrays, names=names)
