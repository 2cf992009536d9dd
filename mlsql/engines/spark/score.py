"""ML.PREDICT, ML.EXPLAIN_PREDICT and ML.EVALUATE on Spark, in the executors.

The model travels to the executors as pickled bytes inside the task (PySpark broadcasts a
large task on its own) and is unpickled once per Python worker; each Arrow batch of the
input goes through the same ``TrainedModel`` methods the DuckDB path calls on its one table
(``mapInArrow``), so the numbers are the same. PREDICT and EXPLAIN_PREDICT give a Spark
DataFrame that is only run when the user fetches rows; EVALUATE aggregates on the cluster:
sums for the regression metrics (``percentile`` for the median), confusion counts and the log
loss by one ``groupBy``, and ROC AUC exactly, from positive and negative counts per distinct
score (the Mann-Whitney statistic with ties counted half, what sklearn's ``roc_auc_score``
computes) rather than Spark ML's binned ``BinaryClassificationEvaluator``.

Nothing here is imported by ``import mlsql``.
"""

from __future__ import annotations

import hashlib
import pickle
from functools import partial

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from mlsql.errors import ModelError, UnknownColumnError
from mlsql.ml import metrics as M

FEATURE_PREFIX = "__mlsql_f"
_models: dict[str, object] = {}  # per Python worker: model bytes digest -> the unpickled model


def model_bytes(model) -> bytes:
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


def _model(blob: bytes):
    key = hashlib.sha1(blob).hexdigest()
    got = _models.get(key)
    if got is None:
        if len(_models) > 8:
            _models.clear()
        got = _models[key] = pickle.loads(blob)
    return got


# -- Spark and Arrow types ---------------------------------------------------------------------


def arrow_schema(df) -> pa.Schema:
    """The Arrow schema Spark's Arrow batches of ``df`` have."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.schema, error_on_duplicated_field_names_in_struct=False)


def _spark_type(t: pa.DataType):
    from pyspark.sql.pandas.types import from_arrow_type

    return from_arrow_type(t)


def _struct(schema: pa.Schema):
    from pyspark.sql.types import StructField, StructType

    return StructType([StructField(f.name, _spark_type(f.type), True) for f in schema])


def prediction_schema(model, func: str) -> pa.Schema:
    """The columns ML.PREDICT / ML.EXPLAIN_PREDICT / ML.DETECT_ANOMALIES put before the input's."""
    if func == "PREDICT" and hasattr(model, "output_schema"):  # an imported graph: its own outputs
        return pa.schema([pa.field(f.name, _listed(f.type)) for f in model.output_schema()])
    return model.prediction_schema(func)


def _listed(t: pa.DataType) -> pa.DataType:
    """Fixed-size arrays as Spark's arrays (it has no fixed-size form)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return pa.list_(_listed(t.value_type))
    return t


# -- the model's inputs as columns of the input DataFrame ---------------------------------------


def with_features(engine, lm, df, *, need_label: bool, func: str):
    """``df`` with the model's inputs added as ``__mlsql_f<i>`` columns (through the TRANSFORM when the
    model has one), and which column holds each feature and the label: ``(frame, {name: column})``.
    Errors are the ones the DuckDB path gives for the same input."""
    from mlsql.ml.features import check_input_types

    model = lm.model
    cols = df.columns
    label = lm.label or ""  # kmeans, pca: no label ("" is no column's name)
    need_label = need_label and bool(label)
    if need_label and label.lower() not in {c.lower() for c in cols} and lm.transform is None:
        raise UnknownColumnError(label, cols,
                                 message=f"ML.{func} input has no label column '{label}' for model {lm.version.ref}")
    if lm.transform is not None:
        tmp = engine.temp_name("in")
        engine.register(tmp, df)
        select = sqlglot.parse_one(lm.transform.select_sql(tmp, cols, optional=set() if need_label or not label
                                                           else {label}),
                                   read="duckdb")
        produced = {}
        for i, item in enumerate(select.expressions):
            produced[item.alias_or_name] = f"{FEATURE_PREFIX}{i}"
            item.set("alias", exp.to_identifier(f"{FEATURE_PREFIX}{i}"))
        select = select.select(exp.Star())
        frame = engine.dataframe(select)
        available = list(produced)
    else:
        frame, produced, available = df, {c: c for c in cols}, cols
    by_lower = {c.lower(): c for c in available}
    wanted = lm.feature_names + ([label] if label and label.lower() in by_lower else [])
    where = {}
    for name in wanted:
        real = by_lower.get(name.lower())
        if real is None:
            raise UnknownColumnError(name, available,
                                     message=f"ML.{func} input has no column '{name}', which model {lm.version.ref} needs")
        where[name] = produced[real]
    schema = arrow_schema(frame.select(*[f"`{c}`" for c in where.values()]))
    empty = pa.Table.from_batches([], schema).rename_columns(list(where))
    check_input_types(empty, model.features, where=f"ML.{func} with model {lm.version.ref}")
    return frame, where


def _inputs(batch: pa.RecordBatch, where: dict[str, str]) -> pa.Table:
    return pa.Table.from_batches([batch]).select(list(where.values())).rename_columns(list(where))


# -- PREDICT and EXPLAIN_PREDICT ----------------------------------------------------------------


def predict(engine, lm, df, func: str, settings: dict):
    """ML.PREDICT / ML.EXPLAIN_PREDICT of ``df`` as a Spark DataFrame: prediction columns first,
    then the input's columns (BigQuery ML's order), scored batch by batch in the executors."""
    model = lm.model
    frame, where = with_features(engine, lm, df, need_label=False, func=func)
    head = prediction_schema(model, func)
    taken = {n.lower() for n in head.names}
    keep = [c for c in df.columns if c.lower() not in taken]
    raw = arrow_schema(frame.select(*[f"`{c}`" for c in keep])) if keep else pa.schema([])
    out = pa.schema(list(head) + list(raw))
    kw = {}
    if func == "EXPLAIN_PREDICT":
        kw["top_k"] = int(settings.get("top_k_features", 5))
    elif func == "DETECT_ANOMALIES":
        kw["contamination"] = float(settings["contamination"])
    elif "threshold" in settings:
        kw["threshold"] = float(settings["threshold"])
    fn = partial(_score_batches, model_bytes(model), func, where, head, keep, kw)
    return frame.mapInArrow(fn, _struct(out))


def _score_batches(blob, func, where, head, keep, kw, batches):
    model = _model(blob)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        feats = _inputs(batch, where)
        run = {"EXPLAIN_PREDICT": model.explain_predict, "DETECT_ANOMALIES": model.detect_anomalies,
               "GENERATE_EMBEDDING": getattr(model, "generate_embedding", None)}.get(func, model.predict)
        got = run(feats, **kw)
        arrays = [got.column(f.name).cast(f.type) for f in head]
        names = list(head.names) + keep
        arrays += [batch.column(c) for c in keep]
        yield pa.RecordBatch.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                          for a in arrays], names=names)


# -- EVALUATE -------------------------------------------------------------------------------------


def evaluate(engine, lm, df, threshold: float | None = None) -> M.Evaluation:
    """ML.EVALUATE of ``df``: the metrics of ``TrainedModel.evaluate`` (and a classifier's confusion
    matrix), aggregated on the cluster."""
    frame, where = with_features(engine, lm, df, need_label=True, func="EVALUATE")
    if not lm.model.supervised:  # kmeans, pca: their sums per batch, added up here
        return unsupervised_metrics(lm.model, frame, where)
    if lm.label not in where:
        raise UnknownColumnError(lm.label, df.columns, message=f"Input has no label column '{lm.label}'")
    return metrics(engine, lm.model, frame, where, threshold)


def unsupervised_metrics(model, frame, where: dict[str, str] | None, encoded_width: int | None = None) -> M.Evaluation:
    """ML.EVALUATE of a kmeans or pca model: each batch's sums (``mlsql.ml.kmeans.evaluation_sums``,
    ``mlsql.ml.pca.evaluation_sums``) computed where the rows are, combined on the driver by the
    same code that combines the DuckDB path's one batch. ``encoded_width``: ``frame`` holds the
    encoded matrix (float columns f0, f1, ...) instead of the model's inputs."""
    import importlib
    import json

    module = importlib.import_module(f"mlsql.ml.{model.model_type}")
    fn = partial(_evaluation_sums, model_bytes(model), where, encoded_width)
    parts = [json.loads(r["s"]) for r in frame.mapInArrow(fn, "s string").collect()]
    return module.combine_evaluation(model.estimator, parts)


def _evaluation_sums(blob, where, width, batches):
    import importlib
    import json

    model = _model(blob)
    module = importlib.import_module(f"mlsql.ml.{model.model_type}")
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if width is None:
            X = model.encode(_inputs(batch, where))
        else:
            X = np.column_stack([batch.column(j).to_numpy(zero_copy_only=False) for j in range(width)])
        yield pa.RecordBatch.from_arrays([pa.array([json.dumps(module.evaluation_sums(model.estimator, X))])],
                                         names=["s"])


def metrics(engine, model, frame, where: dict[str, str] | None, threshold: float | None = None,
            encoded_width: int | None = None) -> M.Evaluation:
    """Evaluation metrics of ``model`` on ``frame`` (features and label in the columns ``where``
    names), BigQuery ML's names and the values ``mlsql.ml.metrics`` gives on the same rows; for a
    classifier with its confusion matrix and ROC curves.

    ``encoded_width``: ``frame`` holds the encoded matrix instead (float columns f0, f1, ...,
    then the label's value or class code), as CREATE MODEL's training pass made it."""
    F = engine._functions()
    k = len(model.classes) if model.is_classifier else 0
    out = pa.schema([("y", pa.float64()), ("pred", pa.float64())]) if not k else pa.schema(
        [("code", pa.int64()), ("pred", pa.int64()), ("logp", pa.float64())]
        + [(f"p{c}", pa.float64()) for c in range(k)])
    if encoded_width is None:
        fn = partial(_evaluate_batches, model_bytes(model), where, threshold)
    else:
        fn = partial(_evaluate_encoded, model_bytes(model), encoded_width, threshold)
    scored = frame.mapInArrow(fn, _struct(out))
    if not k:
        return _regression(F, scored, model)
    scored = scored.persist()
    try:
        return _classification(F, scored, model, k)
    finally:
        scored.unpersist()


def _evaluate_batches(blob, where, threshold, batches):
    model = _model(blob)
    for batch in batches:
        table = _inputs(batch, where)
        label = table.column(model.label)
        if model.is_classifier:
            codes, valid = model._codes(table)
        else:
            y = label.cast(pa.float64()).to_numpy(zero_copy_only=False)
            valid = ~np.isnan(y)
            codes = y
        if not valid.all():
            table = table.filter(pa.array(valid))
            codes = codes[valid]
        if table.num_rows == 0:
            continue
        yield _scored(model, model.estimator.predict_raw(model.encode(table)), codes, threshold)


def _evaluate_encoded(blob, width, threshold, batches):
    model = _model(blob)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        X = np.column_stack([batch.column(j).to_numpy(zero_copy_only=False) for j in range(width)])
        y = batch.column(width).to_numpy(zero_copy_only=False)
        yield _scored(model, model.estimator.predict_raw(X.astype(np.float32, copy=False)),
                      y.astype(np.int64) if model.is_classifier else y, threshold)


def _scored(model, raw: np.ndarray, codes: np.ndarray, threshold: float | None) -> pa.RecordBatch:
    """One batch of what the metrics aggregate: label and prediction (a classifier: class codes,
    the log probability of the true class, each class's probability)."""
    if not model.is_classifier:
        return pa.RecordBatch.from_arrays([pa.array(codes, pa.float64()), pa.array(raw, pa.float64())],
                                          names=["y", "pred"])
    n, k = raw.shape
    if k == 2:  # as mlsql.ml.metrics.classification_metrics decides a binary prediction
        pred = (raw[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    else:
        pred = raw.argmax(axis=1)
    logp = np.log(np.clip(raw[np.arange(n), codes], M.EPS, 1.0))
    arrays = [pa.array(codes.astype(np.int64)), pa.array(pred), pa.array(logp)]
    arrays += [pa.array(raw[:, c]) for c in range(k)]
    return pa.RecordBatch.from_arrays(arrays, names=["code", "pred", "logp"] + [f"p{c}" for c in range(k)])


def _no_rows(model) -> ModelError:
    return ModelError(f"No rows with a known label '{model.label}' to evaluate on")


def _regression(F, scored, model) -> dict:
    err = F.col("pred") - F.col("y")
    row = scored.agg(
        F.count(F.lit(1)).alias("n"),
        F.avg(F.abs(err)).alias("mae"),
        F.avg(err * err).alias("mse"),
        F.min("y").alias("min_y"), F.min("pred").alias("min_pred"),
        F.avg(F.pow(F.log1p("pred") - F.log1p("y"), 2)).alias("msle"),
        F.percentile(F.abs(err), F.lit(0.5)).alias("medae"),
        F.var_pop("y").alias("var_y"), F.var_pop(err).alias("var_err"),
    ).first()
    if not row["n"]:
        raise _no_rows(model)
    var = float(row["var_y"])
    mse = float(row["mse"])
    msle = float(row["msle"]) if row["min_y"] > -1 and row["min_pred"] > -1 else None
    return M.Evaluation({
        "mean_absolute_error": float(row["mae"]),
        "mean_squared_error": mse,
        "mean_squared_log_error": msle,
        "median_absolute_error": float(row["medae"]),
        "r2_score": 1.0 - mse / var if var > 0 else 0.0,
        "explained_variance": 1.0 - float(row["var_err"]) / var if var > 0 else 0.0,
    }, rows=int(row["n"]))


def _classification(F, scored, model, k: int) -> dict:
    rows = scored.groupBy("code", "pred").agg(F.count(F.lit(1)).alias("n"), F.sum("logp").alias("logp")).collect()
    cm = np.zeros((k, k), dtype=np.int64)
    logp = 0.0
    for r in rows:
        cm[r["code"], r["pred"]] += r["n"]
        logp += r["logp"]
    n = int(cm.sum())
    if n == 0:
        raise _no_rows(model)
    if k == 2:
        tp, fp, fn = int(cm[1, 1]), int(cm[0, 1]), int(cm[1, 0])
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        auc, curve = _auc(F, scored, 1, cm, str(model.classes[1]))
        curves = [curve] if curve is not None else []
    else:
        precs, recs, aucs, curves = [], [], [], []
        for c in range(k):
            said, is_c = int(cm[:, c].sum()), int(cm[c, :].sum())
            precs.append(cm[c, c] / said if said else 0.0)
            recs.append(cm[c, c] / is_c if is_c else 0.0)
            a, curve = _auc(F, scored, c, cm, str(model.classes[c]))
            if a is not None:
                aucs.append(a)
                curves.append(curve)
        precision, recall = float(np.mean(precs)), float(np.mean(recs))
        auc = float(np.mean(aucs)) if aucs else None
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return M.Evaluation({
        "precision": float(precision),
        "recall": float(recall),
        "accuracy": float(np.trace(cm) / n),
        "f1_score": float(f1),
        "log_loss": float(-logp / n),
        "roc_auc": auc,
    }, list(model.classes), curves, cm, n)


def _auc(F, scored, c: int, cm: np.ndarray, label: str = "", max_points: int = 2000):
    """Exact ROC AUC of class ``c`` against the rest, and its ROC curve for the picture:
    ``(auc, RocCurve)``, ``(None, None)`` when one side is absent.

    From the positives ``p`` and negatives ``q`` at each distinct score, summed on the cluster:
    AUC = Σ p·(negatives below + q/2) / (positives × negatives), ties counted half (sklearn's
    ``roc_auc_score``). The curve is the exact one (true and false positives at or above each
    distinct score, highest first) at no more than ``max_points`` of those scores, evenly
    spaced in rank, the last always kept: only these points come to the driver."""
    from pyspark.sql import Window

    n_pos = int(cm[c, :].sum())
    n_neg = int(cm.sum()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None, None
    pos = (F.col("code") == c).cast("long")
    per_score = scored.groupBy(F.col(f"p{c}").alias("s")).agg(F.sum(pos).alias("p"), F.sum(1 - pos).alias("q"))
    down = Window.orderBy(F.desc("s"))
    upto = down.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    ranked = (per_score.withColumn("tp", F.sum("p").over(upto)).withColumn("fp", F.sum("q").over(upto))
              .withColumn("rank", F.row_number().over(down))
              # negatives strictly below this score = all negatives − those at or above it
              .withColumn("u", F.col("p") * (F.lit(n_neg) - F.col("fp") + F.col("q") / 2.0)).persist())
    try:
        total, m = ranked.agg(F.sum("u"), F.count(F.lit(1))).first()
        step = max(1, -(-int(m) // max_points))
        pts = ranked.where((F.col("rank") % step == 0) | (F.col("rank") == m)).orderBy("rank") \
            .select("s", "tp", "fp").collect()
    finally:
        ranked.unpersist()
    auc = float(total) / (n_pos * n_neg)
    thr = np.array([np.inf] + [float(r["s"]) for r in pts])
    tpr = np.array([0.0] + [r["tp"] / n_pos for r in pts])
    fpr = np.array([0.0] + [r["fp"] / n_neg for r in pts])
    return auc, M.RocCurve(label, fpr, tpr, thr, auc)
