"""ML table functions (``ML.PREDICT``, ``ML.EVALUATE``, ``ML.EXPLAIN_PREDICT``, ...): load a registered
model version and score the Arrow rows of its input."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, ModelError, UnknownColumnError
from mlsql.plan import planner as P
from mlsql.runtime.registry import ModelVersion
from mlsql.runtime.steps import SessionState

if TYPE_CHECKING:
    from mlsql.plan.transform import FittedTransform

TRANSFORM_FILE = "transform.json"
META_FILE = "mlsql_meta.json"
TRIALS_FILE = "trials.json"  # a tuned model's trials (ML.TRIAL_INFO); their models in trials/<trial_id>/


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


def load_model(s: SessionState, spec: P.ModelSpec, trial_id: int | None = None) -> LoadedModel:
    """The model version ``spec`` names, loaded once per session; of a tuned model, the optimal
    trial's model, or trial ``trial_id``'s (BigQuery ML's STRUCT(3 AS trial_id))."""
    mv = s.registry.get(spec.name, spec.version, spec.alias)
    key = (mv.name, mv.version) if trial_id is None else (mv.name, mv.version, int(trial_id))
    if key not in s.loaded_models:
        from mlsql.ml.imported import load_any
        from mlsql.plan.transform import FittedTransform

        path = s.registry.local_path(mv)
        model_path = path if trial_id is None else trial_folder(path, mv.ref, int(trial_id))
        model = load_any(model_path)  # a TrainedModel, or an ImportedModel (an ONNX graph)
        tf = path / TRANSFORM_FILE
        transform = FittedTransform.from_json(tf.read_text()) if tf.exists() else None
        meta_path = path / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        s.loaded_models[key] = LoadedModel(mv, model, transform, meta)
    return s.loaded_models[key]


def trial_folder(path, ref: str, trial_id: int):
    """Where trial ``trial_id`` of the tuned model at ``path`` is kept, or an error saying which trials exist."""
    trials = path / TRIALS_FILE
    if not trials.exists():
        raise MLSQLError(f"Model {ref} was not tuned: it has no trial {trial_id}",
                         hint="trial_id selects a trial of a model trained with num_trials.")
    rows = json.loads(trials.read_text())
    row = next((r for r in rows if r["trial_id"] == trial_id), None)
    if row is None:
        raise MLSQLError(f"Model {ref} has no trial {trial_id}",
                         hint=f"Its trials: {', '.join(str(r['trial_id']) for r in rows)}.")
    if row["status"] != "SUCCEEDED":
        raise MLSQLError(f"Trial {trial_id} of model {ref} has no model: it {row['status'].lower()}",
                         hint=row.get("error_message") or None)
    return path / "trials" / str(trial_id)


def _trial_info(c: Call):
    from mlsql.ml.tuning import trial_info

    path = c.s.registry.local_path(c.lm.version) / TRIALS_FILE
    if not path.exists():
        raise MLSQLError(f"Model {c.lm.version.ref} was not tuned: ML.TRIAL_INFO has no trials to show",
                         hint="Train it with OPTIONS (num_trials = 10, ...) to tune it.")
    data = json.loads(path.read_text())
    out = trial_info(data)
    objective = c.lm.meta.get("tuning_objective") or (
        "roc_auc" if c.lm.model.is_classifier else "r2_score")
    c.chart("trials", {"trials": data, "objective": objective})
    return out


def model_features(s: SessionState, lm: LoadedModel, data: pa.Table, *, need_label: bool, func: str) -> pa.Table:
    """The model's input columns (after TRANSFORM) for ``data``; label kept if present."""
    cols = data.column_names
    label = lm.label or ""  # kmeans, pca: no label ("" is no column's name)
    need_label = need_label and bool(label)
    if need_label and label.lower() not in {c.lower() for c in cols} and lm.transform is None:
        raise UnknownColumnError(
            label, cols, message=f"ML.{func} input has no label column '{label}' for model {lm.version.ref}"
        )
    if lm.transform is not None:
        tmp = s.engine.temp_name("in")
        s.engine.register(tmp, data)
        try:
            sql = lm.transform.select_sql(tmp, cols, optional=set() if need_label or not label else {label})
            data = s.engine.query(sql)
        finally:
            s.engine.unregister(tmp)
        cols = data.column_names
    by_lower = {c.lower(): c for c in cols}
    wanted = lm.feature_names + ([label] if label and label.lower() in by_lower else [])
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
        if name.lower() != (lm.label or "").lower():
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


@dataclass
class Call:
    """One ML function's call as its handler sees it: the session, the planned step, its input rows
    (Arrow, or the engine's lazy frame where it scores where the data is), the loaded model, the
    checked STRUCT settings, the engine's scorer (or None) and the statement's charts."""

    s: SessionState
    step: P.MLStep
    data: Any
    lm: LoadedModel | None
    settings: dict
    scorer: Any
    charts: list | None
    params: dict | None = None  # the statement's parameters, for a handler that reads its input itself

    @property
    def model(self):
        return self.lm.model

    def rows(self) -> pa.Table:
        """The input rows, or an error saying how to give them."""
        return _require_input(self.data, self.step.func, self.step)

    def features(self, need_label: bool) -> pa.Table:
        return model_features(self.s, self.lm, self.rows(), need_label=need_label, func=self.step.func)

    def chart(self, kind: str, data):
        return _chart(self.charts, kind, data)

    def threshold(self) -> dict:
        return {"threshold": float(self.settings["threshold"])} if "threshold" in self.settings else {}


@dataclass(frozen=True)
class MLFunctionSpec:
    """What the runner needs to know of an ML function: ``run`` computes its rows; ``model``: it
    takes MODEL m; ``scores``: it reads its input through the model (so the input is checked for
    every column the model reads, on every engine, before anything runs); ``in_executors``: an
    engine with an ``executor_scorer`` computes it where its data is; ``reads_rows``: its input's
    rows are fetched for it (else it sends its own aggregate queries over ``step.input``)."""

    run: Callable[[Call], Any]
    model: bool = True
    scores: bool = False
    in_executors: bool = False
    reads_rows: bool = True


def _predict(c: Call):
    if c.settings.get("device"):
        from mlsql.deploy.remote import remote_predict

        data, model = c.rows(), c.model
        dev = c.s.devices.get(str(c.settings["device"]))
        version = c.lm.version.version if (c.step.model.version or c.step.model.alias) else None
        if not model.supervised:  # kmeans, pca: the graph's outputs, as ML.PREDICT names them
            from mlsql.deploy.remote import remote_outputs

            outs = remote_outputs(dev, c.lm.version.name, version, data, model.graph_outputs())
            return _hconcat(model.predictions_from_outputs(outs), data)
        preds = remote_predict(dev, c.lm.version.name, version, data, c.lm.label, model.classes, model.label_type)
        return _hconcat(preds, data)
    if c.scorer is not None:
        return c.scorer.predict(c.s.engine, c.lm, c.rows(), "PREDICT", c.settings)
    return _hconcat(c.model.predict(c.features(need_label=False), **c.threshold()), c.data)


def _explain_predict(c: Call):
    if not c.model.supervised:  # kmeans, pca: refused here, not in an executor
        return c.model.explain_predict(c.rows())
    if getattr(c.model, "onnx_bytes", None) is not None:  # an imported graph: refused before any engine work
        c.model.explain_predict(None)
    if c.scorer is not None:
        return c.scorer.predict(c.s.engine, c.lm, c.rows(), "EXPLAIN_PREDICT", c.settings)
    out = c.model.explain_predict(c.features(need_label=False), top_k=int(c.settings.get("top_k_features", 5)))
    c.chart("attribution", out)
    return _hconcat(out, c.data)


def _evaluate(c: Call):
    if c.model.model_type == "arima_plus":
        return _forecasting("evaluate")(c)
    if c.data is None:
        metrics = dict(c.model.eval_metrics)
        c.chart("evaluation", c.model.evaluation)  # the curves of the evaluation rows kept at training
    else:
        if c.scorer is not None:
            ev = c.scorer.evaluate(c.s.engine, c.lm, c.data, c.threshold().get("threshold"))
        else:  # metrics, ROC curve(s), confusion matrix in one pass
            ev = c.model.evaluation_of(c.features(need_label=True), **c.threshold())
        metrics = ev.metrics
        c.chart("evaluation", ev)
    return pa.table({k: pa.array([v], pa.float64()) for k, v in metrics.items()})


def _unsupervised(c: Call, kind: str, func: str):
    """The model of ``c``, which must be a ``kind`` model (kmeans, pca) for ``func``."""
    if c.model.model_type != kind:
        raise ModelError(f"ML.{func} is available for {kind} models, not {c.model.model_type}",
                         hint={"kmeans": "Train one with OPTIONS (model_type = 'kmeans', num_clusters = 4).",
                               "pca": "Train one with OPTIONS (model_type = 'pca', num_principal_components = 3)."
                               }[kind])
    return c.model


def _detect_anomalies(c: Call):
    """ML.DETECT_ANOMALIES: a small dispatch on the model's type; each type computes its own
    anomalies (mlsql.ml.kmeans.detect_anomalies, mlsql.ml.pca.detect_anomalies,
    mlsql.runtime.steps.forecast.detect_anomalies). kmeans and pca score in the executors on Spark;
    arima_plus brings a lazy frame's rows to the driver (forecast._rows)."""
    model = c.model
    if model.model_type == "arima_plus":  # the history, or new rows, against the forecast's intervals
        return _forecasting("detect_anomalies")(c)
    if model.model_type in ("kmeans", "pca"):
        if "contamination" not in c.settings:
            raise MLSQLError(f"ML.DETECT_ANOMALIES of a {model.model_type} model needs STRUCT(x AS contamination)",
                             hint=f"For example: ML.DETECT_ANOMALIES(MODEL {c.step.model}, STRUCT(0.02 AS "
                                  "contamination), TABLE t): the share of training rows that count as anomalies.")
        contamination = float(c.settings["contamination"])
        if c.scorer is not None:
            return c.scorer.predict(c.s.engine, c.lm, c.rows(), "DETECT_ANOMALIES", c.settings)
        return _hconcat(model.detect_anomalies(c.features(need_label=False), contamination), c.rows())
    return model.detect_anomalies(None, 0.0)  # says which model types it takes


def _generate_embedding(c: Call):
    """ML.GENERATE_EMBEDDING of a pca model: each row's principal components as one array (Spark: in
    the executors, as ML.PREDICT)."""
    model = _unsupervised(c, "pca", "GENERATE_EMBEDDING")
    if c.scorer is not None:
        return c.scorer.predict(c.s.engine, c.lm, c.rows(), "GENERATE_EMBEDDING", c.settings)
    return _hconcat(model.generate_embedding(c.features(need_label=False)), c.data)


def _device_metrics(c: Call):
    from mlsql.deploy.remote import metrics_table

    if len(c.step.args) != 1 or not isinstance(c.step.args[0], str):
        raise MLSQLError("ML.DEVICE_METRICS takes one device name: ML.DEVICE_METRICS('my-device')")
    from mlsql.deploy.data import online_metrics

    dev = c.s.devices.get(c.step.args[0])
    return metrics_table(dev, online=lambda info: online_metrics(
        lambda name, version: load_model(c.s, P.ModelSpec(name, version)), dev, info))


def _device_data(c: Call):
    from mlsql.deploy.data import device_data

    if len(c.step.args) != 1 or not isinstance(c.step.args[0], str):
        raise MLSQLError("ML.DEVICE_DATA takes a device or device group name first: "
                         "ML.DEVICE_DATA('my-device' [, MODEL m] [, STRUCT(TIMESTAMP '...' AS since)])")
    lm = load_model(c.s, c.step.model) if c.step.model is not None else None
    return device_data(c.s.devices, c.step.args[0], lm, model_inputs(lm) if lm is not None else [], c.settings)


def _experiment_results(c: Call):
    if len(c.step.args) != 1 or not isinstance(c.step.args[0], str):
        raise MLSQLError("ML.EXPERIMENT_RESULTS takes one experiment name: ML.EXPERIMENT_RESULTS('my_experiment')")
    from mlsql.runtime.steps.experiments import results_table

    return results_table(c.s, c.step.args[0], load_model)


def _validation(name: str):
    """A handler of mlsql.runtime.steps.validation, imported on first use."""

    def run(c: Call):
        from mlsql.runtime.steps import validation

        return getattr(validation, name)(c)

    return run


def _profile(c: Call):
    from mlsql.runtime.steps.profile import profile

    return profile(c)


def _forecasting(name: str):
    """A handler of mlsql.runtime.steps.forecast (arima_plus), imported on first use."""

    def run(c: Call):
        from mlsql.runtime.steps import forecast

        return getattr(forecast, name)(c)

    return run


def _job_runs(c: Call):
    from mlsql.jobs.statements import job_runs_table

    return job_runs_table(c.s.workspace, c.step.args)


def _compare_models(c: Call):
    """ML.COMPARE_MODELS (mlsql.runtime.steps.compare): every listed model loaded and its inputs
    checked before any is scored, then each evaluated as ML.EVALUATE does, on the same rows."""
    from mlsql.runtime.steps.compare import comparison, model_specs, one_kind

    specs = model_specs(c.step.args)
    data = c.rows()
    loaded = [(ref, load_model(c.s, spec)) for ref, spec in specs]
    classifier = one_kind(loaded)
    cols = _column_names(data)
    for _, lm in loaded:  # one message, before anything is scored
        missing_inputs(lm.version.ref, model_inputs(lm), cols, "COMPARE_MODELS", label=lm.label)
        if lm.label.lower() not in {x.lower() for x in cols} and lm.transform is None:
            raise UnknownColumnError(lm.label, cols, message=(
                f"ML.COMPARE_MODELS input has no label column '{lm.label}' for model {lm.version.ref}"))
    threshold = c.threshold()
    evaluations = []
    for _, lm in loaded:
        if c.scorer is not None:  # Spark: each model's metrics aggregated in the executors
            evaluations.append(c.scorer.evaluate(c.s.engine, lm, data, threshold.get("threshold")))
        else:
            feats = model_features(c.s, lm, data, need_label=True, func="COMPARE_MODELS")
            evaluations.append(lm.model.evaluation_of(feats, **threshold))
    table, charts = comparison(loaded, evaluations, c.settings.get("order_by"), classifier)
    c.chart("compare", charts)
    return table


def _features_at(c: Call):
    from mlsql.runtime.steps.feature_views import features_at

    return features_at(c)


def _alert_history(c: Call):
    from mlsql.jobs.alert_statements import alert_history_table

    return alert_history_table(c.s.workspace, c.step.args)


# name -> how to run it; the language parses ML.<name>(...) for the names in
# mlsql.language.functions.ML_FUNCTIONS, and the options table checks their STRUCT settings
ML_FUNCTIONS: dict[str, MLFunctionSpec] = {
    "PREDICT": MLFunctionSpec(_predict, scores=True, in_executors=True),
    "EXPLAIN_PREDICT": MLFunctionSpec(_explain_predict, scores=True, in_executors=True),
    "EVALUATE": MLFunctionSpec(_evaluate, scores=True, in_executors=True),
    "CONFUSION_MATRIX": MLFunctionSpec(
        lambda c: c.chart("confusion_table", c.model.confusion_matrix(c.features(need_label=True), **c.threshold())),
        scores=True),
    "ROC_CURVE": MLFunctionSpec(lambda c: c.chart("roc_table", c.model.roc_curve(c.features(need_label=True))),
                                scores=True),
    "FEATURE_IMPORTANCE": MLFunctionSpec(lambda c: c.chart("importance", c.model.feature_importance())),
    "TRAINING_INFO": MLFunctionSpec(lambda c: c.chart("loss", c.model.training_info)),
    "WEIGHTS": MLFunctionSpec(lambda c: c.model.weights(standardize=bool(c.settings.get("standardize")))),
    "CENTROIDS": MLFunctionSpec(lambda c: _unsupervised(c, "kmeans", "CENTROIDS").centroids(
        standardize=bool(c.settings.get("standardize")))),
    "DETECT_ANOMALIES": MLFunctionSpec(_detect_anomalies, scores=True, in_executors=True),
    "GENERATE_EMBEDDING": MLFunctionSpec(_generate_embedding, scores=True, in_executors=True),
    "PRINCIPAL_COMPONENTS": MLFunctionSpec(lambda c: _unsupervised(c, "pca", "PRINCIPAL_COMPONENTS").components()),
    "PRINCIPAL_COMPONENT_INFO": MLFunctionSpec(
        lambda c: _unsupervised(c, "pca", "PRINCIPAL_COMPONENT_INFO").component_info()),
    "TRIAL_INFO": MLFunctionSpec(_trial_info),
    "FORECAST": MLFunctionSpec(_forecasting("forecast")),
    "EXPLAIN_FORECAST": MLFunctionSpec(_forecasting("explain_forecast")),
    "ARIMA_EVALUATE": MLFunctionSpec(_forecasting("arima_evaluate")),
    "ARIMA_COEFFICIENTS": MLFunctionSpec(_forecasting("arima_coefficients")),
    "DEVICE_METRICS": MLFunctionSpec(_device_metrics, model=False),
    "DEVICE_DATA": MLFunctionSpec(_device_data, model=False),
    "JOB_RUNS": MLFunctionSpec(_job_runs, model=False),
    "EXPERIMENT_RESULTS": MLFunctionSpec(_experiment_results, model=False),
    "VALIDATE_DATA_SKEW": MLFunctionSpec(_validation("validate_skew"), reads_rows=False),
    "VALIDATE_DATA_DRIFT": MLFunctionSpec(_validation("validate_drift"), model=False, reads_rows=False),
    "DESCRIBE_DATA": MLFunctionSpec(_validation("describe_data"), model=False, reads_rows=False),
    "ALERT_HISTORY": MLFunctionSpec(_alert_history, model=False),
    "COMPARE_MODELS": MLFunctionSpec(_compare_models, model=False, in_executors=True),
    "PROFILE": MLFunctionSpec(_profile),
    "FEATURES_AT": MLFunctionSpec(_features_at, model=False, reads_rows=False),
}


def run_ml(s: SessionState, step: P.MLStep, params, charts: list | None = None) -> pa.Table:
    """One ML table function's rows (on Spark, PREDICT and EXPLAIN_PREDICT: a Spark DataFrame, run when
    the statement's query fetches its rows)."""
    spec = ML_FUNCTIONS.get(step.func)
    if spec is None or (spec.model and step.model is None):
        raise MLSQLError(f"ML.{step.func} is not available in this version of MLSQL")
    # where the engine scores where its data is (Spark): PREDICT and EXPLAIN_PREDICT give a lazy
    # frame scored there, EVALUATE aggregates there; a device's predictions come back as Arrow
    scorer = s.engine.executor_scorer() if spec.in_executors and not step.settings.get("device") else None
    data = None
    if step.input is not None and spec.reads_rows:
        read = s.engine.dataframe if scorer is not None else s.engine.query
        data = read(step.input, P.params_for(step.input, params))
    lm = load_model(s, step.model, step.settings.get("trial_id")) if spec.model else None
    if data is not None and spec.scores:  # on every engine, before any scoring: one message
        missing_inputs(lm.version.ref, model_inputs(lm), _column_names(data), step.func, label=lm.label)
    return spec.run(Call(s, step, data, lm, step.settings, scorer, charts, params))


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
